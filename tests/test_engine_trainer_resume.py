"""Exact resume: k iterations, stop, resume to 2k gives the same weights as 2k straight."""

from __future__ import annotations

import pytest
import torch

from wsss.config import load_config
from wsss.data.demo import build_demo_dataset
from wsss.engine.trainer import train

K_ITERS = 5  # 6 batches per epoch: the stop falls mid-epoch, the resumed run crosses into epoch 1


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("resume") / "demo", num_classes=3, image_size=64,
                              num_train=24, num_val=4)


def config(data, work, num_workers):
    return load_config("demo", [
        f"data.root={data}", f"train.work_dir={work}", f"data.num_workers={num_workers}",
        "data.crop_size=64", "data.batch_size=4", "data.total_batch_size=4", "model.seg_embed_dim=32",
        "model.drop_path_rate=0.1",  # random per step: the RNG state must be restored too
        "cam.scales=[1.0,0.5]", "afa.affinity_scale=1.0", "afa.radius=2", "eval.long_side=64",
        f"train.iterations={2 * K_ITERS}", "train.cam_iters=2", "train.afa_label_iter=6", "train.warmup_iters=2",
        "train.log_interval=3", "train.val_interval=4", "train.ckpt_interval=100", "train.image_log_interval=3",
    ])


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    work = tmp_path_factory.mktemp("straight")
    train(config(data, work, num_workers=0))
    return torch.load(work / "last.pt", weights_only=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_and_resume_gives_the_weights_of_a_straight_run(data, straight, tmp_path, num_workers):
    cfg = config(data, tmp_path, num_workers)
    first = train(cfg, stop_after=K_ITERS)
    assert first["iteration"] == K_ITERS
    paused = torch.load(tmp_path / "last.pt", weights_only=True)
    assert paused["iteration"] == K_ITERS and paused["data"] == {"epoch": 0, "batch": K_ITERS, "batches_per_epoch": 6}

    second = train(cfg, resume=tmp_path / "last.pt")
    assert second["iteration"] == 2 * K_ITERS
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)
    assert resumed["data"] == straight["data"]
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert resumed["scheduler"]["last_epoch"] == straight["scheduler"]["last_epoch"] == 2 * K_ITERS
    assert torch.equal(resumed["rng"]["torch"], straight["rng"]["torch"])
