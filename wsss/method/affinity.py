"""Affinity from attention: labels, local window and random-walk propagation (AFA, Ru et al., CVPR 2022, sec. 3.2).

Token grid h x w, N = h * w tokens in row-major order (token i = (i // w, i % w)).

- ``window_mask``: pairs within Chebyshev radius r (cached per grid, radius and device).
- ``label_to_grid`` + ``affinity_labels``: the pseudo label, nearest-downsampled to the grid,
  gives Y_ij = 1 (same label, background pairs included), 0 (different), ignore (either
  token ignored, or the pair outside the window).
- ``random_walk`` / ``propagate_cams``: P_rw = P . T with T = A^power / (column sums + eps),
  A the predicted affinity zeroed outside the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.method.cam import cams_with_background
from wsss.method.ops import resize


@lru_cache(maxsize=32)
def _window_mask(h: int, w: int, radius: int, device: torch.device) -> Tensor:
    # A normal tensor even if first asked for under inference_mode: training code may later
    # use it in ops that save it for backward.
    with torch.inference_mode(False):
        index = torch.arange(h * w, device=device)
        y, x = index // w, index % w
        near_y = (y[:, None] - y[None, :]).abs() <= radius
        near_x = (x[:, None] - x[None, :]).abs() <= radius
        return near_y & near_x


def window_mask(h: int, w: int, radius: int, device: torch.device | str | None = None) -> Tensor:
    """bool [N, N]: True where tokens i and j satisfy |dy| <= radius and |dx| <= radius.

    Cached per (h, w, radius, device): the same tensor is returned again, do not modify it.
    """
    return _window_mask(int(h), int(w), int(radius), torch.device(device or "cpu"))


def label_to_grid(label: Tensor, size: Sequence[int]) -> Tensor:
    """label [B, H, W] (long) -> [B, h, w] long by nearest-neighbour downsampling (ignore kept)."""
    grid = F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")
    return grid[:, 0].long()


def affinity_labels(label_grid: Tensor, radius: int, ignore_index: int = 255) -> Tensor:
    """label_grid long [B, h, w] -> affinity labels long [B, N, N].

    Y_ij = 1 if l_i == l_j (background pairs count as positive; the diagonal is an ordinary,
    positive pair), 0 otherwise; ignore_index if l_i or l_j is ignored or the pair lies
    outside the Chebyshev window of ``radius``.
    """
    b, h, w = label_grid.shape
    flat = label_grid.reshape(b, h * w)
    same = (flat[:, :, None] == flat[:, None, :]).long()
    ignored = flat == ignore_index
    drop = ignored[:, :, None] | ignored[:, None, :] | ~window_mask(h, w, radius, flat.device)
    return same.masked_fill(drop, ignore_index)


def transition_matrix(affinity: Tensor, grid_size: Sequence[int], radius: int, power: int, eps: float) -> Tensor:
    """affinity [B, N, N] in [0, 1] -> T [B, N, N] float32.

    A is zeroed outside the window, raised to ``power`` and normalized over dim 1:
    T = A / (A.sum(dim=1, keepdim=True) + eps), i.e. by column sums.
    """
    h, w = grid_size
    affinity = affinity.float()
    if affinity.shape[-1] != h * w or affinity.shape[-2] != h * w:
        raise ValueError(f"affinity of shape {tuple(affinity.shape)} does not fit a {h}x{w} token grid")
    inside = window_mask(h, w, radius, affinity.device)
    a = torch.where(inside, affinity, torch.zeros((), dtype=affinity.dtype, device=affinity.device)).pow(power)
    return a / (a.sum(dim=1, keepdim=True) + eps)


def random_walk(probs: Tensor, affinity: Tensor, radius: int, power: int, eps: float) -> Tensor:
    """One propagation step P_rw = P . T.

    probs [B, C, h, w], affinity [B, N, N] (N = h * w) -> [B, C, h, w] float32 with
    P_rw[c, j] = sum_i P[c, i] T[i, j], T from ``transition_matrix``. For an identity
    affinity T = I / (1 + eps), so the output is probs / (1 + eps).
    """
    b, c, h, w = probs.shape
    t = transition_matrix(affinity, (h, w), radius, power, eps)
    return torch.bmm(probs.float().reshape(b, c, h * w), t).view(b, c, h, w)


def propagate_cams(
    cams: Tensor,
    labels: Tensor,
    affinity: Tensor,
    bg_score: float | Sequence[float],
    radius: int,
    power: int,
    eps: float,
    grid_size: Sequence[int] | None = None,
) -> Tensor:
    """Random-walk propagation of CAMs with the predicted affinity (no gradient to the affinity).

    cams [B, K, h', w'] normalized, label-masked CAMs; labels [B, K]; affinity [B, N, N];
    grid_size (h, w) with h * w = N (default: the CAMs' own size). The CAMs are resized
    (bilinear) to the grid, a background channel (= bg_score) is prepended, softmax over
    background + present classes (absent -> exactly 0), then ``random_walk`` with
    ``radius`` / ``power`` / ``eps`` (``afa.radius`` / ``afa.rw_power`` / ``afa.rw_eps``).
    -> probs [B, C, h, w] for one bg_score, or [B, S, C, h, w] for a sequence of S scores
    (one walk over all S x C channels: the transition matrix is built once).
    """
    h, w = grid_size if grid_size is not None else cams.shape[-2:]
    if h * w != affinity.shape[-1]:
        raise ValueError(f"affinity of shape {tuple(affinity.shape)} does not fit a {h}x{w} token grid")
    cams = resize(cams.float(), (h, w))
    single = isinstance(bg_score, (int, float))
    scores = [float(bg_score)] if single else [float(s) for s in bg_score]
    probs = cams_with_background(cams, labels, scores)  # [B, S, C, h, w]
    b, s, c = probs.shape[:3]
    out = random_walk(probs.reshape(b, s * c, h, w), affinity.detach(), radius, power, eps).view(b, s, c, h, w)
    return out[:, 0] if single else out


__all__ = [
    "affinity_labels", "label_to_grid", "propagate_cams", "random_walk", "transition_matrix", "window_mask",
]
