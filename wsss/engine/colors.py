"""Colours of label maps and heat maps, for the viz panels and the TensorBoard grids (numpy only).

Label maps use the VOC palette (255 = ignore colour); heat maps go through the small jet-like
colour look-up table :data:`HEAT_LUT`.
"""

from __future__ import annotations

import numpy as np

from wsss.data.io import VOC_PALETTE

def _heat_lut() -> np.ndarray:
    """A jet-like colour map: dark blue -> blue -> cyan -> yellow -> red -> dark red, [256, 3] uint8."""
    anchors = np.array(
        [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], dtype=np.float64
    )
    positions = np.linspace(0.0, 1.0, len(anchors))
    x = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(x, positions, anchors[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


HEAT_LUT: np.ndarray = _heat_lut()  # [256, 3] uint8, value 0 -> dark blue, 1 -> dark red
HEAT_LUT.setflags(write=False)

HEAT_ALPHA = 0.5  # weight of a heat map blended on the image
def colorize_label(label: np.ndarray) -> np.ndarray:
    """Class-index map int [H, W] (255 = ignore) -> uint8 [H, W, 3] VOC palette colours."""
    return VOC_PALETTE[np.asarray(label).astype(np.intp) & 255]


def heatmap(values: np.ndarray) -> np.ndarray:
    """float [H, W] in [0, 1] (clipped) -> uint8 [H, W, 3] through :data:`HEAT_LUT`."""
    index = np.round(np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0) * 255)
    return HEAT_LUT[index.astype(np.intp)]


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """uint8 [H, W, 3] image, uint8 [H, W, 3] overlay -> (1 - alpha) * image + alpha * overlay."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * overlay.astype(np.float32)
    return np.round(mixed).astype(np.uint8)


def heat_overlay(image: np.ndarray, values: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """A heat map of float [H, W] in [0, 1] blended on uint8 [H, W, 3]."""
    return blend(image, heatmap(values), alpha)


__all__ = ["HEAT_ALPHA", "HEAT_LUT", "blend", "colorize_label", "heat_overlay", "heatmap"]
