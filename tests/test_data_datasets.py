"""VOC and custom datasets: layouts, train_aug, masks, image labels, cache, validation."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wsss.data.datasets as datasets_module
from wsss.config import DataConfig
from wsss.data.datasets import VOC_CLASSES, build_dataset, guess_dataset_kind, read_split_file
from wsss.data.io import write_label_png
from wsss.errors import DatasetError

H, W = 12, 16


def write_image(path: Path, h: int = H, w: int = W, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def box_mask(*classes: int, h: int = H, w: int = W) -> np.ndarray:
    """Background with one vertical band per class, a 255 border row."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for i, c in enumerate(classes):
        mask[2:, 1 + 3 * i: 3 + 3 * i] = c
    mask[0] = 255
    return mask


def write_split(root: Path, split: str, names: list[str], sets: str = "ImageSets/Segmentation") -> None:
    (root / sets).mkdir(parents=True, exist_ok=True)
    (root / sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def make_voc(root: Path) -> Path:
    """VOC with SBD. train: a1 a2, val: v1 v2, SBD-only: s1 s2 s3, test: t1 (no masks).

    SegmentationClass has a1 a2 v1 v2; SegmentationClassAug has a1 (another class than
    its VOC mask, to tell the sources apart) v1 s1 s2 s3, as SBD also covers val images.
    """
    for i, name in enumerate(["a1", "a2", "v1", "v2", "s1", "s2", "s3", "t1"]):
        write_image(root / "JPEGImages" / f"{name}.jpg", seed=i)
    voc = {"a1": box_mask(1), "a2": box_mask(2, 3), "v1": box_mask(4), "v2": box_mask(5, 15)}
    aug = {"a1": box_mask(20), "v1": box_mask(6), "s1": box_mask(7), "s2": box_mask(8, 9), "s3": box_mask(1)}
    for name, mask in voc.items():
        write_label_png(root / "SegmentationClass" / f"{name}.png", mask)
    (root / "SegmentationClassAug").mkdir()
    for name, mask in aug.items():
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{name}.png")  # greyscale, as SBD's
    write_split(root, "train", ["a1", "a2"])
    write_split(root, "val", ["v1", "v2"])
    write_split(root, "test", ["t1"])
    return root


def make_custom(root: Path, classes=("background", "cat", "dog", "fox"), masks=None, split="train") -> Path:
    masks = masks if masks is not None else {"i0": box_mask(1), "i1": box_mask(1, 2), "i2": box_mask(1, 3)}
    for i, (name, mask) in enumerate(masks.items()):
        write_image(root / "JPEGImages" / f"{name}.png", *mask.shape, seed=i)
        write_label_png(root / "SegmentationClass" / f"{name}.png", mask)
    write_split(root, split, list(masks))
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return root


def cfg(root: Path, dataset: str = "voc", crop: int = 16) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root), crop_size=crop, rescale_range=[1.0, 1.0], hflip=False)


def labels_of(ds, name: str) -> list[int]:
    return (np.flatnonzero(ds.image_labels[ds.names.index(name)]) + 1).tolist()


# --------------------------------------------------------------------------- VOC


def test_voc_train_aug_is_built_as_sbd_plus_train_minus_val_and_said_once(tmp_path, caplog):
    root = make_voc(tmp_path / "VOC2012")
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        ds = build_dataset(cfg(root), "train_aug", train=True)
        build_dataset(cfg(root), "train_aug", train=True)
    assert ds.names == ["a1", "a2", "s1", "s2", "s3"]
    assert read_split_file(root / "ImageSets/Segmentation/train_aug.txt") == ds.names
    said = [r.getMessage() for r in caplog.records if "train_aug" in r.getMessage()]
    assert len(said) == 1 and "5 images" in said[0] and "train_aug.txt" in said[0]


def test_voc_train_aug_is_kept_in_memory_when_the_root_is_read_only(tmp_path, caplog, monkeypatch):
    root = make_voc(tmp_path / "VOC2012")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        first = build_dataset(cfg(root), "train_aug", train=False)
        second = build_dataset(cfg(root), "train_aug", train=False)
    assert first.names == second.names == ["a1", "a2", "s1", "s2", "s3"]
    assert not (root / "ImageSets/Segmentation/train_aug.txt").exists()
    said = [r.getMessage() for r in caplog.records if "train_aug" in r.getMessage()]
    assert len(said) == 1 and "in memory" in said[0]


def test_voc_existing_train_aug_file_is_used_as_is(tmp_path, caplog):
    root = make_voc(tmp_path / "VOC2012")
    # DeepLab-style lines are accepted too.
    (root / "ImageSets/Segmentation/train_aug.txt").write_text(
        "/JPEGImages/s2.jpg /SegmentationClassAug/s2.png\n\ns1\n")
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        ds = build_dataset(cfg(root), "train_aug", train=True)
    assert ds.names == ["s2", "s1"]
    assert not [r for r in caplog.records if "train_aug" in r.getMessage()]


