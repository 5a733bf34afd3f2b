"""The best mIoU a segmentation predicted at output stride s can reach on a split: the ceiling of a seg head.

    python3 bench/stride_ceiling.py data/demo                    # val split, strides 4, 8, 16
    python3 bench/stride_ceiling.py data/demo --split train --strides 8 16 32

A head whose logits live on a grid s times coarser than the image (the SegFormer head on a backbone whose
finest feature map has stride s: MiT 4, a timm ViT / DeiT 16) can at best output, per cell, the class shares of
the s x s pixels it covers; upsampled bilinearly to the image and arg-maxed (as `wsss eval` does with the
logits), that is this script's prediction: the ground truth's one-hot masks averaged over s x s cells (a
partial cell at the border counts its pixels only), upsampled, arg-maxed. It needs no model: it says whether
a gap between the seg head and its pseudo labels can come from the output stride alone. Ignored pixels count in
no cell and in no score.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import load_average


def stride_ceiling(data_root: Path, split: str, stride: int) -> float:
    """mIoU % of the ideal stride-``stride`` prediction on ``split`` of the dataset in ``data_root``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from wsss.data.io import IGNORE_VALUE, read_label_png
    from wsss.engine.metrics import ConfusionMatrix

    names = (data_root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    num_classes = len((data_root / "classes.txt").read_text().split())
    confusion = ConfusionMatrix(num_classes, ignore_index=IGNORE_VALUE)
    for name in names:
        mask = torch.from_numpy(read_label_png(data_root / "SegmentationClass" / f"{name}.png").astype(np.int64))
        valid = (mask != IGNORE_VALUE).float()
        one_hot = F.one_hot(mask.masked_fill(mask == IGNORE_VALUE, 0), num_classes).permute(2, 0, 1).float()
        one_hot = (one_hot * valid)[None]
        cells = F.avg_pool2d(one_hot, stride, ceil_mode=True)
        counts = F.avg_pool2d(valid[None, None], stride, ceil_mode=True).clamp_min(1e-6)
        shares = F.interpolate(cells / counts, size=mask.shape, mode="bilinear", align_corners=False)
        confusion.update(shares.argmax(1)[0], mask)
    return confusion.compute()["miou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", type=Path, help="a dataset in the custom layout (e.g. `wsss data demo` output)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--strides", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    print(f"{args.data_root} '{args.split}': mIoU % of the ideal prediction at each output stride "
          f"(load average {load_average()})")
    for stride in args.strides:
        print(f"  stride {stride:>3}: {stride_ceiling(args.data_root, args.split, stride):5.1f}")


if __name__ == "__main__":
    main()
