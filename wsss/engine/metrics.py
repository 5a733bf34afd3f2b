"""Segmentation metrics from one accumulated confusion matrix.

mIoU over a split is computed from ONE confusion matrix accumulated over every
pixel of every image (the PASCAL VOC protocol), not as a mean of per-image
IoUs. Rows are ground truth, columns prediction.

Conventions:

- Ground-truth pixels equal to ``ignore_index`` (255) -- or outside
  0..C-1 -- are not counted at all.
- A predicted value outside 0..C-1 (e.g. 255 left in a pseudo label) is a
  wrong prediction: it counts as a false negative of the ground-truth class
  and as a false positive of no class.
- IoU of class c = TP / (TP + FP + FN). A class with a zero denominator
  (absent from both the ground truth and the prediction) has IoU NaN and is
  left out of the mean. A class absent from the ground truth but predicted
  somewhere has IoU 0 and counts.
- ``mean_acc`` averages the per-class recall TP / (TP + FN) over the classes
  present in the ground truth; ``pixel_acc`` is correct / counted pixels.
- All percentages are in [0, 100].

    cm = ConfusionMatrix(21, device="cuda")
    for pred, gt in batches:          # tensors (any device) or numpy arrays
        cm.update(pred, gt)
    cm.reduce_()                      # sums over DDP ranks when initialized
    print(format_table(cm.compute(class_names)))
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from wsss.method.losses import classification_loss, label_prior_loss


class ConfusionMatrix:
    """A C x C confusion matrix (rows ground truth, columns prediction) accumulated on a device.

    ``update`` adds pixels without a host synchronisation: ignored pixels are routed
    to a spare bin instead of being filtered out, and counting uses ``index_add_``
    (``torch.bincount`` reads the maximum back to the host on CUDA). The counts are
    int64, so there is no overflow for any realistic dataset.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.device = torch.device(device) if device is not None else None
        # [C, C + 1] counts (the extra column: predictions outside 0..C-1) plus one spare
        # bin for ignored pixels, flattened; created on the first update's device when
        # no device was given.
        self._counts: Tensor | None = None
        if self.device is not None:
            self._counts = self._zeros(self.device)

    def _zeros(self, device: torch.device) -> Tensor:
        c = self.num_classes
        # a normal tensor even when first used under torch.inference_mode, so that
        # merge / reduce_ can update it in place afterwards
        with torch.inference_mode(False):
            return torch.zeros(c * (c + 1) + 1, dtype=torch.int64, device=device)

    def reset(self) -> None:
        if self._counts is not None:
            self._counts.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add the pixels of ``pred`` and ``target`` (same shape, any shape, integer class indices)."""
        pred_t = torch.as_tensor(pred) if isinstance(pred, np.ndarray) else pred
        target_t = torch.as_tensor(target) if isinstance(target, np.ndarray) else target
        if pred_t.shape != target_t.shape:
            raise ValueError(
                f"prediction shape {tuple(pred_t.shape)} differs from ground-truth shape {tuple(target_t.shape)}"
            )
        if self._counts is None:
            self.device = target_t.device
            self._counts = self._zeros(self.device)
        device = self._counts.device
        c = self.num_classes
        target_t = target_t.to(device, non_blocking=True).reshape(-1).long()
        pred_t = pred_t.to(device, non_blocking=True).reshape(-1).long()
        counted = (target_t >= 0) & (target_t < c) & (target_t != self.ignore_index)
        pred_t = torch.where((pred_t >= 0) & (pred_t < c), pred_t, c)  # out of range -> column C
        index = torch.where(counted, target_t * (c + 1) + pred_t, c * (c + 1))
        self._counts.index_add_(0, index, torch.ones_like(index))

    @property
    def matrix(self) -> Tensor:
        """int64 [C, C], rows ground truth, columns prediction (predictions outside 0..C-1 left out)."""
        c = self.num_classes
        if self._counts is None:
            return torch.zeros(c, c, dtype=torch.int64)
        return self._counts[: c * (c + 1)].view(c, c + 1)[:, :c]

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this matrix (same number of classes) -> self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        if other._counts is not None:
            if self._counts is None:
                self.device = other._counts.device
                self._counts = self._zeros(self.device)
            self._counts += other._counts.to(self._counts.device)
        return self

    def reduce_(self) -> ConfusionMatrix:
        """Sum the counts over all ranks when torch.distributed is initialized (else no-op) -> self.

        Call it once, after the last update, on every rank (it is a collective).
        With the NCCL backend the matrix must live on this rank's CUDA device.
        """
        if dist.is_available() and dist.is_initialized():
            if self._counts is None:
                self._counts = self._zeros(self.device or torch.device("cpu"))
            dist.all_reduce(self._counts, op=dist.ReduceOp.SUM)
        return self

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Metrics (percent) -> dict with keys

        ``miou`` (mean over classes with a non-zero IoU denominator), ``iou`` (list of C,
        NaN for classes absent from both ground truth and prediction), ``pixel_acc``,
        ``mean_acc``, ``num_classes``, ``num_pixels`` (counted ground-truth pixels) and
        ``class_names`` (when given here or to the constructor).
        """
        c = self.num_classes
        if self._counts is None:
            full = np.zeros((c, c + 1), dtype=np.float64)
        else:
            full = self._counts[: c * (c + 1)].view(c, c + 1).double().cpu().numpy()
        conf = full[:, :c]
        tp = np.diag(conf)
        gt_count = full.sum(1)  # includes out-of-range predictions (false negatives)
        pred_count = conf.sum(0)
        union = gt_count + pred_count - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            recall = np.where(gt_count > 0, tp / gt_count, np.nan)
        total = gt_count.sum()
        result: dict[str, Any] = {
            "miou": _percent(np.nanmean(iou) if np.isfinite(iou).any() else np.nan),
            "iou": [_percent(v) for v in iou],
            "pixel_acc": _percent(tp.sum() / total if total > 0 else np.nan),
            "mean_acc": _percent(np.nanmean(recall) if np.isfinite(recall).any() else np.nan),
            "num_classes": c,
            "num_pixels": int(total),
        }
        names = list(class_names) if class_names is not None else self.class_names
        if names is not None:
            if len(names) != c:
                raise ValueError(f"{len(names)} class names given for {c} classes")
            result["class_names"] = list(names)
        return result


