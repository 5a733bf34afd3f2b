"""``wsss demo`` pieces that do not need a full training run: the precision choice and the table."""

from __future__ import annotations

import math

import pytest
import torch

from wsss.engine.demo import format_demo_table, native_bf16


def test_native_bf16_on_cpu_follows_onednn_support():
    assert native_bf16("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert native_bf16("auto") == (native_bf16("cuda") if torch.cuda.is_available() else native_bf16("cpu"))


def _result(**extra) -> dict:
    return {
        "rows": {"cam": 45.25, "par": 70.75, "afa": math.nan, "seg": 65.6},
        "baselines": {"train": {"all_background": 17.4, "random_class": 61.1},
                      "val": {"all_background": 17.3, "random_class": 62.4}},
        "classifier": {"macro_f1": 0.996, "micro_f1": 0.997},
        "seconds": {"total": 565.0, "train": 507.0, "pseudo_labels": 53.0, "evaluation": 5.0},
        "backbone": "mit_tiny", "precision": "fp32", "iterations": 1300, "train_split": "train",
        "val_split": "val", "train_images": 400, "val_images": 100, "work_dir": "w", **extra,
    }


def test_demo_table_shows_every_row_beside_the_baselines_and_the_precision():
    table = format_demo_table(_result())  # no "pretrained": from scratch
    assert "1300 iterations, fp32; 565 s" in table
    lines = table.splitlines()
    par = next(line for line in lines if line.strip().startswith("PAR-refined CAM"))
    assert par.split()[-3:] == ["70.8", "17.4", "61.1"]
    afa = next(line for line in lines if line.strip().startswith("AFA"))
    assert afa.split()[-3] == "n/a"  # a missing number is not printed as nan
    seg = next(line for line in lines if line.strip().startswith("seg head"))
    assert seg.split()[-3:] == ["65.6", "17.3", "62.4"]
    assert "macro F1 0.996" in table


def test_demo_table_names_the_starting_weights():
    first = [format_demo_table(_result(pretrained=p)).splitlines()[0] for p in ("none", "hub", "w/mit.safetensors")]
    assert first[0].startswith("wsss demo: mit_tiny from scratch, 1300 iterations")
    assert first[1].startswith("wsss demo: mit_tiny from hub weights, 1300 iterations")
    assert first[2].startswith("wsss demo: mit_tiny from weights 'w/mit.safetensors', 1300 iterations")
    assert "from scratch" not in first[1] + first[2]


@pytest.mark.slow
def test_running_the_demo_again_continues_its_run_instead_of_refusing(demo_data, tiny_overrides, tmp_path, caplog):
    """`wsss demo` twice (the README's first command, run again): the second continues the finished run
    (the trainer refuses a new run in a work dir that holds one) and prints the same table."""
    from wsss.engine.demo import run_demo

    tiny = tiny_overrides("eval.long_side=64", "train.iterations=3", "train.cam_iters=1", "train.afa_label_iter=3",
                          "train.warmup_iters=1", "train.val_interval=0", "train.precision=fp32", "train.device=cpu")
    first = run_demo(tmp_path / "work", demo_data, overrides=tiny)
    second = run_demo(tmp_path / "work", demo_data, overrides=tiny)
    assert "continuing the demo run" in caplog.text
    assert second["rows"] == first["rows"] and second["iterations"] == first["iterations"] == 3


def test_demo_from_pretrained_weights_drops_the_from_scratch_conv_stem(demo_data, tmp_path, monkeypatch):
    """configs/demo.yaml trains with a conv stem, which MiT weights do not hold: `wsss demo --pretrained` drops it
    (else every pretrained demo would end in the stem's ConfigError)."""
    import wsss.engine.trainer as trainer
    from wsss.config import load_config
    from wsss.engine.demo import run_demo

    seen = []

    class Stop(Exception):
        pass

    def fake_train(cfg, resume=None):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(trainer, "train", fake_train)
    assert load_config("demo").model.conv_stem > 0
    for pretrained, stem in ((None, load_config("demo").model.conv_stem), ("w/mit_tiny.pth", 0)):
        with pytest.raises(Stop):
            run_demo(tmp_path / "work", demo_data, pretrained=pretrained)
        assert (seen[-1].model.conv_stem, seen[-1].model.pretrained) == (stem, pretrained or "none")
