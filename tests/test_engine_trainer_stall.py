"""The stalled-learning warning (train.stall_check_iter, train.stall_ratio): the label prior loss, the one
warning and metrics.jsonl record of a run whose classification loss stays at the prior (train.lr=0), on the
training batches or on val, none on a run of the demo recipe that learns, none again after a resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.config import load_config
from wsss.data.datasets import build_dataset
from wsss.engine.trainer import stall_check_iteration, train
from wsss.errors import ConfigError
from wsss.method.losses import classification_loss, label_prior_loss

WARNING = "learning has stalled"


def records(work, kind):
    return [r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# --------------------------------------------------------------------------- the prior, the config


def test_the_label_prior_loss_is_the_classification_loss_of_constant_logits_at_the_class_frequencies():
    rng = np.random.default_rng(0)
    labels = (rng.random((37, 5)) < [0.1, 0.3, 0.5, 0.7, 0.9]).astype(np.float32)
    p = torch.from_numpy(labels).double().mean(0)
    assert bool(((p > 0) & (p < 1)).all())
    logits = torch.logit(p).expand(len(labels), -1)
    target = torch.from_numpy(labels).double()
    direct = F.multilabel_soft_margin_loss(logits, target).item()
    assert label_prior_loss(labels) == pytest.approx(direct, rel=1e-12, abs=1e-12)
    assert label_prior_loss(torch.from_numpy(labels)) == pytest.approx(direct, rel=1e-12)
    assert classification_loss(logits, target).item() == pytest.approx(direct, rel=1e-12)  # the loss the trainer uses
    # the best constant guess: any other constant logits do worse
    assert F.multilabel_soft_margin_loss(logits + 0.2, target).item() > direct
    assert F.multilabel_soft_margin_loss(logits - 0.2, target).item() > direct


def test_a_class_in_no_image_or_in_every_image_adds_zero_to_the_prior():
    labels = np.array([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 0]], dtype=np.float32)  # p = 0, 1, 0.5
    assert label_prior_loss(labels) == pytest.approx(np.log(2) / 3, rel=1e-12)  # mean over all 3 classes
    assert label_prior_loss(np.zeros((0, 3))) == 0.0


def test_the_check_starts_500_iterations_after_the_warm_up_unless_configured():
    assert stall_check_iteration(load_config("voc").train) == 2000  # warm-up 1500; cam_iters 2000
    assert stall_check_iteration(load_config("coco").train) == 2000
    assert stall_check_iteration(load_config("demo").train) == 600  # warm-up 100, 1300 iterations
    assert stall_check_iteration(load_config("demo", ["train.stall_check_iter=250"]).train) == 250
    assert stall_check_iteration(load_config("demo", ["train.stall_check_iter=0"]).train) is None


@pytest.mark.parametrize("override, words", [
    ("train.stall_check_iter=-2", "train.stall_check_iter must be -1"),
    ("train.stall_ratio=0", "train.stall_ratio must be a positive number"),
    ("train.stall_ratio=.nan", "train.stall_ratio must be a positive number"),
])
def test_bad_stall_settings_are_refused_by_name(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config("demo", [override])


# --------------------------------------------------------------------------- runs


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_run_that_cannot_learn_warns_once_with_what_to_try_and_records_it(demo_data_3cls, tiny_config, tmp_path):
    """train.lr=0: the classification loss stays at its initial value, above the prior; the check runs from
    iteration 4 at every log interval (2), warns at 4 and not again at 6 or 8, nor after a resume."""
    work = tmp_path / "run"
    cfg = tiny_config(f"data.root={demo_data_3cls}", f"train.work_dir={work}", "train.lr=0", "afa.radius=2",
                      "train.iterations=8", "train.log_interval=2", "train.stall_check_iter=4",
                      "train.val_interval=0", "train.ckpt_interval=100", "train.image_log_interval=0")
    prior = label_prior_loss(build_dataset(cfg.data, cfg.data.train_split, train=False).image_labels)
    assert 0.3 < prior < 0.7
    first = train(cfg, stop_after=6)
    assert first["stall_warned"] == 4
    assert torch.load(work / "last.pt", weights_only=True)["stall_warned"] == 4

    (stalled,) = records(work, "stalled")
    cls_at_4 = next(r["losses"]["cls"] for r in records(work, "train") if r["iteration"] == 4)
    assert stalled["iteration"] == 4 and stalled["window"] == 2
    assert stalled["cls_loss"] == pytest.approx(cls_at_4)
    assert stalled["prior_loss"] == pytest.approx(prior)
    assert stalled["ratio"] == pytest.approx(cls_at_4 / prior) and stalled["ratio"] > stalled["stall_ratio"] == 0.9

    log = (work / "train.log").read_text()
    assert log.count(WARNING) == 1
    line = next(t for t in log.splitlines() if WARNING in t)
    assert "warning:" in line  # a logging WARNING record, not an info line
    for key in ("train.lr=0", "train.warmup_iters=2", "model.pretrained=hub", "cam.bg_threshold_high",
                "cam.bg_threshold_low", f"{prior:.4f}"):
        assert key in line, key

    second = train(cfg, resume="auto")  # iterations 7, 8: still stalled, but this run warned already
    assert second["iteration"] == 8 and second["stall_warned"] == 4
    assert len(records(work, "stalled")) == 1
    assert (work / "train.log").read_text().count(WARNING) == 1


def test_the_prior_of_other_frequencies_is_the_loss_of_constant_logits_at_them():
    """What the training split's frequencies score on another split (the validation side of the check)."""
    rng = np.random.default_rng(1)
    labels = (rng.random((29, 4)) < [0.2, 0.4, 0.6, 0.8]).astype(np.float32)
    f = np.array([0.3, 0.3, 0.5, 0.9])
    logits = torch.logit(torch.from_numpy(f)).expand(len(labels), -1)
    direct = F.multilabel_soft_margin_loss(logits, torch.from_numpy(labels).double()).item()
    assert label_prior_loss(labels, f) == pytest.approx(direct, rel=1e-12)
    assert label_prior_loss(labels, f) > label_prior_loss(labels)  # the split's own frequencies are the best guess
    assert label_prior_loss(labels, labels.mean(0)) == pytest.approx(label_prior_loss(labels), rel=1e-6)
    assert np.isfinite(label_prior_loss(labels, [0.0, 1.0, 0.5, 0.5]))  # a frequency of 0 or 1 is clipped


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_validation_loss_at_the_prior_warns_once_on_the_val_split(tiny_config, tmp_path):
    """train.lr=0, a validation at iteration 4 and the first loss check at 8: the validation side warns first,
    against what the training frequencies score on val, and the training side does not warn again. 24 val
    images: on a handful, the training split's frequencies can be a worse guess than the untrained network's."""
    from wsss.data.demo import build_demo_dataset

    data = build_demo_dataset(tmp_path / "data", num_classes=3, image_size=64, num_train=16, num_val=24)
    work = tmp_path / "run"
    cfg = tiny_config(f"data.root={data}", f"train.work_dir={work}", "train.lr=0", "afa.radius=2",
                      "train.iterations=8", "train.log_interval=8", "train.stall_check_iter=4",
                      "train.val_interval=4", "train.ckpt_interval=100", "train.image_log_interval=0")
    train_labels = build_dataset(cfg.data, cfg.data.train_split, train=False).image_labels
    val_labels = build_dataset(cfg.data, cfg.data.val_split, train=False).image_labels
    prior = label_prior_loss(val_labels, np.asarray(train_labels, dtype=np.float64).mean(0))
    summary = train(cfg)
    assert summary["stall_warned"] == 4

    (stalled,) = records(work, "stalled")
    val_at_4 = next(r for r in records(work, "val") if r["iteration"] == 4)["classifier"]
    assert stalled["split"] == "val" and stalled["iteration"] == 4 and stalled["num_images"] == len(val_labels)
    assert stalled["cls_loss"] == pytest.approx(val_at_4["loss"])
    assert stalled["prior_loss"] == pytest.approx(prior) == pytest.approx(val_at_4["prior_loss"])
    assert stalled["ratio"] > 0.9
    assert records(work, "train")[-1]["losses"]["cls"] > 0.9 * label_prior_loss(train_labels)  # stalled there too

    log = (work / "train.log").read_text()
    assert log.count(WARNING) == 1
    line = next(t for t in log.splitlines() if WARNING in t)
    assert "on 'val' (24 images)" in line and "memorises" in line and "train.iterations" in line
    assert "data.rot90=false" in line  # augmentation, the other remedy of a run that memorises
    assert "model.pretrained=hub" in line and f"{prior:.4f}" in line


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_check_switched_off_never_warns(demo_data_3cls, tiny_config, tmp_path):
    work = tmp_path / "run"
    cfg = tiny_config(f"data.root={demo_data_3cls}", f"train.work_dir={work}", "train.lr=0", "afa.radius=2",
                      "train.log_interval=2", "train.stall_check_iter=0", "train.val_interval=0",
                      "train.ckpt_interval=100", "train.image_log_interval=0")
    assert train(cfg)["stall_warned"] is None
    assert records(work, "stalled") == [] and WARNING not in (work / "train.log").read_text()


