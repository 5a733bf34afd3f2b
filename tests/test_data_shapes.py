"""The shapes dataset builder: deterministic, masks match the record, held-out geometry, no shared material."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsss.data import demo as digits
from wsss.data import shapes
from wsss.data.datasets import build_dataset
from wsss.data.io import read_label_png
from wsss.data.shapes import (
    MIN_VISIBLE,
    SHAPE_NAMES,
    SHAPES_VARIANTS,
    ShapesOptions,
    build_shapes_dataset,
    shapes_variant,
)
from wsss.errors import WsssError

SMALL = {"num_train": 40, "num_val": 12, "image_size": 64}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def meta(root: Path) -> dict:
    return json.loads((root / "meta.json").read_text())


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path):
    a = files_of(build_shapes_dataset(tmp_path / "a", **SMALL))
    b = files_of(build_shapes_dataset(tmp_path / "b", **SMALL))
    c = files_of(build_shapes_dataset(tmp_path / "c", seed=1, **SMALL))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_masks_hold_exactly_the_recorded_objects(tmp_path):
    root = build_shapes_dataset(tmp_path / "s", occlusion=0.8, objects_per_image=(2, 4), **SMALL)
    record = meta(root)
    assert record["classes"] == ["background", *SHAPE_NAMES[:8]]
    for split in ("train", "val"):
        for name, objs in record["objects"][split].items():
            mask = read_label_png(root / "SegmentationClass" / f"{name}.png")
            assert set(np.unique(mask)) - {0} == {o["class"] for o in objs}
            for o in objs:  # every object keeps the visible share the occlusion rule promises
                assert o["visible"] >= MIN_VISIBLE
                y0, y1, x0, x1 = o["box"]
                assert (mask[y0:y1, x0:x1] == o["class"]).any()


def test_dataset_image_labels_match_the_record(tmp_path):
    from wsss.config import load_config

    root = build_shapes_dataset(tmp_path / "s", **SMALL)
    cfg = load_config("demo", [f"data.root={root}"])
    dataset = build_dataset(cfg.data, "train", train=False, long_side=None)
    record = meta(root)["objects"]["train"]
    for i, objs in enumerate(record.values()):
        expected = np.zeros(8)
        expected[[o["class"] - 1 for o in objs]] = 1
        assert np.array_equal(dataset[i]["label"].numpy(), expected)


def test_every_class_has_positives_and_negatives(tmp_path):
    root = build_shapes_dataset(tmp_path / "s", **SMALL)
    present = np.zeros((SMALL["num_train"], 8), dtype=bool)
    for row, objs in enumerate(meta(root)["objects"]["train"].values()):
        for o in objs:
            present[row, o["class"] - 1] = True
    assert present.any(0).all() and not present.all(0).any()


def test_novel_geometry_is_only_in_the_last_val_images(tmp_path):
    root = build_shapes_dataset(tmp_path / "s", val_novel_fraction=0.25, **SMALL)
    record = meta(root)["objects"]
    assert not any(o["novel"] for objs in record["train"].values() for o in objs)
    flags = [any(o["novel"] for o in objs) for objs in record["val"].values() if objs]
    assert flags == sorted(flags) and sum(flags) == 3  # 25 % of 12, at the end


def test_novel_rings_are_thinner_than_any_training_ring():
    rng = np.random.default_rng(0)
    def ring_area(novel: bool) -> float:
        return float(shapes._rasterise(rng, "ring", 60, novel).sum())
    seen = [ring_area(False) for _ in range(30)]
    novel = [ring_area(True) for _ in range(30)]
    assert max(novel) < min(seen)


def test_object_sizes_follow_the_option(tmp_path):
    root = build_shapes_dataset(tmp_path / "s", object_size=(0.2, 0.3), occlusion=0.0, **SMALL)
    sides = [max(o["box"][1] - o["box"][0], o["box"][3] - o["box"][2]) / SMALL["image_size"]
             for objs in meta(root)["objects"]["train"].values() for o in objs]
    assert 0.18 <= min(sides) and max(sides) <= 0.33


def test_shares_no_material_with_the_digits_demo():
    shape_photos = {p.tobytes()[:4096] for p in shapes._photos()}
    digit_photos = {p.tobytes()[:4096] for p in digits._photos()}
    assert shape_photos and not shape_photos & digit_photos
    shape_textures = {t.tobytes()[:4096] for t in shapes._grey_photos()}
    digit_textures = {t.tobytes()[:4096] for t in digits._textures()}
    assert not shape_textures & digit_textures


@pytest.mark.parametrize("changes, expected", [
    ({"num_classes": 11}, "num_classes must be between 1 and 10"),
    ({"fills": ("paint",)}, "fills must be a non-empty list"),
    ({"background": "sky"}, "background must be one of photo, noise, mixed"),
    ({"occlusion": 1.5}, "occlusion and val_novel_fraction must be in [0, 1]"),
    ({"object_size": (0.5, 0.2)}, "object_size must be (low, high)"),
    ({"colour": 1}, "unknown shapes dataset option 'colour'"),
])
def test_bad_options_are_one_line_errors(tmp_path, changes, expected):
    with pytest.raises(WsssError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build_shapes_dataset(tmp_path / "s", **changes)


def test_variants_change_only_their_own_options():
    for name, changes in SHAPES_VARIANTS.items():
        options = shapes_variant(name)
        for field in ShapesOptions.__dataclass_fields__:
            if field not in changes:
                assert getattr(options, field) == getattr(ShapesOptions(), field), (name, field)
    with pytest.raises(WsssError, match="unknown shapes variant 'huge'"):
        shapes_variant("huge")


def test_cli_builds_the_same_dataset(tmp_path, wsss_here):
    result = wsss_here("data", "shapes", str(tmp_path / "cli"), "--num-train", "40", "--num-val", "12",
                       "--image-size", "64")
    assert result.returncode == 0, result.stderr
    assert files_of(tmp_path / "cli") == files_of(build_shapes_dataset(tmp_path / "api", **SMALL))
    bad = wsss_here("data", "shapes", str(tmp_path / "bad"), "--background", "sky")
    assert bad.returncode != 0 and "background must be one of" in bad.stderr and "Traceback" not in bad.stderr


def test_fill_cue_gives_each_class_its_hue_and_any_outline(tmp_path):
    from PIL import Image
    from skimage.color import rgb2hsv

    k = 4
    root = build_shapes_dataset(tmp_path / "f", class_cue="fill", fills=("flat",), background="noise",
                                num_classes=k, occlusion=0.0, num_train=60, num_val=4, image_size=64)
    record = meta(root)
    assert record["classes"] == ["background", "hue_0", "hue_1", "hue_2", "hue_3"]
    shapes_of = {c: set() for c in range(1, k + 1)}
    for name, objs in record["objects"]["train"].items():
        hues = rgb2hsv(np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg")))[..., 0]
        mask = read_label_png(root / "SegmentationClass" / f"{name}.png")
        for o in objs:
            shapes_of[o["class"]].add(o["shape"])
            inside = mask == o["class"]
            if inside.sum() < 30:
                continue
            hue = np.median(hues[inside])  # the flat fill, through JPEG
            centre = (o["class"] - 0.5) / k  # class c (1-based) lies within a quarter of the gap of its centre
            assert min(abs(hue - centre), 1 - abs(hue - centre)) <= 0.3 / k, (name, o, hue)
    assert all(len(s) >= 3 for s in shapes_of.values()), shapes_of  # the outline does not tell the class
    outline = meta(build_shapes_dataset(tmp_path / "o", num_classes=k, num_train=20, num_val=4, image_size=64))
    assert all(o["shape"] == SHAPE_NAMES[o["class"] - 1]
               for objs in outline["objects"]["train"].values() for o in objs)
    with pytest.raises(WsssError, match="class_cue must be one of outline, fill"):
        build_shapes_dataset(tmp_path / "bad", class_cue="colour")