class ImageScores:
    """Image-level classification scores accumulated on a device: the classification loss and, at sigmoid >
    ``threshold``, the per-class true / false positives and false negatives (the classifier's F1).

    ``update`` adds images without a host synchronisation; ``reduce_`` sums over DDP ranks; ``compute``
    reads the figures once. K = the foreground classes (a network's ``cls_logits`` width).
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None, threshold: float = 0.5) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.threshold = threshold
        # rows: tp, fp, fn, positives (images with the class), then the loss sum and the image count in column 0
        self._sums = torch.zeros(6, num_classes, dtype=torch.float64, device=device)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """logits [B, K] or [K] (any float dtype), labels the same shape, multi-hot."""
        k = self.num_classes
        logits = logits.reshape(-1, k).float()
        truth = labels.reshape(-1, k).to(logits.device) > 0
        pred = logits.sigmoid() > self.threshold
        rows = torch.stack([pred & truth, pred & ~truth, ~pred & truth, truth]).sum(dim=1)
        self._sums[:4] += rows.to(self._sums)
        self._sums[4, 0] += classification_loss(logits, truth) * len(logits)  # the mean over the batch
        self._sums[5, 0] += len(logits)

    def reduce_(self) -> ImageScores:
        """Sum over all ranks when torch.distributed is initialized (else no-op) -> self; a collective."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._sums, op=dist.ReduceOp.SUM)
        return self

    def compute(self, prior_frequencies: Sequence[float] | None = None) -> dict[str, Any]:
        """-> {"loss": mean classification loss, "macro_f1": mean of the per-class F1 of the classes that occur
        or are predicted, "micro_f1", "per_class_f1" (NaN: neither), "label_frequency" (per class, the share of
        images with it), "num_images"}; with ``prior_frequencies`` (e.g. the training split's) also "prior_loss":
        the loss of constant predictions at those frequencies on these images
        (:func:`wsss.method.losses.label_prior_loss`)."""
        sums = self._sums.cpu().numpy()
        tp, fp, fn, positives = sums[:4]
        count = sums[5, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            per_class = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
        frequency = positives / count if count > 0 else np.full(self.num_classes, np.nan)
        result: dict[str, Any] = {
            "loss": float(sums[4, 0] / count) if count > 0 else math.nan,
            "macro_f1": float(np.nanmean(per_class)) if np.isfinite(per_class).any() else math.nan,
            "micro_f1": float(micro),
            "per_class_f1": [float(v) for v in per_class],
            "label_frequency": [float(v) for v in frequency],
            "num_images": int(count),
        }
        if prior_frequencies is not None:
            result["prior_loss"] = label_prior_loss(frequency[None], prior_frequencies) if count > 0 else math.nan
        return result


def _percent(value: float) -> float:
    return float(value) * 100.0 if math.isfinite(value) else math.nan


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}"


