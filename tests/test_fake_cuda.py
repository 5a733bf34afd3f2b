"""The CUDA path on a machine without a GPU: every device tensor a fake tensor on ``cuda`` (issue 25).

Under :class:`FakeCuda` (a ``torch._subclasses.fake_tensor.FakeTensorMode``) tensors on ``cuda`` carry shape,
dtype and device but no data, and every op checks its inputs' devices as on a GPU. A tensor made on the wrong
device (``torch.zeros(n)`` without ``device=``, a cached CPU constant, a CPU mask) fails the op that meets a
``cuda`` tensor: "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and
cpu!" (as on a GPU, a 0-dim CPU tensor may mix with them). Host tensors, what the data loader hands the loop,
stay real, so host-side code (``present_classes`` on the loaded labels) runs on their values.

Covered, with the library's own functions on small models (conftest's ``small_voc_config``: mit_tiny, random
init, 64-pixel crops, the VOC recipe otherwise: 21 classes, three CAM scales with flip, affinity scale 1.5,
radius 8):

- the forward half of a training iteration, ``wsss.engine.trainer._micro_step`` (what ``train_step`` runs
  before ``backward``): the network pass under CUDA autocast (bf16, fp16; fp32 without), multi-scale CAM of
  the present classes, thresholds + PAR label, affinity labels, random walk + PAR (AFA label), the
  classification / seg / affinity / dense-energy losses; at a warm-up, a PAR-label and an AFA-label iteration,
  with the SegFormer head and the mask decoder;
- ``build_optimizer`` + ``build_scheduler``: the fused AdamW step and the schedule on stand-in gradients;
- validation's network and label part (``_validation_maps``: seg, CAM, random walk, PAR, the image logits and
  their ``ImageScores``), the background threshold sweep (``cam_labels_per_bg_threshold``) and the confusion
  matrix's update on the device;
- ``Segmenter.to`` and ``Segmenter._probs`` (the network part of ``predict``) for seg, cam and afa, msc.

Not covered, and why:

- backward, hence the backward phase, the GradScaler (fp16) and ``train_step`` as a whole: autograd's engine
  asks the CUDA driver for the device's context ("hasPrimaryContext expects a valid device index"); a device
  bug that only the backward formulas have stays for a GPU (``bench/gpu.sh``);
- ``torch.compile``: Inductor generates Triton kernels and runs them on a real device;
- values: fake tensors have none, so numerics and bf16 / fp32 agreement (``bench/gpu.py``) are not checked,
  and any read of a device value (``.item()``, ``.tolist()``, ``nonzero``) fails here. That is how this test
  found ``refine_probs_to_label`` reading the device copy of ``valid_box`` (a host sync per iteration on a
  GPU; ``_micro_step`` hands it the host copy). Hence also whole loops that read results back stay out: ``validate``'s
  mIoU, ``predict``'s label maps, TensorBoard grids, CRF (numpy), files;
- DDP, SyncBatchNorm's all-reduce and NCCL (no process group of fake devices), pinned memory and the overlap
  of non-blocking copies, DataLoader workers;
- kernel choice: fake tensors run each op's meta function, not a CUDA kernel (SDPA's flash / memory-efficient
  backends, cuDNN): unsupported shapes or dtypes of a specific kernel show only on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_leaves

from wsss.engine import trainer
from wsss.engine.inference import _validation_maps, cam_labels_per_bg_threshold
from wsss.engine.metrics import ConfusionMatrix, ImageScores
from wsss.engine.runtime import autocast
from wsss.engine.schedule import build_scheduler
from wsss.method import affinity, par
from wsss.models.network import build_network

CUDA = torch.device("cuda", 0)
NUM_CLASSES = 21  # VOC: background + 20
CROP = 64  # conftest.SMALL_CROP


class FakeCuda(FakeTensorMode):
    """FakeTensorMode in which ops on real host tensors alone (no fake input, no device argument but the CPU)
    run for real: host tensors keep their values, device tensors are fake; any op that mixes a CPU tensor of
    one or more dimensions into ``cuda`` ones fails as on a GPU (``allow_non_fake_inputs``: a real input is
    made fake on its own device first). Factories without a tensor input (``torch.zeros(n)``) give fake CPU
    tensors, which fail the same way."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        device = kwargs.get("device")
        host = (tensors and not any(isinstance(t, FakeTensor) for t in tensors) and func not in self.lift_fns
                and (device is None or torch.device(device).type == "cpu"))
        if host:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _clear_device_caches() -> None:
    """The per-device caches (window mask, PAR position kernel) would keep fake tensors for ``cuda`` past
    the test: on a GPU machine a later real ``cuda`` test in this process would get them."""
    affinity._window_mask.cache_clear()
    par._position_kernel.cache_clear()


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """:class:`FakeCuda`, with CUDA autocast enabled (torch disables it when no GPU is present: "CUDA is not
    available ... Disabling autocast"; on fake tensors it runs as on a GPU with bf16 support)."""
    _clear_device_caches()
    with (mock.patch.object(torch.cuda.amp.common, "amp_definitely_not_available", return_value=False),
          mock.patch.object(torch.cuda, "is_bf16_supported", return_value=True)):
        try:
            with FakeCuda() as mode:
                yield mode
        finally:
            _clear_device_caches()


