"""evaluate_prediction_dir on the tiny demo dataset of the demo_data fixture (tests/conftest.py): perfect,
all-background, missing / extra / wrong predictions."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsss.data.io import read_label_png, write_label_png
from wsss.engine.evaluation import evaluate_prediction_dir
from wsss.errors import DatasetError

SPLIT = "val"


def split_names(root: Path) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{SPLIT}.txt").read_text().split()


def copy_ground_truth(root: Path, out: Path) -> Path:
    out.mkdir()
    for name in split_names(root):
        shutil.copy(root / "SegmentationClass" / f"{name}.png", out / f"{name}.png")
    return out


def test_ground_truth_as_prediction_scores_100(demo_data, tmp_path):
    pred = copy_ground_truth(demo_data, tmp_path / "pred")
    result = evaluate_prediction_dir(pred, demo_data, split=SPLIT)
    assert result["miou"] == pytest.approx(100.0)
    assert result["pixel_acc"] == pytest.approx(100.0)
    assert result["class_names"] == ["background", "zero", "one"]
    assert result["num_images"] == 4


def test_all_background_prediction_gives_the_hand_computed_miou(demo_data, tmp_path):
    pred = tmp_path / "pred"
    counts = np.zeros(3, dtype=np.int64)
    for name in split_names(demo_data):
        gt = read_label_png(demo_data / "SegmentationClass" / f"{name}.png")
        counts += np.bincount(gt[gt != 255], minlength=3)[:3]
        write_label_png(pred / f"{name}.png", np.zeros_like(gt))
    # background: TP = its pixels, FP = every foreground pixel -> IoU = bg / all counted;
    # each foreground class present in the ground truth: IoU 0; absent ones: left out.
    present_fg = int((counts[1:] > 0).sum())
    expected = 100 * (counts[0] / counts.sum()) / (1 + present_fg)
    result = evaluate_prediction_dir(pred, demo_data, split=SPLIT)
    assert result["miou"] == pytest.approx(expected)
    assert result["pixel_acc"] == pytest.approx(100 * counts[0] / counts.sum())


def test_missing_predictions_are_one_error_naming_count_and_names(demo_data, tmp_path):
    pred = copy_ground_truth(demo_data, tmp_path / "pred")
    names = split_names(demo_data)
    for name in names[:2]:
        (pred / f"{name}.png").unlink()
    with pytest.raises(DatasetError, match=rf"2 of 4 images of split 'val' have no prediction.*{names[0]}, {names[1]}"):
        evaluate_prediction_dir(pred, demo_data, split=SPLIT)


def test_extra_predictions_only_warn(demo_data, tmp_path, caplog):
    pred = copy_ground_truth(demo_data, tmp_path / "pred")
    write_label_png(pred / "not_in_split.png", np.zeros((32, 32), dtype=np.uint8))
    with caplog.at_level(logging.WARNING):
        result = evaluate_prediction_dir(pred, demo_data, split=SPLIT)
    assert result["miou"] == pytest.approx(100.0)
    assert "1 PNG files" in caplog.text and "not_in_split" in caplog.text


def test_prediction_of_the_wrong_size_is_an_error(demo_data, tmp_path):
    pred = copy_ground_truth(demo_data, tmp_path / "pred")
    name = split_names(demo_data)[1]
    write_label_png(pred / f"{name}.png", np.zeros((16, 32), dtype=np.uint8))
    with pytest.raises(DatasetError, match=rf"{name}.png' is 16x32 .* expected the size of the image"):
        evaluate_prediction_dir(pred, demo_data, split=SPLIT)


def test_prediction_value_outside_the_classes_is_an_error(demo_data, tmp_path):
    pred = copy_ground_truth(demo_data, tmp_path / "pred")
    name = split_names(demo_data)[0]
    size = read_label_png(pred / f"{name}.png").shape  # the right size: only the value is wrong
    write_label_png(pred / f"{name}.png", np.full(size, 7, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"has value 7; expected class indices 0..2"):
        evaluate_prediction_dir(pred, demo_data, split=SPLIT)


def test_missing_prediction_directory_is_an_error(demo_data, tmp_path):
    with pytest.raises(DatasetError, match="prediction directory .* does not exist"):
        evaluate_prediction_dir(tmp_path / "nope", demo_data, split=SPLIT)
