"""Dense-energy regularisation cost: forward + backward time and peak memory of ``dense_energy_loss``.

Cases: batch 2, 21 classes, crops 320 and 512, scale 0.5, radius 5, sigma_rgb 15, sigma_xy 100
(the trainer defaults), random RGB images in [0, 1], logits at 1/4 of the crop (the segmentation
head's stride; --logit-stride 1 for full-resolution logits), every pixel valid. Each case runs in a
fresh child process; time is the median of --repeats runs after --warmup, peak memory is what the
loss adds on top of its inputs (CUDA: max_memory_allocated above the allocation before the call;
CPU: peak resident set size above the one before the call). The load average is printed with every
figure: the machine is shared, and other processes slow the CPU figures.

``--autograd`` also times the same energy written with plain autograd (per window offset, a weight
map times 1 - <S_i, S_j>; the graph keeps every offset), for comparison with the custom backward.

    python3 bench/reg_loss.py                          # CPU, crops 320 and 512
    python3 bench/reg_loss.py --device cuda --repeats 20
    python3 bench/reg_loss.py --crops 320 --repeats 3 --autograd
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import load_average, peak_memory, run_in_child, time_runs

# Trainer defaults of the loss.
SIGMA_RGB = 15.0
SIGMA_XY = 100.0
SCALE = 0.5
RADIUS = 5


def energy_autograd(images, seg_logits, valid_mask, sigma_rgb, sigma_xy, scale, radius):
    """The same energy through plain autograd: per half-window offset, sum W_ij (1 - <S_i, S_j>), times 2."""
    import torch.nn.functional as F

    from wsss.method.regularization import downscale_inputs, half_window_offsets

    rgb, probs, roi = downscale_inputs(images, seg_logits, valid_mask, scale)
    h, w = probs.shape[-2:]
    r, sigma_xy = radius, sigma_xy * scale
    rgb_pad, roi_pad, probs_pad = (F.pad(t, (r, r, r, r)) for t in (rgb, roi, probs))
    total = probs.new_zeros(())
    for dy, dx in half_window_offsets(r):
        rows, cols = slice(r + dy, r + dy + h), slice(r + dx, r + dx + w)
        with torch.no_grad():
            colour = (rgb_pad[..., rows, cols] - rgb).square().sum(dim=1)
            weight = torch.exp(-colour / (2 * sigma_rgb**2) - (dy * dy + dx * dx) / (2 * sigma_xy**2))
            weight = weight * roi[:, 0] * roi_pad[:, 0, rows, cols]
        total = total + (weight * (1 - (probs * probs_pad[..., rows, cols]).sum(dim=1))).sum()
    return 2 * total / probs.shape[0]


def _case(crop: int, impl: str, args) -> dict:
    from wsss.method.regularization import dense_energy_loss

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    side = crop // args.logit_stride
    images = torch.rand(args.batch, 3, crop, crop, generator=g).to(device)
    logits = torch.randn(args.batch, args.num_classes, side, side, generator=g).to(device).requires_grad_(True)
    valid = torch.ones(args.batch, crop, crop, dtype=torch.bool, device=device)
    fn = dense_energy_loss if impl == "ours" else energy_autograd

    def step():
        loss = fn(images, logits, valid, SIGMA_RGB, SIGMA_XY, args.scale, args.radius)
        loss.backward()
        logits.grad = None
        return loss

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else peak_memory(False)
    times = time_runs(step, args.warmup, args.repeats, cuda)
    peak = peak_memory(cuda) - base
    return {"crop": crop, "impl": impl, "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "peak_mib": peak / 2**20, "load": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, nargs="+", default=[320, 512])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--logit-stride", type=int, default=4, help="crop / logits side (4: the head's output)")
    parser.add_argument("--scale", type=float, default=SCALE)
    parser.add_argument("--radius", type=int, default=RADIUS)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--autograd", action="store_true", help="also time the plain-autograd formulation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    threads = args.threads or torch.get_num_threads()
    print(f"# dense_energy_loss forward + backward; device {args.device}, threads {threads}, "
          f"torch {torch.__version__}; batch {args.batch}, {args.num_classes} classes, "
          f"logits at 1/{args.logit_stride}, scale {args.scale}, radius {args.radius}; "
          f"median of {args.repeats} after {args.warmup} warm-up; load average {load_average()}")
    print(f"{'crop':>5} {'energy at':>10} {'impl':>9} {'median ms':>10} {'min ms':>9} {'peak MiB':>9} {'load':>6}")
    impls = ["ours", "autograd"] if args.autograd else ["ours"]
    for crop in args.crops:
        at = "x".join(str(max(1, int(crop * args.scale))) for _ in range(2))
        for impl in impls:
            result = run_in_child(_case, {"crop": crop, "impl": impl}, crop, impl, args)
            if "error" in result:
                print(f"{crop:>5} {at:>10} {impl:>9} error: {result['error']}")
            else:
                print(f"{crop:>5} {at:>10} {impl:>9} {result['median_ms']:>10.1f} {result['min_ms']:>9.1f} "
                      f"{result['peak_mib']:>9.1f} {result['load']:>6}")
    print(f"load average after: {load_average()} (other processes on the machine slow the CPU figures)")


if __name__ == "__main__":
    main()
