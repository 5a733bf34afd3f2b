"""Small tensor helpers shared by the method and the engine (one place each)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def resize(x: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of x [B, C, h, w] to ``size`` (H, W); x itself when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """(int(h * scale), int(w * scale)), at least 1 pixel (the reference code's rounding)."""
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


__all__ = ["resize", "scaled_size"]
