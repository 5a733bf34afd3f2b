"""GPU benchmark of the training iteration of a recipe (AFA's VOC recipe by default; ToCo's with
``--config voc-toco``), in one command; the last steps of ``bench/gpu.sh``, which installs, tests and runs
``wsss train`` / ``wsss predict`` first.

    python3 bench/gpu.py                        # CUDA, the VOC recipe: bf16 / fp32, eager / torch.compile (~5 min)
    python3 bench/gpu.py --quick                # CUDA, the VOC recipe: 1 warm-up + 3 timed iterations, no compile
    python3 bench/gpu.py --device cpu --quick   # CPU test run: mit_tiny, crop 128, 1 timed iteration, no compile
    python3 bench/gpu.py --precisions bf16 --compile on --iters 20 --budget 300
    python3 bench/gpu.py --config voc-toco --quick --precisions bf16   # ToCo: ViT-B/16, crop 448
    python3 bench/gpu.py --config voc-toco --device cpu --quick        # ToCo CPU test run: ViT-Tiny, crop 128

For a ToCo config the network is its ViT (``toco_micro_step``: CAM + auxiliary CAM passes, local crops, the
two-view forward, PTC / CTC, seg and dense-energy losses), the batch carries ToCo's views, the iteration is
``train.cam_iters`` (every loss on) and the precision check compares the PAR-refined CAM labels only (ToCo
has no AFA label); the table has no "affinity + random walk" row.

It needs the repository on the import path (``pip install -e .``, or ``PYTHONPATH=.`` as ``bench/gpu.sh`` sets).

Same set-up as ``bench/train_step.py`` (``_common``: ``bench_config``, ``build_training``, ``synthetic_batch``,
``timed_step``; the trainer's own ``train_step`` with a ``PhaseTimer``): ``configs/voc.yaml`` (MiT-B1, crop
512, 2 images per GPU, 20 classes + background), random initialisation, a fixed synthetic batch, iteration
index past ``train.afa_label_iter`` so every phase of the full iteration runs. It prints:

1. the machine: ``nvidia-smi``, ``torch.cuda.get_device_name``, torch / CUDA / cuDNN versions, TF32 flags;
2. bf16 against fp32 on the pseudo labels: the same weights (eval mode: no drop-path), the same batch (random
   8-bit images), one ``wsss.engine.trainer.make_pseudo_labels`` pass (multi-scale CAM, PAR label, random walk
   + PAR = AFA label) with ``train.precision`` fp32 and bf16 (autocast); the share of pixels on which the two
   PAR labels agree and on which the two AFA labels agree (the ignore label counts as a class; for information
   also the share on the pixels that either label does not ignore), the largest |difference| of the CAMs. PASS when both agreements are >= ``--min-agreement`` (99 %, see
   ``MIN_AGREEMENT``), else FAIL and exit code 1;
3. per configuration (bf16 / fp32, each eager and with ``torch.compile``), each in a process of its own (its
   peak memory is its own; a per-configuration timeout): median seconds per phase (forward, multi-scale CAM,
   pseudo labels + PAR, affinity + random walk, losses, backward, optimizer) and per iteration, images / s,
   peak memory (``torch.cuda.max_memory_allocated`` over the timed iterations; peak RSS on the CPU), the first
   iteration, and the hours that ``train.iterations`` (20,000) of them take on one GPU;
4. the time taken.

torch.compile: ``train.compile`` (``wsss.engine.runtime.compile_network``, what the trainer does): the backbone
compiled in place, so the training pass (forward and its backward) and the no-grad multi-scale CAM passes run
compiled graphs (one per input shape and grad mode); heads and post-processing stay eager. Compilation
happens in the first iteration (a warm-up, never timed); the reported compile time is that iteration minus the
median one. A compile error is printed in one line and the other configurations
still run.

Budget: at most ``--budget`` seconds (default 420) for the check, which runs first, and the configurations (those
that do not fit are skipped, in the order bf16 eager, fp32 eager, bf16 compiled, fp32 compiled), and
``--timeout`` seconds for each (``--compile-timeout`` for a compiled one). Exit code: 0; 1 when the check FAILs or errs; 2 when there is no
CUDA device (and no ``--device cpu``); 3 when an eager configuration fails or times out (a compiled one failing
does not change the exit code). Trailing ``key=value`` arguments are config overrides for every run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import TRAIN_PHASES

# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4 %); through the encoder's four stages the CAMs (in
# [0, 1] after max-normalisation) differ from fp32 by about 1e-2. A pixel changes label only where its best two
# scores (or its best score and a background threshold, 0.55 / 0.35) lie within that of each other: near-ties on
# object boundaries and threshold contours, which PAR (10 local-averaging iterations) moves only locally. They
# are well under 1 % of the pixels; a real precision bug (an op overflowing, a mask or a softmax going wrong in
# bf16) changes whole regions, i.e. several percent. Hence 99 % agreement, per label (PAR and AFA). Measured on
# the CPU (bf16 autocast there), MiT-B1, crop 512, random init: 99.6 % (PAR) and 99.5 % (AFA), CAM max |diff|
# 0.012. Random weights give few foreground pixels, so the check mostly compares background against ignore.
MIN_AGREEMENT = 0.99

PHASE_NAMES = {
    "forward": "forward", "multiscale_cam": "multi-scale CAM", "pseudo_label_par": "pseudo labels + PAR",
    "affinity_random_walk": "affinity + random walk", "losses": "losses", "backward": "backward",
    "optimizer": "optimizer",
}


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters (compile errors are pages long)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------- child processes


def _setup(args: argparse.Namespace, precision: str) -> tuple[Any, Any]:
    """(config, device) of a child, with ``--threads`` applied."""
    import torch
    from _common import bench_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_config(args.config, args.backbone, args.crop, args.batch, precision, args.device, args.overrides)
    return cfg, torch.device(args.device)


def run_check(args: argparse.Namespace) -> dict:
    """bf16 against fp32 pseudo labels on one batch (module docstring, 2.)."""
    import torch
    from _common import build_training, synthetic_batch

    from wsss.engine.trainer import make_pseudo_labels

    start = time.perf_counter()
    cfg32, device = _setup(args, "fp32")
    cfg16, _ = _setup(args, "bf16")
    network = build_training(cfg32, args.classes + 1, device, seed=0)[0].eval()  # eval: no drop-path sampling
    batch = synthetic_batch(args.batch, args.crop, args.classes, torch.Generator().manual_seed(0),
                            cfg32.data.mean, cfg32.data.std)
    images, labels = (batch[k].to(device) for k in ("image", "label"))
    box = batch["valid_box"]  # on the host: refine_probs_to_label reads its values
    toco = cfg32.model.method == "toco"
    if toco:  # ToCo's seg target: the PAR-refined CAM label (no AFA label)
        from wsss.engine.toco_step import toco_pseudo_labels as label_fn
    else:
        label_fn = functools.partial(make_pseudo_labels, with_afa=True)
    out = {p: label_fn(network, images, labels, box, cfg) for p, cfg in (("fp32", cfg32), ("bf16", cfg16))}
    ref, low = out["fp32"], out["bf16"]
    ignore = cfg32.data.ignore_index
    result: dict[str, Any] = {"seconds": time.perf_counter() - start, "pixels": ref.label.numel(),
                              "cam_max_diff": (ref.cams - low.cams).abs().max().item(),
                              "cam_mean_diff": (ref.cams - low.cams).abs().mean().item()}
    for name in ("label",) if toco else ("label", "afa_label"):
        a, b = getattr(ref, name), getattr(low, name)
        labelled = (a != ignore) | (b != ignore)
        result[name] = {"agreement": (a == b).float().mean().item(),
                        "labelled_agreement": (a == b)[labelled].float().mean().item() if labelled.any() else 1.0,
                        "ignore": (a == ignore).float().mean().item(), "background": (a == 0).float().mean().item()}
    return result


def run_config(args: argparse.Namespace, precision: str, compiled: bool) -> dict:
    """One configuration's timing (module docstring, 3.); a compile error -> ``{"error": ...}``."""
    import torch
    from _common import build_training, peak_memory, synthetic_batch, timed_step

    from wsss.engine.trainer import PhaseTimer, train_step

    cfg, device = _setup(args, precision)
    cfg.train.compile = compiled
    cuda = device.type == "cuda"
    model, optimizer, scheduler, scaler = build_training(cfg, args.classes + 1, device)
    batch = synthetic_batch(args.batch, args.crop, args.classes, toco_views=cfg.model.method == "toco")
    iteration = max(cfg.train.afa_label_iter, cfg.train.cam_iters) if cfg.model.method == "afa" else cfg.train.cam_iters
    timer = PhaseTimer(device)

    def step() -> None:
        train_step(model, batch, iteration, cfg, optimizer, scheduler, scaler, device, timer)

    try:
        first = timed_step(step, timer, cuda)["total"]  # compiles the forward and backward graphs
    except Exception as exc:
        if not compiled:
            raise
        return {"error": "compile failed: " + one_line(exc)}
    for _ in range(args.warmup - 1):
        timed_step(step, timer, cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rows = [timed_step(step, timer, cuda) for _ in range(args.iters)]
    median = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in ("total", *TRAIN_PHASES)}
    return {"median": median, "first": first, "peak_gib": peak_memory(cuda) / 2**30,
            "iterations": cfg.train.iterations, "threads": torch.get_num_threads()}