@pytest.mark.slow
def test_the_demo_recipe_that_learns_does_not_warn(demo_data_3cls, tmp_path):
    """The demo recipe (its lr, warm-up, batch, from scratch) as in test_engine_trainer_learns.py, checked from
    iteration 60 of 100 at every log interval (20): far earlier than the demo's own check (600 of 1300), and
    still no warning; the check was armed and every checked window is below the threshold."""
    work = tmp_path / "run"
    cfg = load_config("demo", [
        f"data.root={demo_data_3cls}", f"train.work_dir={work}", "data.crop_size=64", "data.num_workers=0",
        "train.iterations=100", "train.cam_iters=100", "train.val_interval=100", "train.log_interval=20",
        "train.ckpt_interval=100", "train.precision=fp32", "train.device=cpu", "train.image_log_interval=0",
        "train.stall_check_iter=60",
    ])
    prior = label_prior_loss(build_dataset(cfg.data, cfg.data.train_split, train=False).image_labels)
    summary = train(cfg)
    assert summary["stall_warned"] is None
    assert records(work, "stalled") == []
    log = (work / "train.log").read_text()
    assert "stalled-learning check from iteration 60" in log and WARNING not in log
    cls = {r["iteration"]: r["losses"]["cls"] for r in records(work, "train")}
    assert cls[20] > 0.9 * prior  # it starts at the prior: the same check at iteration 20 would have warned
    assert all(cls[i] < 0.9 * prior for i in (60, 80, 100)), (prior, cls)
    (val,) = [r["classifier"] for r in records(work, "val") if r["iteration"] == 100]
    assert val["loss"] < 0.9 * val["prior_loss"], val  # the validation side checked it too, and it generalises
