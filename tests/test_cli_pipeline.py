"""train -> pseudolabel -> eval through the command line on a tiny demo dataset, and the
one-line errors a user gets for bad input.

Training and the missing-checkpoint error run the real console entry point in a fresh
interpreter (what a user sees, traceback or not); the other commands call the same
``wsss.cli.main`` in this process to save the interpreter start-up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from wsss.data.io import read_label_png

NUM_TRAIN, NUM_CLASSES = 16, 3  # the demo_data_3cls fixture (tests/conftest.py)
# on top of the tiny run (tests/conftest.py): validation, checkpoints and image grids at 3, the loss every 2
EXTRAS = [
    "afa.radius=2", "eval.long_side=64",
    "train.log_interval=2", "train.val_interval=3", "train.ckpt_interval=3", "train.image_log_interval=3",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def wsss(*args: str) -> subprocess.CompletedProcess:
    """The ``wsss`` console entry point (``wsss.cli.main``) in a fresh interpreter."""
    code = "import sys\nfrom wsss.cli import main\nsys.argv = ['wsss', *sys.argv[1:]]\nmain()"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def trained(demo_data_3cls, tiny_overrides, tmp_path_factory):
    data = demo_data_3cls
    work = tmp_path_factory.mktemp("pipeline") / "work"
    out = wsss("train", "demo", "--data-root", str(data), "--work-dir", str(work), *tiny_overrides(*EXTRAS))
    assert out.returncode == 0, out.stderr[-3000:]
    return data, work


def error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_train_writes_checkpoints_config_versions_log_and_tensorboard_events(trained):
    _, work = trained
    for name in ("last.pt", "best.pt", "config.yaml", "versions.json", "train.log"):
        assert (work / name).is_file(), name
    assert list((work / "tb").glob("events.out.tfevents.*"))
    last = torch.load(work / "last.pt", weights_only=True)
    assert last["iteration"] == 6 and last["num_classes"] == NUM_CLASSES + 1
    assert last["class_names"][0] == "background" and 0 <= last["best_miou"] <= 100
    versions = json.loads((work / "versions.json").read_text())
    assert {"python", "torch", "torchvision", "timm", "wsss"} <= set(versions)
    assert re.search(r"val mIoU \(\d+ images\) cam", (work / "train.log").read_text())


@pytest.mark.slow
def test_tensorboard_has_losses_lr_val_mious_and_image_grids(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, work = trained
    events = EventAccumulator(str(work / "tb")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/cls", "loss/seg", "loss/aff", "lr", "val/cam_miou", "val/afa_miou",
            "val/seg_miou"} <= scalars
    assert events.Tags()["images"]


@pytest.mark.slow
def test_pseudolabel_writes_one_label_png_per_image_and_scores_them(trained, wsss_here):
    data, work = trained
    out_dir = work / "labels_afa"
    out = wsss_here("pseudolabel", "--checkpoint", str(work / "last.pt"), "--split", "train", "--method", "afa",
               "--eval", "--out", str(out_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    pngs = sorted(out_dir.glob("*.png"))
    assert len(pngs) == NUM_TRAIN
    label = read_label_png(pngs[0])
    assert label.shape == (64, 64) and set(np.unique(label)) <= set(range(NUM_CLASSES + 1)) | {255}
    miou = float(re.search(r"^mIoU\s+([0-9.]+)", out.stdout, re.M).group(1))
    assert 0 <= miou <= 100


@pytest.mark.slow
def test_eval_of_the_checkpoint_writes_metrics_in_range(trained, wsss_here):
    data, work = trained
    out = wsss_here("eval", "--checkpoint", str(work / "best.pt"), "--split", "val",
                    "--json", str(work / "val.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((work / "val.json").read_text())
    assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["pixel_acc"] <= 100
    assert len(metrics["iou"]) == NUM_CLASSES + 1


@pytest.mark.slow
def test_resume_through_the_cli_continues_to_the_new_iteration_count(trained, tmp_path, wsss_here, tiny_overrides):
    data, work = trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pt").write_bytes((work / "last.pt").read_bytes())
    out = wsss_here("train", "demo", "--data-root", str(data), "--work-dir", str(resumed), *tiny_overrides(*EXTRAS),
                    "train.iterations=7", "train.val_interval=0", "--resume", str(resumed / "last.pt"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.load(resumed / "last.pt", weights_only=True)["iteration"] == 7


@pytest.mark.slow
def test_missing_checkpoint_is_one_line_error(tmp_path):
    line = error_line(wsss("eval", "--checkpoint", str(tmp_path / "nope.pt")))
    assert "nope.pt" in line and "does not exist" in line


def test_unknown_config_key_is_one_line_error(tmp_path, wsss_here):
    line = error_line(wsss_here("train", "demo", "--work-dir", str(tmp_path), "train.lrr=1"))
    assert "unknown config key 'train.lrr'" in line and "did you mean 'lr'" in line


def test_missing_dataset_directory_is_one_line_error(tmp_path, wsss_here):
    missing = tmp_path / "no_such_dataset"
    line = error_line(wsss_here("train", "demo", "--data-root", str(missing),
                                "--work-dir", str(tmp_path / "w")))
    assert str(missing) in line and "does not exist" in line


@pytest.mark.slow
def test_crf_without_pydensecrf2_is_one_line_error_naming_the_package(trained, tmp_path, wsss_here, monkeypatch):
    _, work = trained
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import pydensecrf now raises ImportError
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    line = error_line(wsss_here("pseudolabel", "--checkpoint", str(work / "last.pt"), "--split", "train",
                                "--method", "cam", "--crf", "--out", str(tmp_path / "crf")))
    assert "pydensecrf2" in line


@pytest.mark.slow
def test_resume_with_a_config_whose_network_differs_is_one_line_error(trained, tmp_path, wsss_here, tiny_overrides):
    data, work = trained
    line = error_line(wsss_here("train", "demo", "--data-root", str(data), "--work-dir", str(tmp_path),
                                *tiny_overrides(*EXTRAS), "model.seg_head=mask_decoder",
                                "--resume", str(work / "last.pt")))
    assert "cannot resume" in line and "last.pt" in line


@pytest.mark.slow
def test_the_published_recipe_offline_is_one_line_naming_the_weights_and_the_key(trained, tmp_path):
    """`wsss train custom` (the voc recipe: MiT-B1 from hub weights) without network access or cache."""
    data, _ = trained
    env_offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_cache")}
    code = "import sys\nfrom wsss.cli import main\nsys.argv = ['wsss', *sys.argv[1:]]\nmain()"
    out = subprocess.run([sys.executable, "-c", code, "train", "custom", "--data-root", str(data), "--work-dir",
                          str(tmp_path / "w"), "data.num_workers=0", "train.val_interval=0"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env_offline})
    line = error_line(out)
    assert "nvidia/mit-b1" in line and "model.pretrained" in line and "model.pretrained=none" in line
