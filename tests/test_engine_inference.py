"""generate_pseudo_labels / evaluate_checkpoint / validate with a real (untrained) mit_tiny checkpoint
on a tiny demo dataset: files, restart, probabilities, CRF, test-server layout, metrics."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.config import load_config
from wsss.data.datasets import build_dataset
from wsss.data.io import read_label_png
from wsss.engine.checkpoint import save_checkpoint
from wsss.engine.evaluation import evaluate_prediction_dir
from wsss.engine.inference import (
    VOC_SERVER_DIR,
    evaluate_checkpoint,
    generate_pseudo_labels,
    validate,
)
from wsss.errors import DatasetError, WsssError
from wsss.models.network import build_network

FAST = ["data.num_workers=0", "eval.long_side=64", "eval.scales=[1.0,0.5]", "eval.crf_workers=0"]


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    root = demo_data
    cfg = load_config("demo", [f"data.root={root}", f"train.work_dir={tmp / 'work'}", "train.device=cpu", *FAST])
    torch.manual_seed(0)
    network = build_network(cfg, 3)
    ckpt = save_checkpoint({"config": cfg.to_dict(), "model": network.state_dict(), "num_classes": 3,
                            "class_names": ["background", "zero", "one"], "iteration": 0}, tmp / "last.pt")
    return root, ckpt, cfg, network


def names(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def test_pseudo_labels_cover_the_split_and_their_miou_matches_the_files(setup, tmp_path):
    root, ckpt, _, _ = setup
    out = tmp_path / "labels"
    result = generate_pseudo_labels(ckpt, split="val", out_dir=out, method="afa", msc=True, evaluate=True,
                                    save_probs=True, overrides=FAST)
    val = names(root, "val")
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(val)
    assert not list(out.glob(".*"))  # no temporary files left
    first = read_label_png(out / f"{val[0]}.png")
    assert first.shape == (64, 64) and first.max() < 3
    probs = np.load(out / f"{val[0]}.npy")
    assert probs.dtype == np.float16 and probs.shape == (3, 64, 64)
    assert np.array_equal(probs.astype(np.float32).argmax(0), first)
    assert result["miou"] == pytest.approx(evaluate_prediction_dir(out, root, split="val")["miou"])
    assert result["num_images"] == len(val)


def test_pseudo_labels_are_restartable(setup, tmp_path):
    root, ckpt, _, _ = setup
    out = tmp_path / "labels"
    generate_pseudo_labels(ckpt, split="train", out_dir=out, method="cam", msc=False,
                           overrides=[*FAST[1:], "data.num_workers=1"])
    train = names(root, "train")
    (out / f"{train[2]}.png").unlink()
    stamps = {n: (out / f"{n}.png").stat().st_mtime_ns for n in train if n != train[2]}
    result = generate_pseudo_labels(ckpt, split="train", out_dir=out, method="cam", msc=False, evaluate=True,
                                    overrides=FAST)
    assert (out / f"{train[2]}.png").is_file()
    assert {n: (out / f"{n}.png").stat().st_mtime_ns for n in stamps} == stamps  # untouched
    assert (result["written"], result["skipped"]) == (1, len(train) - 1)
    assert result["num_images"] == len(train)  # the skipped ones are scored too
    assert result["miou"] == pytest.approx(evaluate_prediction_dir(out, root, split="train")["miou"])


def test_pseudo_labels_default_directory_and_data_root_override(setup, tmp_path, monkeypatch):
    """The default output sits next to the checkpoint (not below the current directory), the default
    split is the run's training split, and --data-root replaces the run's dataset root."""
    root, ckpt, cfg, _ = setup
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    out = Path(ckpt).parent / "pseudo_labels" / "train_par"
    out.mkdir(parents=True)
    name = names(root, "train")[0]
    (out / f".{name}.png.tmp{os.getpid() + 1}").write_bytes(b"half a file")  # a killed run's leftover
    monkeypatch.chdir(tmp_path)  # somewhere else: the default must not depend on it
    generate_pseudo_labels(ckpt, method="par", msc=False, data_root=moved, overrides=FAST)
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(names(root, "train"))
    assert read_label_png(out / f"{name}.png").shape == (64, 64)
    assert not (tmp_path / "pseudo_labels").exists()


def test_pseudo_labels_with_crf_in_a_worker_process(setup, tmp_path):
    root, ckpt, _, _ = setup
    out = tmp_path / "crf"
    result = generate_pseudo_labels(ckpt, split="val", out_dir=out, method="cam", msc=False, crf=True,
                                    evaluate=True, overrides=[*FAST[:-1], "eval.crf_workers=1"])
    assert len(list(out.glob("*.png"))) == len(names(root, "val"))
    assert 0 <= result["miou"] <= 100 and result["crf"] is True


def test_evaluate_checkpoint_seg_msc_and_saved_predictions(setup, tmp_path):
    root, ckpt, _, _ = setup
    save = tmp_path / "pred"
    result = evaluate_checkpoint(ckpt, split="val", target="seg", msc=True, save_dir=save, overrides=FAST)
    assert set(result) >= {"miou", "iou", "pixel_acc", "class_names", "num_images"}
    assert result["num_images"] == 4 and len(result["iou"]) == 3
    assert result["miou"] == pytest.approx(evaluate_prediction_dir(save, root, split="val")["miou"])


def test_evaluate_checkpoint_afa_target(setup):
    _, ckpt, _, _ = setup
    result = evaluate_checkpoint(ckpt, split="val", target="afa", msc=False, overrides=FAST)
    assert 0 <= result["miou"] <= 100 and result["target"] == "afa"


def test_bg_threshold_sweep_equals_one_evaluation_per_threshold(setup):
    """One CAM pass, several background scores: each threshold's mIoU is what a separate evaluation with
    cam.bg_threshold_eval at that value gives; the result is the best threshold's full table."""
    _, ckpt, _, _ = setup
    thresholds = [0.05, 0.3, 0.9]
    for target in ("par", "cam"):
        result = evaluate_checkpoint(ckpt, split="val", target=target, bg_thresholds=thresholds, overrides=FAST)
        assert [row["bg_threshold"] for row in result["sweep"]] == thresholds
        singles = [evaluate_checkpoint(ckpt, split="val", target=target,
                                       overrides=[*FAST, f"cam.bg_threshold_eval={t}"]) for t in thresholds]
        assert [row["miou"] for row in result["sweep"]] == pytest.approx([r["miou"] for r in singles])
        best = max(range(len(thresholds)), key=lambda i: singles[i]["miou"])
        assert result["bg_threshold"] == thresholds[best]
        assert result["iou"] == pytest.approx(singles[best]["iou"], nan_ok=True)
        ratios = [row["fg_ratio"] for row in result["sweep"]]
        assert ratios[0] > ratios[-1] >= 0  # a higher background score leaves less foreground


