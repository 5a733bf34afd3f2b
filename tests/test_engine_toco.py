"""ToCo in the engine: the views of a training item, the training step (wsss.engine.toco_step), validation, and a
tiny ToCo run through the CLI's train, eval, pseudolabel, predict and export, and the demo with --method toco."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.config import load_config
from wsss.engine.trainer import PhaseTimer, build_optimizer, loss_names, train_step
from wsss.models.network import build_network

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CROP = 64
# the ToCo demo recipe at test size: 64-pixel crops, 2 local crops of 32, one CAM scale
TOCO_TINY = ["model.pretrained=none", f"data.crop_size={CROP}", "data.batch_size=2", "data.total_batch_size=2",
             "data.num_workers=0", "toco.local_crop_size=32", "toco.num_local_crops=2", "cam.scales=[1.0]",
             "train.precision=fp32", "train.device=cpu", "train.cam_iters=2", "train.warmup_iters=1",
             "train.iterations=4", "par.iterations=2", "train.reg_loss_weight=0.05"]  # the reg loss on: its path runs


def toco_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    return {"image": torch.randn(2, 3, CROP, CROP, generator=g), "label": labels,
            "valid_box": torch.tensor([[0, CROP, 0, CROP], [0, CROP - 8, 0, CROP - 16]]),
            "global_view2": torch.randn(2, 3, CROP, CROP, generator=g),
            "local_image": torch.randn(2, 3, CROP, CROP, generator=g)}


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("demo-toco", TOCO_TINY)
    torch.manual_seed(0)
    network = build_network(cfg, num_classes=3).train()
    return cfg, network


def test_toco_step_losses_before_and_after_the_cam_warm_up(setup):
    cfg, network = setup
    assert loss_names(cfg) == ("total", "cls", "cls_aux", "ptc", "ctc", "seg", "reg")
    optimizer = build_optimizer(network, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    timer = PhaseTimer()
    warm = train_step(network, toco_batch(), 0, cfg, optimizer, scheduler, None, torch.device("cpu"), timer)
    assert set(warm.losses) == set(loss_names(cfg))
    assert warm.losses["seg"] == 0 and warm.losses["reg"] == 0 and warm.pseudo is None
    for name in ("cls", "cls_aux", "ptc", "ctc"):
        assert math.isfinite(warm.losses[name]) and warm.losses[name] > 0, name
    expected = (warm.losses["cls"] + warm.losses["cls_aux"] + cfg.toco.ptc_loss_weight * warm.losses["ptc"]
                + cfg.toco.ctc_loss_weight * warm.losses["ctc"])
    assert warm.losses["total"] == pytest.approx(expected, rel=1e-5)
    assert {"multiscale_cam", "forward", "losses"} <= set(timer.totals)
    after = train_step(network, toco_batch(1), cfg.train.cam_iters, cfg, optimizer, scheduler, None,
                       torch.device("cpu"))
    assert after.losses["seg"] > 0 and after.pseudo is not None
    assert after.pseudo.label.shape == (2, CROP, CROP)
    assert (after.pseudo.label[1, CROP - 8 :] == cfg.data.ignore_index).all()  # the padding is ignored
    assert after.losses["reg"] > 0  # the dense-energy loss counts after the warm-up too


def test_the_seg_head_and_every_head_train_once_the_warm_up_is_over(setup):
    cfg, network = setup
    from wsss.engine.toco_step import toco_micro_step

    network.zero_grad()
    total, _, out, _ = toco_micro_step(network, toco_batch(2), cfg.train.cam_iters, cfg, torch.device("cpu"),
                                       PhaseTimer())
    total.backward()
    for name in ("classifier", "aux_classifier", "proj_head", "seg_head"):
        grads = [p.grad for p in getattr(network, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in network.proj_head_t.parameters())
    network.zero_grad()
    total, _, out, _ = toco_micro_step(network, toco_batch(2), 0, cfg, torch.device("cpu"), PhaseTimer())
    total.backward()
    assert out.seg_logits is None and all(p.grad is None for p in network.seg_head.parameters())


def test_contrast_waits_for_its_iteration_and_the_seg_target_can_come_from_the_aux_cams():
    cfg = load_config("demo-toco", [*TOCO_TINY, "toco.contrast_from_iter=5", "toco.seg_label_from_aux_until=5"])
    torch.manual_seed(0)
    network = build_network(cfg, num_classes=3).train()
    from wsss.engine import toco_step

    seen = []
    original = toco_step.toco_pseudo_labels

    def spy(net, images, labels, valid_box, c, cams=None):
        seen.append(cams)
        return original(net, images, labels, valid_box, c, cams)

    toco_step.toco_pseudo_labels = spy
    try:
        total, losses, _, _ = toco_step.toco_micro_step(network, toco_batch(), 3, cfg, torch.device("cpu"),
                                                        PhaseTimer())
    finally:
        toco_step.toco_pseudo_labels = original
    w = cfg.train
    expected = losses["cls"] + losses["cls_aux"] + w.seg_loss_weight * losses["seg"] + w.reg_loss_weight * losses["reg"]
    torch.testing.assert_close(total, expected)  # PTC / CTC computed (and logged) but not counted before iter 5
    assert losses["ptc"] > 0 and losses["ctc"] > 0
    cams, aux = toco_step.toco_cams(network, toco_batch()["image"], toco_batch()["label"], cfg)
    torch.testing.assert_close(seen[0], aux)  # the aux CAMs are the seg target before iteration 5


def test_tocos_views_of_an_item():
    from wsss.data.transforms import ToCoViews

    cfg = load_config("demo-toco", TOCO_TINY)
    views = ToCoViews.from_config(cfg)
    torch.manual_seed(0)
    image = torch.randn(3, CROP, CROP).clamp(-2, 2)
    decoded = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    out = views(image, decoded)
    assert set(out) == {"image", "global_view2", "local_image"}
    for key, value in out.items():
        assert value.shape == (3, CROP, CROP) and value.dtype == torch.float32 and torch.isfinite(value).all(), key
    assert not torch.equal(out["image"], image)  # view 1 always blurred (blur_p[0] = 1)
    plain = ToCoViews(CROP, cfg.data.mean, cfg.data.std, [1.0, 1.0], [0, 0, 0, 0], 0.0, 0.0, [0.1, 2.0],
                      [0.0, 0.0, 0.0], 0.0)
    kept = plain(image, decoded)
    from wsss.data.transforms import denormalize

    torch.testing.assert_close(denormalize(kept["image"], cfg.data.mean, cfg.data.std),
                               denormalize(image, cfg.data.mean, cfg.data.std), atol=1e-5, rtol=0)


def test_toco_validation_scores_the_aux_cams_and_no_random_walk(setup):
    from wsss.engine.inference import validation_keys

    cfg, network = setup
    assert validation_keys(network) == ("cam", "seg", "par", "cam_aux")
    afa = build_network(load_config("demo", ["model.pretrained=none"]), num_classes=3)
    assert validation_keys(afa) == ("cam", "afa", "seg", "par")


# ----------------------------------------------------------------------------- a tiny ToCo run through the CLI

@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    from wsss.engine.trainer import train

    work = tmp_path_factory.mktemp("toco") / "work"
    cfg = load_config("demo-toco", [*TOCO_TINY, f"data.root={demo_data}", f"train.work_dir={work}",
                                    "train.val_interval=4", "train.ckpt_interval=4", "train.log_interval=2",
                                    "eval.long_side=64"])
    result = train(cfg)
    return demo_data, work, Path(result["last_checkpoint"])


@pytest.mark.slow
def test_a_toco_run_logs_its_losses_and_validates_its_aux_cams(trained):
    _, work, ckpt = trained
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r.get("kind") == "train"]
    assert train_records and {"cls_aux", "ptc", "ctc"} <= set(train_records[-1]["losses"])
    log = (work / "train.log").read_text()
    assert re.search(r"val mIoU \(\d+ images\) cam [\d.]+ .*cam_aux [\d.]+", log), log[-2000:]
    last = torch.load(ckpt, weights_only=True)
    assert last["iteration"] == 4 and any(k.startswith("proj_head_t.") for k in last["model"])


@pytest.mark.slow
def test_a_toco_checkpoint_goes_through_eval_pseudolabel_predict_and_export(trained, tmp_path, wsss_here):
    from wsss.data.io import read_label_png

    root, work, ckpt = trained
    out = wsss_here("eval", "--checkpoint", str(ckpt), "--split", "val", "--json", str(tmp_path / "val.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert 0 <= json.loads((tmp_path / "val.json").read_text())["miou"] <= 100
    labels = tmp_path / "labels"
    out = wsss_here("pseudolabel", "--checkpoint", str(ckpt), "--split", "train", "--out", str(labels))
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list(labels.glob("*.png"))) == 8
    out = wsss_here("pseudolabel", "--checkpoint", str(ckpt), "--split", "train", "--method", "afa",
                    "--out", str(tmp_path / "afa"))
    assert out.returncode != 0 and "afa" in (out.stderr + out.stdout).lower()
    assert "Traceback" not in out.stderr
    model = tmp_path / "model"
    out = wsss_here("export", "--checkpoint", str(ckpt), str(model))
    assert out.returncode == 0, out.stderr[-3000:]
    pred = tmp_path / "pred"
    out = wsss_here("predict", "--checkpoint", str(model), str(root / "JPEGImages"), "--out", str(pred),
                    "train.device=cpu", "data.num_workers=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list(pred.glob("*.png"))) == 12 and read_label_png(pred / "val_0000.png").shape == (64, 64)

    out = wsss_here("viz", "--checkpoint", str(ckpt), "--split", "val", "--limit", "2", "--out", str(tmp_path / "viz"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((tmp_path / "viz").glob("*.png"))) >= 2

    import wsss

    loaded = wsss.load_model(model, device="cpu")
    direct = wsss.load_model(ckpt, device="cpu")
    image = root / "JPEGImages" / "val_0000.jpg"
    np.testing.assert_array_equal(loaded.predict(image)[0], direct.predict(image)[0])


@pytest.mark.slow
def test_demo_with_method_toco_prints_its_table(demo_data, tmp_path, wsss_here):
    out = wsss_here("demo", "--method", "toco", "--work-dir", str(tmp_path / "w"), "--data-dir", str(demo_data),
                    *TOCO_TINY, "train.val_interval=0", "eval.long_side=64")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[0].startswith("wsss demo (ToCo): ")
    rows = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert "AFA" not in rows
    for row in ("CAM", "PAR-refined", "seg"):
        assert any(line.strip().startswith(row) for line in out.stdout.splitlines()), row


def test_the_toco_recipe_offline_is_one_line_naming_the_weights_and_the_key(demo_data, tmp_path):
    """Hub weights (the recipes' default) with no network and no cache: one error line, as for MiT."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_cache"), "OMP_NUM_THREADS": "1"}
    code = "import sys\nfrom wsss.cli import main\nsys.argv = ['wsss', *sys.argv[1:]]\nmain()"
    out = subprocess.run([sys.executable, "-c", code, "train", "demo-toco", "--data-root", str(demo_data),
                          "--work-dir", str(tmp_path / "w"), "model.pretrained=hub", "data.num_workers=0"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "timm:vit_tiny_patch16_224" in errors[0] and "huggingface.co/timm/" in errors[0]
    assert "model.pretrained to the file path" in errors[0] and "model.pretrained=none" in errors[0]


@pytest.mark.slow
def test_a_stopped_toco_run_resumes_to_the_weights_of_a_straight_run(demo_data, tmp_path):
    """Across the CAM warm-up (cam_iters 2): student, teacher (EMA), optimizer and random streams restored."""
    from wsss.engine.trainer import train

    def config(work):
        return load_config("demo-toco", [*TOCO_TINY, f"data.root={demo_data}", f"train.work_dir={work}",
                                         "train.val_interval=0", "train.ckpt_interval=100", "train.log_interval=2"])

    train(config(tmp_path / "straight"))
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    cfg = config(tmp_path / "resumed")
    assert train(cfg, stop_after=2)["iteration"] == 2
    paused = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    for head in ("proj_head_t.", "seg_head."):  # the last 2 iterations move the teacher and the seg head
        assert any(not torch.equal(paused["model"][k], v) for k, v in straight["model"].items() if k.startswith(head))
    assert train(cfg, resume=tmp_path / "resumed" / "last.pt")["iteration"] == 4
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert any(k.startswith("proj_head_t.") for k in straight["model"])
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.slow
def test_a_two_process_toco_run_through_the_warm_up_validation_and_checkpoints(demo_data, tmp_path):
    """torchrun, two Gloo processes on the CPU: the warm-up (no seg head), then every loss, validation sharded
    over the ranks, the EMA teacher stepped on each rank, checkpoints from rank 0."""
    import os
    import subprocess
    import sys

    work = tmp_path / "ddp"
    overrides = [o for o in TOCO_TINY if not o.startswith(("data.batch_size", "data.total_batch_size"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wsss.cli",
           "train", "demo-toco", "--data-root", str(demo_data), "--work-dir", str(work), *overrides,
           "data.batch_size=2", "data.total_batch_size=4", "train.val_interval=2", "train.ckpt_interval=2",
           "train.log_interval=1", "eval.long_side=64"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    last = torch.load(work / "last.pt", weights_only=True)
    assert last["iteration"] == 4 and len(last["rng"]["per_rank"]) == 2
    log = (work / "train.log").read_text()
    assert "2 process(es)" in log and re.search(r"val mIoU .*cam_aux", log), log[-2000:]
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    seg = [r["losses"]["seg"] for r in records if r.get("kind") == "train" and r.get("iteration", 0) > 2]
    assert seg and all(math.isfinite(v) and v > 0 for v in seg)
