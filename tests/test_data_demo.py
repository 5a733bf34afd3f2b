"""The demo dataset builder: deterministic, exact masks, disjoint digits, learnable defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.config import load_config
from wsss.data.datasets import build_dataset
from wsss.data.demo import (
    CLASS_COLOURS,
    DEMO_VARIANTS,
    DemoOptions,
    build_demo_dataset,
    demo_variant,
)
from wsss.data.io import read_label_png
from wsss.errors import WsssError

SMALL = {"num_train": 24, "num_val": 8, "image_size": 64}
# sha256 of meta.json of the default dataset (options, and every object's MNIST index, class and box): the
# README's demo figures were measured on it; a change to the generator's default output shows here.
DEFAULT_META_SHA256 = "2ce757766fa699f0720be87a5671d3ab8f8a946ac747baca4c5af4b7ef5c3905"


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


def masks_of(root: Path, split: str) -> list[np.ndarray]:
    names = (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
    return [read_label_png(root / "SegmentationClass" / f"{n}.png") for n in names]


def test_default_dataset_is_unchanged(default_demo):
    import hashlib

    meta = (default_demo / "meta.json").read_bytes()
    assert "grayscale" not in json.loads(meta)["options"]  # options added later are recorded only when set
    assert hashlib.sha256(meta).hexdigest() == DEFAULT_META_SHA256


def test_options_object_and_keywords_build_the_same_files(tmp_path):
    options = DemoOptions(seed=5, num_classes=3, **SMALL)
    a = files_of(build_demo_dataset(tmp_path / "a", options))
    b = files_of(build_demo_dataset(tmp_path / "b", seed=5, num_classes=3, **SMALL))
    c = files_of(build_demo_dataset(tmp_path / "c", DemoOptions(seed=5, **SMALL), num_classes=3))
    assert a == b == c
    two = DemoOptions(num_classes=2, object_size=[0.3, 0.5], digits=[3, 8])
    assert two.object_size == (0.3, 0.5) and two.digits == (3, 8)  # sequences are stored as tuples


@pytest.mark.parametrize("call,expected", [
    (lambda out: build_demo_dataset(out, colour=True), "unknown demo dataset option 'colour'"),
    (lambda out: build_demo_dataset(out, 3), "options must be a DemoOptions"),
    (lambda out: demo_variant("huge"), "unknown demo variant 'huge'"),
    (lambda out: DemoOptions(stroke_dilation=0.5), "stroke_dilation must be in"),
])
def test_bad_calls_are_one_line_errors(tmp_path, call, expected):
    with pytest.raises(WsssError, match=expected) as info:
        call(tmp_path / "d")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "d").exists()


def test_cli_defaults_are_the_generators():
    import typer.main

    from wsss.cli import app

    command = typer.main.get_command(app).commands["data"].commands["demo"]
    defaults = {p.name: p.default for p in command.params}
    o = DemoOptions()
    assert defaults == {
        "out": None, "seed": o.seed, "num_classes": o.num_classes, "image_size": o.image_size,
        "num_train": o.num_train, "num_val": o.num_val, "min_objects": o.objects_per_image[0],
        "max_objects": o.objects_per_image[1], "min_object_size": o.object_size[0],
        "max_object_size": o.object_size[1], "texture": o.texture, "random_colours": o.random_colours,
        "grayscale": o.grayscale}


def test_variants_change_only_their_own_options():
    default = DemoOptions().record()
    for name, changes in DEMO_VARIANTS.items():
        record = demo_variant(name).record()
        changed = {k for k in record.keys() | default.keys() if record.get(k) != default.get(k)}
        changed -= {"digits"} if "num_classes" in changes else set()  # the digits follow the class count
        changed -= {"gray_contrast"} if changes.get("grayscale") else set()  # recorded with grayscale only
        assert changed == set(changes), name
    assert demo_variant("gray", num_train=30).num_train == 30


def test_grayscale_is_the_colour_dataset_in_grey_levels(tmp_path):
    gray = build_demo_dataset(tmp_path / "gray", seed=1, grayscale=True, texture=True, gray_contrast=0, **SMALL)
    colour = build_demo_dataset(tmp_path / "colour", seed=1, texture=True, **SMALL)
    assert json.loads((gray / "meta.json").read_text())["options"]["grayscale"] is True
    assert objects(gray) == objects(colour)  # same layout, digits and masks: only the pixels' colour differs
    for name in objects(gray)["train"]:
        a = Image.open(gray / "JPEGImages" / f"{name}.jpg")
        assert a.mode == "RGB"
        pixels = np.asarray(a).astype(int)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all(), name
        assert np.abs(pixels[..., 0] - luma(colour / "JPEGImages" / f"{name}.jpg")).mean() < 3, name  # BT.601
        assert (read_label_png(gray / "SegmentationClass" / f"{name}.png")
                == read_label_png(colour / "SegmentationClass" / f"{name}.png")).all()


def luma(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(float) @ np.array([0.299, 0.587, 0.114])


def test_grayscale_digits_keep_their_contrast_to_the_photo_around_them(tmp_path):
    """In grey levels a red or blue digit can vanish into the photo: gray_contrast moves each digit's mean
    grey level away from its surroundings'; the photo and the masks stay as the plain conversion's."""
    from scipy import ndimage

    plain = build_demo_dataset(tmp_path / "plain", seed=2, grayscale=True, gray_contrast=0, **SMALL)
    kept = build_demo_dataset(tmp_path / "kept", seed=2, grayscale=True, **SMALL)
    assert json.loads((kept / "meta.json").read_text())["options"]["gray_contrast"] == DemoOptions().gray_contrast
    assert objects(kept) == objects(plain)
    gaps = {"plain": [], "kept": []}
    for name, records in objects(kept)["train"].items():
        mask = read_label_png(kept / "SegmentationClass" / f"{name}.png")
        assert (mask == read_label_png(plain / "SegmentationClass" / f"{name}.png")).all()
        for key, root in (("plain", plain), ("kept", kept)):
            grey = luma(root / "JPEGImages" / f"{name}.jpg")
            for r in records:  # the digit's mean grey level vs the photo's in its box
                y0, y1, x0, x1 = r["box"]
                box, grey_box = mask[y0:y1, x0:x1], grey[y0:y1, x0:x1]
                digit = grey_box[box == r["class"]]
                if digit.size and (box == 0).any():
                    gaps[key].append(abs(digit.mean() - grey_box[box == 0].mean()))
        assert np.abs(luma(kept / "JPEGImages" / f"{name}.jpg") - luma(plain / "JPEGImages" / f"{name}.jpg")
                      )[ndimage.binary_dilation(mask > 0, iterations=2) == 0].mean() < 1, name  # the photo
    assert min(gaps["plain"]) < 20 < min(gaps["kept"])  # the plain conversion has a near-invisible digit


def test_cli_grayscale_flag(tmp_path, wsss_here):
    out = wsss_here("data", "demo", str(tmp_path / "d"), "--grayscale", "--num-train", "12", "--num-val", "4",
                    "--image-size", "48")
    assert out.returncode == 0, out.stderr
    pixels = np.asarray(Image.open(tmp_path / "d/JPEGImages/train_0000.jpg")).astype(int)
    assert (pixels[..., 0] == pixels[..., 2]).all() and pixels.std() > 0


def test_max_objects_per_image_is_respected(tmp_path):
    root = build_demo_dataset(tmp_path / "d", objects_per_image=(3, 4), object_size=(0.15, 0.25), **SMALL)
    for split in ("train", "val"):
        counts = [len(objs) for objs in objects(root)[split].values()]
        assert max(counts) == 4 and min(counts) >= 2, (split, counts)  # a rare third may find no free spot
    for mask in masks_of(root, "train"):
        assert len(set(np.unique(mask).tolist()) - {0}) <= 3  # K = 4: at most K - 1 classes per image
    crowded = objects(build_demo_dataset(tmp_path / "c", demo_variant("crowded", **SMALL)))
    assert max(len(objs) for split in crowded.values() for objs in split.values()) <= 4


def test_ten_classes_are_named_and_in_the_masks(tmp_path):
    root = build_demo_dataset(tmp_path / "d", demo_variant("classes10", num_train=80, num_val=30, image_size=64))
    assert (root / "classes.txt").read_text().split() == [
        "background", "zero", "one", "four", "seven", "three", "eight", "two", "five", "six", "nine"]
    for split in ("train", "val"):
        seen = set().union(*(np.unique(m).tolist() for m in masks_of(root, split)))
        assert seen == set(range(11)), split


def test_small_variant_objects_are_two_to_three_tokens_long(tmp_path):
    root = build_demo_dataset(tmp_path / "d", demo_variant("small", num_train=24, num_val=8))
    sides = []
    for name, objs in objects(root)["train"].items():
        mask = read_label_png(root / "SegmentationClass" / f"{name}.png")
        for o in objs:
            y0, y1, x0, x1 = o["box"]
            ys, xs = np.nonzero(mask[y0:y1, x0:x1] == o["class"])
            sides.append(max(np.ptp(ys), np.ptp(xs)) + 1)  # the mask's extent inside the object's box
    assert 32 <= min(sides) and max(sides) <= 48, sorted(sides)  # 2-3 tokens of 16 px at 128 px