def format_table(result: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU table, then mIoU, pixel accuracy and mean accuracy, as plain text.

    Class names come from ``class_names``, else ``result["class_names"]``, else "class <i>".
    Classes absent from both ground truth and prediction show "n/a" (not in the mean).
    """
    ious = list(result["iou"])
    names = list(class_names) if class_names is not None else result.get("class_names")
    if names is None or len(names) != len(ious):
        names = [f"class {i}" for i in range(len(ious))]
    width = max([len("pixel accuracy"), *(len(n) for n in names)]) + 2
    lines = [f"{'class':<{width}}{'IoU':>8}", "-" * (width + 8)]
    lines += [f"{name:<{width}}{_fmt(iou):>8}" for name, iou in zip(names, ious)]
    absent = sum(1 for v in ious if v is None or not math.isfinite(v))
    lines.append("-" * (width + 8))
    lines.append(f"{'mIoU':<{width}}{_fmt(result['miou']):>8}")
    lines.append(f"{'pixel accuracy':<{width}}{_fmt(result.get('pixel_acc')):>8}")
    lines.append(f"{'mean accuracy':<{width}}{_fmt(result.get('mean_acc')):>8}")
    if absent:
        lines.append(f"({absent} class{'es' if absent > 1 else ''} absent from ground truth and prediction: "
                     "n/a, left out of the mean)")
    return "\n".join(lines)


def format_sweep(result: dict[str, Any]) -> str:
    """The background-threshold sweep of ``evaluate_checkpoint(..., bg_thresholds=...)`` as plain text:
    per threshold its mIoU and predicted / true foreground, the best one marked."""
    lines = [f"{'bg threshold':>12}{'mIoU':>8}{'fg pred/true':>14}"]
    for row in result["sweep"]:
        best = "  <- best" if row["bg_threshold"] == result["bg_threshold"] else ""
        lines.append(f"{row['bg_threshold']:>12.3g}{_fmt(row['miou']):>8}{_fmt(row['fg_ratio']):>14}{best}")
    lines.append("(set cam.bg_threshold_eval to the best; the training pair cam.bg_threshold_high / _low around it)")
    return "\n".join(lines)


def to_json(result: Any, indent: int | None = 2) -> str:
    """``result`` as JSON text, non-finite floats (the IoU of an absent class) written as null
    (``indent`` None: one line)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    return json.dumps(clean(result), indent=indent, allow_nan=False)


__all__ = ["ConfusionMatrix", "format_sweep", "format_table", "to_json"]
