"""PAR: Pixel-Adaptive Refinement of class masks (Ru et al., CVPR 2022, sec. 3.3).

Each pixel i is linked to 48 neighbours j: the 8 pixels of a 3x3 stencil at every
dilation of ``par.dilations`` (1, 2, 4, 8, 12, 24), with replicate padding. The
pixel-adaptive kernel is

    k_rgb(i, j) = -mean_rgb (|I_i - I_j| / (sigma_i + 1e-8) / w1)^2
    k_pos(i, j) = -(d_ij / (sigma_d + 1e-8) / w1)^2
    kernel(i, j) = softmax_j k_rgb(i, j) + w2 * softmax_j k_pos(i, j)

with sigma_i the (unbiased) std of the 48 neighbour intensities of pixel i, per RGB
channel, d_ij the dilation (axial neighbours) or sqrt(2) * dilation (diagonal ones) and
sigma_d the std of those 48 distances. The masks are then updated ``iterations`` times
with m_i <- sum_j kernel(i, j) m_j.

The update is the reference formula without renormalization: every kernel row sums to
1 + w2, so a constant mask c comes out as c * (1 + w2) ** iterations (1.105 for the
defaults) and so do per-pixel sums of probabilities; per-pixel argmax decisions are not
affected by this common factor.

Speed: the kernel is computed once per image and applied to every mask set of that
image in one call (stack them along M). Each iteration pads the masks once, to the
largest dilation (replicate padding is clamping, so one wide pad serves every dilation),
and accumulates the 48 shifted *views* of that one tensor with in-place ``addcmul_``;
the [B, M, 48, H, W] neighbour tensor of the straightforward formulation is never built.
See ``bench/par.py`` for the measured speed-up.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

# The 3x3 stencil without its centre, row-major: the neighbour order of the reference code.
STENCIL = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# Guards the divisions by a standard deviation (reference value).
STD_EPS = 1e-8


@dataclass(frozen=True)
class ParParams:
    """PAR's settings (``par`` section of the config): neighbour dilations, the kernel's w1 / w2,
    the number of updates and the fraction of the input resolution PAR runs at."""

    dilations: tuple[int, ...]
    w1: float
    w2: float
    iterations: int
    scale: float


@dataclass(frozen=True)
class ParKernel:
    """A pixel-adaptive kernel and the dilations it was built for (``par_kernel``).

    weights [B, n, H, W] float32, n = 8 * len(dilations): weights[:, j] is the weight of
    neighbour j (order of ``neighbour_offsets``); rows sum to 1 + w2.
    """

    weights: Tensor
    dilations: tuple[int, ...]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.weights.shape[-2]), int(self.weights.shape[-1])

    def select(self, index: int) -> ParKernel:
        """The kernel of image ``index`` alone (batch of 1)."""
        return ParKernel(self.weights[index : index + 1], self.dilations)


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(dy, dx) of the 8 * len(dilations) neighbours, dilation-major, stencil order inside."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in STENCIL]


def neighbour_distances(dilations: Sequence[int]) -> list[float]:
    """Distance of each neighbour of ``neighbour_offsets``: d (axial) or sqrt(2) * d (diagonal)."""
    return [d * (math.sqrt(2.0) if dy and dx else 1.0) for d in dilations for dy, dx in STENCIL]


def _shifted_views(x: Tensor, dilations: Sequence[int]) -> Iterator[Tensor]:
    """Yield, per neighbour, x [..., H, W] shifted so position i holds neighbour j's value.

    Pads once (replicate) to the largest dilation and yields views of that tensor.
    """
    h, w = x.shape[-2:]
    pad = max(dilations)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    for dy, dx in neighbour_offsets(dilations):
        yield padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


@lru_cache(maxsize=16)
def _position_kernel(dilations: tuple[int, ...], w1: float, w2: float, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        dist = torch.tensor(neighbour_distances(dilations), dtype=torch.float32)
        logits = -(dist / (dist.std() + STD_EPS) / w1).square()
        return (w2 * logits.softmax(dim=0)).to(device)


def position_kernel(dilations: Sequence[int], w1: float, w2: float, device: torch.device | str | None = None) -> Tensor:
    """w2 * softmax_j k_pos(j) -> float32 [n] (n = 8 * len(dilations)), the same for every pixel.

    Cached per (dilations, w1, w2, device) (one host-to-device copy per device); do not modify.
    """
    return _position_kernel(tuple(int(d) for d in dilations), float(w1), float(w2), torch.device(device or "cpu"))


def par_kernel(images: Tensor, dilations: Sequence[int], w1: float, w2: float) -> ParKernel:
    """Pixel-adaptive kernel of the images.

    images [B, 3, H, W] RGB in [0, 1] (any per-channel affine normalization gives the same
    kernel, up to the 1e-8 guard) -> ParKernel with weights [B, n, H, W] float32,
    n = 8 * len(dilations).
    """
    dilations = tuple(int(d) for d in dilations)
    images = images.float()
    b, c, h, w = images.shape
    n = len(dilations) * len(STENCIL)
    # Accumulate over the 48 shifted views instead of stacking a [B, 3, 48, H, W] tensor:
    # the same two-pass (mean, then squared deviations) unbiased std as torch.std, ~4x faster on CPU.
    views = list(_shifted_views(images, dilations))
    mean = torch.zeros_like(images)
    for view in views:
        mean.add_(view)
    mean.div_(n)
    sq_dev = torch.zeros_like(images)
    for view in views:
        deviation = view - mean
        sq_dev.addcmul_(deviation, deviation)
    inv_sigma = sq_dev.div_(n - 1).sqrt_().add_(STD_EPS).reciprocal_()  # 1 / (sigma_i + 1e-8), [B, 3, H, W]
    k_rgb = images.new_empty(b, n, h, w)
    for j, view in enumerate(views):
        scaled = (view - images).mul_(inv_sigma).square_()  # (|I_i - I_j| / sigma_i)^2 per channel
        k_rgb[:, j] = scaled.sum(dim=1)
    k_rgb.mul_(-1.0 / (c * w1 * w1))  # mean over RGB of -(... / w1)^2
    weights = k_rgb.softmax(dim=1)
    weights.add_(position_kernel(dilations, w1, w2, weights.device).view(1, n, 1, 1))
    return ParKernel(weights, dilations)


def apply_par_kernel(masks: Tensor, kernel: ParKernel, iterations: int) -> Tensor:
    """masks [B, M, H, W], kernel from ``par_kernel`` (same B, H, W) -> refined masks [B, M, H, W] float32.

    ``iterations`` times m_i <- sum_j kernel(i, j) m_j, every mask of an image with that
    image's kernel.
    """
    masks = masks.float()
    dilations = kernel.dilations
    if kernel.size != tuple(masks.shape[-2:]) or kernel.weights.shape[0] != masks.shape[0]:
        raise ValueError(f"PAR kernel of shape {tuple(kernel.weights.shape)} does not fit masks {tuple(masks.shape)}")
    n = kernel.weights.shape[1]
    weights = [kernel.weights[:, j : j + 1].float() for j in range(n)]  # [B, 1, H, W] each, broadcast over M
    for _ in range(iterations):
        views = _shifted_views(masks, dilations)
        out = torch.mul(next(views), weights[0])
        for view, weight in zip(views, weights[1:]):
            out.addcmul_(view, weight)
        masks = out
    return masks


__all__ = [
    "STENCIL", "ParKernel", "ParParams", "apply_par_kernel", "neighbour_distances", "neighbour_offsets",
    "par_kernel", "position_kernel",
]
