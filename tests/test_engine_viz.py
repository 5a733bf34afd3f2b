"""`visualize` / `wsss viz` end to end on a checkpoint of a tiny training run, and compute_maps
for every kind of backbone and seg head."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.config import load_config
from wsss.engine.viz import COLUMNS, GAP, TILE_SIZE, compute_maps, render_panel, visualize
from wsss.errors import WsssError

REPO = Path(__file__).resolve().parents[1]
# the tiny run of tests/conftest.py with 8 iterations and this module's seg head width
EXTRAS = ["model.seg_embed_dim=256", "train.device=cpu", "train.iterations=8", "train.val_interval=0",
          "train.ckpt_interval=8", "train.log_interval=4", "eval.long_side=64"]


@pytest.fixture(scope="module")
def checkpoint(demo_data_3cls, train_tiny) -> Path:
    return train_tiny("viz", demo_data_3cls, *EXTRAS)


def assert_panel_ok(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    h, w = pixels.shape[:2]
    assert w == COLUMNS * (TILE_SIZE + GAP) + GAP
    assert h > 2 * TILE_SIZE
    assert pixels.std() > 20, f"{path} looks blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100, f"{path} has too few colours"


@pytest.mark.slow  # trains the module's checkpoint
def test_split_panels_and_index_list_every_image(checkpoint, demo_data_3cls, tmp_path):
    index = visualize(checkpoint, tmp_path / "viz", split="val", limit=3)
    assert index == tmp_path / "viz" / "index.html"
    panels = sorted(p.name for p in (tmp_path / "viz").glob("*.png"))
    assert panels == ["val_0000.png", "val_0001.png", "val_0002.png"]
    for name in panels:
        assert_panel_ok(tmp_path / "viz" / name)
    text = index.read_text()
    assert sorted(re.findall(r'<img class="thumb" src="([^"]+)"', text)) == panels
    rows = json.loads((tmp_path / "viz" / "index.json").read_text())
    ious = [r["iou"] for r in rows]
    assert all(iou is not None and 0.0 <= iou <= 1.0 for iou in ious)
    assert ious == sorted(ious)  # worst first
    assert all(r["classes_from"] == "labels" for r in rows)


@pytest.mark.slow  # trains the module's checkpoint
def test_image_files_use_predicted_classes_and_have_no_iou(checkpoint, demo_data_3cls, tmp_path):
    first = demo_data_3cls / "JPEGImages" / "val_0000.jpg"
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    same_stem = shutil.copy(demo_data_3cls / "JPEGImages" / "val_0001.jpg", other_dir / "val_0000.jpg")
    index = visualize(checkpoint, tmp_path / "viz", images=[first, same_stem])
    rows = json.loads((tmp_path / "viz" / "index.json").read_text())
    assert sorted(r["panel"] for r in rows) == ["val_0000.png", "val_0000_2.png"]  # no panel overwritten
    for row in rows:
        assert row["iou"] is None and row["classes_from"] == "prediction" and len(row["classes"]) >= 1
        assert_panel_ok(tmp_path / "viz" / row["panel"])
    assert "n/a" in index.read_text()


@pytest.mark.slow  # trains the module's checkpoint
def test_visualize_needs_exactly_one_source_and_readable_images(checkpoint, tmp_path):
    with pytest.raises(WsssError, match="either a split or one or more image files"):
        visualize(checkpoint, tmp_path, split=None, images=[])
    with pytest.raises(WsssError, match="either a split or one or more image files"):
        visualize(checkpoint, tmp_path, split="val", images=[tmp_path / "x.jpg"])
    with pytest.raises(WsssError, match="does not exist"):
        visualize(checkpoint, tmp_path, images=[tmp_path / "missing.jpg"])


@pytest.mark.slow  # trains the module's checkpoint
def test_cli_viz_writes_panels_and_index(checkpoint, tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "viz", "--checkpoint", str(checkpoint), "--split", "val",
         "--limit", "1", "--out", str(tmp_path / "viz"), "cam.scales=[1.0]"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "viz" / "index.html").is_file() and (tmp_path / "viz" / "val_0000.png").is_file()


@pytest.mark.parametrize("overrides", [
    ["model.backbone=timm:deit_tiny_patch16_224", "model.conv_stem=0"],
    ["model.backbone=timm:pvt_v2_b0", "model.conv_stem=0"],
    ["model.seg_head=mask_decoder", "model.mask_decoder.num_layers=2", "model.mask_decoder.num_queries=8",
     "model.mask_decoder.hidden_dim=32", "model.mask_decoder.ffn_dim=64", "model.mask_decoder.num_heads=2",
     "model.mask_decoder.soft_mask_scales=[8.0,4.0]"],
], ids=["vit", "pvt_v2", "mask_decoder"])
def test_compute_maps_works_for_every_backbone_and_seg_head(demo_data_3cls, overrides):
    import torch

    from wsss.data.datasets import build_dataset
    from wsss.models.network import build_network

    torch.manual_seed(0)
    cfg = load_config("demo", [f"data.root={demo_data_3cls}", "eval.long_side=64", "cam.scales=[1.0]",
                               "afa.affinity_scale=1.0", *overrides])
    dataset = build_dataset(cfg.data, "val", train=False)
    network = build_network(cfg, dataset.num_classes)
    maps = compute_maps(network, dataset.load_image(0), cfg, dataset.class_names,
                        labels=dataset.image_labels[0], gt=dataset.load_mask(0))
    h, w = dataset.load_image(0).shape[:2]
    shown = len(maps.classes)
    assert shown == int(dataset.image_labels[0].sum()) >= 1
    assert maps.cams.shape == (shown, h, w) and maps.affinity.shape == (shown + 1, h, w)
    assert maps.par_label.shape == maps.rw_label.shape == maps.seg_label.shape == (h, w)
    assert maps.iou is not None
    assert np.asarray(render_panel(maps)).std() > 20


def test_compute_maps_predicts_classes_without_labels_and_restores_train_mode(demo_data_3cls):
    import torch

    from wsss.data.datasets import build_dataset
    from wsss.models.network import build_network

    torch.manual_seed(0)
    cfg = load_config("demo", [f"data.root={demo_data_3cls}", "eval.long_side=64", "cam.scales=[1.0]",
                               "afa.affinity_scale=1.0"])
    dataset = build_dataset(cfg.data, "val", train=False)
    network = build_network(cfg, dataset.num_classes).train()
    maps = compute_maps(network, dataset.load_image(0), cfg, dataset.class_names)
    assert network.training
    assert maps.classes_from == "prediction" and len(maps.classes) >= 1 and maps.gt is None and maps.iou is None
    assert maps.point_classes == [*maps.classes, 0]
