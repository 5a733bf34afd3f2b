"""MS COCO 2014 instance annotations -> VOC-style semantic label PNGs.

Input (the official download)::

    coco_root/train2014/COCO_train2014_*.jpg
    coco_root/val2014/COCO_val2014_*.jpg
    coco_root/annotations/instances_{train,val}2014.json

Output (the layout WSSS papers use, read by ``build_dataset`` with ``data.dataset=coco``)::

    out_root/JPEGImages/{split}/<name>.jpg           symlinks to the originals (or copies)
    out_root/SegmentationClass/{split}/<name>.png    mode "P" label PNGs, VOC palette
    out_root/ImageSets/{split}.txt                   images with at least one foreground class
    out_root/classes.txt                             "background" + category names

Rules of the conversion:

- Category ids are mapped to 1..N in increasing id order (N = 80 for COCO 2014,
  the order of :data:`COCO_CLASSES`); 0 is background.
- Overlaps are resolved deterministically: crowd regions (``iscrowd=1``) are
  painted 255 (ignore) first; then the non-crowd instances are painted from the
  largest pixel area to the smallest (ties: increasing annotation id), so a
  smaller object lying on a larger one stays visible, and an instance always
  wins over a crowd region it overlaps.
- Every image gets a mask; the split file lists only images with at least one
  foreground pixel (images whose annotations are all crowd, or that have none,
  carry no image-level label to learn from).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsss.data.io import IGNORE_VALUE, write_label_png
from wsss.errors import DatasetError, require

logger = logging.getLogger(__name__)

# The 80 COCO 2014 categories in increasing category-id order (= label 1..80).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


def coco_semantic_mask(coco: object, image_id: int, category_to_label: dict[int, int]) -> np.ndarray:
    """One image's annotations -> uint8 [H, W] label map (rules in the module docstring).

    ``coco`` is a ``pycocotools.coco.COCO``; ``category_to_label`` maps category id -> 1..N.
    """
    info = coco.imgs[image_id]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    instances = []
    for ann in sorted(anns, key=lambda a: a["id"]):
        if ann["category_id"] not in category_to_label:
            raise DatasetError(
                f"annotation {ann['id']} of image {image_id} has category_id {ann['category_id']}, "
                "which is not among the file's categories"
            )
        binary = coco.annToMask(ann).astype(bool)
        if ann.get("iscrowd", 0):
            mask[binary] = IGNORE_VALUE
        else:
            instances.append((-int(binary.sum()), ann["id"], binary, category_to_label[ann["category_id"]]))
    for _, _, binary, label in sorted(instances, key=lambda t: (t[0], t[1])):
        mask[binary] = label
    return mask


def _place_image(src: Path, dst: Path, copy_images: bool) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if copy_images:
        shutil.copyfile(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def convert_coco_masks(
    coco_root: str | Path,
    out_root: str | Path,
    splits: Sequence[str] = ("train", "val"),
    copy_images: bool = False,
    year: str = "2014",
) -> Path:
    """Convert ``annotations/instances_{split}{year}.json`` to the VOC-style layout -> ``out_root``.

    See the module docstring for the layout and the overlap rule. Images are
    symlinked (``copy_images=False``) or copied. Re-running overwrites the outputs.
    Needs pycocotools (``pip install 'wsss[coco]'``).
    """
    coco_api = require("pycocotools.coco", package="pycocotools", extra="coco")
    coco_root, out_root = Path(coco_root), Path(out_root)
    if not coco_root.is_dir():
        raise DatasetError(
            f"COCO root '{coco_root}' is not a directory; expected {{train,val}}{year}/ and annotations/ in it")
    if not splits:
        raise DatasetError("convert_coco_masks needs at least one split, e.g. ('train', 'val')")
    class_names: list[str] | None = None
    for split in splits:
        ann_file = coco_root / "annotations" / f"instances_{split}{year}.json"
        image_dir = coco_root / f"{split}{year}"
        if not ann_file.is_file():
            raise DatasetError(f"COCO annotation file '{ann_file}' does not exist (split '{split}')")
        if not image_dir.is_dir():
            raise DatasetError(f"COCO image directory '{image_dir}' does not exist (split '{split}')")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco = coco_api.COCO(str(ann_file))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"COCO annotation file '{ann_file}' is not valid COCO JSON ({exc})") from None
        categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        if not categories:
            raise DatasetError(f"COCO annotation file '{ann_file}' has no categories")
        names = [c["name"] for c in categories]
        if class_names is not None and names != class_names:
            raise DatasetError(
                f"COCO annotation file '{ann_file}' has other categories than the previous split; "
                "expected the same category list in every split"
            )
        class_names = names
        category_to_label = {c["id"]: i + 1 for i, c in enumerate(categories)}

        out_images = out_root / "JPEGImages" / split
        out_masks = out_root / "SegmentationClass" / split
        out_images.mkdir(parents=True, exist_ok=True)
        out_masks.mkdir(parents=True, exist_ok=True)
        listed: list[str] = []
        image_ids = sorted(coco.getImgIds())
        from tqdm import tqdm

        for count, image_id in enumerate(tqdm(image_ids, desc=f"coco {split} masks", unit="img"), 1):
            file_name = coco.imgs[image_id]["file_name"]
            src = image_dir / file_name
            if not src.is_file():
                raise DatasetError(f"COCO image '{src}' (image id {image_id} of '{ann_file.name}') does not exist")
            stem = Path(file_name).stem
            mask = coco_semantic_mask(coco, image_id, category_to_label)
            write_label_png(out_masks / f"{stem}.png", mask)
            _place_image(src, out_images / file_name, copy_images)
            if ((mask > 0) & (mask != IGNORE_VALUE)).any():
                listed.append(stem)
            if count % 5000 == 0:
                logger.info("coco %s: %d / %d images converted", split, count, len(image_ids))
        (out_root / "classes.txt").write_text("background\n" + "".join(f"{n}\n" for n in class_names))
        (out_root / "ImageSets").mkdir(parents=True, exist_ok=True)
        (out_root / "ImageSets" / f"{split}.txt").write_text("".join(f"{n}\n" for n in listed))
        logger.info("coco %s: %d images, %d with a foreground class listed in ImageSets/%s.txt",
                    split, len(image_ids), len(listed), split)
    return out_root


__all__ = ["COCO_CLASSES", "coco_semantic_mask", "convert_coco_masks"]
