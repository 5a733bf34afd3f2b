"""Segmentation datasets: PASCAL VOC 2012 (+ SBD), COCO 2014 (VOC-style layout), custom folders.

All three are one class, :class:`SegmentationDataset`, over lists of image and
mask files; :func:`build_dataset` resolves a layout into those lists.

Layouts (``data.root``)::

    voc     JPEGImages/<name>.jpg
            SegmentationClass/<name>.png         VOC masks (train, val)
            SegmentationClassAug/<name>.png      SBD masks (train_aug); optional otherwise
            ImageSets/Segmentation/<split>.txt   train, val, test, train_aug
    coco    JPEGImages/<split>/<name>.jpg
            SegmentationClass/<split>/<name>.png
            ImageSets/<split>.txt                optional, see below
            classes.txt                          optional (written by ``wsss data coco-masks``)
    custom  JPEGImages/<name>.<jpg|png|...>
            SegmentationClass/<name>.png
            ImageSets/Segmentation/<split>.txt
            classes.txt                          one name per line, the first is background

Split files hold one name per line (the DeepLab form "/JPEGImages/x.jpg
/SegmentationClassAug/x.png" is read too). VOC ``train_aug`` (10,582 images in
the usual setting) is built when its file is missing: every image with an SBD
mask plus ``train``, minus ``val``; it is written next to the other split files
when that directory is writable, else kept in memory, and a one-line warning
says which. Masks of ``train_aug`` come from SegmentationClassAug (falling back
to SegmentationClass), those of other splits from SegmentationClass (falling
back to SegmentationClassAug). COCO split files are optional: without
``ImageSets/<split>.txt`` the split is every mask in ``SegmentationClass/<split>``,
sorted by name. Without ``classes.txt`` COCO uses the 80 COCO 2014 categories.

A split named ``test`` whose masks are all absent (the VOC test set) is an
inference-only dataset: ``has_masks`` is False, ``load_mask`` and the item's
``mask`` are all ignore (255), and the image labels are unknown (all zeros).

Image-level labels (classes present in a mask other than 0 and 255) are
computed once, checking every mask's values and size on the way, and cached in
``<root>/.wsss_cache`` (or ``~/.cache/wsss`` when the root is read-only), keyed
by the split and the masks' names, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from wsss.config import DataConfig
from wsss.data.coco import COCO_CLASSES
from wsss.data.io import IGNORE_VALUE, image_size, read_image, read_label_png
from wsss.data.transforms import EvalTransform, TrainTransform
from wsss.errors import DatasetError
from wsss.files import atomic_write

logger = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSION = ".png"
INFERENCE_ONLY_SPLIT = "test"
_CACHE_VERSION = 1
_TRAIN_AUG_IN_MEMORY: dict[str, list[str]] = {}  # root -> names, for read-only VOC roots


# --------------------------------------------------------------------------- the dataset


class SegmentationDataset(Dataset):
    """Images with semantic masks (and the image-level labels derived from them).

    Attributes: ``root``, ``split``, ``names`` (list[str]), ``image_paths``,
    ``mask_paths`` (None for an inference-only split), ``class_names`` (C names,
    first "background"), ``num_classes`` (C), ``has_masks``, ``image_labels``
    (float32 [len, K], K = C - 1).

    Items (``train=True``): ``name``, ``image`` float [3, S, S] normalized, ``mask``
    long [S, S] (``ignore_index`` on padding), ``label`` float [K], ``valid_box`` long [4]
    = (y0, y1, x0, x1). Items (``train=False``): ``name``, ``image`` float [3, h, w]
    normalized with long side ``long_side`` (None = original), ``mask`` long [H0, W0]
    at the original size, ``label`` float [K], ``size`` long [2] = (H0, W0).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        names: Sequence[str],
        image_paths: Sequence[Path],
        mask_paths: Sequence[Path] | None,
        class_names: Sequence[str],
        data_cfg: DataConfig,
        train: bool,
        long_side: int | None = None,
        kind: str = "custom",
        views: Any = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.kind = kind
        self.names = list(names)
        self.image_paths = list(image_paths)
        self.mask_paths = list(mask_paths) if mask_paths is not None else None
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.train = train
        self.ignore_index = data_cfg.ignore_index
        self.train_transform = TrainTransform.from_config(data_cfg) if train else None
        self.eval_transform = EvalTransform.from_config(data_cfg, long_side)
        # training only: extra views of each item (ToCo's, wsss.data.transforms.ToCoViews)
        self.views = views if train else None
        if train and self.mask_paths is None:
            raise DatasetError(
                f"split '{split}' of '{self.root}' has no masks (hence no image labels); it can only be used "
                "for inference, not training"
            )
        self.image_labels = self._load_image_labels()
        if train:
            self.report_label_statistics()

    @property
    def has_masks(self) -> bool:
        return self.mask_paths is not None

    def __len__(self) -> int:
        return len(self.names)

    def load_image(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3]."""
        return read_image(self.image_paths[index])

    def load_mask(self, index: int) -> np.ndarray:
        """uint8 [H, W] class indices, 255 = ignore; all 255 for an inference-only split."""
        if self.mask_paths is None:
            return np.full(image_size(self.image_paths[index]), IGNORE_VALUE, dtype=np.uint8)
        path = self.mask_paths[index]
        mask = read_label_png(path)
        self._check_mask_values(mask, path)
        return mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.load_image(index)
        mask = self.load_mask(index) if self.mask_paths is not None else None
        if mask is not None:
            self._check_sizes(image.shape[:2], mask.shape, index)
        label = torch.from_numpy(self.image_labels[index].copy())
        if self.train_transform is not None:
            item: dict[str, Any] = {"name": self.names[index], **self.train_transform(image, mask)}
            item["label"] = label
            if self.views is not None:
                item.update(self.views(item["image"], image))
            return item
        h0, w0 = image.shape[:2]
        if mask is None:
            target = torch.full((h0, w0), self.ignore_index, dtype=torch.long)
        else:
            target = torch.from_numpy(mask).long()
            if self.ignore_index != IGNORE_VALUE:
                target[target == IGNORE_VALUE] = self.ignore_index
        return {
            "name": self.names[index],
            "image": self.eval_transform(image),
            "mask": target,
            "label": label,
            "size": torch.tensor([h0, w0], dtype=torch.long),
        }

    # ----------------------------------------------------------------------- checks and labels

    def _check_mask_values(self, mask: np.ndarray, path: Path) -> None:
        bad = (mask >= self.num_classes) & (mask != IGNORE_VALUE)
        if bad.any():
            value = int(mask[bad].max())
            raise DatasetError(
                f"mask '{path}' has value {value}; expected class indices 0..{self.num_classes - 1} "
                f"({self.num_classes} classes) or 255 (ignore)"
            )

    def _check_sizes(self, image_hw: Sequence[int], mask_hw: Sequence[int], index: int) -> None:
        if tuple(image_hw) != tuple(mask_hw):
            mask_path = self.mask_paths[index] if self.mask_paths is not None else "(none)"
            raise DatasetError(
                f"mask '{mask_path}' is {mask_hw[0]}x{mask_hw[1]} (HxW) but its image "
                f"'{self.image_paths[index]}' is {image_hw[0]}x{image_hw[1]}; expected the same size"
            )

    def _labels_of(self, index: int) -> np.ndarray:
        """Read and check one mask -> bool [K] of the foreground classes it contains."""
        mask = self.load_mask(index)
        self._check_sizes(image_size(self.image_paths[index]), mask.shape, index)
        present = np.zeros(self.num_classes + 1, dtype=bool)
        present[np.unique(np.where(mask == IGNORE_VALUE, self.num_classes, mask))] = True
        return present[1:self.num_classes]

    def _cache_key(self) -> str:
        entries = []
        for path in self.mask_paths or []:
            st = path.stat()
            entries.append((path.name, st.st_size, st.st_mtime_ns))
        blob = json.dumps([_CACHE_VERSION, self.kind, self.split, self.class_names, entries])
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def _cache_files(self, key: str) -> list[Path]:
        safe_split = re.sub(r"[^A-Za-z0-9_.-]", "_", self.split)
        name = f"image_labels_{safe_split}_{key}.npy"
        root_id = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        user_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wsss" / root_id
        return [self.root / ".wsss_cache" / name, user_cache / name]

    def _load_image_labels(self) -> np.ndarray:
        k = self.num_classes - 1
        if self.mask_paths is None:
            return np.zeros((len(self.names), k), dtype=np.float32)
        key = self._cache_key()
        candidates = self._cache_files(key)
        for path in candidates:
            if path.is_file():
                try:
                    labels = np.load(path)
                except (OSError, ValueError):
                    continue
                if labels.shape == (len(self.names), k):
                    return labels.astype(np.float32)
        logger.info("computing image labels of split '%s' from %d masks (once; cached)", self.split, len(self))
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:  # PNG decoding releases the GIL
            from tqdm import tqdm

            rows = list(tqdm(pool.map(self._labels_of, range(len(self))), total=len(self),
                             desc=f"image labels of '{self.split}'", unit="mask"))
        labels = np.stack(rows).astype(np.float32) if rows else np.zeros((0, k), dtype=np.float32)
        for path in candidates:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp: np.save(tmp, labels))
                break
            except OSError:
                continue
        return labels

    def report_label_statistics(self) -> None:
        """Warn (one line each) about images with no foreground class and classes present in every image."""
        if len(self) == 0 or self.image_labels.shape[1] == 0:
            return
        empty = np.flatnonzero(self.image_labels.sum(1) == 0)
        if len(empty):
            examples = ", ".join(self.names[i] for i in empty[:3])
            logger.warning(
                "split '%s' of '%s': %d of %d images have no foreground class (e.g. %s); they only teach background",
                self.split, self.root, len(empty), len(self), examples,
            )
        everywhere = np.flatnonzero(self.image_labels.min(0) == 1)
        if len(everywhere):
            names = ", ".join(f"'{self.class_names[c + 1]}'" for c in everywhere)
            logger.warning(
                "split '%s' of '%s': class %s appears in every image; the classifier sees no negative example",
                self.split, self.root, names,
            )


# --------------------------------------------------------------------------- layouts


def read_split_file(path: Path) -> list[str]:
    """Names listed in a split file: one per line; blank lines and '#' comments skipped;
    a DeepLab-style line "/JPEGImages/x.jpg /SegmentationClassAug/x.png" gives "x"."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DatasetError(f"split file '{path}' cannot be read ({exc})") from None
    names = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split()[0]
        is_file_name = "/" in first or Path(first).suffix.lower() in (*IMAGE_EXTENSIONS, MASK_EXTENSION)
        names.append(Path(first).stem if is_file_name else first)
    return names


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} directory '{path}' does not exist")


