"""The training iteration, its schedule and its data order, on tiny inputs (mit_tiny, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from wsss.config import load_config
from wsss.engine.schedule import build_scheduler, lr_factor
from wsss.engine.loader import build_train_loader, iterate_batches
from wsss.engine.trainer import (
    NO_TIMER, PhaseTimer, build_optimizer, build_scaler, cam_path_is_deterministic, make_pseudo_labels, train_step,
)
from wsss.method.pseudo_labels import present_classes
from wsss.models.network import build_network

K = 3  # foreground classes of the tiny setting


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def tiny_config(tiny_config):
    """tests/conftest.py's tiny config with this module's batch of 2 and 10 iterations."""
    return lambda *overrides: tiny_config("data.batch_size=2", "data.total_batch_size=2", "data.num_workers=2",
                                          "train.iterations=10", *overrides)


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


def test_lr_rises_linearly_from_the_warmup_ratio_then_follows_the_official_poly_curve():
    """As the official PolyWarmupAdamW: after the warm-up the factor is (1 - t / T) ** power of the
    whole run (a step down from 1 to 1 - W / T at t = W), not a curve restarted at W."""
    cfg = load_config("voc", ["train.iterations=100", "train.warmup_iters=10", "train.warmup_ratio=0.01"])
    tc = cfg.train
    assert lr_factor(0, tc) == pytest.approx(0.01)
    assert lr_factor(5, tc) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(9, tc) == pytest.approx(0.01 + 0.99 * 0.9)
    assert lr_factor(10, tc) == pytest.approx(0.9)
    assert lr_factor(55, tc) == pytest.approx(0.45)  # poly power 1
    assert lr_factor(100, tc) == 0.0
    squared = load_config("voc", ["train.iterations=100", "train.warmup_iters=10", "train.poly_power=2"]).train
    assert lr_factor(50, squared) == pytest.approx(0.25)


def test_scheduler_sets_each_group_to_lr_times_its_multiplier(tiny_config):
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


def test_pseudo_labels_on_the_present_classes_equal_those_on_all_classes(tiny_config):
    cfg = tiny_config("model.drop_path_rate=0.0")
    network, _, _ = build(cfg)
    batch = tiny_batch()
    args = (network, batch["image"], batch["label"], batch["valid_box"], cfg, True)
    compact = make_pseudo_labels(*args)
    full = make_pseudo_labels(*args, class_index=torch.arange(K).repeat(2, 1))
    assert torch.equal(compact.label, full.label)
    assert torch.equal(compact.afa_label, full.afa_label)
    assert compact.cams.shape[1] == 2 and full.cams.shape[1] == K


def test_main_pass_cams_are_reused_only_without_drop_path_or_batch_norm(tiny_config):
    with_drop_path = build(tiny_config("model.drop_path_rate=0.1", "model.conv_stem=0"))[0]
    without = build(tiny_config("model.drop_path_rate=0.0", "model.conv_stem=0"))[0]
    with_stem = build(tiny_config("model.drop_path_rate=0.0", "model.conv_stem=8"))[0]  # BatchNorm: batch statistics
    assert not cam_path_is_deterministic(with_drop_path)
    assert cam_path_is_deterministic(without)
    assert not cam_path_is_deterministic(with_stem)
    assert cam_path_is_deterministic(with_drop_path.eval()) and cam_path_is_deterministic(with_stem.eval())


@pytest.mark.parametrize(("policy", "drop_path", "reused"), [
    ("always", 0.1, True), ("exact", 0.1, False), ("exact", 0.0, True), ("never", 0.0, False)])
def test_cam_reuse_train_pass_decides_whether_the_scale_1_pass_runs(tiny_config, policy, drop_path, reused):
    cfg = tiny_config(f"model.drop_path_rate={drop_path}", f"cam.reuse_train_pass={policy}", "cam.flip=true",
                      "model.conv_stem=0")  # the demo's stem has BatchNorm, which "exact" never reuses
    network, _, _ = build(cfg)
    batch = tiny_batch()
    with torch.no_grad():
        main = network(batch["image"])
    full_size = []  # images per cam_forward call at the input resolution
    cam_forward = network.cam_forward

    def counting(x, with_affinity=False):
        if x.shape[-2:] == batch["image"].shape[-2:]:
            full_size.append(x.shape[0])
        return cam_forward(x, with_affinity)

    network.cam_forward = counting
    make_pseudo_labels(network, batch["image"], batch["label"], batch["valid_box"], cfg, True, main_output=main)
    b = batch["image"].shape[0]
    assert sum(full_size) == (b if reused else 2 * b)  # reused: only the flipped images run at scale 1


def test_reused_main_pass_gives_the_same_pseudo_labels_as_a_separate_pass(tiny_config):
    cfg = tiny_config("model.drop_path_rate=0.0", "model.conv_stem=0")  # no BatchNorm: "exact" reuses
    network, _, _ = build(cfg)
    batch = tiny_batch()
    with torch.no_grad():
        main = network(batch["image"])
    args = (network, batch["image"], batch["label"], batch["valid_box"], cfg, True)
    reused = make_pseudo_labels(*args, main_output=main)
    separate = make_pseudo_labels(*args)
    assert torch.allclose(reused.cams, separate.cams, atol=1e-5)
    assert torch.equal(reused.label, separate.label)


def test_warmup_step_trains_only_the_classification_path(tiny_config):
    cfg = tiny_config()
    network, optimizer, scheduler = build(cfg)
    seg_before = [p.detach().clone() for p in network.seg_head.parameters()]
    aff_before = [p.detach().clone() for p in network.affinity_head.parameters()]
    cls_before = network.classifier.classifier.weight.detach().clone()
    timer = PhaseTimer()
    decay = {id(p): g["lr"] * g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    result = train_step(network, tiny_batch(), 0, cfg, optimizer, scheduler, None, torch.device("cpu"), timer)
    assert result.pseudo is None and result.seg_logits is None
    assert result.losses["seg"] == 0 and result.losses["aff"] == 0 and result.losses["cls"] > 0
    assert not torch.equal(cls_before, network.classifier.classifier.weight)
    # the heads the warm-up skips get zero gradients, as the official loop's zero-weighted losses give:
    # AdamW only decays them (decoupled weight decay) and counts the step, the moments stay zero
    for before, part in ((seg_before, network.seg_head), (aff_before, network.affinity_head)):
        for a, p in zip(before, part.parameters()):
            assert torch.allclose(p, a * (1 - decay[id(p)]), rtol=0, atol=1e-12)
            state = optimizer.state[p]
            assert float(state["step"]) == 1 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert "multiscale_cam" not in timer.totals and timer.totals["forward"] > 0


@pytest.mark.parametrize("iteration, target", [(2, "par"), (4, "afa")])
def test_full_step_trains_every_head_with_finite_losses(tiny_config, iteration, target):
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
def test_reduced_precision_step_runs_on_cpu(tiny_config, precision):
    cfg = tiny_config(f"train.precision={precision}")
    network, optimizer, scheduler = build(cfg)
    scaler = build_scaler(cfg, torch.device("cpu"))
    assert scaler is None  # bf16 needs none; fp16 runs as fp32 on the CPU (wsss.engine.runtime.autocast_dtype)
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


def test_batches_resume_mid_epoch_in_the_same_order_with_the_same_augmentation_draws(tiny_config):
    from wsss.engine.distributed import DistContext

    cfg = tiny_config("data.batch_size=3", "data.total_batch_size=3", "data.num_workers=0", "train.seed=7")
    ctx = DistContext(0, 0, 1, torch.device("cpu"))
    loader, sampler = build_train_loader(_Names(), cfg, ctx)
    straight = _take(loader, sampler, 0, 0, 8)  # 3 batches per epoch (drop_last): crosses two epochs
    assert [(e, c) for e, c, _, _ in straight] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    assert straight[0][2] != straight[3][2]  # a new permutation per epoch
    loader, sampler = build_train_loader(_Names(), cfg, ctx)  # a fresh process resuming after batch 2 of epoch 0
    assert _take(loader, sampler, 0, 2, 6) == straight[2:]


# --------------------------------------------------------------------------- total batch and accumulation


@pytest.mark.parametrize("total, world, batch, steps, expected", [
    (4, 1, 2, 0, (2, 2)),  # the VOC recipe on one GPU: 1 x 2 images x 2 steps
    (4, 2, 2, 0, (2, 1)),  # as published: 2 GPUs x 2
    (4, 4, 2, 0, (1, 1)),  # 4 GPUs: one image each
    (8, 1, 2, 0, (2, 4)),  # COCO on one GPU
    (8, 2, 3, 0, (2, 2)),  # the largest divisor of the share that fits data.batch_size
    (4, 1, 2, 4, (1, 4)),  # explicit accumulation
])
def test_the_total_batch_splits_into_processes_images_and_accumulation_steps(total, world, batch, steps, expected):
    from wsss.engine.trainer import split_batch

    per_forward, accumulation = split_batch(total, world, batch, steps)
    assert (per_forward, accumulation) == expected
    assert world * per_forward * accumulation == total


@pytest.mark.parametrize("total, world, steps, message", [
    (4, 3, 0, "data.total_batch_size=4 cannot be split over 3 processes"),
    (4, 1, 3, "train.accumulation_steps=3 does not divide"),
])
def test_a_total_batch_that_cannot_be_split_is_a_clear_error(total, world, steps, message):
    from wsss.engine.trainer import split_batch
    from wsss.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        split_batch(total, world, 2, steps)


def _grads(network) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None}


def _step_gradients(cfg, batches, iteration):
    """The gradients of train_step's optimizer step (captured when it clears them)."""
    network, optimizer, scheduler = build(cfg)
    captured = {}
    original = optimizer.zero_grad

    def zero_grad(*args, **kwargs):
        captured.update(_grads(network))
        return original(*args, **kwargs)

    optimizer.zero_grad = zero_grad
    train_step(network, batches, iteration, cfg, optimizer, scheduler, None, torch.device("cpu"))
    return captured


