"""Class activation maps and the pseudo labels made from them (AFA, Ru et al., CVPR 2022, sec. 3.1 / 3.3).

- ``multiscale_cam``: multi-scale + flip CAMs, min-max normalized per class, absent classes zero.
- ``cam_scores``: CAMs with a constant background score (evaluation; argmax = the CAM label).
- ``refine_cams_to_label``: the training pseudo label: background channel at a high and a low
  threshold, softmax over background + present classes, PAR, high/low combination.
- ``refine_probs_to_label``: the same combination for already-propagated probabilities
  (the AFA random-walk branch).
- ``ignore_outside_box``: ignore the padding of a padded crop.

Shapes: B batch, K foreground classes, C = K + 1 (background = channel 0), H x W input size.
The steps are put together, once, in :mod:`wsss.method.pseudo_labels`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.method.ops import resize, scaled_size
from wsss.method.par import ParKernel, ParParams, apply_par_kernel, par_kernel

# Min-max normalization guard: cam / (max + 1e-5) (reference value).
CAM_NORM_EPS = 1e-5

CamFn = Callable[[Tensor, bool], "tuple[Tensor, Tensor | None]"]


class MultiScaleCams(NamedTuple):
    cams: Tensor  # [B, K, H, W] float32 in [0, 1]
    affinity: Tensor | None  # [B, N, N] of the affinity_scale pass (non-flipped half), or None
    grid: tuple[int, int] | None  # the token grid (h, w) of that pass, h * w = N


def multiscale_cam(
    cam_fn: CamFn,
    images: Tensor,
    labels: Tensor,
    scales: Sequence[float],
    flip: bool = True,
    affinity_scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Multi-scale (+ horizontal flip) CAMs, without gradients.

    cam_fn(images [B', 3, h, w], with_affinity) -> (raw cams [B', K, h', w'], affinity
    [B', N, N] | None); it must run only the CAM path of the network (no segmentation head).
    images [B, 3, H, W] (network-normalized), labels [B, K] multi-hot.

    Per scale s: the image resized to (int(s*H), int(s*W)) and its flip go through ONE
    cam_fn call (batch 2B), except at ``affinity_scale``: there the image (with affinity) and its
    flip (without: its affinity is never used) are two calls (the image at
    scale 1 is ``images`` itself); CAMs are resized to H x W, the flipped half is un-flipped and
    the elementwise max taken, then ReLU. The scales are summed, each channel is min-max
    normalized ((cam - min) / (max + 1e-5)) and absent classes are zeroed.
    -> MultiScaleCams: cams [B, K, H, W] float32 in [0, 1]; affinity [B, N, N] of the
    ``affinity_scale`` pass (non-flipped half; asked for at that scale only) and its token
    grid (the raw CAMs' size in that pass), or None.
    """
    if not scales:
        raise ValueError("multiscale_cam needs at least one scale")
    if affinity_scale is not None and affinity_scale not in scales:
        raise ValueError(f"affinity_scale {affinity_scale} must be one of the CAM scales {list(scales)}")
    b = images.shape[0]
    size = images.shape[-2:]
    total: Tensor | None = None
    affinity = grid = None
    with torch.no_grad():
        for scale in scales:
            x = images if scale == 1.0 else resize(images, scaled_size(size, scale))
            with_affinity = affinity_scale is not None and scale == affinity_scale
            if flip and with_affinity:  # the flipped half's affinity is never used: no attention logits for it
                cams, aff = cam_fn(x, True)
                cams = torch.cat([cams, cam_fn(x.flip(-1), False)[0].to(cams.dtype)])
            else:
                cams, aff = cam_fn(torch.cat([x, x.flip(-1)], dim=0) if flip else x, with_affinity)
            if with_affinity and aff is not None:
                affinity, grid = aff[:b], (int(cams.shape[-2]), int(cams.shape[-1]))
            cams = resize(cams.float(), size)
            if flip:
                cams = torch.maximum(cams[:b], cams[b:].flip(-1))
            cams = F.relu(cams)
            total = cams if total is None else total.add_(cams)
        assert total is not None
        total = total - total.amin(dim=(-2, -1), keepdim=True)
        total = total / (total.amax(dim=(-2, -1), keepdim=True) + CAM_NORM_EPS)
        total = total * labels.to(total.dtype)[:, :, None, None]
    return MultiScaleCams(total, affinity, grid)


def box_mask(valid_box: Tensor, size: Sequence[int]) -> Tensor:
    """valid_box long [B, 4] = (y0, y1, x0, x1), half-open -> bool [B, H, W], True inside each box."""
    h, w = size
    y0, y1, x0, x1 = (valid_box[:, i].view(-1, 1, 1) for i in range(4))
    ys = torch.arange(h, device=valid_box.device).view(1, h, 1)
    xs = torch.arange(w, device=valid_box.device).view(1, 1, w)
    return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


