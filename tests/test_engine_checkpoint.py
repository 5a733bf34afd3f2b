"""Checkpoint files: atomic writes, clear errors for bad files, RNG state, load_network."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.config import load_config
from wsss.engine.checkpoint import (
    atomic_torch_save, capture_rng_state, load_network, restore_rng_state, save_checkpoint,
    software_versions,
)
from wsss.errors import WsssError
from wsss.models.network import build_network

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_cfg(*overrides: str):
    return load_config("demo", ["model.seg_embed_dim=32", *overrides])


def write_checkpoint(path: Path, cfg=None) -> torch.nn.Module:
    cfg = cfg or tiny_cfg()
    torch.manual_seed(0)
    network = build_network(tiny_cfg(f"model.seg_embed_dim={cfg.model.seg_embed_dim}"), NUM_CLASSES)
    save_checkpoint({"config": cfg.to_dict(), "model": network.state_dict(), "num_classes": NUM_CLASSES,
                     "class_names": ["background", "a", "b", "c"], "iteration": 7, "best_miou": 12.5,
                     "rng": capture_rng_state(), "versions": software_versions()}, path)
    return network


def test_atomic_save_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"v": 1}, path)
    atomic_torch_save({"v": 2}, path)
    assert torch.load(path)["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_write_that_dies_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"v": 1}, path)

    def dying_save(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # as if killed while writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoint_loads_safely_with_weights_only(tmp_path):
    write_checkpoint(tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ckpt["iteration"] == 7 and ckpt["format"].startswith("wsss")
    assert ckpt["versions"]["torch"] == str(torch.__version__)


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("directory", "is not a file"),
    ("garbage", "cannot be read"),
    ("truncated", "cannot be read"),
    ("foreign", "is not a wsss checkpoint"),
    ("pickled_object", "is not a wsss checkpoint"),
])
def test_bad_checkpoint_files_give_one_clear_error(tmp_path, kind, message):
    path = tmp_path / "model.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 10)
    elif kind == "truncated":
        write_checkpoint(tmp_path / "full.pt")
        data = (tmp_path / "full.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "pickled_object":
        torch.save({"config": {}, "model": {}, "num_classes": 2, "extra": Path("x")}, path)
    with pytest.raises(WsssError) as info:
        load_network(path, "cpu")
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_load_network_restores_the_weights_in_eval_mode(tmp_path):
    network = write_checkpoint(tmp_path / "c.pt").eval()
    loaded, cfg, meta = load_network(tmp_path / "c.pt", "cpu", ["eval.scales=[1.0]"])
    assert not loaded.training and cfg.eval.scales == [1.0]
    assert meta["iteration"] == 7 and meta["num_classes"] == NUM_CLASSES and meta["class_names"][1] == "a"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = network(x), loaded(x)
    assert torch.equal(a.cls_logits, b.cls_logits) and torch.equal(a.seg_logits, b.seg_logits)


def test_load_network_with_an_override_that_changes_the_architecture_says_so(tmp_path):
    write_checkpoint(tmp_path / "c.pt")
    with pytest.raises(WsssError, match="does not fit the network of its config"):
        load_network(tmp_path / "c.pt", "cpu", ["model.seg_embed_dim=16"])


def test_a_vit_checkpoint_from_before_the_seg_pyramid_loads_without_one_and_a_new_one_with_it(tmp_path):
    vit = ("model.backbone=timm:vit_tiny_patch16_224", "model.conv_stem=0", "model.seg_embed_dim=32")
    for pyramid in ("none", "auto"):
        cfg = tiny_cfg(*vit, f"model.seg_pyramid={pyramid}")
        torch.manual_seed(0)
        network = build_network(cfg, NUM_CLASSES)
        saved = cfg.to_dict()
        if pyramid == "none":
            del saved["model"]["seg_pyramid"]  # as written before the key existed
        save_checkpoint({"config": saved, "model": network.state_dict(), "num_classes": NUM_CLASSES}, tmp_path / "c.pt")
        loaded, loaded_cfg, _ = load_network(tmp_path / "c.pt", "cpu")
        assert loaded_cfg.model.seg_pyramid == pyramid
        assert (loaded.seg_pyramid is None) == (pyramid == "none")


def test_load_network_never_downloads_pretrained_weights(tmp_path):
    write_checkpoint(tmp_path / "c.pt", tiny_cfg("model.pretrained=/nonexistent/weights.pth"))
    network, cfg, _ = load_network(tmp_path / "c.pt", "cpu")
    assert cfg.model.pretrained == "none"


def test_rng_state_round_trip_reproduces_every_generator(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    atomic_torch_save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]