def assert_on_cuda(value: Any, where: str = "output") -> None:
    """Every tensor in ``value`` (nested dataclasses, dicts, lists, tuples) is a fake tensor on ``cuda``."""
    if isinstance(value, torch.Tensor):
        assert isinstance(value, FakeTensor) and value.device == CUDA, f"{where}: {type(value).__name__} on {value.device}"
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            assert_on_cuda(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            assert_on_cuda(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_on_cuda(v, f"{where}[{i}]")


# --------------------------------------------------------------------------- the harness


def test_fake_cuda_fails_on_a_host_tensor_as_a_gpu_does():
    host = torch.arange(4)  # made before: a real host tensor, as the loader's
    with fake_cuda():
        x = torch.ones(2, 3, device="cuda")
        assert isinstance(x, FakeTensor) and x.device == CUDA
        assert_on_cuda(x + torch.tensor(2.0))  # a 0-dim CPU tensor mixes, as on a GPU
        assert_on_cuda(x + torch.zeros(3, device=x.device))
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.zeros(3)
        with pytest.raises(RuntimeError, match="same device"):
            torch.where(x > 0, x, torch.zeros(2, 3))
        total = host.sum()  # ops on host tensors alone run for real
        assert not isinstance(total, FakeTensor) and total.item() == 6
        assert_on_cuda(host.to(x.device) + x[0, :1])
        with torch.autocast("cuda", torch.bfloat16):  # CUDA autocast runs on fake tensors
            assert (x @ x.T).dtype == torch.bfloat16
    assert affinity._window_mask.cache_info().currsize == 0


# --------------------------------------------------------------------------- training iteration

PHASES = {"warmup": lambda tc: 0, "par_label": lambda tc: tc.cam_iters, "afa_label": lambda tc: tc.afa_label_iter}


@pytest.mark.parametrize(("precision", "phase", "extras"), [
    ("bf16", "warmup", ()),
    ("bf16", "par_label", ()),
    ("bf16", "afa_label", ()),
    ("fp32", "afa_label", ()),
    ("fp16", "afa_label", ()),
    ("bf16", "afa_label", ("model.seg_head=mask_decoder", "model.mask_decoder.num_queries=4",
                           "model.mask_decoder.hidden_dim=32", "model.mask_decoder.ffn_dim=64")),
], ids=["bf16-warmup", "bf16-par", "bf16-afa", "fp32-afa", "fp16-afa", "bf16-afa-mask_decoder"])
def test_training_step_forward_on_cuda(precision, phase, extras, small_voc_config, small_voc_batch):
    """``_micro_step`` on ``cuda``: outputs, pseudo labels and losses on the device, network outputs in the
    autocast dtype (so autocast really ran), losses float32 scalars, labels long [B, H, W]."""
    cfg = small_voc_config(precision, *extras)
    iteration = PHASES[phase](cfg.train)
    network = build_network(cfg, NUM_CLASSES).train()
    batch = small_voc_batch
    with fake_cuda():
        network.to(CUDA)  # as the trainer: build on the host, then move
        total, losses, out, pseudo = trainer._micro_step(network, batch, iteration, cfg, CUDA, trainer.NO_TIMER)
        assert_on_cuda(out, "network output")
        assert_on_cuda(losses, "losses")
        assert_on_cuda(pseudo, "pseudo labels")
    assert set(losses) == set(trainer.LOSS_NAMES) and total is losses["total"]
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in losses.values())
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    assert out.cls_logits.dtype == expected
    if phase == "warmup":
        assert pseudo is None and out.seg_logits is None
        return
    assert pseudo.label.shape == (2, CROP, CROP) and pseudo.label.dtype == torch.long
    assert pseudo.cams.dtype == torch.float32  # post-processing in float32 under autocast
    assert (pseudo.afa_label is not None) == (phase == "afa_label")
    if pseudo.afa_label is not None:
        assert pseudo.afa_label.shape == (2, CROP, CROP) and pseudo.afa_label.dtype == torch.long


def test_optimizer_step_on_cuda(small_voc_config):
    """The fused AdamW step and the schedule on ``cuda``, on stand-in gradients (backward cannot run here)."""
    cfg = small_voc_config("bf16")
    network = build_network(cfg, NUM_CLASSES).train()
    with fake_cuda():
        network.to(CUDA)
        optimizer = trainer.build_optimizer(network, cfg)
        scheduler = build_scheduler(optimizer, cfg.train)
        params = [p for p in network.parameters() if p.requires_grad]
        for p in params[::2]:
            p.grad = torch.ones_like(p)
        trainer.zero_fill_grads(network)  # the warm-up's zero gradients for the rest
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        assert_on_cuda(list(network.parameters()), "parameters")
        assert_on_cuda([optimizer.state[p] for p in params], "optimizer state")


# --------------------------------------------------------------------------- validation and prediction


def test_validation_maps_on_cuda(small_voc_config):
    """Validation's labels (seg, CAM, random walk, PAR) at another output size, the threshold sweep and the
    confusion matrix's update, all on ``cuda`` under inference mode and bf16 autocast (``run_over_split``)."""
    cfg = small_voc_config("bf16")
    network = build_network(cfg, NUM_CLASSES).eval()
    image = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with fake_cuda():
        network.to(CUDA)
        x, label = image.to(CUDA), torch.eye(20)[3].to(CUDA)
        with torch.inference_mode(), autocast(CUDA, cfg.train.precision):
            maps, cls_logits = _validation_maps(network, x, label, (80, 100), cfg)
            sweep = cam_labels_per_bg_threshold(network, x, label, cfg, "afa", [0.3, 0.4], True, (80, 100))
        assert_on_cuda(maps, "validation maps")
        assert_on_cuda(cls_logits, "validation image logits")
        scores = ImageScores(NUM_CLASSES - 1, device=CUDA)
        scores.update(cls_logits, label)
        assert_on_cuda(scores._sums, "image scores")
        assert_on_cuda(sweep, "threshold sweep")
        mask = torch.zeros(80, 100, dtype=torch.long).to(CUDA)
        cm = ConfusionMatrix(NUM_CLASSES, device=CUDA)
        for prediction in maps.values():
            cm.update(prediction, mask)
        assert_on_cuda(cm.matrix, "confusion matrix")
    assert set(maps) == {"seg", "cam", "afa", "par"}
    assert all(m.shape == (80, 100) and m.dtype == torch.long for m in maps.values())
    assert sweep.shape == (2, 80, 100) and cls_logits.shape == (1, 20)


@pytest.mark.parametrize("target", ["seg", "cam", "afa"])
def test_segmenter_probs_on_cuda(target, small_voc_config):
    """``Segmenter.to("cuda")`` and the network part of ``predict`` (``_probs``), multi-scale, at the
    image's size: probabilities [C, H0, W0] float32 on ``cuda``; cam / afa also the predicted image labels."""
    from wsss.api import Segmenter
    from wsss.data.transforms import EvalTransform

    cfg = small_voc_config("bf16")
    raw = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    image = EvalTransform.from_config(cfg.data, cfg.eval.long_side)(raw)  # on the host, as the loader does
    item = {"index": 0, "raw": raw, "image": image, "error": None}
    network = build_network(cfg, NUM_CLASSES)
    with fake_cuda():
        segmenter = Segmenter(network, cfg, [f"class {c}" for c in range(NUM_CLASSES)], device=CUDA)
        assert segmenter.device == CUDA
        cam_cfg, seg_flip = segmenter._flip_settings(target, True, None)
        probs = segmenter._probs(item, target, True, seg_flip, cam_cfg)
        assert_on_cuda(probs, "probabilities")
        if target != "seg":
            assert_on_cuda(item["image_labels"], "image labels")
    assert probs.shape == (NUM_CLASSES, 60, 90) and probs.dtype == torch.float32