def ignore_outside_box(label: Tensor, valid_box: Tensor | None, ignore_index: int = 255) -> Tensor:
    """label [B, H, W]; valid_box long [B, 4] = (y0, y1, x0, x1), half-open -> label with
    ``ignore_index`` outside each image's box (a new tensor; None = label unchanged)."""
    if valid_box is None:
        return label
    box = valid_box.to(label.device, non_blocking=True)  # a host box: no wait for the device's queue
    return label.masked_fill(~box_mask(box, label.shape[-2:]), ignore_index)


def cam_scores(cams: Tensor, labels: Tensor, bg_score: float) -> Tensor:
    """cams [B, K, h, w] in [0, 1], labels [B, K] -> scores [B, C, h, w] float32: a constant
    background channel (= bg_score) before the label-masked CAMs.

    Their argmax is the evaluation CAM label: class k + 1 where cam_k is the largest present
    CAM and exceeds bg_score, else background (ties go to background, the first channel).
    """
    cams = cams.float() * labels.float()[:, :, None, None]
    return torch.cat([torch.full_like(cams[:, :1], float(bg_score)), cams], dim=1)


def cams_with_background(cams: Tensor, labels: Tensor, bg_scores: Sequence[float]) -> Tensor:
    """Class probabilities with a constant background score, one set per score.

    cams [B, K, h, w], labels [B, K] -> probs [B, S, C, h, w] float32 (S = len(bg_scores)):
    softmax over {background (= score) + present classes}; absent classes are masked with
    -inf before the softmax, so their probability is exactly 0.
    """
    cams = cams.float()
    b, k, h, w = cams.shape
    # constant fills, not torch.tensor(scores, device=...): no host-to-device copy
    bg = torch.cat([cams.new_full((b, 1, 1, h, w), float(score)) for score in bg_scores], dim=1)
    logits = torch.cat([bg, cams.unsqueeze(1).expand(-1, len(bg_scores), -1, -1, -1)], dim=2)
    present = torch.cat([labels.new_ones(b, 1), labels], dim=1) > 0  # [B, C]
    logits = logits.masked_fill(~present[:, None, :, None, None], float("-inf"))
    return logits.softmax(dim=2)


def combine_high_low(label_high: Tensor, label_low: Tensor, ignore_index: int = 255) -> Tensor:
    """The AFA rule: foreground from the high-threshold label; where it says background the
    pixel is ignored unless the low-threshold label says background too (then 0)."""
    background = torch.zeros_like(label_high)
    return torch.where(
        label_high == 0,
        torch.where(label_low == 0, background, torch.full_like(label_high, ignore_index)),
        label_high,
    )


def scaled_par_kernel(images01: Tensor, par: ParParams) -> ParKernel:
    """The PAR kernel of images01 [B, 3, H, W] at par.scale of H x W.

    Pass it as ``kernel`` to several pseudo-label calls on the same images (the CAM and the
    AFA branch of one training step) to compute it once.
    """
    images = resize(images01.float(), scaled_size(images01.shape[-2:], par.scale))
    return par_kernel(images, par.dilations, par.w1, par.w2)


def refine_probs(probs: Tensor, kernel: ParKernel, iterations: int, align_corners: bool = False) -> Tensor:
    """probs [B, M, h, w] -> PAR-refined [B, M, h', w'] float32 at the kernel's size (h' x w').

    The probabilities are resized (bilinear) to the kernel's size first.
    """
    return apply_par_kernel(resize(probs.float(), kernel.size, align_corners), kernel, iterations)


def _par_high_low_label(
    images01: Tensor,
    probs: Tensor,
    par: ParParams,
    valid_box: Tensor | None,
    ignore_index: int,
    kernel: ParKernel | None,
) -> Tensor:
    """images01 [B, 3, H, W], probs [B, 2, C, h, w] (high, low) -> long [B, H, W].

    PAR at par.scale of H x W (one call for both sets), upsample, argmax, combine, box.
    """
    b, s, c = probs.shape[:3]
    size = images01.shape[-2:]
    if kernel is None:
        kernel = scaled_par_kernel(images01, par)
    refined = refine_probs(probs.reshape(b, s * c, *probs.shape[-2:]), kernel, par.iterations)
    refined = resize(refined, size).view(b, s, c, *size)
    # max(...).indices: the same first-maximum index as argmax, ~10x faster on CPU over a non-last dim
    label_high, label_low = refined.max(dim=2).indices.unbind(dim=1)
    return ignore_outside_box(combine_high_low(label_high, label_low, ignore_index), valid_box, ignore_index)


