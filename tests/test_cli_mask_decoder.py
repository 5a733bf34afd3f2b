"""Every mask-decoder cross-attention variant through the command line: train -> pseudolabel -> eval.

The checkpoint carries the resolved config, so ``pseudolabel`` and ``eval`` rebuild the same
head without being told which one it is.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsss.data.io import read_label_png

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # tests/conftest.py
NUM_TRAIN, NUM_CLASSES = 16, 3  # the demo_data_3cls fixture (tests/conftest.py)
VARIANTS = ["standard", "masked", "kmeans", "soft"]
DECODER = [  # on top of the tiny run (tests/conftest.py) with the logging of tests/test_cli_pipeline.py
    "afa.radius=2", "eval.long_side=64", "train.log_interval=2", "train.image_log_interval=3",
    "model.seg_head=mask_decoder", "model.mask_decoder.num_queries=6", "model.mask_decoder.num_layers=2",
    "model.mask_decoder.hidden_dim=32", "model.mask_decoder.num_heads=2", "model.mask_decoder.ffn_dim=64",
    "model.mask_decoder.soft_mask_scales=[8.0,4.0]", "train.iterations=5", "train.val_interval=5",
    "train.ckpt_interval=5",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_pseudolabels_and_evaluates_through_the_cli(variant, demo_data_3cls, tmp_path, wsss_here,
                                                                    tiny_overrides):
    work = tmp_path / "work"
    out = wsss_here("train", "demo", "--data-root", str(demo_data_3cls), "--work-dir", str(work),
                    *tiny_overrides(*DECODER), f"model.mask_decoder.cross_attention={variant}")
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(work / "last.pt", weights_only=False)
    assert state["iteration"] == 5
    assert state["config"]["model"]["mask_decoder"]["cross_attention"] == variant
    assert any(key.startswith("seg_head.") and "query" in key for key in state["model"]), "no mask-decoder weights"

    labels = tmp_path / "labels"
    out = wsss_here("pseudolabel", "--checkpoint", str(work / "last.pt"), "--split", "train",
                    "--method", "afa", "--out", str(labels))
    assert out.returncode == 0, out.stderr[-3000:]
    pngs = sorted(labels.glob("*.png"))
    assert len(pngs) == NUM_TRAIN
    assert set(np.unique(read_label_png(pngs[0]))) <= set(range(NUM_CLASSES + 1)) | {255}

    out = wsss_here("eval", "--checkpoint", str(work / "last.pt"), "--split", "val",
                    "--json", str(tmp_path / "val.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "val.json").read_text())
    assert 0 <= metrics["miou"] <= 100 and len(metrics["iou"]) == NUM_CLASSES + 1
