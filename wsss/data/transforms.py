"""Joint image / mask transforms for training and evaluation.

Geometry acts on the image and the mask together (torchvision.transforms.v2
with ``tv_tensors.Image`` / ``tv_tensors.Mask``: bilinear for the image,
nearest-exact for the mask, which samples pixel centres like the bilinear
resize; legacy "nearest" shifts the mask by up to half a pixel), so a mask
drawn from the image stays aligned with it.
Randomness comes from torch's global RNG only, so the per-worker seeding of a
DataLoader (and ``torch.manual_seed``) makes the augmentation reproducible.

Training (``TrainTransform``), in this order:
  1. random rescale by a factor uniform in ``data.rescale_range``;
  2. optional colour jitter (``data.color_jitter``);
  3. random horizontal flip (``data.hflip``), and with ``data.rot90`` a rotation by a random multiple of
     90 degrees (with the flip: the eight symmetries of the square);
  4. normalization with ``data.mean`` / ``data.std``;
  5. random crop to ``data.crop_size``; an image smaller than the crop is
     placed at a random position on a padded canvas: padded pixels have the colour
     ``data.pad_rgb`` (black, as the official code) and ``ignore_index`` in the mask,
     and the valid box (y0, y1, x0, x1) of the real pixels is returned.

ToCo (``ToCoViews``, with model.method "toco"): the training crop above becomes global view 1 after DINO's
photometric augmentation; global view 2 is a random resized crop of the decoded image; the source of the
local crops is the training crop with its own flip and photometric augmentation.

Evaluation (``EvalTransform``): resize so the long side is ``long_side``
(None keeps the size), normalize; the mask stays at the original size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from wsss.data.io import IGNORE_VALUE

if TYPE_CHECKING:
    from wsss.config import DataConfig



def to_image_tensor(image: np.ndarray) -> tv_tensors.Image:
    """uint8 [H, W, 3] array -> tv_tensors.Image uint8 [3, H, W]."""
    return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous())


def to_mask_tensor(mask: np.ndarray) -> tv_tensors.Mask:
    """uint8 [H, W] array -> tv_tensors.Mask uint8 [1, H, W]."""
    return tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))[None])


def normalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [3, H, W] (0..255) -> float32 [3, H, W], (x / 255 - mean) / std."""
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), mean=list(mean), std=list(std))


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalized images [..., 3, H, W] -> RGB in [0, 1] (what PAR wants)."""
    # built on the host, copied without blocking (a Python list straight to a CUDA device waits on the stream)
    m = torch.tensor(mean, dtype=images.dtype).to(images.device, non_blocking=True).view(3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).to(images.device, non_blocking=True).view(3, 1, 1)
    return (images * s + m).clamp(0.0, 1.0)


def _randint(high: int) -> int:
    """Uniform integer in [0, high] from torch's RNG."""
    return int(torch.randint(0, high + 1, (1,)).item()) if high > 0 else 0


def pad_and_crop(image: Tensor, mask: Tensor, crop_size: int, ignore_index: int,
                 fill: Sequence[float] = (0.0, 0.0, 0.0)) -> tuple[Tensor, Tensor, Tensor]:
    """Random crop with padding.

    image float [3, H, W] (normalized), mask long [H, W] -> (image [3, S, S], mask [S, S],
    valid_box long [4] = (y0, y1, x0, x1)) with S = crop_size. Along a side longer than S
    a random window is cut; along a shorter side the image lands at a random offset
    inside the crop and the rest is padding (image ``fill`` per channel, mask ``ignore_index``).
    """
    _, h, w = image.shape
    # Offset of the image inside the (possibly padded) canvas, and of the crop inside the canvas.
    off_y, off_x = _randint(max(crop_size - h, 0)), _randint(max(crop_size - w, 0))
    crop_y, crop_x = _randint(max(h - crop_size, 0)), _randint(max(w - crop_size, 0))
    out_h, out_w = min(h, crop_size), min(w, crop_size)
    out_image = torch.tensor(list(fill), dtype=image.dtype).view(3, 1, 1).expand(3, crop_size, crop_size).clone()
    out_mask = mask.new_full((crop_size, crop_size), ignore_index)
    out_image[:, off_y:off_y + out_h, off_x:off_x + out_w] = image[:, crop_y:crop_y + out_h, crop_x:crop_x + out_w]
    out_mask[off_y:off_y + out_h, off_x:off_x + out_w] = mask[crop_y:crop_y + out_h, crop_x:crop_x + out_w]
    valid_box = torch.tensor([off_y, off_y + out_h, off_x, off_x + out_w], dtype=torch.long)
    return out_image, out_mask, valid_box