def child_main(args: argparse.Namespace) -> None:
    """``--case``: run one case, its result as the last line of stdout (JSON)."""
    if args.case == "check":
        result = run_check(args)
    else:
        precision, mode = args.case.split(":")
        result = run_config(args, precision, mode == "compile")
    print(json.dumps(result))


def run_child(case: str, timeout: float) -> dict:
    """This script with ``--case case`` in a new process (own session, so a timeout ends the compile workers
    too) -> its JSON result, or ``{"error": ...}`` (exception, crash or timeout)."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--case", case]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    except BaseException:  # Ctrl-C, or SIGTERM (see main): the child's session would outlive this process
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    lines = stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = [line for line in stderr.strip().splitlines() if line.strip()]
        return {"error": f"exit code {proc.returncode}: " + (" ".join(last[-1].split())[:300] if last else "")}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- report


def environment(cuda: bool) -> list[str]:
    import torch

    versions = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                f"Python {sys.version.split()[0]}")
    lines = [versions]
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {torch.cuda.get_device_name(0)} (capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible), bf16 supported: "
                     f"{torch.cuda.is_bf16_supported()}")
        lines.append(f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32} "
                     "(fp32 below runs with these defaults)")
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm,temperature.gpu"
            out = subprocess.run([smi, query, "--format=csv"], check=False, capture_output=True, text=True)
            lines += ["nvidia-smi: " + line for line in (out.stdout or out.stderr).strip().splitlines()]
        else:
            lines.append("nvidia-smi: not found")
    else:
        lines.append(f"device: CPU, {torch.get_num_threads()} torch threads")
    return lines


def check_lines(res: dict, min_agreement: float) -> tuple[list[str], bool]:
    if "error" in res:
        return [f"bf16 vs fp32 pseudo labels: ERROR {res['error']}"], False
    keys = [k for k in ("label", "afa_label") if k in res]  # a ToCo run has no AFA label
    ok = all(res[k]["agreement"] >= min_agreement for k in keys)
    title = (f"bf16 vs fp32 pseudo labels (same weights and batch, eval mode, {res['pixels']} pixels, "
             f"{res['seconds']:.1f} s):")
    lines = [title]
    for key, name in (("label", "PAR label"), ("afa_label", "AFA label")):
        if key not in res:
            continue
        r = res[key]
        foreground = 1 - r["ignore"] - r["background"]
        lines.append(f"  {name:<10} agreement {100 * r['agreement']:8.4f} %  (not gated: {100 * r['labelled_agreement']:.2f} % "
                     f"on the pixels either labels; fp32 label: {100 * r['ignore']:.1f} % ignore, "
                     f"{100 * r['background']:.1f} % background, {100 * foreground:.1f} % foreground)")
    lines.append(f"  CAMs       max |diff| {res['cam_max_diff']:.4g}, mean |diff| {res['cam_mean_diff']:.3g}")
    lines.append(f"  {'PASS' if ok else 'FAIL'}: {'both agreements' if len(keys) == 2 else 'the agreement'} "
                 f"{'>=' if ok else 'must be >='} "
                 f"{100 * min_agreement:g} %")
    return lines, ok


def table(results: dict[str, dict], args: argparse.Namespace) -> list[str]:
    ok = {name: r for name, r in results.items() if "error" not in r}
    lines = []
    if ok:
        names = list(ok)
        header = f"{'':<26}" + "".join(f"{n:>20}" for n in names)
        lines += [header, "-" * len(header)]
        for phase in TRAIN_PHASES:
            if phase == "affinity_random_walk" and args.method != "afa":
                continue  # AFA's phase only
            lines.append(f"{PHASE_NAMES[phase]:<26}" + "".join(
                f"{1e3 * ok[n]['median'][phase]:>12.1f} ms {100 * ok[n]['median'][phase] / ok[n]['median']['total']:>3.0f}%"
                for n in names))
        lines.append("-" * len(header))
        its = next(iter(ok.values()))["iterations"]
        rows = {
            "iteration (median)": lambda r: f"{1e3 * r['median']['total']:.1f} ms",
            "images / s": lambda r: f"{args.batch / r['median']['total']:.2f}",
            f"peak {'GPU (max allocated)' if args.device.startswith('cuda') else 'RSS'}":
                lambda r: f"{r['peak_gib']:.2f} GiB",
            "first iteration": lambda r: f"{r['first']:.1f} s",
            "compile (first - median)": lambda r: f"{r['first'] - r['median']['total']:.1f} s" if r["compiled"] else "-",
            f"{its:,} iterations, 1 GPU": lambda r: f"{r['median']['total'] * r['iterations'] / 3600:.2f} h",
        }
        for label, cell in rows.items():
            lines.append(f"{label:<26}" + "".join(f"{cell(ok[n]):>20}" for n in names))
        gpus = max(1, args.total_batch // args.batch)  # the recipe's total batch in GPUs of args.batch images
        lines.append(f"hours = iteration seconds x {its} / 3600, at {args.batch} images per GPU per iteration, data "
                     f"loading not included. {args.config}'s total batch is {args.total_batch}: on {gpus} GPUs of "
                     f"{args.batch} images about these hours plus the DDP all-reduce (not measured here); on 1 GPU it "
                     f"accumulates {gpus} micro-batches per iteration, about {gpus} times these hours.")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name}: {r['error']}")
    return lines


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up + 3 timed iterations, no compile; on the CPU also mit_tiny, crop 128, 1 timed")
    parser.add_argument("--config", default="voc")
    parser.add_argument("--backbone", default=None, help="default mit_b1 (--device cpu --quick: mit_tiny); "
                        "ToCo configs: the config's ViT (--device cpu --quick: timm:vit_tiny_patch16_224)")
    parser.add_argument("--crop", type=int, default=None, help="default 512, ToCo configs the config's (--device cpu "
                        "--quick: 128)")
    parser.add_argument("--batch", type=int, default=2, help="images per GPU (per forward pass)")
    parser.add_argument("--classes", type=int, default=20, help="foreground classes K (VOC: 20, + background)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"])
    parser.add_argument("--compile", default=None, choices=["both", "off", "on"],
                        help="eager and compiled, eager only, compiled only (default both; --quick: off)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations, >= 1 (default 3; --quick 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 10; --quick 3, CPU 1)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per eager configuration / the check")
    parser.add_argument("--compile-timeout", type=float, default=240, help="seconds per compiled configuration")
    parser.add_argument("--budget", type=float, default=420, help="seconds for the check and all configurations")
    parser.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT, help="PASS threshold, a share")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--case", default=None, help="(internal) check | PRECISION:eager | PRECISION:compile")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. par.iterations=10")
    args = parser.parse_args()
    tiny = args.quick and args.device == "cpu"
    from wsss.config import load_config

    recipe = load_config(args.config)
    args.method = recipe.model.method
    args.total_batch = recipe.data.total_batch_size
    if args.method == "toco":  # the recipe's ViT-B/16 and crop 448; a ViT-Tiny at 128 for the CPU test run
        args.backbone = args.backbone or ("timm:vit_tiny_patch16_224" if tiny else recipe.model.backbone)
        args.crop = args.crop or (128 if tiny else recipe.data.crop_size)
        if tiny:
            args.overrides = ["toco.local_crop_size=32", *args.overrides]
    args.backbone = args.backbone or ("mit_tiny" if tiny else "mit_b1")
    args.crop = args.crop or (128 if tiny else 512)
    args.compile = args.compile or ("off" if args.quick else "both")
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if args.quick else 3))
    args.iters = args.iters or (1 if tiny else 3 if args.quick else 10)
    return args


def main() -> None:
    args = parse_args()
    if args.case:
        child_main(args)
        return
    import torch

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # -> run_child ends its child
    start = time.perf_counter()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device found (torch.cuda.is_available() is False); for a CPU test run use "
              "bash bench/gpu.sh --device cpu --quick", file=sys.stderr)
        sys.exit(2)
    method = {"afa": "AFA", "toco": "ToCo"}[args.method]
    print(f"{method} training iteration benchmark: {args.config} recipe, {args.backbone}, crop {args.crop}, "
          f"{args.batch} images per GPU, {args.classes} + 1 classes, full path (past "
          f"{'afa_label_iter' if args.method == 'afa' else 'cam_iters'}); random init, "
          f"synthetic batch; median of {args.iters} iterations after {args.warmup} warm-up", flush=True)
    for line in environment(cuda):
        print(line, flush=True)
    print()

    deadline = time.perf_counter() + args.budget
    check, passed = check_lines(run_child("check", min(args.timeout, args.budget)), args.min_agreement)
    print("\n".join(check) + "\n", flush=True)

    modes = {"both": ["eager", "compile"], "off": ["eager"], "on": ["compile"]}[args.compile]
    cases = [f"{p}:{m}" for m in modes for p in args.precisions]
    results: dict[str, dict] = {}
    for case in cases:
        precision, mode = case.split(":")
        name = f"{precision} {mode}"
        left = deadline - time.perf_counter()
        limit = min(args.compile_timeout if mode == "compile" else args.timeout, left)
        if limit < 20:
            results[name] = {"error": f"skipped: the --budget of {args.budget:.0f} s is spent", "mode": mode}
            print(f"{name}: skipped (budget)", flush=True)
            continue
        t0 = time.perf_counter()
        res = run_child(case, limit)
        res.update(compiled=mode == "compile", mode=mode)
        results[name] = res
        took = time.perf_counter() - t0
        if "error" in res:
            print(f"{name}: ERROR ({took:.0f} s) {res['error']}", flush=True)
        else:
            print(f"{name}: {1e3 * res['median']['total']:.1f} ms per iteration, {args.batch / res['median']['total']:.2f} "
                  f"images/s, peak {res['peak_gib']:.2f} GiB, first iteration {res['first']:.1f} s ({took:.0f} s "
                  "in all)", flush=True)
    print()
    print("\n".join(table(results, args)))
    print(f"\ntime taken: {time.perf_counter() - start:.0f} s; pseudo-label check: {'PASS' if passed else 'FAIL'}")
    eager_failed = any("error" in r and r["mode"] == "eager" for r in results.values())
    sys.exit(1 if not passed else 3 if eager_failed else 0)


if __name__ == "__main__":
    main()
