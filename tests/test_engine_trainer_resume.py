"""Exact resume: k iterations, stop, resume to 2k gives the same weights as 2k straight."""

from __future__ import annotations

import pytest
import torch

from wsss.data.demo import build_demo_dataset
from wsss.engine.trainer import train

K_ITERS = 5  # 6 batches per epoch: the stop falls mid-epoch, the resumed run crosses into epoch 1


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Its own demo data: 24 training images are the 6 batches of 4 per epoch that K_ITERS needs."""
    return build_demo_dataset(tmp_path_factory.mktemp("resume") / "demo", num_classes=3, image_size=64,
                              num_train=24, num_val=4)


@pytest.fixture(scope="module")
def config(data, tiny_config):
    """config(work, num_workers) -> the tiny run of tests/conftest.py on ``data``, to 2 * K_ITERS iterations."""

    def make(work, num_workers):
        return tiny_config(
            f"data.root={data}", f"train.work_dir={work}", f"data.num_workers={num_workers}",
            "model.drop_path_rate=0.1",  # random per step: the RNG state must be restored too
            "afa.radius=2", "eval.long_side=64", f"train.iterations={2 * K_ITERS}", "train.afa_label_iter=6",
            "train.log_interval=3", "train.val_interval=4", "train.ckpt_interval=100", "train.image_log_interval=3",
        )

    return make


@pytest.fixture(scope="module")
def straight(config, tmp_path_factory):
    work = tmp_path_factory.mktemp("straight")
    train(config(work, num_workers=0))
    return torch.load(work / "last.pt", weights_only=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_and_resume_gives_the_weights_of_a_straight_run(config, straight, tmp_path, num_workers):
    cfg = config(tmp_path, num_workers)
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
