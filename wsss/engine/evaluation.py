"""Score a directory of predicted label PNGs against a dataset split's masks.

    result = evaluate_prediction_dir("preds/", "data/VOCdevkit/VOC2012", split="val")
    print(format_table(result))

The prediction for split name ``x`` is ``<pred_dir>/x.png`` (a palette or greyscale
label PNG of class indices, the size of the image). Every name of the split must
have one: missing predictions are an error (one message with the count and the
first few names). PNGs in ``pred_dir`` that are not in the split are only reported
in one warning line (a directory of pseudo labels for ``train_aug`` scored on
``train`` is a normal use). mIoU comes from one confusion matrix over the whole split
(see :mod:`wsss.engine.metrics`); ground-truth 255 is ignored; a predicted 255 counts
as wrong.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from wsss.config import DataConfig
from wsss.data.io import IGNORE_VALUE, read_label_png
from wsss.engine.metrics import ConfusionMatrix
from wsss.errors import DatasetError

logger = logging.getLogger(__name__)

DATASET_KINDS = ("voc", "coco", "custom")
PREDICTION_EXTENSION = ".png"
NAMES_IN_MESSAGES = 5  # how many example names an error or warning line shows
_READ_CHUNK = 64  # images decoded ahead of the accumulation; keeps memory flat


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_IN_MESSAGES])
    return shown + (", ..." if len(names) > NAMES_IN_MESSAGES else "")


def evaluate_prediction_dir(
    pred_dir: str | Path,
    data_root: str | Path,
    split: str = "val",
    dataset: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """mIoU of the label PNGs in ``pred_dir`` against split ``split`` of the dataset at ``data_root``.

    dataset: "voc" | "coco" | "custom"; None guesses it from the root's layout
    (``classes.txt`` + ``ImageSets/Segmentation`` -> custom, ``JPEGImages/{train,val}`` -> coco, else voc).
    workers: threads decoding PNGs (None = up to 8).
    Returns :meth:`ConfusionMatrix.compute`'s dict plus ``num_images``, ``split``, ``pred_dir``.
    Raises DatasetError for a missing directory, missing predictions, a prediction whose
    size differs from its mask, or a predicted value that is neither a class nor 255.
    """
    from wsss.data.datasets import build_dataset, guess_dataset_kind

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DatasetError(f"prediction directory '{pred_dir}' does not exist")
    kind = dataset or guess_dataset_kind(data_root)
    if kind not in DATASET_KINDS:
        raise DatasetError(f"dataset must be one of {', '.join(DATASET_KINDS)}; got '{kind}'")
    ds = build_dataset(DataConfig(dataset=kind, root=str(data_root)), split, train=False)
    if not ds.has_masks:
        raise DatasetError(f"split '{split}' of '{data_root}' has no masks; there is no ground truth to score against")

    available = {
        os.path.splitext(entry.name)[0]
        for entry in os.scandir(pred_dir)
        if entry.name.lower().endswith(PREDICTION_EXTENSION) and entry.is_file()
    }
    missing = [n for n in ds.names if n not in available]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(ds)} images of split '{split}' have no prediction in '{pred_dir}' "
            f"(expected <name>{PREDICTION_EXTENSION}; missing: {_examples(missing)})"
        )
    extra = sorted(available.difference(ds.names))
    if extra:
        logger.warning("%d PNG files in '%s' are not in split '%s' and are not scored (%s)",
                       len(extra), pred_dir, split, _examples(extra))

    cm = ConfusionMatrix(ds.num_classes, ignore_index=IGNORE_VALUE, device="cpu", class_names=ds.class_names)

    def load(index: int) -> tuple[np.ndarray, np.ndarray]:
        path = pred_dir / f"{ds.names[index]}{PREDICTION_EXTENSION}"
        pred = read_label_png(path)
        gt = ds.load_mask(index)
        if pred.shape != gt.shape:
            raise DatasetError(
                f"prediction '{path}' is {pred.shape[0]}x{pred.shape[1]} (HxW) but the mask "
                f"'{ds.mask_paths[index]}' is {gt.shape[0]}x{gt.shape[1]}; expected the size of the image"
            )
        bad = (pred >= ds.num_classes) & (pred != IGNORE_VALUE)
        if bad.any():
            raise DatasetError(
                f"prediction '{path}' has value {int(pred[bad].max())}; expected class indices "
                f"0..{ds.num_classes - 1} ({ds.num_classes} classes of '{data_root}') or 255"
            )
        return pred, gt

    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # PNG decoding releases the GIL
        for start in range(0, len(ds), _READ_CHUNK):
            for pred, gt in pool.map(load, range(start, min(start + _READ_CHUNK, len(ds)))):
                cm.update(pred, gt)
    result = cm.compute()
    result.update({"num_images": len(ds), "split": split, "pred_dir": str(pred_dir)})
    return result


__all__ = ["evaluate_prediction_dir"]
