"""The demo dataset builder: deterministic, exact masks, disjoint digits, learnable defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.config import load_config
from wsss.data.datasets import build_dataset
from wsss.data.demo import CLASS_COLOURS, build_demo_dataset
from wsss.data.io import read_label_png
from wsss.errors import WsssError

SMALL = {"num_train": 24, "num_val": 8, "image_size": 64}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def objects(root: Path) -> dict[str, dict[str, list[dict]]]:
    return json.loads((root / "meta.json").read_text())["objects"]


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo")


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path):
    a = files_of(build_demo_dataset(tmp_path / "a", seed=3, **SMALL))
    b = files_of(build_demo_dataset(tmp_path / "b", seed=3, **SMALL))
    c = files_of(build_demo_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a if k.startswith("JPEGImages")) == SMALL["num_train"] + SMALL["num_val"]


def test_default_layout_classes_and_sizes(default_demo):
    root = default_demo
    assert (root / "classes.txt").read_text().split() == ["background", "zero", "one", "four", "seven"]
    train = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 400 and len(val) == 100 and not set(train) & set(val)
    image = Image.open(root / "JPEGImages" / f"{train[0]}.jpg")
    assert image.size == (128, 128) and image.mode == "RGB"
    assert Image.open(root / "SegmentationClass" / f"{train[0]}.png").mode == "P"


def test_default_is_easy_every_class_has_positives_and_negatives(default_demo):
    cfg = load_config("demo", [f"data.root={default_demo}"])
    for split in ("train", "val"):
        labels = build_dataset(cfg.data, split, train=False).image_labels
        assert labels.shape[1] == 4
        share = labels.mean(0)
        assert (share > 0.2).all() and (share < 0.6).all(), (split, share)  # balanced, with negatives
        assert set(labels.sum(1).tolist()) <= {1.0, 2.0}  # one or two classes per image
    mask = read_label_png(default_demo / "SegmentationClass/train_0000.png")
    boxes = [o["box"] for o in objects(default_demo)["train"]["train_0000"]]
    for y0, y1, x0, x1 in boxes:  # digits about half the image side
        assert 0.3 * 128 <= max(y1 - y0, x1 - x0) <= 0.7 * 128
    assert (mask > 0).mean() > 0.03


def test_masks_are_exactly_the_pasted_digits_in_their_class_colours(tmp_path):
    root = build_demo_dataset(tmp_path / "d", seed=1, **SMALL)
    records = objects(root)
    for split in ("train", "val"):
        for name, objs in records[split].items():
            mask = read_label_png(root / "SegmentationClass" / f"{name}.png")
            image = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg")).astype(float)
            assert set(np.unique(mask).tolist()) - {0} == {o["class"] for o in objs}
            for c in np.unique(mask[mask > 0]):
                boxes = np.zeros(mask.shape, dtype=bool)
                for o in objs:
                    if o["class"] == c:
                        y0, y1, x0, x1 = o["box"]
                        boxes[y0:y1, x0:x1] = True
                assert not ((mask == c) & ~boxes).any()  # class pixels only where its digits were pasted
                colour = np.median(image[mask == c], axis=0)
                assert np.abs(colour - CLASS_COLOURS[c - 1]).max() < 25, (name, c, colour)


def test_dataset_image_labels_match_the_generator_record(tmp_path):
    root = build_demo_dataset(tmp_path / "d", seed=2, **SMALL)
    cfg = load_config("demo", [f"data.root={root}"])
    ds = build_dataset(cfg.data, "train", train=True)
    records = objects(root)["train"]
    for i, name in enumerate(ds.names):
        expected = {o["class"] for o in records[name]}
        assert set((np.flatnonzero(ds.image_labels[i]) + 1).tolist()) == expected
    item = ds[0]
    assert item["image"].shape == (3, 128, 128)  # demo crop size; 64px images are padded
    assert (item["mask"] == 255).any()


def test_train_and_val_use_disjoint_digit_samples(tmp_path):
    root = build_demo_dataset(tmp_path / "d", seed=0, num_train=60, num_val=30, image_size=48)
    records = objects(root)
    used = {split: {o["mnist_index"] for objs in records[split].values() for o in objs} for split in records}
    assert used["train"] and used["val"] and not used["train"] & used["val"]


def test_one_class_still_has_negative_images(tmp_path):
    root = build_demo_dataset(tmp_path / "d", num_classes=1, **SMALL)
    assert (root / "classes.txt").read_text().split() == ["background", "zero"]
    present = [bool(objs) for objs in objects(root)["train"].values()]
    assert any(present) and not all(present)


def test_harder_variant_options(tmp_path):
    root = build_demo_dataset(tmp_path / "d", num_classes=10, object_size=(0.2, 0.3), objects_per_image=(1, 3),
                              texture=True, random_colours=True, **SMALL)
    assert len((root / "classes.txt").read_text().split()) == 11
    records = objects(root)["train"]
    assert max(len(objs) for objs in records.values()) == 3
    for objs in records.values():
        for o in objs:
            y0, y1, x0, x1 = o["box"]
            assert max(y1 - y0, x1 - x0) <= 0.3 * 64 + 2 * round(0.03 * 0.3 * 64) + 1


def test_rebuild_is_skipped_for_same_options_and_replaced_for_others(tmp_path):
    root = build_demo_dataset(tmp_path / "d", **SMALL)
    stamp = (root / "JPEGImages/train_0000.jpg").stat().st_mtime_ns
    build_demo_dataset(tmp_path / "d", **SMALL)
    assert (root / "JPEGImages/train_0000.jpg").stat().st_mtime_ns == stamp
    build_demo_dataset(tmp_path / "d", **{**SMALL, "num_train": 30})
    assert len((root / "ImageSets/Segmentation/train.txt").read_text().split()) == 30


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(WsssError, match="is not a demo dataset"):
        build_demo_dataset(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("options,expected", [
    ({"num_classes": 11}, "num_classes must be between 1 and 10"),
    ({"digits": [1, 1, 2, 3]}, "digits must be 4 distinct values"),
    ({"object_size": (0.5, 1.5)}, "object_size must be"),
    ({"objects_per_image": (0, 2)}, "objects_per_image must be"),
    ({"image_size": 8}, "image_size must be at least 16"),
])
def test_bad_options_are_one_line_errors(tmp_path, options, expected):
    with pytest.raises(WsssError, match=expected):
        build_demo_dataset(tmp_path / "d", **{**SMALL, **options})