class TrainTransform:
    """Training augmentation acting jointly on image and mask (see the module docstring).

    ``__call__(image uint8 [H, W, 3], mask uint8 [H, W] | None)`` -> dict with
    ``image`` float [3, S, S] normalized, ``mask`` long [S, S] (``ignore_index`` on
    padding; all ``ignore_index`` when no mask is given), ``valid_box`` long [4].
    Mask values 255 (ignore in label files) become ``ignore_index``.
    """

    def __init__(
        self,
        crop_size: int,
        rescale_range: Sequence[float],
        hflip: bool,
        color_jitter: bool,
        mean: Sequence[float],
        std: Sequence[float],
        ignore_index: int = IGNORE_VALUE,
        jitter_strength: Sequence[float] = (0.3, 0.3, 0.3, 0.05),
        pad_rgb: Sequence[float] = (0.0, 0.0, 0.0),
        rot90: bool = False,
    ) -> None:
        self.crop_size = int(crop_size)
        self.rescale_range = (float(rescale_range[0]), float(rescale_range[1]))
        self.hflip, self.rot90 = hflip, rot90
        # brightness, contrast, saturation, hue (the default: data.color_jitter_strength's)
        self.jitter = v2.ColorJitter(*jitter_strength) if color_jitter else None
        self.mean, self.std = list(mean), list(std)
        self.ignore_index = ignore_index
        # the padding colour (RGB 0..255) in the normalized image
        self.fill = [(v / 255.0 - m) / s for v, m, s in zip(pad_rgb, self.mean, self.std)]

    @classmethod
    def from_config(cls, data_cfg: DataConfig) -> TrainTransform:
        return cls(data_cfg.crop_size, data_cfg.rescale_range, data_cfg.hflip, data_cfg.color_jitter,
                   data_cfg.mean, data_cfg.std, data_cfg.ignore_index, data_cfg.color_jitter_strength, data_cfg.pad_rgb,
                   data_cfg.rot90)

    def __call__(self, image: np.ndarray, mask: np.ndarray | None) -> dict[str, Tensor]:
        if mask is None:
            mask = np.full(image.shape[:2], IGNORE_VALUE, dtype=np.uint8)
        img, msk = to_image_tensor(image), to_mask_tensor(mask)
        lo, hi = self.rescale_range
        scale = lo + (hi - lo) * float(torch.rand(()).item())
        h, w = img.shape[-2:]
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        if size != [h, w]:
            img = F.resize(img, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
            msk = F.resize(msk, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
        if self.jitter is not None:
            img = self.jitter(img)
        if self.hflip and float(torch.rand(()).item()) < 0.5:
            img, msk = F.horizontal_flip(img), F.horizontal_flip(msk)
        target = msk.as_subclass(Tensor)[0].long()
        if self.ignore_index != IGNORE_VALUE:
            target = torch.where(target == IGNORE_VALUE, self.ignore_index, target)
        image = normalize(img.as_subclass(Tensor), self.mean, self.std)
        turns = _randint(3) if self.rot90 else 0
        if turns:  # before the crop, so the valid box of the crop stays true
            image, target = torch.rot90(image, turns, (-2, -1)), torch.rot90(target, turns, (-2, -1))
        out_image, out_mask, valid_box = pad_and_crop(image, target, self.crop_size, self.ignore_index, self.fill)
        return {"image": out_image, "mask": out_mask, "valid_box": valid_box}


class ToCoViews:
    """ToCo's views of a training item (the official ``VOC12ClsDataset``'s, DINO's augmentation).

    ``__call__(image float [3, S, S] normalized (the TrainTransform crop), decoded uint8 [H, W, 3])`` -> dict:
    ``image`` (global view 1, replaces the crop): colour jitter with probability ``jitter_p``, grayscale with
    ``grayscale_p``, Gaussian blur with ``blur_p[0]``; ``global_view2`` [3, S, S]: a random resized crop
    (``view2_scale`` of the area, bicubic) of the decoded image, flip, jitter, grayscale, blur ``blur_p[1]``,
    solarization; ``local_image`` [3, S, S], whose windows become the local crops: the crop with its own flip,
    jitter, grayscale, blur ``blur_p[2]``. All normalized. The official view 1 is flipped a second time after the
    crop while its padding box is not; here the crop's one flip (TrainTransform's) keeps the box true.
    """

    def __init__(self, crop_size: int, mean: Sequence[float], std: Sequence[float], view2_scale: Sequence[float],
                 jitter: Sequence[float], jitter_p: float, grayscale_p: float, blur_sigma: Sequence[float],
                 blur_p: Sequence[float], solarize_p: float) -> None:
        self.mean, self.std = list(mean), list(std)
        sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        kernel = 2 * int(np.ceil(3 * sigma[1])) + 1  # +-3 sigma of the widest blur

        def photometric(p_blur: float) -> list:
            return [v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_p), v2.RandomGrayscale(p=grayscale_p),
                    v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=p_blur)]

        self.view1 = v2.Compose(photometric(blur_p[0]))
        self.view2 = v2.Compose([
            v2.RandomResizedCrop(crop_size, scale=tuple(view2_scale), interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.ToDtype(torch.float32, scale=True), v2.RandomHorizontalFlip(), *photometric(blur_p[1]),
            v2.RandomSolarize(threshold=128 / 255, p=solarize_p),
        ])
        self.local = v2.Compose([v2.RandomHorizontalFlip(), *photometric(blur_p[2])])

    @classmethod
    def from_config(cls, cfg: Any) -> ToCoViews:
        t = cfg.toco
        return cls(cfg.data.crop_size, cfg.data.mean, cfg.data.std, t.view2_scale, t.view_jitter, t.view_jitter_p,
                   t.view_grayscale_p, t.view_blur_sigma, t.view_blur_p, t.view_solarize_p)

    def _normalize(self, image01: Tensor) -> Tensor:
        return F.normalize(image01.clamp(0.0, 1.0), mean=self.mean, std=self.std)

    def __call__(self, image: Tensor, decoded: np.ndarray) -> dict[str, Tensor]:
        crop01 = denormalize(image, self.mean, self.std)
        return {
            "image": self._normalize(self.view1(crop01)),
            "global_view2": self._normalize(self.view2(to_image_tensor(decoded)).as_subclass(Tensor)),
            "local_image": self._normalize(self.local(crop01)),
        }


class EvalTransform:
    """Evaluation transform: resize so the long side is ``long_side`` (None = keep), normalize.

    ``__call__(image uint8 [H0, W0, 3])`` -> float [3, h, w] with max(h, w) = long_side.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], long_side: int | None = None) -> None:
        self.mean, self.std = list(mean), list(std)
        self.long_side = long_side

    @classmethod
    def from_config(cls, data_cfg: DataConfig, long_side: int | None = None) -> EvalTransform:
        return cls(data_cfg.mean, data_cfg.std, long_side)

    def __call__(self, image: np.ndarray) -> Tensor:
        img = to_image_tensor(image)
        h, w = img.shape[-2:]
        if self.long_side is not None and max(h, w) != self.long_side:
            factor = self.long_side / max(h, w)
            size = [max(1, round(h * factor)), max(1, round(w * factor))]
            img = F.resize(img, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        return normalize(img.as_subclass(Tensor), self.mean, self.std)


__all__ = ["EvalTransform", "ToCoViews", "TrainTransform", "denormalize", "normalize", "pad_and_crop",
           "to_image_tensor", "to_mask_tensor"]
