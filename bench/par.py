"""PAR speed: ``wsss.method.par`` against the straightforward formulation, same run, same inputs.

The straightforward formulation (``par_straightforward`` below) is the reference code's:
the kernel is recomputed per call, the centre image is ``.repeat``-ed 48 times, and every
iteration builds all 48 shifted copies of the masks ([B, M, 48, H, W], replicate pad per
dilation + slicing + torch.cat) before the weighted sum. Timed: kernel + 10 iterations, on
random RGB images in [0, 1] and softmax masks; median of --repeats runs after one warm-up,
the two implementations timed alternately.

    python3 bench/par.py                      # CPU, cases 2x21x160x160, 1x21x256x256, 1x3x160x160
    python3 bench/par.py --repeats 9 --device cuda
    python3 bench/par.py --cases 2x21x160x160 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import load_average

from wsss.config import ParConfig
from wsss.method.par import STD_EPS, apply_par_kernel, neighbour_distances, neighbour_offsets, par_kernel

DEFAULT_CASES = ["2x21x160x160", "1x21x256x256", "1x3x160x160"]


def _all_neighbours(x: torch.Tensor, dilations) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C, 48, H, W]: replicate pad per dilation, slice, cat."""
    h, w = x.shape[-2:]
    copies = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy, dx in neighbour_offsets([d]):
            copies.append(padded[:, :, None, d + dy : d + dy + h, d + dx : d + dx + w])
    return torch.cat(copies, dim=2)


def par_straightforward(images: torch.Tensor, masks: torch.Tensor, cfg: ParConfig) -> torch.Tensor:
    """The formula as the reference code writes it; images [B, 3, H, W], masks [B, M, H, W]."""
    b, _, h, w = images.shape
    neighbours = _all_neighbours(images, cfg.dilations)
    n = neighbours.shape[2]
    centre = images.unsqueeze(2).repeat(1, 1, n, 1, 1)
    dist = torch.tensor(neighbour_distances(cfg.dilations), device=images.device).view(1, 1, n, 1, 1)
    dist = dist.repeat(b, 1, 1, h, w)
    k_rgb = -((neighbours - centre).abs() / (neighbours.std(dim=2, keepdim=True) + STD_EPS) / cfg.w1) ** 2
    k_rgb = k_rgb.mean(dim=1, keepdim=True)
    k_pos = -(dist / (dist.std(dim=2, keepdim=True) + STD_EPS) / cfg.w1) ** 2
    kernel = k_rgb.softmax(dim=2) + cfg.w2 * k_pos.softmax(dim=2)
    for _ in range(cfg.iterations):
        masks = (_all_neighbours(masks, cfg.dilations) * kernel).sum(dim=2)
    return masks


def par_ours(images: torch.Tensor, masks: torch.Tensor, cfg: ParConfig) -> torch.Tensor:
    kernel = par_kernel(images, cfg.dilations, cfg.w1, cfg.w2)
    return apply_par_kernel(masks, kernel, cfg.iterations)


def _time_pair(fn_a, fn_b, device: torch.device, repeats: int):
    """Median seconds of fn_a and fn_b, timed alternately (shared-machine load hits both alike)."""
    def timed(fn):
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out

    timed(fn_a), timed(fn_b)  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        t_a, out_a = timed(fn_a)
        t_b, out_b = timed(fn_b)
        times_a.append(t_a)
        times_b.append(t_b)
    return statistics.median(times_a), statistics.median(times_b), out_a, out_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="BxMxHxW mask shapes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ParConfig()
    generator = torch.Generator().manual_seed(args.seed)
    print(f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"dilations {cfg.dilations}, iterations {cfg.iterations}, median of {args.repeats}, "
          f"load average {load_average()}")
    print(f"{'masks B x M x H x W':>20} {'ours ms':>10} {'straightforward ms':>19} {'ratio':>7} {'max |diff|':>11}")
    with torch.no_grad():
        for case in args.cases:
            b, m, h, w = (int(v) for v in case.split("x"))
            images = torch.rand(b, 3, h, w, generator=generator).to(device)
            masks = torch.randn(b, m, h, w, generator=generator).softmax(dim=1).to(device)
            t_ours, t_ref, out_ours, out_ref = _time_pair(
                lambda: par_ours(images, masks, cfg), lambda: par_straightforward(images, masks, cfg), device, args.repeats
            )
            diff = (out_ours - out_ref).abs().max().item()
            print(f"{case:>20} {t_ours * 1e3:10.1f} {t_ref * 1e3:19.1f} {t_ref / t_ours:6.1f}x {diff:11.2e}")
    print(f"load average after: {load_average()} (other processes on the machine slow both columns)")


if __name__ == "__main__":
    main()