def _split_file(directory: Path, split: str, layout: str) -> Path:
    path = directory / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in directory.glob("*.txt")) if directory.is_dir() else []
        hint = f"; available splits: {', '.join(available)}" if available else ""
        raise DatasetError(f"split file '{path}' does not exist (split '{split}', {layout} layout){hint}")
    return path


def _index_dir(directory: Path, extensions: Sequence[str]) -> dict[str, str]:
    """stem -> file name of the files in ``directory`` with one of ``extensions`` (earlier wins)."""
    rank = {ext: i for i, ext in enumerate(extensions)}
    found: dict[str, str] = {}
    if not directory.is_dir():
        return found
    with os.scandir(directory) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            ext = ext.lower()
            if ext in rank and (stem not in found or rank[ext] < rank[os.path.splitext(found[stem])[1].lower()]):
                found[stem] = entry.name
    return found


def _resolve_images(names: list[str], image_dir: Path, split_path: Path) -> list[Path]:
    index = _index_dir(image_dir, IMAGE_EXTENSIONS)
    missing = [n for n in names if n not in index]
    if missing:
        raise DatasetError(
            f"'{image_dir / (missing[0] + '.jpg')}' does not exist: '{missing[0]}' is listed in '{split_path}' "
            f"but has no image in '{image_dir}' ({len(missing)} of {len(names)} listed images missing)"
        )
    return [image_dir / index[n] for n in names]


