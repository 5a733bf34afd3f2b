"""Network cost: training forward+backward and multi-scale CAM time and peak memory.

Cases, each in fp32 and bf16 autocast, on a batch of 2 x 3 x 320 x 320 with ``mit_b1``
(strides 4, 2, 2, 1; 21 classes; random weights):

- ``backbone``   backbone forward (with attention logits) + backward
- ``train``      the training pass: network forward with seg head and affinity + backward
- ``ms_cam``     multi-scale CAM without grad, scales 1, 0.5, 1.5 with flip, affinity from
                 the 1.5 pass (``wsss.method.cam.multiscale_cam``)

Median over several timed runs after warm-up. Every case runs in a fresh child process so its
peak memory is its own. CUDA: ``max_memory_allocated`` (and its growth over the memory held
before the first run: weights, inputs). CPU: peak resident set size of the child
(``getrusage`` max RSS) and its growth over the RSS just before the first run.

    python3 bench/model.py                     # cuda if available, else cpu
    python3 bench/model.py --device cpu --repeats 5
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import current_rss, peak_memory, run_in_child, time_runs

CASES = ["backbone", "train", "ms_cam"]
CAM_SCALES = [1.0, 0.5, 1.5]
AFFINITY_SCALE = 1.5


def _case(case: str, precision: str, args) -> dict:
    from wsss.config import load_config
    from wsss.method.cam import multiscale_cam
    from wsss.models.network import build_network

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.backbone={args.backbone}"])
    net = build_network(cfg, args.num_classes).to(device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.ones(args.batch, args.num_classes - 1, device=device)

    if case == "backbone":
        net.train()

        def step():
            features, logits = net.backbone(images, with_attn=True)
            (sum(f.float().mean() for f in features) + logits.float().mean()).backward()
    elif case == "train":
        net.train()

        def step():
            out = net(images, with_seg=True, with_affinity=True)
            (out.cls_logits.float().mean() + out.seg_logits.float().mean() + out.affinity.float().mean()).backward()
    else:
        net.eval()

        def step():
            with torch.no_grad():
                multiscale_cam(net.cam_forward, images, labels, CAM_SCALES, flip=True, affinity_scale=AFFINITY_SCALE)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            step()
        net.zero_grad(set_to_none=True)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = current_rss()
    times = time_runs(run, args.warmup, args.repeats, cuda)
    peak = peak_memory(cuda)
    return {"case": case, "precision": precision, "median_ms": 1000 * statistics.median(times),
            "min_ms": 1000 * min(times), "peak_mib": peak / 2**20, "delta_mib": (peak - baseline) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--backbone", default="mit_b1")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()

    print(f"# {args.backbone}, batch {args.batch}x3x{args.size}x{args.size}, {args.num_classes} classes, "
          f"device {args.device}, median of {args.repeats} after {args.warmup} warm-up, torch {torch.__version__}")
    print(f"{'case':<9} {'precision':<9} {'median ms':>10} {'min ms':>9} {'peak MiB':>9} {'delta MiB':>10}")
    for case in args.cases:
        for precision in args.precisions:
            result = run_in_child(_case, {"case": case, "precision": precision}, case, precision, args)
            if "error" in result:
                print(f"{case:<9} {precision:<9} error: {result['error']}")
                continue
            print(f"{case:<9} {precision:<9} {result['median_ms']:>10.1f} {result['min_ms']:>9.1f} "
                  f"{result['peak_mib']:>9.0f} {result['delta_mib']:>10.0f}")


if __name__ == "__main__":
    main()
