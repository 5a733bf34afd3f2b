"""The typed config: defaults are the paper's, YAML files and overrides apply, errors name the key."""

from __future__ import annotations

import pytest

from wsss.config import Config, config_from_dict, load_config
from wsss.errors import ConfigError


def test_defaults_are_the_published_afa_values():
    cfg = Config()
    assert cfg.model.backbone == "mit_b1" and cfg.model.strides == [4, 2, 2, 1]
    assert (cfg.cam.bg_threshold_high, cfg.cam.bg_threshold_low, cfg.cam.bg_threshold_eval) == (0.55, 0.35, 0.45)
    assert cfg.cam.scales == [1.0, 0.5, 1.5]
    assert cfg.par.dilations == [1, 2, 4, 8, 12, 24] and (cfg.par.w1, cfg.par.w2, cfg.par.iterations) == (0.3, 0.01, 10)
    assert (cfg.afa.radius, cfg.afa.attn_blocks, cfg.afa.rw_power) == (8, 2, 2)
    assert (cfg.train.iterations, cfg.train.cam_iters, cfg.train.afa_label_iter) == (20000, 2000, 6000)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_iters) == (6e-5, 0.01, 1500)
    assert (cfg.train.seg_loss_weight, cfg.train.aff_loss_weight) == (0.1, 0.1)


@pytest.mark.parametrize("name", ["voc", "coco", "custom", "demo"])
def test_builtin_configs_load(name):
    cfg = load_config(name)
    assert cfg.data.dataset in ("voc", "coco", "custom")


def test_coco_extends_voc_with_its_own_schedule():
    cfg = load_config("coco")
    assert cfg.data.dataset == "coco"
    assert (cfg.train.iterations, cfg.train.cam_iters, cfg.train.afa_label_iter, cfg.par.iterations) == (
        80000, 5000, 15000, 15)
    assert cfg.model.backbone == "mit_b1"  # inherited from voc


def test_demo_turns_horizontal_flip_off():
    assert load_config("demo").data.hflip is False


def test_overrides_are_typed():
    cfg = load_config("voc", ["train.lr=1e-4", "cam.scales=[1, 0.5]", "afa.affinity_scale=1.0",
                              "data.hflip=false", "model.mask_decoder.cross_attention=soft", "train.iterations=10"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.cam.scales == [1.0, 0.5] and all(isinstance(s, float) for s in cfg.cam.scales)
    assert cfg.data.hflip is False
    assert cfg.model.mask_decoder.cross_attention == "soft"
    assert cfg.train.iterations == 10


def test_unknown_key_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*did you mean 'lr'.*valid keys"):
        load_config("voc", ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*data, model, train"):
        load_config("voc", ["trian.lr=1"])


@pytest.mark.parametrize("override, expected", [
    ("train.lr=abc", r"'train\.lr' must be a number, got 'abc'"),
    ("train.iterations=1.5", r"'train\.iterations' must be an integer"),
    ("train.precision=fp8", r"'train\.precision' must be one of 'fp32', 'bf16', 'fp16'"),
    ("cam.scales=1.0", r"'cam\.scales' must be a list of a number"),
    ("data.hflip=maybe", r"'data\.hflip' must be true or false"),
    ("train=3", r"'train' must be a mapping"),
    ("train.lr", r"must look like section\.key=value"),
])
def test_wrong_types_name_the_key_and_the_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("voc", [override])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="affinity_scale"):
        load_config("voc", ["cam.scales=[1.0, 0.5]"])
    with pytest.raises(ConfigError, match="bg_threshold_low"):
        load_config("voc", ["cam.bg_threshold_low=0.7"])


def test_yaml_file_with_base_and_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("base: voc\ntrain:\n  iterations: 7\n")
    assert load_config(str(good)).train.iterations == 7
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iterationz: 7\n")
    with pytest.raises(ConfigError, match="iterationz"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown config 'vocc'.*coco, coco-toco, custom, demo, demo-toco, voc, voc-toco"):
        load_config("vocc")


def test_round_trip_through_dict():
    cfg = load_config("coco", ["train.lr=2e-5"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_a_folder_named_like_a_builtin_config_does_not_hide_it(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("demo").data.hflip is False
