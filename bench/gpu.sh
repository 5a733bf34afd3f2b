#!/usr/bin/env bash
# The CUDA path end to end in one prepared command (issue 25), sized for 10 minutes of one H100 (default
# --budget 500 s for steps 1-5, each step also capped; the machine's start and the transfers come on top):
#
#   0. wheels: .whl/*.whl (what the GPU image lacks, see --fetch-wheels) installed into /tmp/wsss-site, the
#      repository put on PYTHONPATH (no pip install -e: nothing is built), the dependencies' versions printed;
#   1. tests: pytest -m cuda (tests/test_cuda.py); with --device cpu the fake-CUDA tests (tests/test_fake_cuda.py);
#   2. train: a synthetic dataset in the VOC layout (bench/_common.py: 8 train, 2 val images, 375 x 500) and
#      `wsss train voc` on it: MiT-B1, random init, crop 512, 2 images, bf16, 12 iterations through the
#      CAM warm-up, the PAR label and the AFA label, the real loader (pinned memory, 2 workers), a checkpoint
#      and one validation at the end;
#   3. predict: `wsss predict` of the val images with that checkpoint (multi-scale, overlays, probabilities);
#   4. toco: bench/gpu.py --config voc-toco --quick --precisions bf16 --compile off (at most 150 s): ToCo's
#      recipe (ViT-B/16, crop 448): the bf16 vs fp32 PAR-label check, one eager bf16 configuration, the
#      projected hours for its 20k iterations;
#   5. bench/gpu.py with the budget left: bf16 vs fp32 pseudo labels on a fixed input (PASS / FAIL), then
#      bf16 / fp32, eager / torch.compile: iteration time by phase, images/s, peak GPU memory, the first
#      iteration, projected hours for 20k iterations.
#
#   bash bench/gpu.sh                          # CUDA (run it on the lent GPU machine)
#   bash bench/gpu.sh --device cpu --quick     # CPU test run of every step: mit_tiny, crop 128, small images
#   bash bench/gpu.sh --fetch-wheels           # here, where pip reaches PyPI: download the wheels into .whl/
#
# Options: --device cuda|cpu, --quick (gpu.py --quick; on the CPU also the small set-up), --budget SECONDS,
# --fetch-wheels; any other argument goes to bench/gpu.py (python3 bench/gpu.py --help). PYTHON=... picks the
# interpreter. With OUT set (the device tool's output folder) the whole log is also written to $OUT/gpu_sh.log.
# Exit code: 0 when every step passed, else that of the first failing step (a summary table comes last).
#
# On the lent machine (device tool, README: /work/.library/device/README.md), after --fetch-wheels here:
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
DEVICE=cuda QUICK=0 BUDGET=500 FETCH=0
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
        --device=*) DEVICE=${1#*=}; shift ;;
        --quick) QUICK=1; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
        --budget=*) BUDGET=${1#*=}; shift ;;
        --fetch-wheels) FETCH=1; shift ;;
        -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) PASS+=("$1"); shift ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "bench/gpu.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac

# The project's dependencies (pyproject.toml) that the GPU image lacks (/work/.library/device/KINDS.md lists
# what it has: torch, torchvision, timm, numpy, scipy, typer, pillow, pyyaml, tqdm, tensorboard, safetensors,
# scikit-image, scikit-learn, pytest). mlxtend is pure Python; its own dependencies are all on the image.
WHEELS=.whl
WHEEL_PINS=(mlxtend==0.25.0)