def _resolve_masks(
    names: list[str], mask_dirs: Sequence[Path], split: str, split_path: Path
) -> list[Path] | None:
    """Mask path per name, from the first directory that has it; None for a mask-less test split."""
    indexes = [(d, _index_dir(d, (MASK_EXTENSION,))) for d in mask_dirs]
    paths: list[Path | None] = []
    for n in names:
        paths.append(next((d / idx[n] for d, idx in indexes if n in idx), None))
    missing = [n for n, p in zip(names, paths) if p is None]
    if split == INFERENCE_ONLY_SPLIT and len(missing) == len(names):
        return None
    if missing:
        where = " or ".join(f"'{d}'" for d in mask_dirs)
        raise DatasetError(
            f"'{mask_dirs[0] / (missing[0] + MASK_EXTENSION)}' does not exist: '{missing[0]}' is listed in "
            f"'{split_path}' but has no mask in {where} ({len(missing)} of {len(names)} listed masks missing)"
        )
    return [p for p in paths if p is not None]


def read_classes_file(path: Path) -> list[str]:
    """Class names from ``classes.txt``: one per line, the first is background; at most 255 classes."""
    if not path.is_file():
        raise DatasetError(f"class list '{path}' does not exist; expected one class name per line, background first")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise DatasetError(f"class list '{path}' has {len(names)} names; expected background plus at least one class")
    if len(names) > IGNORE_VALUE:
        raise DatasetError(f"class list '{path}' has {len(names)} names; at most 255 fit (255 is the ignore value)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"class list '{path}' names '{duplicates[0]}' more than once; expected unique names")
    return names


def voc_train_aug_names(root: str | Path) -> list[str]:
    """Build VOC ``train_aug``: images with an SBD mask plus ``train``, minus ``val`` (sorted).

    Writes ``ImageSets/Segmentation/train_aug.txt`` when possible, else keeps the list in
    memory for this process; says which in one warning line.
    """
    root = Path(root)
    key = str(root.resolve())
    if key in _TRAIN_AUG_IN_MEMORY:
        return _TRAIN_AUG_IN_MEMORY[key]
    sets_dir = root / "ImageSets" / "Segmentation"
    aug_dir = root / "SegmentationClassAug"
    if not aug_dir.is_dir():
        raise DatasetError(
            f"split 'train_aug' needs the SBD masks directory '{aug_dir}' (SegmentationClassAug), which does not exist"
        )
    train = read_split_file(_split_file(sets_dir, "train", "voc"))
    val = set(read_split_file(_split_file(sets_dir, "val", "voc")))
    names = sorted((set(_index_dir(aug_dir, (MASK_EXTENSION,))) | set(train)) - val)
    path = sets_dir / "train_aug.txt"
    try:
        atomic_write(path, lambda tmp: tmp.write_text("".join(f"{n}\n" for n in names)))
        logger.warning("built split 'train_aug' (%d images = SBD masks + train - val) and wrote '%s'",
                       len(names), path)
    except OSError:
        _TRAIN_AUG_IN_MEMORY[key] = names
        logger.warning("built split 'train_aug' (%d images = SBD masks + train - val) in memory: '%s' is not writable",
                       len(names), sets_dir)
    return names


def _voc_layout(root: Path, split: str) -> tuple[list[str], list[Path], list[Path] | None, list[str], Path]:
    _require_dir(root, "VOC root")
    image_dir, seg_dir, aug_dir = root / "JPEGImages", root / "SegmentationClass", root / "SegmentationClassAug"
    _require_dir(image_dir, "VOC image")
    sets_dir = root / "ImageSets" / "Segmentation"
    _require_dir(sets_dir, "VOC split")
    split_path = sets_dir / f"{split}.txt"
    if split == "train_aug" and not split_path.is_file():
        names = voc_train_aug_names(root)
    else:
        names = read_split_file(_split_file(sets_dir, split, "voc"))
    if split != INFERENCE_ONLY_SPLIT and not seg_dir.is_dir() and not aug_dir.is_dir():
        raise DatasetError(f"VOC mask directory '{seg_dir}' does not exist (nor '{aug_dir}')")
    mask_dirs = [aug_dir, seg_dir] if split == "train_aug" else [seg_dir, aug_dir]
    images = _resolve_images(names, image_dir, split_path)
    masks = _resolve_masks(names, mask_dirs, split, split_path)
    return names, images, masks, list(VOC_CLASSES), split_path


def _coco_layout(root: Path, split: str) -> tuple[list[str], list[Path], list[Path] | None, list[str], Path]:
    _require_dir(root, "COCO root")
    image_dir, mask_dir = root / "JPEGImages" / split, root / "SegmentationClass" / split
    _require_dir(image_dir, f"COCO image (split '{split}')")
    split_path = root / "ImageSets" / f"{split}.txt"
    if split_path.is_file():
        names = read_split_file(split_path)
    else:
        listing = mask_dir if mask_dir.is_dir() or split != INFERENCE_ONLY_SPLIT else image_dir
        _require_dir(listing, f"COCO mask (split '{split}', no '{split_path}')")
        names = sorted(_index_dir(listing, (MASK_EXTENSION,) if listing == mask_dir else IMAGE_EXTENSIONS))
        split_path = listing
    if split != INFERENCE_ONLY_SPLIT:
        _require_dir(mask_dir, f"COCO mask (split '{split}')")
    classes_path = root / "classes.txt"
    classes = read_classes_file(classes_path) if classes_path.exists() else ["background", *COCO_CLASSES]
    images = _resolve_images(names, image_dir, split_path)
    masks = _resolve_masks(names, [mask_dir], split, split_path)
    return names, images, masks, classes, split_path


def _custom_layout(root: Path, split: str) -> tuple[list[str], list[Path], list[Path] | None, list[str], Path]:
    _require_dir(root, "dataset root")
    image_dir, mask_dir = root / "JPEGImages", root / "SegmentationClass"
    _require_dir(image_dir, "image")
    if split != INFERENCE_ONLY_SPLIT:
        _require_dir(mask_dir, "mask")
    sets_dir = root / "ImageSets" / "Segmentation"
    _require_dir(sets_dir, "split")
    split_path = _split_file(sets_dir, split, "custom")
    names = read_split_file(split_path)
    classes = read_classes_file(root / "classes.txt")
    images = _resolve_images(names, image_dir, split_path)
    masks = _resolve_masks(names, [mask_dir], split, split_path)
    return names, images, masks, classes, split_path


_LAYOUTS = {"voc": _voc_layout, "coco": _coco_layout, "custom": _custom_layout}


def guess_dataset_kind(root: str | Path) -> str:
    """'custom' if ``classes.txt`` and ``ImageSets/Segmentation`` exist, 'coco' for
    ``JPEGImages/{train,val}`` sub-directories, else 'voc'."""
    root = Path(root)
    if (root / "classes.txt").is_file() and (root / "ImageSets" / "Segmentation").is_dir():
        return "custom"
    if (root / "JPEGImages" / "train").is_dir() or (root / "JPEGImages" / "val").is_dir():
        return "coco"
    return "voc"


def build_dataset(
    data_cfg: DataConfig, split: str, train: bool, long_side: int | None = None, views: Any = None
) -> SegmentationDataset:
    """The dataset ``data_cfg.dataset`` at ``data_cfg.root``, split ``split``.

    ``train=True``: training augmentation from ``data_cfg`` (crop, rescale, flip, jitter).
    ``train=False``: images resized so the long side is ``long_side`` (None = original size).
    ``views``: called on each training item's image and the decoded image, its dict joins the item
    (:class:`wsss.data.transforms.ToCoViews`).
    Raises DatasetError (one line naming the file or directory) for a broken layout.
    """
    if data_cfg.dataset not in _LAYOUTS:
        raise DatasetError(f"data.dataset must be one of {', '.join(_LAYOUTS)}; got '{data_cfg.dataset}'")
    root = Path(data_cfg.root).expanduser()
    names, images, masks, classes, _ = _LAYOUTS[data_cfg.dataset](root, split)
    if not names:
        raise DatasetError(f"split '{split}' of '{root}' lists no images")
    return SegmentationDataset(root, split, names, images, masks, classes, data_cfg, train=train,
                               long_side=long_side, kind=data_cfg.dataset, views=views)


__all__ = [
    "IMAGE_EXTENSIONS", "VOC_CLASSES", "SegmentationDataset", "build_dataset", "guess_dataset_kind",
    "read_classes_file", "read_split_file", "voc_train_aug_names",
]
