"""The demo recipe learns: a short run of it (its lr, warm-up, batch, backbone, from scratch) must bring the
classification loss well below the label prior, the loss of the best constant guess. A recipe or a trainer
change that stops the network from learning (a dead learning rate, a broken loss or pooling, frozen weights)
fails here instead of in a user's week-long run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from wsss.config import load_config
from wsss.data.datasets import build_dataset
from wsss.engine.trainer import train

pytestmark = pytest.mark.slow


def label_prior_loss(labels: np.ndarray) -> float:
    """The classification loss (mean over classes of the binary cross-entropy) of predicting every class's
    frequency for every image: what a network that learned nothing from the pixels can reach."""
    p = labels.mean(axis=0).clip(1e-6, 1 - 1e-6)
    return float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))))


def test_a_short_run_of_the_demo_recipe_drives_the_classification_loss_far_below_the_label_prior(demo_data_3cls,
                                                                                                  tmp_path):
    cfg = load_config("demo", [
        f"data.root={demo_data_3cls}", f"train.work_dir={tmp_path / 'run'}", "data.crop_size=64",
        "data.num_workers=0", "train.iterations=100", "train.cam_iters=100", "train.val_interval=0",
        "train.log_interval=20", "train.ckpt_interval=100", "train.precision=fp32", "train.device=cpu",
        "train.image_log_interval=0",
    ])
    prior = label_prior_loss(build_dataset(cfg.data, cfg.data.train_split, train=False).image_labels)
    assert 0.4 < prior < 0.7  # 3 classes, 1-2 per image
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cls = [r["losses"]["cls"] for r in records if r["kind"] == "train"]
    assert len(cls) == 5 and all(math.isfinite(v) for v in cls)
    assert cls[0] > 0.8 * prior  # it starts at (or above) the prior: the test measures learning, not the init
    assert cls[-1] < 0.35 * prior, (prior, cls)
