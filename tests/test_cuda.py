"""The CUDA path on a real GPU (issue 25): what fake tensors (tests/test_fake_cuda.py) cannot run.

Every test here is marked ``cuda``: where no CUDA device is available tests/conftest.py deselects them (the
summary counts them as deselected); ``bash bench/gpu.sh`` runs them on a GPU (``pytest -m cuda``). Small
models (conftest's ``small_voc_config``: mit_tiny, random init, 64-pixel crops, the VOC recipe otherwise).

- ``train_step`` whole, backward included, in bf16 / fp16 (GradScaler) / fp32, from a pinned host batch with
  non-blocking copies: finite losses, every parameter with a learning rate updated, all finite;
- no host synchronisation in a bf16 / fp32 iteration (the trainer's promise; ``torch.cuda.set_sync_debug_mode``
  turns each one into an error), after a first iteration that fills the per-device caches;
- the same fp32 forward half of an iteration on the CPU and on CUDA: losses and pseudo labels agree (cuDNN's
  default TF32 convolutions round at about 1e-3, hence the tolerances);
- the pseudo-label pipeline alone (PAR kernel, PAR, random walk, labels, evaluation probabilities) on the CPU
  and on CUDA from the same random inputs;
- ``Segmenter`` on CUDA against the CPU (seg and afa targets, fp32);
- ``train_step`` under DistributedDataParallel over NCCL (one rank; two micro-batches, so ``no_sync`` too).
  With one rank SyncBatchNorm falls back to BatchNorm: its all-reduce needs two GPUs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from wsss.engine import trainer
from wsss.engine.runtime import pseudo_label_params
from wsss.engine.schedule import build_scheduler
from wsss.method.pseudo_labels import CamMaps, cam_probabilities, pseudo_labels
from wsss.models.network import build_network

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda", 0)
NUM_CLASSES = 21


def _training(cfg, network=None):
    """(network on the device in train mode, optimizer, scheduler, scaler) as the trainer builds them."""
    network = (network if network is not None else build_network(cfg, NUM_CLASSES)).to(DEVICE).train()
    optimizer = trainer.build_optimizer(network, cfg)
    return network, optimizer, build_scheduler(optimizer, cfg.train), trainer.build_scaler(cfg, DEVICE)


def _pinned(batch):
    return {k: v.pin_memory() if DEVICE.type == "cuda" else v for k, v in batch.items()}


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_train_step_on_cuda(precision, small_voc_config, small_voc_batch):
    torch.manual_seed(0)
    cfg = small_voc_config(precision)
    network, optimizer, scheduler, scaler = _training(cfg)
    assert (scaler is not None) == (precision == "fp16" and DEVICE.type == "cuda")
    frozen = {id(p) for g in optimizer.param_groups if g["lr_mult"] == 0 for p in g["params"]}  # backbone norms
    before = {n: p.detach().clone() for n, p in network.named_parameters() if p.requires_grad and id(p) not in frozen}
    batch = _pinned(small_voc_batch)
    for iteration in (0, cfg.train.afa_label_iter):  # a warm-up iteration, then the full one
        result = trainer.train_step(network, batch, iteration, cfg, optimizer, scheduler, scaler, DEVICE)
        assert all(torch.isfinite(v).item() for v in result.losses.values()), result.losses
    assert result.pseudo is not None and result.pseudo.afa_label.device == DEVICE
    unchanged = [n for n, p in network.named_parameters() if n in before and torch.equal(p.detach(), before[n])]
    assert not unchanged, f"not updated: {unchanged[:5]}"
    assert all(torch.isfinite(p).all().item() for p in network.parameters())
    if scaler is not None:
        assert scaler.get_scale() > 0


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_train_step_reads_nothing_back(precision, small_voc_config, small_voc_batch):
    """"No host synchronisation in the loop" (wsss/engine/trainer.py): the second iteration with every
    synchronising CUDA call an error. (fp16 syncs by design: the GradScaler reads whether a gradient overflowed.)"""
    torch.manual_seed(0)
    cfg = small_voc_config(precision)
    network, optimizer, scheduler, scaler = _training(cfg)
    batch = _pinned(small_voc_batch)
    iteration = cfg.train.afa_label_iter
    trainer.train_step(network, batch, iteration, cfg, optimizer, scheduler, scaler, DEVICE)  # fills the caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(network, batch, iteration + 1, cfg, optimizer, scheduler, scaler, DEVICE)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_forward_half_matches_cpu(small_voc_config, small_voc_batch):
    """``_micro_step`` in fp32 without dropout or drop-path, the same weights and batch on both devices."""
    torch.manual_seed(0)
    cfg = small_voc_config("fp32", "model.drop_path_rate=0.0", "model.seg_dropout=0.0")
    cpu_net = build_network(cfg, NUM_CLASSES).train()
    gpu_net = copy.deepcopy(cpu_net).to(DEVICE)
    iteration = cfg.train.afa_label_iter
    _, cpu_losses, _, cpu_pseudo = trainer._micro_step(cpu_net, small_voc_batch, iteration, cfg,
                                                       torch.device("cpu"), trainer.NO_TIMER)
    _, gpu_losses, _, gpu_pseudo = trainer._micro_step(gpu_net, small_voc_batch, iteration, cfg, DEVICE,
                                                       trainer.NO_TIMER)
    for name in ("cls", "aff", "reg"):
        assert gpu_losses[name].item() == pytest.approx(cpu_losses[name].item(), rel=1e-2, abs=1e-4), name
    torch.testing.assert_close(gpu_pseudo.cams.cpu(), cpu_pseudo.cams, atol=2e-2, rtol=0)
    for name in ("label", "afa_label"):
        same = (getattr(gpu_pseudo, name).cpu() == getattr(cpu_pseudo, name)).float().mean().item()
        assert same >= 0.99, f"{name}: {same:.4f} of the pixels agree"


def test_pseudo_label_pipeline_matches_cpu(small_voc_config):
    """PAR kernel, PAR, random walk, the training labels and the evaluation probabilities, float32 inputs."""
    cfg = small_voc_config("fp32")
    params = pseudo_label_params(cfg)
    g = torch.Generator().manual_seed(0)
    b, k, size, grid = 2, 3, 64, (6, 6)
    images01 = torch.rand(b, 3, size, size, generator=g)
    cams = torch.rand(b, k, size, size, generator=g)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    cams = cams * labels[:, :, None, None]
    affinity = torch.rand(b, grid[0] * grid[1], grid[0] * grid[1], generator=g)
    box = torch.tensor([[0, size, 0, size], [0, size - 8, 0, size - 16]])

    def run(device):
        maps = CamMaps(cams.to(device), labels.to(device), None, affinity.to(device), grid)
        out = pseudo_labels(images01.to(device), maps, params, box)
        probs = cam_probabilities(images01.to(device), maps, params, ("cam", "par", "afa", "rw"), (48, 40))
        return out, probs

    cpu_out, cpu_probs = run(torch.device("cpu"))
    gpu_out, gpu_probs = run(DEVICE)
    for name in ("label", "afa_label"):
        same = (getattr(gpu_out, name).cpu() == getattr(cpu_out, name)).float().mean().item()
        assert same >= 0.999, f"{name}: {same:.5f} of the pixels agree"
    for name, probs in cpu_probs.items():
        torch.testing.assert_close(gpu_probs[name].cpu(), probs, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("target", ["seg", "afa"])
def test_segmenter_matches_cpu(target, small_voc_config):
    from wsss.api import Segmenter

    torch.manual_seed(0)
    cfg = small_voc_config("fp32")
    network = build_network(cfg, NUM_CLASSES)
    names = [f"class {c}" for c in range(NUM_CLASSES)]
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    cpu = Segmenter(copy.deepcopy(network), cfg, names, device="cpu", target=target).predict_proba([image])[0]
    gpu = Segmenter(network, cfg, names, device=DEVICE, target=target).predict_proba([image])[0]
    assert gpu.shape == cpu.shape == (NUM_CLASSES, 60, 90)
    np.testing.assert_allclose(gpu, cpu, atol=1e-2)
    assert (gpu.argmax(0) == cpu.argmax(0)).mean() >= 0.99


def test_train_step_under_ddp_nccl(small_voc_config, small_voc_batch, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    assert dist.is_nccl_available(), "this torch has no NCCL"
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = small_voc_config("bf16", "data.total_batch_size=4")
        network, optimizer, scheduler, scaler = _training(cfg)
        model = DistributedDataParallel(network, device_ids=[DEVICE.index], find_unused_parameters=True)
        micro = [_pinned(small_voc_batch), _pinned(small_voc_batch)]
        result = trainer.train_step(model, micro, cfg.train.afa_label_iter, cfg, optimizer, scheduler, scaler,
                                    DEVICE)
        assert all(torch.isfinite(v).item() for v in result.losses.values()), result.losses
    finally:
        dist.destroy_process_group()