def test_bg_threshold_sweep_rejects_what_it_cannot_score(setup, tmp_path):
    _, ckpt, _, _ = setup
    with pytest.raises(WsssError, match="not for 'seg'"):
        evaluate_checkpoint(ckpt, split="val", target="seg", bg_thresholds=[0.3], overrides=FAST)
    with pytest.raises(WsssError, match="neither CRF nor a directory"):
        evaluate_checkpoint(ckpt, split="val", target="par", bg_thresholds=[0.3], save_dir=tmp_path, overrides=FAST)
    with pytest.raises(WsssError, match=r"must lie in \(0, 1\); got 1.5"):
        evaluate_checkpoint(ckpt, split="val", target="par", bg_thresholds=[0.3, 1.5], overrides=FAST)


def test_test_split_predictions_go_to_the_voc_server_layout(setup, tmp_path):
    root, ckpt, _, _ = setup
    data = tmp_path / "data"
    shutil.copytree(root, data)
    test_names = []
    for i, name in enumerate(names(root, "val")[:2]):  # images without masks
        shutil.copy(data / "JPEGImages" / f"{name}.jpg", data / "JPEGImages" / f"test_{i:04d}.jpg")
        test_names.append(f"test_{i:04d}")
    (data / "ImageSets" / "Segmentation" / "test.txt").write_text("\n".join(test_names) + "\n")
    save = tmp_path / "server"
    assert evaluate_checkpoint(ckpt, split="test", save_dir=save, data_root=data, overrides=FAST) is None
    written = sorted(p.stem for p in (save / VOC_SERVER_DIR).glob("*.png"))
    assert written == test_names
    assert read_label_png(save / VOC_SERVER_DIR / "test_0000.png").shape == (64, 64)
    with pytest.raises(DatasetError, match="no masks"):
        generate_pseudo_labels(ckpt, split="test", out_dir=tmp_path / "x", data_root=data, overrides=FAST)


def test_validate_reports_cam_afa_seg_and_restores_training_mode(setup):
    _, _, cfg, network = setup
    dataset = build_dataset(cfg.data, "val", train=False, long_side=None)
    network.train()
    results = validate(network, dataset, cfg, "cpu", limit=2, prior_frequencies=[0.5] * (dataset.num_classes - 1))
    assert set(results) == {"cam", "afa", "seg", "par", "cls"}
    cls = results.pop("cls")
    assert all(r["num_images"] == 2 and 0 <= r["miou"] <= 100 for r in results.values())
    assert cls["num_images"] == 2 and 0 <= cls["macro_f1"] <= 1 and cls["loss"] > 0
    assert cls["prior_loss"] == pytest.approx(math.log(2))  # frequencies 0.5: log 2 whatever the labels
    assert network.training


def test_resuming_with_other_options_is_refused(setup, tmp_path):
    _, ckpt, _, _ = setup
    out = tmp_path / "labels"
    generate_pseudo_labels(ckpt, split="val", out_dir=out, method="cam", msc=False, overrides=FAST)
    with pytest.raises(WsssError, match=r"other options \(cam, method differ"):
        generate_pseudo_labels(ckpt, split="val", out_dir=out, method="par", msc=False,
                               overrides=[*FAST, "cam.bg_threshold_eval=0.5"])
