"""`wsss export`: a folder without pickle that wsss.load_model and `wsss predict` read, predicting exactly
what the training checkpoint predicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from wsss.errors import WsssError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# the tiny run of tests/conftest.py (mit_tiny, crop 64, 6 iterations) on the CPU, one validation (best_miou recorded)
EXTRAS = ["train.device=cpu", "train.val_interval=6", "train.ckpt_interval=6", "train.log_interval=6",
          "eval.long_side=72"]
EXPORT_FILES = ["README.md", "classes.json", "config.yaml", "model.safetensors"]


@pytest.fixture(scope="module")
def trained(demo_data, train_tiny) -> tuple[Path, Path]:
    """(demo data root, checkpoint of a 6-iteration mit_tiny run on it)."""
    return demo_data, train_tiny("export", demo_data, *EXTRAS)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    from wsss.engine.export import export_model

    _, ckpt = trained
    return export_model(ckpt, tmp_path_factory.mktemp("models") / "demo")


def test_export_folder_holds_safetensors_yaml_json_and_a_card_no_pickle(trained, exported):
    from safetensors import safe_open

    _, ckpt = trained
    assert sorted(p.name for p in exported.iterdir()) == EXPORT_FILES
    for path in exported.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["wsss_format"] == "wsss-model-1"
        weights = {k: f.get_tensor(k) for k in f.keys()}
    state = torch.load(ckpt, weights_only=True)
    assert weights.keys() == state["model"].keys()
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)
    config = yaml.safe_load((exported / "config.yaml").read_text())
    assert config["model"]["pretrained"] == "none" and config["model"]["backbone"] == "mit_tiny"
    assert json.loads((exported / "classes.json").read_text()) == ["background", "zero", "one"]
    card = (exported / "README.md").read_text()
    for text in ("mit_tiny", "segformer", "`zero`", "iteration | 6 of 6", "best validation seg mIoU",
                 "wsss.load_model", "| torch |"):
        assert text in card, text
    assert f"{state['best_miou']:.2f}" in card


def test_exported_model_predicts_exactly_what_the_checkpoint_predicts(trained, exported):
    import wsss

    root, ckpt = trained
    images = sorted((root / "JPEGImages").glob("val_*.jpg"))
    from_ckpt = wsss.load_model(ckpt, device="cpu")
    from_export = wsss.load_model(exported, device="cpu")
    assert from_export.class_names == from_ckpt.class_names
    assert from_export.meta["iteration"] == 6
    for a, b in zip(from_ckpt.predict(images, msc=True), from_export.predict(images, msc=True)):
        assert a.dtype == np.uint8 and np.array_equal(a, b)
    for a, b in zip(from_ckpt.predict_proba(images[:2]), from_export.predict_proba(images[:2])):
        assert np.array_equal(a, b)


def test_export_and_predict_from_the_command_line(trained, tmp_path, wsss_here):
    from wsss.data.io import read_label_png

    root, ckpt = trained
    out = tmp_path / "model"
    result = wsss_here("export", "--checkpoint", str(ckpt), str(out))
    assert result.returncode == 0, result.stderr
    assert f"model exported to {out}" in result.stdout
    result = wsss_here("export", "--checkpoint", str(ckpt), str(out))  # an earlier export is replaced
    assert result.returncode == 0, result.stderr
    pred = tmp_path / "pred"
    result = wsss_here("predict", "--checkpoint", str(out), str(root / "JPEGImages"), "--out", str(pred),
                       "train.device=cpu", "data.num_workers=0")
    assert result.returncode == 0, result.stderr
    assert len(list(pred.glob("*.png"))) == 12 and read_label_png(pred / "val_0000.png").shape == (64, 64)


def test_export_refuses_a_folder_with_other_files_and_load_model_a_plain_folder(trained, tmp_path, wsss_here):
    import wsss

    _, ckpt = trained
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = wsss_here("export", "--checkpoint", str(ckpt), str(tmp_path / "busy"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: '{tmp_path / 'busy'}' holds other files than an export (notes.txt)")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(WsssError, match="not an exported model"):
        wsss.load_model(tmp_path / "busy")
    with pytest.raises(WsssError, match="does not exist"):
        wsss.load_model(tmp_path / "nothing")
