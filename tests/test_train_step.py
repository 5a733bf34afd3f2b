"""The training iteration, its schedule and its data order, on tiny inputs (mit_tiny, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from wsss.config import load_config
from wsss.engine.schedule import build_scheduler, lr_factor
from wsss.engine.trainer import (
    PhaseTimer, build_optimizer, build_scaler, cam_path_is_deterministic, iterate_batches, make_pseudo_labels,
    present_classes, train_step,
)
from wsss.models.network import build_network

K = 3  # foreground classes of the tiny setting


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(*overrides: str):
    return load_config("demo", [
        "data.crop_size=64", "data.batch_size=2", "model.seg_embed_dim=32", "cam.scales=[1.0,0.5]",
        "afa.affinity_scale=1.0", "afa.radius=2", "train.cam_iters=2", "train.afa_label_iter=4",
        "train.iterations=10", "train.warmup_iters=2", *overrides,
    ])


def tiny_batch(b: int = 2, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(b, K)
    labels[0, 0] = 1
    labels[1, [1, 2]] = 1
    return {"image": torch.randn(b, 3, size, size, generator=g), "label": labels,
            "valid_box": torch.tensor([[0, size, 0, size], [4, size, 0, size - 8]])}


def build(cfg):
    torch.manual_seed(0)
    network = build_network(cfg, K + 1).train()
    optimizer = build_optimizer(network, cfg)
    return network, optimizer, build_scheduler(optimizer, cfg.train)


def test_lr_rises_linearly_from_the_warmup_ratio_then_decays_to_zero_without_a_jump():
    cfg = load_config("voc", ["train.iterations=100", "train.warmup_iters=10", "train.warmup_ratio=0.01"])
    tc = cfg.train
    assert lr_factor(0, tc) == pytest.approx(0.01)
    assert lr_factor(5, tc) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, tc) == pytest.approx(1.0)
    assert lr_factor(55, tc) == pytest.approx(0.5)  # poly power 1, halfway through the decay
    assert lr_factor(100, tc) == 0.0
    factors = [lr_factor(t, tc) for t in range(101)]
    assert max(abs(a - b) for a, b in zip(factors, factors[1:])) < 0.1  # continuous


def test_scheduler_sets_each_group_to_lr_times_its_multiplier():
    cfg = tiny_config("train.lr=1e-3", "train.head_lr_mult=10")
    network, optimizer, scheduler = build(cfg)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    factor = lr_factor(3, cfg.train)
    by_name = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert by_name["backbone"] == pytest.approx(1e-3 * factor)
    assert by_name["seg_head"] == pytest.approx(1e-2 * factor)
    assert by_name["backbone_norm"] == 0.0  # frozen norms (train.freeze_backbone_norm)


def test_present_classes_lists_each_images_classes_first_padded_with_absent_ones():
    labels = torch.tensor([[0.0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
    index = present_classes(labels)
    assert index.tolist() == [[1, 3], [2, 0], [0, 1]]


def test_pseudo_labels_on_the_present_classes_equal_those_on_all_classes():
    cfg = tiny_config("model.drop_path_rate=0.0")
    network, _, _ = build(cfg)
    batch = tiny_batch()
    args = (network, batch["image"], batch["label"], batch["valid_box"], cfg, True)
    compact = make_pseudo_labels(*args)
    full = make_pseudo_labels(*args, class_index=torch.arange(K).repeat(2, 1))
    assert torch.equal(compact.label, full.label)
    assert torch.equal(compact.afa_label, full.afa_label)
    assert compact.cams.shape[1] == 2 and full.cams.shape[1] == K


def test_main_pass_cams_are_reused_only_without_drop_path():
    with_drop_path = build(tiny_config("model.drop_path_rate=0.1"))[0]
    without = build(tiny_config("model.drop_path_rate=0.0"))[0]
    assert not cam_path_is_deterministic(with_drop_path)
    assert cam_path_is_deterministic(without)
    assert cam_path_is_deterministic(with_drop_path.eval())


def test_reused_main_pass_gives_the_same_pseudo_labels_as_a_separate_pass():
    cfg = tiny_config("model.drop_path_rate=0.0")
    network, _, _ = build(cfg)
    batch = tiny_batch()
    with torch.no_grad():
        main = network(batch["image"])
    args = (network, batch["image"], batch["label"], batch["valid_box"], cfg, True)
    reused = make_pseudo_labels(*args, main_output=main)
    separate = make_pseudo_labels(*args)
    assert torch.allclose(reused.cams, separate.cams, atol=1e-5)
    assert torch.equal(reused.label, separate.label)


def test_warmup_step_trains_only_the_classification_path():
    cfg = tiny_config()
    network, optimizer, scheduler = build(cfg)
    seg_before = [p.detach().clone() for p in network.seg_head.parameters()]
    aff_before = [p.detach().clone() for p in network.affinity_head.parameters()]
    cls_before = network.classifier.classifier.weight.detach().clone()
    timer = PhaseTimer()
    result = train_step(network, tiny_batch(), 0, cfg, optimizer, scheduler, None, torch.device("cpu"), timer)
    assert result.pseudo is None and result.seg_logits is None
    assert result.losses["seg"] == 0 and result.losses["aff"] == 0 and result.losses["cls"] > 0
    assert all(torch.equal(a, b) for a, b in zip(seg_before, network.seg_head.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(aff_before, network.affinity_head.parameters()))
    assert not torch.equal(cls_before, network.classifier.classifier.weight)
    assert "multiscale_cam" not in timer.totals and timer.totals["forward"] > 0


@pytest.mark.parametrize("iteration, target", [(2, "par"), (4, "afa")])
def test_full_step_trains_every_head_with_finite_losses(iteration, target):
    cfg = tiny_config()
    network, optimizer, scheduler = build(cfg)
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    timer = PhaseTimer()
    result = train_step(network, tiny_batch(), iteration, cfg, optimizer, scheduler, None, torch.device("cpu"), timer)
    assert all(math.isfinite(float(v)) for v in result.losses.values())
    assert result.losses["seg"] > 0 and result.losses["aff"] > 0
    assert (result.pseudo.afa_label is not None) == (target == "afa")
    for part in ("seg_head", "affinity_head", "classifier", "backbone.block4"):
        assert any(not torch.equal(before[n], p) for n, p in network.named_parameters() if n.startswith(part)), part
    phases = set(timer.totals)
    assert {"forward", "multiscale_cam", "pseudo_label_par", "losses", "backward", "optimizer"} <= phases
    assert ("affinity_random_walk" in phases) == (target == "afa")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_step_runs_on_cpu(precision):
    cfg = tiny_config(f"train.precision={precision}")
    network, optimizer, scheduler = build(cfg)
    scaler = build_scaler(cfg, torch.device("cpu"))
    assert (scaler is not None) == (precision == "fp16")
    result = train_step(network, tiny_batch(), 4, cfg, optimizer, scheduler, scaler, torch.device("cpu"))
    assert all(math.isfinite(float(v)) for v in result.losses.values())
    assert result.pseudo.label.dtype == torch.long and result.pseudo.cams.dtype == torch.float32


class _Names(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return {"index": index, "draw": torch.rand(())}


def _take(loader, sampler, epoch, consumed, count):
    it = iterate_batches(loader, sampler, epoch, consumed, batch_size=3)
    return [(e, c, b["index"].tolist(), b["draw"].tolist()) for (e, c, b), _ in zip(it, range(count))]


def test_batches_resume_mid_epoch_in_the_same_order_with_the_same_augmentation_draws():
    from wsss.engine.distributed import DistContext
    from wsss.engine.trainer import build_train_loader

    cfg = tiny_config("data.batch_size=3", "data.num_workers=0", "train.seed=7")
    ctx = DistContext(0, 0, 1, torch.device("cpu"))
    loader, sampler = build_train_loader(_Names(), cfg, ctx)
    straight = _take(loader, sampler, 0, 0, 8)  # 3 batches per epoch (drop_last): crosses two epochs
    assert [(e, c) for e, c, _, _ in straight] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    assert straight[0][2] != straight[3][2]  # a new permutation per epoch
    loader, sampler = build_train_loader(_Names(), cfg, ctx)  # a fresh process resuming after batch 2 of epoch 0
    assert _take(loader, sampler, 0, 2, 6) == straight[2:]
