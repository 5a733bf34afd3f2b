"""The weight of ours' dense-energy loss that gives the gradient of the official ToCo one (w_reg 0.05 on its
``DenseEnergyLoss(weight=1e-7, sigma_rgb=15, sigma_xy=100, scale_factor=0.5)``), measured on photos.

    python3 bench/reg_weight.py                       # crop 448, the four photos, 3 sharpnesses
    python3 bench/reg_weight.py --crop 128 --classes 5

The two losses are not the same function (``wsss/method/regularization.py`` lists how they differ): the
official one sums a Gaussian over every pixel pair of the half-resolution crop (a permutohedral lattice,
compiled, approximates it), gates each pixel by 1 - its largest probability (1 where the pseudo label
ignores it) and is scaled by 1e-7 inside; ours sums the exact Gaussian over a window of radius 5 without a
gate. A weight for ours is therefore a calibration, not an identity: this script takes the exact Gaussian
that the lattice approximates, computes the official gradient (its backward, -2 x gate x filtered masked
probabilities / N, through the bilinear downscale and the softmax) and ours (autograd) for the same seg
logits, and prints the ratio of their norms, official / ours, per photo and sharpness, and the weight for
ours that matches 0.05 of the official loss: 0.05 x 1e-7 x that ratio (the script computes the official
gradient without the 1e-7, and folds it in there).

Inputs: scikit-image's photos ``astronaut``, ``chelsea``, ``coffee``, ``rocket``, centre-cropped to the
square and resized to ``--crop``; seg logits [1, C, crop / 16, crop / 16] (a stride-16 head, as LargeFOV on a
ViT-B/16) from smooth random fields (a 4 x 4 normal field upsampled bicubically) times a sharpness (1, 4, 16:
from uncertain to confident predictions); the pseudo label ignores the pixels whose largest probability is
below 0.7 (the official gate counts them fully). No padding. CPU, float64 for the official pair sums (done
in row chunks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsss.method.regularization import dense_energy_loss  # noqa: E402

OFFICIAL_WEIGHT, W_REG = 1e-7, 0.05  # DenseEnergyLoss(weight=1e-7, ...), the script's --w_reg
SIGMA_RGB, SIGMA_XY, SCALE, RADIUS = 15.0, 100.0, 0.5, 5  # the official loss layer's; ours: the trainer defaults
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str, crop: int) -> torch.Tensor:
    """scikit-image's photo ``name`` -> RGB [1, 3, crop, crop] in [0, 1] (centre square, bilinear resize)."""
    from skimage import data

    image = torch.from_numpy(getattr(data, name)()[..., :3].copy()).permute(2, 0, 1).float()[None] / 255
    h, w = image.shape[-2:]
    side = min(h, w)
    image = image[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    return F.interpolate(image, size=(crop, crop), mode="bilinear", align_corners=False, antialias=True)


def gaussian_filter(features: torch.Tensor, values: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """features [N, d], values [N, C] -> [N, C]: sum_j exp(-|f_i - f_j|^2 / 2) v_j over every j (self included)."""
    f = features.double()
    v = values.double()
    sq = (f * f).sum(dim=1)
    out = torch.empty_like(v)
    for start in range(0, f.shape[0], chunk):
        fc = f[start : start + chunk]
        d2 = (sq[start : start + chunk, None] + sq[None, :] - 2 * fc @ f.T).clamp_min(0)
        out[start : start + chunk] = torch.exp(-0.5 * d2) @ v
    return out


def official_gradient(image01: torch.Tensor, logits: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    """The official DenseEnergyLoss gradient w.r.t. the seg logits, without its 1e-7 (exact Gaussian in place of
    the lattice): logits upsampled to the crop, softmax, bilinear x0.5; the image nearest x0.5 on 0..255."""
    x = logits.detach().clone().requires_grad_(True)
    crop = image01.shape[-1]
    probs = torch.softmax(F.interpolate(x, size=(crop, crop), mode="bilinear", align_corners=False), dim=1)
    half = F.interpolate(probs, scale_factor=SCALE, mode="bilinear", align_corners=False,
                         recompute_scale_factor=True)
    image = F.interpolate(image01 * 255, scale_factor=SCALE, recompute_scale_factor=True)  # nearest, as there
    unlabelled = F.interpolate(ignored[:, None].float(), scale_factor=SCALE, recompute_scale_factor=True)[:, 0] > 0
    n, c, h, w = half.shape
    with torch.no_grad():
        gate = (1 - half.max(dim=1).values).clamp_min(0)
        gate[unlabelled] = 1
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        sigma_xy = SIGMA_XY * SCALE
        feats = torch.cat([torch.stack([ys, xs]).reshape(2, -1).T / sigma_xy,
                           image[0].reshape(3, -1).T.double() / SIGMA_RGB], dim=1)
        filtered = gaussian_filter(feats, half[0].reshape(c, -1).T).T.reshape(1, c, h, w)
        grad_half = -2 * gate[:, None] * filtered.float() / n
    half.backward(grad_half)
    return x.grad


def ours_gradient(image01: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    x = logits.detach().clone().requires_grad_(True)
    valid = torch.ones(image01.shape[0], *image01.shape[-2:], dtype=torch.bool)
    dense_energy_loss(image01, x, valid, SIGMA_RGB, SIGMA_XY, SCALE, RADIUS).backward()
    return x.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=int, default=448)
    parser.add_argument("--classes", type=int, default=3, help="classes of the seg logits (background + 2)")
    parser.add_argument("--sharpness", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    grid = args.crop // 16
    print(f"official / ours gradient norm (seg logits [1, {args.classes}, {grid}, {grid}], crop {args.crop}; "
          f"official without its 1e-7; load {os.getloadavg()[0]:.2f})")
    print(f"{'photo':<12}" + "".join(f"{'sharpness ' + format(s, 'g'):>16}" for s in args.sharpness))
    ratios = []
    for name in PHOTOS:
        image01 = photo(name, args.crop)
        row = []
        for sharpness in args.sharpness:
            field = torch.randn(1, args.classes, 4, 4, generator=generator)
            logits = sharpness * F.interpolate(field, size=(grid, grid), mode="bicubic", align_corners=False)
            probs = torch.softmax(F.interpolate(logits, size=(args.crop, args.crop), mode="bilinear",
                                                align_corners=False), dim=1)
            ignored = probs.max(dim=1).values < 0.7
            ratio = (official_gradient(image01, logits, ignored).norm() / ours_gradient(image01, logits).norm()).item()
            row.append(ratio)
            ratios.append(ratio)
        print(f"{name:<12}" + "".join(f"{r:>16.1f}" for r in row), flush=True)
    median = statistics.median(ratios)
    print(f"\nmedian ratio {median:.1f} (range {min(ratios):.1f} - {max(ratios):.1f}); the weight of ours matching the "
          f"official w_reg {W_REG} x {OFFICIAL_WEIGHT:g}: {W_REG * OFFICIAL_WEIGHT * median:.3g} "
          f"(range {W_REG * OFFICIAL_WEIGHT * min(ratios):.3g} - {W_REG * OFFICIAL_WEIGHT * max(ratios):.3g}); "
          f"{time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