if [ "$FETCH" = 1 ]; then
    mkdir -p "$WHEELS"
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$WHEELS" "${WHEEL_PINS[@]}"
fi

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    exec > >(tee "$OUT/gpu_sh.log") 2>&1
fi
export PYTHONUNBUFFERED=1
START=$SECONDS
DEADLINE=$((SECONDS + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsss-gpu.XXXXXX")
SUMMARY=()
FIRST_FAIL=0

left() { echo $((DEADLINE - SECONDS)); }

# step NAME CAP COMMAND...: run under `timeout` (at most CAP seconds and what the budget leaves), record it.
step() {
    local name=$1 cap=$2 t0=$SECONDS rc limit
    shift 2
    limit=$(left)
    [ "$limit" -gt "$cap" ] && limit=$cap
    echo
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: skipped, the --budget of $BUDGET s is spent ==="
        SUMMARY+=("$(printf '%-10s %-8s %5s s' "$name" skipped 0)")
        [ "$FIRST_FAIL" = 0 ] && FIRST_FAIL=124
        return 124
    fi
    echo "=== $name (at most ${limit} s) ==="
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    local status=ok
    [ $rc = 124 ] && status=timeout
    [ $rc != 0 ] && [ $rc != 124 ] && status="rc $rc"
    SUMMARY+=("$(printf '%-10s %-8s %5s s' "$name" "$status" $((SECONDS - t0)))")
    [ $rc != 0 ] && [ "$FIRST_FAIL" = 0 ] && FIRST_FAIL=$rc
    return $rc
}

# ---------------------------------------------------------------- 0. wheels, import path, versions
echo "=== setup: $(uname -n), $("$PY" --version 2>&1), device $DEVICE, budget $BUDGET s, work dir $WORK ==="
SITE=/tmp/wsss-site
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
        || { echo "bench/gpu.sh: installing ${wheels[*]} failed" >&2; exit 2; }
    echo "installed into $SITE: ${wheels[*]##*/}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$SITE" ] && export PYTHONPATH="$PYTHONPATH:$SITE"
"$PY" - <<'EOF' || { echo "bench/gpu.sh: a dependency is missing (above); on a machine with PyPI run bash bench/gpu.sh --fetch-wheels and carry .whl" >&2; exit 2; }
import importlib.metadata as md, sys
names = ["torch", "torchvision", "timm", "numpy", "scipy", "typer", "pillow", "pyyaml", "tqdm", "tensorboard",
         "safetensors", "mlxtend", "scikit-image", "scikit-learn", "pytest"]
found, missing = [], []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        missing.append(name)
print("packages: " + ", ".join(found))
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
if missing:
    sys.exit("missing: " + ", ".join(missing))
EOF
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False); for a CPU test run: bash bench/gpu.sh --device cpu --quick" >&2
    exit 2
fi

# The set-up of steps 2-3: the VOC recipe at MiT-B1 and crop 512 on CUDA, a small one on the CPU.
if [ "$DEVICE" = cuda ]; then
    SET=(model.backbone=mit_b1 data.crop_size=512 train.precision=bf16 data.num_workers=2)
    IMAGE=(375 500)
else
    SET=(model.backbone=mit_tiny data.crop_size=128 train.precision=fp32 data.num_workers=0 eval.long_side=160)
    IMAGE=(120 160)
fi
ITERS=12
TRAIN=(model.pretrained=none data.train_split=train data.val_split=val data.batch_size=2 data.total_batch_size=2
       train.iterations=$ITERS train.cam_iters=4 train.afa_label_iter=8 train.warmup_iters=2 train.log_interval=4
       train.val_interval=$ITERS train.ckpt_interval=$ITERS train.image_log_interval=$ITERS train.device=$DEVICE
       "${SET[@]}")

# ---------------------------------------------------------------- 1. tests
if [ "$DEVICE" = cuda ]; then
    step tests 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda
else
    step tests 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_fake_cuda.py
fi

# ---------------------------------------------------------------- 2. train (+ one validation), 3. predict
step data 60 "$PY" bench/_common.py voc "$WORK/voc" 8 2 "${IMAGE[@]}"
if step train 150 "$PY" -m wsss train voc --data-root "$WORK/voc" --work-dir "$WORK/run" "${TRAIN[@]}"; then
    step predict 90 "$PY" -m wsss predict --checkpoint "$WORK/run/last.pt" --out "$WORK/pred" --msc --overlay --probs \
        "$WORK/voc/JPEGImages/val_0000.jpg" "$WORK/voc/JPEGImages/val_0001.jpg" "train.device=$DEVICE"
    ls -l "$WORK/pred" 2>/dev/null | tail -n +2
fi

# ---------------------------------------------------------------- 4. ToCo, 5. benchmark
GPU_ARGS=(--device "$DEVICE")
[ "$QUICK" = 1 ] && GPU_ARGS+=(--quick)
step toco 150 "$PY" bench/gpu.py --config voc-toco --device "$DEVICE" --quick --precisions bf16 --compile off \
    --budget 130

BENCH_BUDGET=$(($(left) - 15))
step bench $((BENCH_BUDGET + 10)) "$PY" bench/gpu.py "${GPU_ARGS[@]}" --budget "$BENCH_BUDGET" "${PASS[@]}"

echo
echo "=== bench/gpu.sh: $((SECONDS - START)) s, device $DEVICE ==="
printf '%s\n' "${SUMMARY[@]}"
rm -rf "$WORK"
exit "$FIRST_FAIL"
