"""What a run leaves in its work dir and how it is continued: refusal to overwrite a run, --resume auto
without a config, kept interval checkpoints, metrics.jsonl, the final full-split validation, W&B offline."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from wsss.engine.trainer import train
from wsss.errors import WsssError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def config(demo_data_3cls, tiny_config):
    """config(work, *overrides) -> the tiny run of tests/conftest.py on demo_data_3cls (3 classes, 16 + 4 images)."""

    def make(work, *overrides):
        return tiny_config(
            f"data.root={demo_data_3cls}", f"train.work_dir={work}", "afa.radius=2", "train.log_interval=2",
            "train.val_interval=3", "train.ckpt_interval=2", "train.image_log_interval=0", *overrides,
        )

    return make


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
    """One run with every run file switched on: kept checkpoints, a validation subset, W&B offline."""
    work = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    try:
        summary = train(config(work, "train.keep_checkpoints=2", "data.val_limit=2",
                               "train.loggers=[tensorboard,wandb]"))
    finally:
        mp.undo()
    return work, summary


def records(work, kind):
    return [r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.slow
def test_metrics_jsonl_holds_losses_throughput_and_validation_per_class(run, demo_data_3cls):
    work, _ = run
    train_rows = records(work, "train")
    assert [r["iteration"] for r in train_rows] == [2, 4, 6]
    assert set(train_rows[-1]["losses"]) == {"total", "cls", "seg", "aff", "reg"}
    assert train_rows[-1]["lr"] >= 0 and train_rows[-1]["images_per_s"] > 0
    val_rows = records(work, "val")
    assert [r["iteration"] for r in val_rows] == [3, 6]
    assert set(val_rows[0]["miou"]) == {"cam", "afa", "seg", "par"}
    classes = (demo_data_3cls / "classes.txt").read_text().split()
    assert list(val_rows[0]["per_class_iou"]["seg"]) == classes and len(classes) == 4


@pytest.mark.slow
def test_a_validation_subset_during_training_and_the_whole_split_at_the_end(run):
    work, _ = run
    assert {r["num_images"] for r in records(work, "val")} == {2}
    full = records(work, "val_full")
    assert len(full) == 1 and full[0]["iteration"] == 6 and full[0]["num_images"] == 4
    assert "val_full mIoU (4 images)" in (work / "train.log").read_text()


@pytest.mark.slow
def test_the_last_interval_checkpoints_are_kept_beside_last_and_best(run):
    work, _ = run
    kept = sorted(p.name for p in work.glob("iter_*.pt"))
    assert kept == ["iter_0000004.pt", "iter_0000006.pt"]  # keep_checkpoints=2 of 2, 4, 6
    assert torch.load(work / "iter_0000004.pt", weights_only=True)["iteration"] == 4
    assert (work / "last.pt").is_file() and (work / "best.pt").is_file()


@pytest.mark.slow
def test_weights_and_biases_logs_offline_into_the_work_dir(run):
    work, _ = run
    assert (work / "wandb_id.txt").is_file()
    run_id = (work / "wandb_id.txt").read_text().strip()
    assert list((work / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


@pytest.mark.slow
def test_a_work_dir_that_holds_a_run_is_refused_without_resume(config, run):
    work, _ = run
    with pytest.raises(WsssError, match="already holds a run.*--resume auto"):
        train(config(work))


@pytest.mark.slow
def test_resume_auto_without_a_config_continues_the_run_in_the_work_dir(config, tmp_path, monkeypatch):
    """`wsss train --resume auto --work-dir W`: the config saved in W's last.pt, to the same weights as a
    straight run."""
    from wsss.cli import main

    straight = tmp_path / "straight"
    train(config(straight))
    paused = tmp_path / "paused"
    train(config(paused), stop_after=3)
    monkeypatch.setattr(sys, "argv", ["wsss", "train", "--resume", "auto", "--work-dir", str(paused)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(paused / "last.pt", weights_only=True)
    assert b["iteration"] == 6
    for name, value in a["model"].items():
        assert torch.equal(b["model"][name], value), name


def test_resume_auto_without_a_checkpoint_is_a_clear_error(config, tmp_path):
    with pytest.raises(WsssError, match="holds no last.pt"):
        train(config(tmp_path / "empty"), resume="auto")