def test_voc_mask_sources_train_aug_prefers_sbd_val_prefers_voc(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    aug = build_dataset(cfg(root), "train_aug", train=False)
    assert labels_of(aug, "a1") == [20]  # SBD version
    assert labels_of(aug, "a2") == [2, 3]  # not in SBD: falls back to the VOC mask
    assert labels_of(aug, "s2") == [8, 9]
    val = build_dataset(cfg(root), "val", train=False)
    assert val.names == ["v1", "v2"] and labels_of(val, "v1") == [4] and labels_of(val, "v2") == [5, 15]
    assert val.class_names == list(VOC_CLASSES) and val.num_classes == 21
    assert val.image_labels.shape == (2, 20) and val.image_labels.dtype == np.float32


def test_voc_items_have_the_contract_shapes(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    item = build_dataset(cfg(root, crop=32), "train", train=True)[1]
    assert item["name"] == "a2"
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.long
    assert item["valid_box"].tolist()[1] - item["valid_box"].tolist()[0] == H
    assert item["label"].tolist() == [0, 1, 1] + [0] * 17
    item = build_dataset(cfg(root), "val", train=False, long_side=32)[0]
    assert item["image"].shape == (3, 24, 32)
    assert item["mask"].shape == (H, W) and item["size"].tolist() == [H, W]
    assert torch.equal(item["mask"], torch.from_numpy(box_mask(4)).long())
    batch = torch.utils.data.default_collate([build_dataset(cfg(root), "train", train=True)[i] for i in range(2)])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["valid_box"].shape == (2, 4)


def test_voc_test_split_without_masks_is_inference_only(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    ds = build_dataset(cfg(root), "test", train=False)
    assert not ds.has_masks and ds.image_labels.shape == (1, 20) and ds.image_labels.sum() == 0
    item = ds[0]
    assert item["name"] == "t1" and (item["mask"] == 255).all() and item["mask"].shape == (H, W)
    assert (ds.load_mask(0) == 255).all()
    with pytest.raises(DatasetError, match="test.*no masks.*inference"):
        build_dataset(cfg(root), "test", train=True)


def test_voc_train_aug_without_sbd_masks_names_the_directory(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    for p in (root / "SegmentationClassAug").iterdir():
        p.unlink()
    (root / "SegmentationClassAug").rmdir()
    with pytest.raises(DatasetError, match="SegmentationClassAug"):
        build_dataset(cfg(root), "train_aug", train=True)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("missing,expected", [
    ("", "VOC root directory"),
    ("JPEGImages", "JPEGImages' does not exist"),
    ("ImageSets", "Segmentation' does not exist"),
])
def test_missing_directories_are_named(tmp_path, missing, expected):
    root = tmp_path / "VOC2012"
    if missing:
        make_voc(root)
        shutil.rmtree(root / missing)
    with pytest.raises(DatasetError, match=expected):
        build_dataset(cfg(root), "val", train=False)


def test_missing_split_file_is_named_with_the_available_splits(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    with pytest.raises(DatasetError, match=r"trainval\.txt' does not exist.*available splits: test, train, val"):
        build_dataset(cfg(root), "trainval", train=False)


def test_listed_name_without_image_is_named(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    write_split(root, "val", ["v1", "ghost"])
    with pytest.raises(DatasetError, match=r"ghost\.jpg' does not exist.*val\.txt"):
        build_dataset(cfg(root), "val", train=False)


def test_listed_name_without_mask_is_named(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    write_split(root, "val", ["v1", "t1"])
    with pytest.raises(DatasetError, match=r"SegmentationClass/t1\.png' does not exist.*val\.txt"):
        build_dataset(cfg(root), "val", train=False)


def test_mask_value_outside_the_classes_is_named(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    write_label_png(root / "SegmentationClass/v2.png", box_mask(21))
    with pytest.raises(DatasetError, match=r"v2\.png' has value 21; expected class indices 0\.\.20"):
        build_dataset(cfg(root), "val", train=False)


def test_mask_size_mismatch_is_named(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    write_label_png(root / "SegmentationClass/v1.png", box_mask(4, h=H + 1))
    with pytest.raises(DatasetError, match=rf"v1\.png' is {H + 1}x{W}.*v1\.jpg' is {H}x{W}"):
        build_dataset(cfg(root), "val", train=False)


def test_unreadable_image_is_named(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    (root / "JPEGImages/v1.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match=r"v1\.jpg' is not a readable image"):
        build_dataset(cfg(root), "val", train=False)


def test_masks_are_checked_again_when_loaded(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    ds = build_dataset(cfg(root), "val", train=False)
    write_label_png(root / "SegmentationClass/v1.png", box_mask(42))
    with pytest.raises(DatasetError, match=r"v1\.png' has value 42"):
        ds[0]
    write_label_png(root / "SegmentationClass/v1.png", box_mask(4, w=W - 2))
    with pytest.raises(DatasetError, match=r"v1\.png' is .* expected the same size"):
        ds[0]


def test_unknown_dataset_kind_is_a_dataset_error(tmp_path):
    data_cfg = cfg(tmp_path)
    data_cfg.dataset = "imagenet"
    with pytest.raises(DatasetError, match="data.dataset must be one of voc, coco, custom"):
        build_dataset(data_cfg, "val", train=False)


# --------------------------------------------------------------------------- image labels cache


def test_image_labels_are_cached_and_recomputed_when_a_mask_changes(tmp_path, monkeypatch):
    root = make_voc(tmp_path / "VOC2012")
    first = build_dataset(cfg(root), "val", train=False)
    assert list((root / ".wsss_cache").glob("image_labels_val_*.npy"))
    calls = []
    real = datasets_module.read_label_png
    monkeypatch.setattr(datasets_module, "read_label_png", lambda p: calls.append(p) or real(p))
    again = build_dataset(cfg(root), "val", train=False)
    assert calls == [] and np.array_equal(again.image_labels, first.image_labels)
    write_label_png(root / "SegmentationClass/v1.png", box_mask(7, 8))
    st = os.stat(root / "SegmentationClass/v1.png")
    os.utime(root / "SegmentationClass/v1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = build_dataset(cfg(root), "val", train=False)
    assert len(calls) == 2 and labels_of(changed, "v1") == [7, 8]


def test_image_labels_cache_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    root = make_voc(tmp_path / "VOC2012")
    (root / ".wsss_cache").write_text("a file where the cache directory would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    build_dataset(cfg(root), "val", train=False)
    assert list((tmp_path / "xdg" / "wsss").glob("*/image_labels_val_*.npy"))


# --------------------------------------------------------------------------- custom


def test_custom_dataset_reads_classes_and_png_images(tmp_path):
    root = make_custom(tmp_path / "mine")
    ds = build_dataset(cfg(root, "custom"), "train", train=False)
    assert ds.class_names == ["background", "cat", "dog", "fox"] and ds.num_classes == 4
    assert ds.image_labels.tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert ds.load_image(0).shape == (H, W, 3)
    assert guess_dataset_kind(root) == "custom"


def test_custom_dataset_with_many_classes(tmp_path):
    classes = ["background"] + [f"c{i}" for i in range(1, 40)]
    root = make_custom(tmp_path / "many", classes, masks={"x": box_mask(39, 2), "y": box_mask(17)})
    ds = build_dataset(cfg(root, "custom"), "train", train=False)
    assert ds.num_classes == 40 and labels_of(ds, "x") == [2, 39] and labels_of(ds, "y") == [17]


def test_custom_mask_beyond_classes_txt_is_named(tmp_path):
    root = make_custom(tmp_path / "mine", masks={"i0": box_mask(1), "i1": box_mask(4)})
    with pytest.raises(DatasetError, match=r"i1\.png' has value 4; expected class indices 0\.\.3 \(4 classes\)"):
        build_dataset(cfg(root, "custom"), "train", train=False)


@pytest.mark.parametrize("content,expected", [
    (None, "classes.txt' does not exist"),
    ("background\n", "has 1 names; expected background plus at least one class"),
    ("background\ncat\ncat\n", "names 'cat' more than once"),
])
def test_custom_bad_class_list_is_named(tmp_path, content, expected):
    root = make_custom(tmp_path / "mine")
    if content is None:
        (root / "classes.txt").unlink()
    else:
        (root / "classes.txt").write_text(content)
    with pytest.raises(DatasetError, match=expected):
        build_dataset(cfg(root, "custom"), "train", train=False)


def test_training_split_reports_images_without_foreground_and_classes_without_negatives(tmp_path, caplog):
    masks = {"i0": box_mask(1), "i1": box_mask(1, 2), "i2": box_mask(), "i3": box_mask(1, 3)}
    root = make_custom(tmp_path / "mine", masks=masks)
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        build_dataset(cfg(root, "custom"), "train", train=False)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        build_dataset(cfg(root, "custom"), "train", train=True)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1  # i2 has no cat, so cat has a negative
    assert "1 of 4 images have no foreground class (e.g. i2)" in messages[0]
    caplog.clear()
    masks = {"i0": box_mask(1), "i1": box_mask(1, 2), "i3": box_mask(1, 3)}
    root = make_custom(tmp_path / "mine2", masks=masks)
    with caplog.at_level(logging.WARNING, logger="wsss.data"):
        build_dataset(cfg(root, "custom"), "train", train=True)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "class 'cat' appears in every image" in messages[0]
