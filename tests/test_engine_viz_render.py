"""Panel rendering and the HTML index on synthetic maps (no network)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from wsss.data.io import VOC_PALETTE
from wsss.engine.colors import HEAT_LUT, colorize_label, heatmap
from wsss.engine.viz import (
    COLUMNS,
    GAP,
    TILE_SIZE,
    ImageMaps,
    IndexEntry,
    image_miou,
    legend_entries,
    render_panel,
    sort_entries,
    write_index,
)

NAMES = ["background", "zero", "one", "four", "seven"]


def synthetic_maps(h: int = 72, w: int = 100, gt: bool = True, affinity: bool = True) -> ImageMaps:
    rng = np.random.default_rng(0)
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    blob1 = np.exp(-((yy - h // 3) ** 2 + (xx - w // 3) ** 2) / 200.0).astype(np.float32)
    blob2 = np.exp(-((yy - 2 * h // 3) ** 2 + (xx - 3 * w // 4) ** 2) / 200.0).astype(np.float32)
    label = np.zeros((h, w), np.uint8)
    label[blob1 > 0.5] = 1
    label[blob2 > 0.5] = 3
    pseudo = label.copy()
    pseudo[(blob1 > 0.2) & (blob1 <= 0.5)] = 255
    points = [(h // 3, w // 3), (2 * h // 3, 3 * w // 4), (2, 2)]
    return ImageMaps(
        image=image, class_names=NAMES, classes=[1, 3], classes_from="labels", cams=np.stack([blob1, blob2]),
        par_label=pseudo, rw_label=pseudo if affinity else None, seg_label=label,
        points=points if affinity else [], point_classes=[1, 3, 0] if affinity else [],
        affinity=np.stack([blob1, blob2, 1 - blob1]) if affinity else None,
        gt=label if gt else None, iou=image_miou(label, label if gt else None, len(NAMES)),
    )


def test_colorize_label_indexes_the_voc_palette_and_ignore_colour():
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    rgb = colorize_label(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, VOC_PALETTE[label])
    assert tuple(rgb[1, 1]) == tuple(VOC_PALETTE[255])


def test_heatmap_maps_zero_and_one_to_the_lut_ends_and_clips():
    rgb = heatmap(np.array([[0.0, 1.0, -3.0, 7.0, np.nan]]))
    assert np.array_equal(rgb[0, 0], HEAT_LUT[0]) and np.array_equal(rgb[0, 1], HEAT_LUT[255])
    assert np.array_equal(rgb[0, 2], HEAT_LUT[0]) and np.array_equal(rgb[0, 3], HEAT_LUT[255])
    assert np.array_equal(rgb[0, 4], HEAT_LUT[0])
    assert HEAT_LUT.shape == (256, 3) and len({tuple(c) for c in HEAT_LUT}) > 200


def test_panel_has_the_grid_size_and_is_not_blank():
    maps = synthetic_maps()
    panel = render_panel(maps, title="synthetic")
    width, height = panel.size
    assert width == COLUMNS * (TILE_SIZE + GAP) + GAP
    assert height > 3 * TILE_SIZE  # three rows: labels, CAMs, affinities
    pixels = np.asarray(panel)
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    for c in (1, 3):  # the classes' palette colours appear (label tiles)
        assert (pixels == VOC_PALETTE[c]).all(-1).sum() > 100


def test_panel_without_ground_truth_or_affinity_still_renders():
    with_all = render_panel(synthetic_maps())
    without = render_panel(synthetic_maps(gt=False, affinity=False))
    assert without.size[0] == with_all.size[0]
    assert without.size[1] < with_all.size[1]  # no affinity row
    assert np.asarray(without).std() > 20


def test_legend_names_the_classes_in_the_label_maps_and_ignore():
    names = [name for name, _ in legend_entries(synthetic_maps())]
    assert names == ["background", "zero", "four", "ignore"]


def test_image_miou_is_one_for_a_perfect_prediction_and_none_without_gt():
    gt = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    assert image_miou(gt, gt, 3) == pytest.approx(1.0)
    assert image_miou(gt, None, 3) is None
    assert image_miou(gt, np.full_like(gt, 255), 3) is None
    pred = np.array([[0, 1], [1, 0]], dtype=np.uint8)  # class 2 missed: IoUs 1, 1/2, 0
    assert image_miou(pred, gt, 3) == pytest.approx((1 + 0.5 + 0) / 3)


def test_index_lists_every_image_worst_first_with_relative_links(tmp_path):
    entries = [
        IndexEntry("good", "good.png", 0.9, ["zero"]),
        IndexEntry("unlabelled", "unlabelled.png", None, ["one"], "prediction"),
        IndexEntry("bad", "bad.png", 0.1, ["four"]),
        IndexEntry("mid", "sub dir/mid.png", 0.5, ["zero", "four"]),
    ]
    assert [e.name for e in sort_entries(entries)] == ["bad", "mid", "good", "unlabelled"]
    index = write_index(tmp_path, entries, title="test")
    text = index.read_text()
    assert index == tmp_path / "index.html"
    links = re.findall(r'<img class="thumb" src="([^"]+)"', text)
    assert links == ["bad.png", "sub dir/mid.png", "good.png", "unlabelled.png"]
    assert "n/a" in text and "90.0" in text and "<script>" in text
    assert "http" not in text.replace("http-equiv", "")  # self-contained: nothing fetched from the web