def refine_cams_to_label(
    images01: Tensor,
    cams: Tensor,
    labels: Tensor,
    bg_thresholds: tuple[float, float],
    par: ParParams,
    valid_box: Tensor | None = None,
    ignore_index: int = 255,
    kernel: ParKernel | None = None,
) -> Tensor:
    """The PAR-refined CAM pseudo label (docs/method.md sec. 3).

    images01 [B, 3, H, W] de-normalized RGB in [0, 1]; cams [B, K, H, W] from ``multiscale_cam``;
    labels [B, K]; valid_box long [B, 4] or None -> long [B, H, W] with 0 = background,
    1..K = classes, ignore_index = uncertain or padding.

    CAMs are resized to par.scale of H x W; a background channel at the high and one at
    the low threshold of ``bg_thresholds`` (high, low) give two probability sets
    (softmax over background + present classes), both refined by ONE PAR call, upsampled
    back, argmaxed and combined: foreground only where it beats the high threshold,
    background only where it loses even to the low one, the band in between ignored.
    ``kernel``: ``scaled_par_kernel(images01, par)`` when the caller already has it.
    """
    par_size = scaled_size(images01.shape[-2:], par.scale)
    cams = resize(cams.float(), par_size)
    probs = cams_with_background(cams, labels, bg_thresholds)
    return _par_high_low_label(images01, probs, par, valid_box, ignore_index, kernel)


def refine_probs_to_label(
    images01: Tensor,
    probs_high: Tensor,
    probs_low: Tensor,
    par: ParParams,
    valid_box: Tensor | None = None,
    ignore_index: int = 255,
    kernel: ParKernel | None = None,
) -> Tensor:
    """The AFA-branch pseudo label from propagated probabilities (docs/method.md, "AFA label").

    images01 [B, 3, H, W] in [0, 1]; probs_high / probs_low [B, C, h, w] (random-walk output
    for the high / low background score, e.g. at the token grid); valid_box long [B, 4]
    (y0, y1, x0, x1) or None (= whole image) -> long [B, H, W]. The boxes' values set the crops' sizes, so
    they are read on the host: pass the host copy (the loader's); a CUDA copy costs a device sync.

    As the official code (``refine_cams_with_cls_label``): the probabilities are upsampled to
    H x W, then each image is cropped to its valid box, so that PAR never sees the padding of
    a padded crop: the box's image is resized to par.scale of the box size, the box's
    probabilities to that size with align_corners=True (the official PAR's resize, used
    only in this branch), both probability sets are refined with the box's kernel in one
    call, resized back to the box (align_corners=False), argmaxed and combined with
    ``combine_high_low``; outside the box the label is ``ignore_index``. ``kernel``
    (``scaled_par_kernel(images01, par)``) is reused for images whose box is the whole
    image (there the box's kernel is that kernel).
    """
    b, c = probs_high.shape[:2]
    size = tuple(images01.shape[-2:])
    probs = torch.cat([resize(probs_high.float(), size), resize(probs_low.float(), size)], dim=1)  # [B, 2C, H, W]
    boxes = valid_box.tolist() if valid_box is not None else [[0, size[0], 0, size[1]]] * b
    label = torch.full((b, *size), ignore_index, dtype=torch.long, device=probs.device)
    for i, (y0, y1, x0, x1) in enumerate(boxes):  # per image: boxes differ in size (B is 1-2 per process)
        if y1 <= y0 or x1 <= x0:
            continue
        whole = (y0, y1, x0, x1) == (0, size[0], 0, size[1])
        box_image = images01[i : i + 1, :, y0:y1, x0:x1]
        box_kernel = kernel.select(i) if whole and kernel is not None else scaled_par_kernel(box_image, par)
        # align_corners=True: the official PAR's resize, used only in this branch
        refined = refine_probs(probs[i : i + 1, :, y0:y1, x0:x1], box_kernel, par.iterations, align_corners=True)
        refined = resize(refined, (y1 - y0, x1 - x0)).view(2, c, y1 - y0, x1 - x0)
        # max(...).indices: the same first-maximum index as argmax, ~10x faster on CPU over a non-last dim
        label_high, label_low = refined.max(dim=1).indices
        label[i, y0:y1, x0:x1] = combine_high_low(label_high, label_low, ignore_index)
    return label


__all__ = [
    "CAM_NORM_EPS", "MultiScaleCams", "box_mask", "cam_scores", "cams_with_background", "combine_high_low",
    "ignore_outside_box", "multiscale_cam", "refine_cams_to_label", "refine_probs", "refine_probs_to_label",
    "scaled_par_kernel",
]