def _halves(batch: dict) -> list[dict]:
    return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]


def test_accumulated_warmup_step_has_the_gradients_of_the_whole_batch(tiny_config):
    """Classification loss (warm-up) is a mean over images: 2 micro-batches of 1 accumulated give the
    gradients of one batch of 2 (no BatchNorm on this path: without the demo's conv stem)."""
    cfg = tiny_config("model.drop_path_rate=0.0", "model.conv_stem=0")
    whole = _step_gradients(cfg, tiny_batch(), 0)
    accumulated = _step_gradients(cfg, _halves(tiny_batch()), 0)
    assert whole.keys() == accumulated.keys() and whole
    for name, grad in whole.items():
        assert torch.allclose(accumulated[name], grad, atol=1e-6, rtol=1e-5), name


def test_accumulated_full_step_averages_the_micro_batch_gradients(tiny_config):
    """After the warm-up each micro-batch's losses (per-micro-batch pseudo labels, seg-head BatchNorm over
    the micro-batch, as each GPU of the published 2 x 2 run) are averaged: the gradient is the mean of the
    micro-batches' own gradients, as DDP's average over two processes (dropout off: same random draws)."""
    cfg = tiny_config("model.drop_path_rate=0.0", "model.seg_dropout=0.0")
    halves = _halves(tiny_batch())
    accumulated = _step_gradients(cfg, halves, 4)
    separate = [_step_gradients(cfg, [half], 4) for half in halves]
    for name, grad in accumulated.items():
        mean = 0.5 * (separate[0].get(name, torch.zeros_like(grad)) + separate[1].get(name, torch.zeros_like(grad)))
        assert torch.allclose(grad, mean, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("switch", [False, True])
def test_affinity_labels_switch_to_the_afa_label_only_when_configured(tiny_config, switch):
    """VOC script: affinity labels from the PAR-refined CAM label throughout; COCO script
    (train.afa_label_for_affinity): from the AFA label once it is the seg target."""
    from wsss.engine.trainer import _micro_step
    from wsss.method.affinity import affinity_labels, label_to_grid
    from wsss.method.losses import affinity_loss

    cfg = tiny_config("model.drop_path_rate=0.0", f"train.afa_label_for_affinity={str(switch).lower()}")
    network, _, _ = build(cfg)
    _, losses, out, pseudo = _micro_step(network, tiny_batch(), 4, cfg, torch.device("cpu"), NO_TIMER)

    def loss_from(label):
        target = affinity_labels(label_to_grid(label, out.cams.shape[-2:]), cfg.afa.radius, 255)
        return affinity_loss(out.affinity.float(), target)

    from_par, from_afa = loss_from(pseudo.label), loss_from(pseudo.afa_label)
    assert not torch.allclose(from_par, from_afa)  # the two labels give different affinity targets here
    assert torch.allclose(losses["aff"], from_afa if switch else from_par)


def test_coco_and_voc_configs_follow_their_official_scripts():
    voc, coco = load_config("voc"), load_config("coco")
    assert voc.data.total_batch_size == 4 and coco.data.total_batch_size == 8
    assert voc.model.pretrained == coco.model.pretrained == "hub"
    assert not voc.train.afa_label_for_affinity and voc.train.afa_label_iter == 6000
    assert coco.train.afa_label_for_affinity and coco.train.afa_label_iter == 15000
    assert load_config("demo").model.pretrained == "none"


def test_the_seg_head_and_the_conv_stem_get_sync_batchnorm_under_ddp_on_accelerators_only(tiny_config):
    from timm.layers import SyncBatchNormAct

    from wsss.engine.distributed import DistContext
    from wsss.engine.trainer import use_sync_batchnorm

    cfg = tiny_config("model.conv_stem=8")

    def converted(world: int, device: str, enabled: bool = True) -> bool:
        network = build(cfg)[0]
        done = use_sync_batchnorm(network, DistContext(0, 0, world, torch.device(device)), enabled)
        head_sync = any(isinstance(m, torch.nn.SyncBatchNorm) for m in network.seg_head.modules())
        stem = list(network.backbone.patch_embed1.proj.modules())
        stem_sync = [m for m in stem if isinstance(m, torch.nn.SyncBatchNorm)]
        assert done == head_sync == bool(stem_sync)
        if stem_sync:  # the stem's BatchNorm + GELU stays one module with its activation
            assert all(isinstance(m, SyncBatchNormAct) for m in stem_sync) and len(stem_sync) == 2
        assert not any(type(m) is torch.nn.BatchNorm2d for m in network.modules()) or not done
        return head_sync

    assert converted(2, "cuda")  # conversion itself needs no GPU
    assert not converted(1, "cuda") and not converted(2, "cpu") and not converted(2, "cuda", enabled=False)


def test_reg_loss_enters_the_total_only_with_a_positive_weight(tiny_config):
    cfg_off = tiny_config("model.drop_path_rate=0.0")
    cfg_on = tiny_config("model.drop_path_rate=0.0", "train.reg_loss_weight=1e-6")
    from wsss.engine.trainer import _micro_step

    results = []
    for cfg in (cfg_off, cfg_on):
        network, _, _ = build(cfg)
        total, losses, _, _ = _micro_step(network, tiny_batch(), 4, cfg, torch.device("cpu"), NO_TIMER)
        results.append((total, losses))
    (total_off, off), (total_on, on) = results
    assert off["reg"] == 0 and on["reg"] > 0
    assert torch.allclose(total_on, total_off + 1e-6 * on["reg"], rtol=1e-5)


def test_the_first_lines_of_a_run_name_the_weights_and_the_batch_split():
    from wsss.engine.distributed import DistContext
    from wsss.engine.trainer import run_header

    ctx = DistContext(0, 0, 1, torch.device("cpu"))
    voc = run_header(load_config("voc"), ctx, 2, 2, range(10582), 5291, 0, False)
    assert "ImageNet weights" in voc[0]
    assert voc[1] == "total batch 4 = 1 process(es) x 2 image(s) x 2 accumulation step(s)"
    scratch = run_header(load_config("voc", ["model.pretrained=none"]), ctx, 2, 2, range(10), 5, 0, False)
    assert "random initialisation (model.pretrained=none" in scratch[0]
