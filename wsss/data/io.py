"""Reading and writing images and label PNGs.

Label PNGs follow the PASCAL VOC convention: one class index per pixel
(0 = background, 255 = ignore), stored as a palette image (mode "P") with the
VOC colour map so that they open as colour pictures in any viewer while the
pixel values stay the class indices. Greyscale label PNGs (mode "L", as in
SBD's ``SegmentationClassAug``) read the same way; RGB label pictures are
mapped back to indices through the VOC palette.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.errors import DatasetError

IGNORE_VALUE = 255  # the "ignore" value inside label files (VOC convention)


def _voc_palette() -> np.ndarray:
    """The VOC colour map: bits of the index spread over the high bits of R, G, B."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


VOC_PALETTE: np.ndarray = _voc_palette()  # [256, 3] uint8; index 255 is the "ignore" colour
VOC_PALETTE.setflags(write=False)

# RGB code -> palette index, for label pictures saved as RGB.
_PALETTE_CODES = (VOC_PALETTE.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int64))
_CODE_ORDER = np.argsort(_PALETTE_CODES)
_SORTED_CODES = _PALETTE_CODES[_CODE_ORDER]


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB -> uint8 [H, W, 3].

    Raises DatasetError naming the file when it is missing or not a readable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"image file '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"image file '{path}' is not a readable image ({exc})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise DatasetError(f"image file '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"image file '{path}' is not a readable image ({exc})") from None
    return h, w


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a label image -> uint8 [H, W] of class indices (255 = ignore).

    Palette ("P") and greyscale ("L", "I", "1") files give their pixel values;
    RGB files are mapped through the VOC palette (a colour outside it is an error).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            mode = img.mode
            img.load()
            if mode in ("RGB", "RGBA"):
                rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
            else:
                values = np.array(img)
    except FileNotFoundError:
        raise DatasetError(f"label file '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"label file '{path}' is not a readable image ({exc})") from None
    if mode in ("RGB", "RGBA"):
        codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        pos = np.clip(np.searchsorted(_SORTED_CODES, codes), 0, 255)
        if not np.array_equal(_SORTED_CODES[pos], codes):
            bad = rgb[_SORTED_CODES[pos] != codes][0]
            raise DatasetError(
                f"label file '{path}' is an RGB picture with colour {tuple(int(v) for v in bad)} outside the VOC "
                "palette; expected class indices (mode P or L) or VOC palette colours"
            )
        return _CODE_ORDER[pos].astype(np.uint8)
    if values.ndim != 2:
        raise DatasetError(f"label file '{path}' has mode {mode}; expected a single-channel label image")
    if values.dtype == np.uint8:
        return values
    if values.dtype == bool:
        return values.astype(np.uint8)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise DatasetError(
            f"label file '{path}' has values in [{values.min()}, {values.max()}]; expected class indices 0..255"
        )
    return values.astype(np.uint8)


def write_label_png(path: str | Path, label: np.ndarray) -> None:
    """Write a label map (int array [H, W], values 0..255) as a mode "P" PNG with the VOC palette.

    Parent directories are created. Raises DatasetError for a wrong shape or out-of-range values.
    """
    path = Path(path)
    label = np.asarray(label)
    if label.ndim != 2:
        raise DatasetError(f"label for '{path}' must be a 2-D array [H, W], got shape {tuple(label.shape)}")
    if label.dtype != np.uint8:
        if label.dtype.kind not in "iub":
            raise DatasetError(f"label for '{path}' must be an integer array, got dtype {label.dtype}")
        if label.size and (label.min() < 0 or label.max() > 255):
            raise DatasetError(
                f"label for '{path}' has values in [{label.min()}, {label.max()}]; expected 0..255"
            )
        label = label.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.ascontiguousarray(label))  # mode "L"; putpalette turns it into "P"
    img.putpalette(VOC_PALETTE.tobytes())
    try:
        img.save(path, format="PNG")
    except OSError as exc:
        raise DatasetError(f"cannot write label file '{path}' ({exc})") from None


__all__ = ["IGNORE_VALUE", "VOC_PALETTE", "image_size", "read_image", "read_label_png", "write_label_png"]
