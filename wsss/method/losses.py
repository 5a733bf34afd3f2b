"""Losses of AFA (Ru et al., CVPR 2022): classification, balanced segmentation, affinity.

L = L_cls + 0.1 L_seg + 0.1 L_aff after the CAM-only warm-up (weights in TrainConfig).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """logits [B, K], labels [B, K] multi-hot -> scalar multi-label soft-margin loss."""
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def label_prior_loss(image_labels: Any, frequencies: Any = None) -> float:
    """The classification loss of the label prior: :func:`classification_loss` (mean over classes, then over
    images) of the constant logits logit(f_k) for every image.

    image_labels: multi-hot [N, K] (array or tensor; a dataset's ``image_labels``; or the per-class shares p_k
    as one row [1, K]). frequencies: f_k [K], by default p_k = the fraction of the images with class k; then the
    loss is mean_k H(p_k), the binary entropy H(p) = -[p log p + (1 - p) log(1 - p)], 0 for a class in no image
    or in all (its limit): what a network that learned nothing from the pixels can reach on these images. Other
    frequencies (another split's) give the cross-entropy -[p log f + (1 - p) log(1 - f)], f clipped to
    [1e-6, 1 - 1e-6]: what that guess scores here. The trainer's stalled-learning check compares with both.
    """
    labels = torch.as_tensor(image_labels, dtype=torch.float64)
    if labels.ndim != 2 or labels.numel() == 0:
        return 0.0
    p = labels.mean(dim=0)
    f = p if frequencies is None else torch.as_tensor(frequencies, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    entropy = -(torch.special.xlogy(p, f) + torch.special.xlogy(1 - p, 1 - f))
    return float(entropy.mean())


def balanced_seg_loss(logits: Tensor, label: Tensor, ignore_index: int = 255) -> Tensor:
    """Background/foreground balanced cross-entropy.

    logits [B, C, h, w] (bilinearly upsampled here to the label size), label long [B, H, W]
    -> 0.5 * (mean CE over background pixels + mean CE over foreground pixels), ignore_index
    pixels excluded. A part without pixels contributes 0 (never NaN).
    """
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    label = label.long()
    ce = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="none")  # 0 where ignored
    background = label == 0
    foreground = (label != 0) & (label != ignore_index)
    bg_loss = (ce * background).sum() / background.sum().clamp_min(1)
    fg_loss = (ce * foreground).sum() / foreground.sum().clamp_min(1)
    return 0.5 * (bg_loss + fg_loss)


def affinity_loss(pred: Tensor, labels: Tensor) -> Tensor:
    """pred [B, N, N] affinity in [0, 1], labels [B, N, N] with 1 / 0 / ignore -> scalar.

    L = 0.5 * sum_{Y=1} (1 - A) / (n_pos + 1) + 0.5 * sum_{Y=0} A / (n_neg + 1)   (no log),
    counts over the whole batch.
    """
    pred = pred.float()
    positive = labels == 1
    negative = labels == 0
    pos_loss = ((1 - pred) * positive).sum() / (positive.sum() + 1)
    neg_loss = (pred * negative).sum() / (negative.sum() + 1)
    return 0.5 * (pos_loss + neg_loss)


__all__ = ["affinity_loss", "balanced_seg_loss", "classification_loss", "label_prior_loss"]
