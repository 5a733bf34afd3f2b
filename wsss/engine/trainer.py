"""End-to-end AFA training (Ru et al., CVPR 2022; docs/method.md sec. 3-7).

One iteration (:func:`train_step`), t = optimizer steps done before it::

    network(images)                      cls logits, CAMs, seg logits, affinity A  (grad)
    t < train.cam_iters:                 loss = cls_w * L_cls          (CAM-only warm-up)
    otherwise, without gradients (wsss.method.pseudo_labels):
      cam_maps(cam_forward)              CAMs [B, K', H, W] of the present classes; affinity of the
                                         afa.affinity_scale pass
      pseudo_labels                      high/low thresholds + PAR -> label (255 = ignore);
                                         t >= train.afa_label_iter: random walk of the CAMs with that
                                         affinity, high/low + PAR -> AFA label (the seg target from then on)
      affinity_labels                    label nearest-downsampled to the main pass's token grid
    loss = cls_w * L_cls + seg_w * L_seg(target) + aff_w * L_aff(A, affinity labels)
    backward, AdamW step, warm-up + poly schedule

Network passes run under ``wsss.engine.runtime.autocast`` (``train.precision`` bf16, or fp16 on CUDA)
(GradScaler for fp16); everything after them (thresholds, PAR, random walk, losses) runs
outside autocast in float32. No host synchronisation in the loop: losses are summed as
tensors and read (``.item()``) only every ``train.log_interval`` iterations.
At those log intervals and at each validation, from ``train.stall_check_iter`` on, the classification loss
(of the training batches; on val) is compared with the label prior's (:func:`wsss.method.losses.label_prior_loss`):
one warning per run when learning has stalled.

:func:`train` adds the rest: torchrun / DDP (:mod:`wsss.engine.distributed`), an infinite
loader over epochs with exact mid-epoch resume (:mod:`wsss.engine.loader`), checkpoints
(:mod:`wsss.engine.checkpoint`), validation (:func:`wsss.engine.inference.validate`), and the run's
files and logs (:mod:`wsss.engine.run_files`)::

    <train.work_dir>/config.yaml  versions.json  train.log  metrics.jsonl  last.pt  best.pt  tb/
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.layers import convert_sync_batchnorm
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from wsss.config import Config, config_from_dict
from wsss.data.transforms import denormalize
from wsss.engine import distributed as du
from wsss.engine.checkpoint import (
    BEST_NAME, LAST_NAME, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint, software_versions,
)
from wsss.engine.loader import build_train_loader, iterate_batches
from wsss.engine.run_files import (
    RunLogger, check_work_dir, config_differences, keep_interval_checkpoint, resolve_resume, write_run_files,
)
from wsss.engine.runtime import (
    autocast,
    autocast_dtype,
    compile_network,
    fork_rng,
    keep_host_memory,
    pseudo_label_params,
    unwrap,
)
from wsss.engine.schedule import build_scheduler
from wsss.errors import ConfigError, DatasetError, WsssError, first_line
from wsss.logs import configure_logging
from wsss.method.affinity import affinity_labels, label_to_grid
from wsss.method.cam import CamFn, box_mask
from wsss.method.losses import affinity_loss, balanced_seg_loss, classification_loss, label_prior_loss
from wsss.method.ops import resize
from wsss.method.pseudo_labels import cam_maps, present_classes, pseudo_labels

logger = logging.getLogger(__name__)

LOSS_NAMES = ("total", "cls", "seg", "aff", "reg")
MAX_LOGGED_IMAGES = 4  # images of a batch shown in a TensorBoard grid


def loss_names(cfg: Config) -> tuple[str, ...]:
    """The losses a step of model.method returns and the logs show (AFA's LOSS_NAMES, ToCo's TOCO_LOSS_NAMES)."""
    if cfg.model.method == "toco":
        from wsss.engine.toco_step import TOCO_LOSS_NAMES

        return TOCO_LOSS_NAMES
    return LOSS_NAMES


# --------------------------------------------------------------------------- timing hook


class PhaseTimer:
    """Wall time per phase of :func:`train_step` (for ``bench/train_step.py``).

    ``with timer.phase("forward"): ...`` adds the block's seconds to ``timer.totals["forward"]``;
    on CUDA the device is synchronised at both ends so the time belongs to the phase. The
    trainer passes no timer (``NO_TIMER``), which costs nothing and never synchronises.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.totals: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.totals.clear()


class _NoTimer:
    @staticmethod
    def phase(name: str) -> contextlib.nullcontext:
        return contextlib.nullcontext()


NO_TIMER = _NoTimer()


# --------------------------------------------------------------------------- pieces of a step


def cam_path_is_deterministic(network: nn.Module) -> bool:
    """True when a CAM-path pass (backbone + classifier + affinity head) has no randomness and no
    batch dependence now: no active dropout / drop-path, no BatchNorm using batch statistics.
    Only then may the main pass's CAMs stand in for a separate no-grad pass of the same images."""
    if not network.training:
        return True
    parts = [network.backbone, network.classifier, network.affinity_head]
    for module in (m for part in parts for m in part.modules()):
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return False
        if getattr(module, "drop_prob", 0.0) > 0:  # timm DropPath
            return False
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return False
    return True


def reuses_train_pass(network: nn.Module, policy: str) -> bool:
    """Whether the training pass's CAMs stand in for the scale-1 CAM pass now (``cam.reuse_train_pass``)."""
    return policy == "always" or (policy == "exact" and cam_path_is_deterministic(network))


def _cam_fn(network: nn.Module, images: Tensor, precision: str, main_output: Any) -> CamFn:
    """The network's CAM path under autocast for ``multiscale_cam``; the unflipped scale-1 images (``images``
    itself, or the first half of the flip batch) take the CAMs / affinity of ``main_output`` (the training
    pass of ``images``) when given."""
    batch = images.shape[0]

    def cam_fn(x: Tensor, with_affinity: bool) -> tuple[Tensor, Tensor | None]:
        # multiscale_cam asks for an affinity only of unflipped images: a flip batch comes without
        flip_batch = not with_affinity and x.shape[0] == 2 * batch and x.shape[-2:] == images.shape[-2:]
        same = main_output is not None and (x is images or flip_batch)
        if with_affinity and (main_output is None or main_output.affinity is None):
            same = False
        with autocast(images.device, precision):
            if not same:
                return network.cam_forward(x, with_affinity)
            cams = main_output.cams.detach()
            if flip_batch:
                cams = torch.cat([cams, network.cam_forward(x[batch:], False)[0].to(cams.dtype)])
        return cams, main_output.affinity.detach() if with_affinity else None

    return cam_fn


@dataclass
class StepLabels:
    cams: Tensor  # [B, K', H, W] multi-scale CAMs in [0, 1] of the batch's present classes
    label: Tensor  # long [B, H, W] PAR-refined CAM label, class ids 0..K (255 = ignore)
    afa_label: Tensor | None = None  # long [B, H, W] random walk + PAR label


def make_pseudo_labels(
    network: nn.Module,
    images: Tensor,
    labels: Tensor,
    valid_box: Tensor,
    cfg: Config,
    with_afa: bool,
    main_output: Any = None,
    timer: PhaseTimer | _NoTimer = NO_TIMER,
    class_index: Tensor | None = None,
) -> StepLabels:
    """The no-grad half of an iteration (:mod:`wsss.method.pseudo_labels`): multi-scale CAM of the present
    classes -> PAR label (-> AFA label).

    ``network`` is the bare AFANetwork (not DDP). ``class_index`` (:func:`present_classes`,
    default: computed from ``labels``) restricts CAMs, PAR and random walk to the present
    classes; the returned labels use the full class ids 0..K. ``main_output`` (the training pass's
    NetworkOutput of the same images) replaces the scale-1, non-flipped CAM pass as ``cam.reuse_train_pass``
    says: "always", "exact" (only when :func:`cam_path_is_deterministic`: with drop-path active the training
    pass is another random sample than a separate pass would draw) or "never".
    """
    params = pseudo_label_params(cfg)
    if class_index is None:
        class_index = present_classes(labels.cpu())
    reuse = main_output if main_output is not None and reuses_train_pass(network, cfg.cam.reuse_train_pass) else None
    cam_fn = _cam_fn(network, images, cfg.train.precision, reuse)
    with torch.no_grad():
        with timer.phase("multiscale_cam"):
            maps = cam_maps(cam_fn, images, labels, params, cfg.afa.affinity_scale, class_index=class_index)
        images01 = denormalize(images.float(), cfg.data.mean, cfg.data.std)
        out = pseudo_labels(images01, maps, params, valid_box, with_afa, timer.phase)
    return StepLabels(maps.cams, out.label, out.afa_label)


@dataclass
class StepResult:
    losses: dict[str, Tensor]  # detached float32 scalars (LOSS_NAMES), means over the micro-batches
    seg_logits: Tensor | None = None  # detached seg logits of the last micro-batch (None in the warm-up)
    pseudo: StepLabels | None = None  # pseudo labels of the last micro-batch (None in the warm-up)
    batch: dict[str, Any] | None = None  # the last micro-batch


def split_batch(total: int, world_size: int, batch_size: int, accumulation_steps: int = 0) -> tuple[int, int]:
    """The recipe's total batch per optimizer step -> (images per forward and process, accumulation steps).

    total = world_size x images per forward x accumulation steps. accumulation_steps 0: the
    largest number of images per forward <= ``batch_size`` that divides the process's share;
    > 0: that many steps, the images per forward follow. A total that cannot be split is a
    ConfigError naming the keys.
    """
    if total % world_size:
        raise ConfigError(f"data.total_batch_size={total} cannot be split over {world_size} processes; use a "
                          f"multiple of {world_size} or a number of processes that divides {total}")
    share = total // world_size
    if accumulation_steps > 0:
        if share % accumulation_steps:
            raise ConfigError(f"data.total_batch_size={total} over {world_size} process(es) is {share} images per "
                              f"process, which train.accumulation_steps={accumulation_steps} does not divide")
        return share // accumulation_steps, accumulation_steps
    per_forward = max(d for d in range(1, min(batch_size, share) + 1) if share % d == 0)
    return per_forward, share // per_forward


def _micro_step(
    model: nn.Module,
    batch: dict[str, Any],
    iteration: int,
    cfg: Config,
    device: torch.device,
    timer: PhaseTimer | _NoTimer,
) -> tuple[Tensor, dict[str, Tensor], Any, StepLabels | None]:
    """Forward, pseudo labels and losses of one micro-batch -> (total loss, losses, output, pseudo)."""
    tc = cfg.train
    network = unwrap(model)
    warmup = iteration < tc.cam_iters
    use_afa_label = iteration >= tc.afa_label_iter
    images = batch["image"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True)
    valid_box = batch["valid_box"].to(device, non_blocking=True)
    class_index = present_classes(batch["label"]) if not warmup and batch["label"].device.type == "cpu" else None

    with timer.phase("forward"), autocast(device, tc.precision):
        # warm-up: only what the classification loss needs (no seg head, no attention logits)
        out = model(images, with_seg=not warmup, with_affinity=not warmup)

    pseudo = None
    if not warmup:
        # the host copy of the boxes: the label refinement reads them with .tolist(), a device copy would sync
        pseudo = make_pseudo_labels(network, images, labels, batch["valid_box"], cfg, use_afa_label, out, timer,
                                    class_index)

    with timer.phase("losses"):
        cls_loss = classification_loss(out.cls_logits.float(), labels)
        zero = cls_loss.new_zeros(())
        seg_loss = aff_loss = reg_loss = zero
        total = tc.cls_loss_weight * cls_loss
        if pseudo is not None:
            afa_ready = use_afa_label and pseudo.afa_label is not None
            target = pseudo.afa_label if afa_ready else pseudo.label
            seg_outputs = [out.seg_logits, *out.seg_aux]  # mask-decoder deep supervision: mean over outputs
            seg_loss = sum(balanced_seg_loss(s.float(), target, cfg.data.ignore_index) for s in seg_outputs)
            seg_loss = seg_loss / len(seg_outputs)
            grid = out.cams.shape[-2:]  # the main pass's token grid (that of out.affinity)
            # official VOC script: affinity labels from the PAR-refined CAM label throughout; COCO script:
            # from the AFA label too once it is the seg target (train.afa_label_for_affinity)
            aff_source = target if tc.afa_label_for_affinity else pseudo.label
            with torch.no_grad():
                aff_target = affinity_labels(label_to_grid(aff_source, grid), cfg.afa.radius, cfg.data.ignore_index)
            aff_loss = affinity_loss(out.affinity.float(), aff_target)
            total = total + tc.seg_loss_weight * seg_loss + tc.aff_loss_weight * aff_loss
            if tc.reg_loss_weight > 0:
                reg_loss = dense_energy_term(images, out.seg_logits, valid_box, cfg)
                total = total + tc.reg_loss_weight * reg_loss
    losses = {"total": total, "cls": cls_loss, "seg": seg_loss, "aff": aff_loss, "reg": reg_loss}
    return total, losses, out, pseudo


def dense_energy_term(images: Tensor, seg_logits: Tensor, valid_box: Tensor, cfg: Config) -> Tensor:
    """The dense-energy loss (train.reg_*) of ``seg_logits`` on the normalized crops ``images`` [B, 3, H, W],
    the padding outside ``valid_box`` [B, 4] left out; unweighted."""
    from wsss.method.regularization import dense_energy_loss

    tc = cfg.train
    images01 = denormalize(images.float(), cfg.data.mean, cfg.data.std)
    valid = box_mask(valid_box, images.shape[-2:])
    return dense_energy_loss(images01, seg_logits.float(), valid, tc.reg_sigma_rgb, tc.reg_sigma_xy, tc.reg_scale,
                             tc.reg_radius)


def zero_fill_grads(model: nn.Module) -> None:
    """Zero gradients for the trainable parameters the CAM-only warm-up did not reach (seg head, affinity
    head): the official loop runs them with loss weight 0, so AdamW still decays them and counts their
    steps, which sets the size of their first updates after the warm-up. Skipping their forward saves the
    time; this keeps the optimizer state as the official run's."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def train_step(
    model: nn.Module,
    batch: dict[str, Any] | list[dict[str, Any]],
    iteration: int,
    cfg: Config,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    timer: PhaseTimer | _NoTimer = NO_TIMER,
) -> StepResult:
    """One AFA iteration (module docstring); ``iteration`` = optimizer steps done before it.

    ``model`` is the AFANetwork, or its DistributedDataParallel wrapper. batch: one micro-batch
    or a list of them (gradient accumulation: each micro-batch's loss is divided by their
    number and back-propagated, DDP synchronises the gradients on the last one only, then
    one optimizer step), each with ``image`` [B, 3, S, S] normalized, ``label`` [B, K],
    ``valid_box`` long [B, 4].
    """
    micro_batches = batch if isinstance(batch, list) else [batch]
    n = len(micro_batches)
    micro_step = _micro_step
    if cfg.model.method == "toco":
        from wsss.engine.toco_step import toco_micro_step as micro_step
    sums: dict[str, Tensor] = {}
    out = pseudo = None
    for j, micro in enumerate(micro_batches):
        last = j == n - 1
        sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            total, losses, out, pseudo = micro_step(model, micro, iteration, cfg, device, timer)
            with timer.phase("backward"):
                scaled = total / n if n > 1 else total
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        for k, v in losses.items():
            sums[k] = v.detach() if k not in sums else sums[k] + v.detach()

    with timer.phase("optimizer"):
        if iteration < cfg.train.cam_iters:
            zero_fill_grads(model)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    losses = {k: v / n for k, v in sums.items()} if n > 1 else sums
    seg_logits = out.seg_logits.detach() if out.seg_logits is not None else None
    return StepResult(losses, seg_logits, pseudo, micro_batches[-1])


# --------------------------------------------------------------------------- optimizer, precision


def build_optimizer(network: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the network's parameter groups (lr = train.lr x lr_mult), betas, weight decay."""
    tc = cfg.train
    groups = network.param_groups(tc)
    # fused: one kernel over all parameters (CPU and CUDA), same math and state as the default
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.betas[0], tc.betas[1]), weight_decay=tc.weight_decay,
                             fused=True)


def build_scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler | None:
    """GradScaler when the network runs in fp16 (:func:`wsss.engine.runtime.autocast_dtype`; bf16 and fp32
    need none)."""
    if autocast_dtype(device, cfg.train.precision) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def check_precision(cfg: Config, device: torch.device) -> None:
    if cfg.train.precision == "fp16" and autocast_dtype(device, "fp16") is None:
        logger.warning("train.precision=fp16 runs as fp32 on %s (fp16 autocast is CUDA-only here; bf16 is the "
                       "reduced precision for the CPU)", device)
    if cfg.train.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise WsssError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support; "
                        "use train.precision=fp16 or fp32")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- logging


def image_grid(images: Tensor, pseudo: StepLabels, seg_logits: Tensor | None, cfg: Config) -> Tensor:
    """Rows of image | CAM (max over classes) on the image | PAR label | AFA label | seg prediction
    (:mod:`wsss.engine.colors`) -> float [3, H', W'] in [0, 1] for TensorBoard."""
    from torchvision.utils import make_grid

    from wsss.engine.colors import colorize_label, heat_overlay

    n = min(images.shape[0], MAX_LOGGED_IMAGES)
    rgb = denormalize(images[:n].float(), cfg.data.mean, cfg.data.std).clamp(0, 1).mul(255).round()
    rgb = rgb.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    cams = pseudo.cams[:n].float().amax(dim=1).cpu().numpy()
    label = pseudo.label[:n].cpu()
    afa = pseudo.afa_label[:n].cpu() if pseudo.afa_label is not None else torch.full_like(label, 255)
    seg = torch.full_like(label, 255)
    if seg_logits is not None:
        seg = resize(seg_logits[:n].float(), images.shape[-2:]).max(dim=1).indices.cpu()
    tiles = []
    for i in range(n):
        tiles += [rgb[i], heat_overlay(rgb[i], cams[i]), colorize_label(label[i].numpy()),
                  colorize_label(afa[i].numpy()), colorize_label(seg[i].numpy())]
    stacked = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float().div_(255)
    return make_grid(stacked, nrow=5, padding=2, pad_value=1.0)


def _miou(result: Any) -> float:
    value = result.get("miou") if isinstance(result, dict) else result
    return float(value) if value is not None else math.nan


# --------------------------------------------------------------------------- stalled learning

STALL_AUTO_AFTER_WARMUP = 500  # train.stall_check_iter=-1: the check starts this many iterations after the warm-up


def stall_check_iteration(tc: Any) -> int | None:
    """The iteration from which the stalled-learning check runs (``train.stall_check_iter``; -1 = auto:
    ``train.warmup_iters`` + 500), or None when it never does (0)."""
    if tc.stall_check_iter == 0:
        return None
    if tc.stall_check_iter < 0:
        return tc.warmup_iters + STALL_AUTO_AFTER_WARMUP
    return tc.stall_check_iter


def stall_message(cfg: Config, iteration: int, loss_text: str, ratio: float, on_val: bool = False) -> str:
    """The one warning of a run whose classification loss has not left the label prior: what it means and
    what to try. loss_text: which loss, its value and the prior it is compared with; on_val: a validation loss
    (a training loss below its prior then means the classifier memorises its training images)."""
    from wsss.models.weights import RANDOM_INIT

    tc, cam = cfg.train, cfg.cam
    if cfg.model.pretrained == RANDOM_INIT:
        weights = "pretrained weights (model.pretrained=hub or a weight file; this run starts from random init)"
    else:
        weights = f"other pretrained weights (model.pretrained={cfg.model.pretrained}: check that they loaded)"
    if on_val:
        meaning = ("the classifier has learned nothing that holds on images it did not train on (where its "
                   "training loss is lower, it memorises the training images)")
        more = ("more training images or iterations (train.iterations), augmentation that keeps the classes "
                f"(data.hflip={str(cfg.data.hflip).lower()}, data.rot90={str(cfg.data.rot90).lower()}: where they "
                "look the same mirrored or turned), ")
    else:
        meaning = "the classifier has not learned from the pixels"
        more = ""
    return (
        f"learning has stalled: at iteration {iteration} {loss_text}, {ratio:.2f} x that, above train.stall_ratio="
        f"{tc.stall_ratio:g}: {meaning}, and the CAMs, pseudo labels and seg head built on it learn nothing either. "
        f"Try: {weights}, {more}a higher or lower learning rate (train.lr={tc.lr:g}), a longer or shorter warm-up "
        f"(train.warmup_iters={tc.warmup_iters}); once the classifier learns, the CAM labels' background "
        f"thresholds (cam.bg_threshold_high={cam.bg_threshold_high:g}, cam.bg_threshold_low={cam.bg_threshold_low:g}"
        f", cam.bg_threshold_eval={cam.bg_threshold_eval:g}). Warned once per run; train.stall_check_iter=0 turns "
        f"the check off."
    )


# --------------------------------------------------------------------------- the run


def run_header(cfg: Config, ctx: du.DistContext, micro: int, accumulation: int, dataset: Any, per_epoch: int,
               iteration: int, resuming: bool) -> list[str]:
    """The first lines of a run's log: what is trained from which weights, how the batch is made up."""
    from wsss.models.weights import RANDOM_INIT

    tc = cfg.train
    pretrained = cfg.model.pretrained
    if pretrained == RANDOM_INIT:
        weights = "random initialisation (model.pretrained=none; the published recipe starts from ImageNet weights)"
    elif pretrained == "hub":
        weights = "ImageNet weights from the hub (model.pretrained=hub)"
    else:
        weights = f"weights '{pretrained}'"
    return [
        f"{'resuming' if resuming else 'training'} {cfg.model.backbone} from {weights}",
        f"total batch {cfg.data.total_batch_size} = {ctx.world_size} process(es) x {micro} image(s) x "
        f"{accumulation} accumulation step(s)",
        f"data '{cfg.data.train_split}' ({len(dataset)} images, {per_epoch // accumulation} steps/epoch/process) at "
        f"iteration {iteration}/{tc.iterations}; {ctx.world_size} process(es) on {ctx.device}, {tc.precision}; "
        f"work dir {tc.work_dir}",
    ]


def use_sync_batchnorm(network: nn.Module, ctx: du.DistContext, enabled: bool) -> bool:
    """Every BatchNorm -> SyncBatchNorm under DDP (statistics over every process's images): the seg head's, as
    the official code's SyncBN head, and a conv stem's (``model.conv_stem``; MiT itself has none) ->
    whether it converted. timm's converter keeps the stem's fused activation (BatchNormAct2d). Not on the
    CPU: PyTorch's SyncBatchNorm runs on accelerators only, so CPU (gloo) runs keep per-process statistics."""
    if not (enabled and ctx.distributed and ctx.device.type != "cpu"):
        return False
    convert_sync_batchnorm(network)  # in place below the root, which is no BatchNorm
    return True


def _wrap(network: nn.Module, ctx: du.DistContext, find_unused: bool) -> nn.Module:
    if not ctx.distributed:
        return network
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids, find_unused_parameters=find_unused)


def _needs_find_unused(cfg: Config, iteration: int) -> bool:
    """During the CAM-only warm-up the seg head and the affinity head take no part in the loss, so
    DDP must be told to expect parameters without gradient. After it every parameter of the
    SegFormer network gets one and the (cheaper) default applies; the mask decoder has
    variant-specific parameters that a given cross-attention may not use."""
    return iteration < cfg.train.cam_iters or cfg.model.seg_head == "mask_decoder"


def _load_resume_checkpoint(resume: Path, cfg: Config, ctx: du.DistContext) -> dict[str, Any]:
    """The checkpoint to resume from; warns when the run's config differs from the checkpoint's."""
    ckpt = load_checkpoint(resume)
    diffs = config_differences(ckpt["config"], cfg.to_dict())
    if diffs and ctx.is_main:
        logger.warning("resuming '%s' with a config that differs from the checkpoint's: %s", resume, "; ".join(diffs))
    config_from_dict(ckpt["config"])  # a readable config, or a clear error
    return ckpt


def _restore(ckpt: dict[str, Any], resume: Path, network: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, scaler: torch.amp.GradScaler | None, ctx: du.DistContext, seed: int,
             per_epoch: int) -> tuple[int, int, int, float]:
    """Load the training state of ``ckpt`` -> (iteration, epoch, micro-batches of it consumed, best mIoU)."""
    try:
        network.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise WsssError(f"cannot resume from '{resume}': it does not fit the network / optimizer built "
                        f"from this config ({first}); resume with the config it was trained with") from None
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    iteration = int(ckpt["iteration"])
    epoch, consumed = int(ckpt["data"]["epoch"]), int(ckpt["data"]["batch"])
    if consumed >= per_epoch:
        epoch, consumed = epoch + 1, 0
    best = ckpt.get("best_miou")
    best_miou = float(best) if best is not None else -math.inf
    per_rank = ckpt["rng"].get("per_rank") or [ckpt["rng"]]
    if len(per_rank) == ctx.world_size:
        restore_rng_state(per_rank[ctx.rank])
    else:
        seed_everything(seed + ctx.rank + iteration)
        if ctx.is_main:
            logger.warning("checkpoint was written by %d processes, this run has %d: the data order is kept, "
                           "the random state is re-seeded (not bit-exact)", len(per_rank), ctx.world_size)
    return iteration, epoch, consumed, best_miou


def train(cfg: Config, resume: Path | str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Train AFA end to end as configured -> summary dict.

    resume: a checkpoint written by this function (``last.pt``), or "auto" for the work dir's
    ``last.pt``; training continues exactly (model, optimizer, schedule, iteration, RNG states,
    data order) to ``train.iterations``. Without it, a work dir that already holds a run is refused.
    stop_after: stop after this many iterations, as if interrupted, with ``last.pt`` written
    there (the schedule still runs to ``train.iterations``); resume continues from it.

    Returns {"iteration", "work_dir", "last_checkpoint", "best_checkpoint", "best_miou",
    "val": the last validation {"cam", "afa", "seg"} mIoUs, "losses": the last logged means,
    "seconds", "stall_warned": the iteration of the stalled-learning warning or None}.
    """
    started = time.perf_counter()
    ctx = du.init_distributed(cfg.train.device)
    configure_logging(ctx.rank)
    run: _Run | None = None
    try:
        check_precision(cfg, ctx.device)
        resume = resolve_resume(resume, cfg.train.work_dir)
        check_work_dir(Path(cfg.train.work_dir), resume is not None)
        run = _Run(cfg, ctx, resume, started)
        return run.loop(stop_after)
    finally:
        if run is not None and run.logs is not None:
            run.logs.close()
        if ctx.distributed:  # the group exists: this run created it
            du.cleanup_distributed()


class _Run:
    """The state of one training run (built by :func:`train`) and its loop."""

    def __init__(self, cfg: Config, ctx: du.DistContext, resume: Path | None, started: float) -> None:
        from wsss.data.datasets import build_dataset

        tc = cfg.train
        self.cfg, self.ctx, self.started = cfg, ctx, started
        self.work_dir = Path(tc.work_dir)
        self.logs: RunLogger | None = None
        ckpt = _load_resume_checkpoint(resume, cfg, ctx) if resume is not None else None
        views = None
        if cfg.model.method == "toco":
            from wsss.data.transforms import ToCoViews

            views = ToCoViews.from_config(cfg)
        self.dataset = build_dataset(cfg.data, cfg.data.train_split, train=True, views=views)
        # each image at its own size, as the authors validate
        self.val_dataset = (build_dataset(cfg.data, cfg.data.val_split, train=False, long_side=None)
                            if tc.val_interval > 0 else None)
        self.micro, self.accumulation = split_batch(cfg.data.total_batch_size, ctx.world_size, cfg.data.batch_size,
                                                    tc.accumulation_steps)
        self.per_epoch = math.ceil(len(self.dataset) / ctx.world_size) // self.micro  # micro-batches
        self._check_data(ckpt, resume)
        self._build(ckpt, resume)
        if ctx.is_main:
            write_run_files(cfg, self.work_dir, self.versions)
        self.logs = RunLogger(self.work_dir, ctx.is_main, tc.iterations, self.iteration, cfg)
        if ctx.is_main:
            for text in run_header(cfg, ctx, self.micro, self.accumulation, self.dataset, self.per_epoch,
                                   self.iteration, ckpt is not None):
                self.logs.line(text)
            if cfg.model.method == "afa":
                self.logs.line(f"AFA head on {'standardized' if self.network.attn_norm == 'standardize' else 'raw'} "
                               f"attention logits (afa.attn_norm={cfg.afa.attn_norm})")
        self.last_saved = self.iteration if ckpt is not None else -1
        self.last_val: dict[str, float] = {}
        # stalled-learning check: the label prior from the dataset's image labels (no pass over the images);
        # the iteration of the warning is kept in the checkpoint, so a resumed run that warned does not again
        self.prior_loss = label_prior_loss(self.dataset.image_labels)
        self.train_frequency = np.asarray(self.dataset.image_labels, dtype=np.float64).mean(axis=0)
        self.stall_from = stall_check_iteration(tc) if self.prior_loss > 0 else None
        warned = ckpt.get("stall_warned") if ckpt is not None else None
        self.stall_warned: int | None = int(warned) if warned is not None else None
        if (ctx.is_main and self.stall_from is not None and self.stall_from <= tc.iterations
                and self.stall_warned is None):
            self.logs.line(f"stalled-learning check from iteration {self.stall_from} on: warns when the mean "
                           f"classification loss is above {tc.stall_ratio:g} x the label prior {self.prior_loss:.4f}")

    def _check_data(self, ckpt: dict[str, Any] | None, resume: Path | None) -> None:
        dataset, ctx = self.dataset, self.ctx
        if self.per_epoch == 0:
            raise DatasetError(
                f"split '{self.cfg.data.train_split}' of '{dataset.root}' has {len(dataset)} images: too few for one "
                f"batch of {self.micro} images per process ({ctx.world_size} processes)")
        if ckpt is not None and int(ckpt["num_classes"]) != dataset.num_classes:
            raise WsssError(f"checkpoint '{resume}' has {ckpt['num_classes']} classes but the dataset '{dataset.root}' "
                            f"has {dataset.num_classes}; resume with the dataset it was trained on")

    def _build(self, ckpt: dict[str, Any] | None, resume: Path | None) -> None:
        """Network, optimizer, schedule, scaler; the training state of ``ckpt`` when resuming."""
        from wsss.models.network import build_network

        cfg, ctx, tc = self.cfg, self.ctx, self.cfg.train
        keep_host_memory(tc.keep_host_memory)
        seed_everything(tc.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        network = build_network(_without_pretrained(cfg) if ckpt is not None else cfg, self.dataset.num_classes)
        network.to(ctx.device)
        use_sync_batchnorm(network, ctx, tc.sync_bn)
        network.train()
        self.network = compile_network(network, tc.compile)
        self.optimizer = build_optimizer(network, cfg)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.scaler = build_scaler(cfg, ctx.device)
        self.versions = software_versions()
        if ckpt is not None:
            self.iteration, self.epoch, self.consumed, self.best_miou = _restore(
                ckpt, resume, network, self.optimizer, self.scheduler, self.scaler, ctx, tc.seed, self.per_epoch)
        else:
            self.iteration, self.epoch, self.consumed, self.best_miou = 0, 0, 0, -math.inf
            seed_everything(tc.seed + ctx.rank)  # per-rank randomness (drop-path) from here on

    def checkpoint_state(self) -> dict[str, Any]:
        rng = capture_rng_state()
        per_rank = du.all_gather_objects(rng) if self.ctx.distributed else [rng]
        return {
            "config": self.cfg.to_dict(), "model": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "iteration": self.iteration, "rng": {**rng, "per_rank": per_rank},
            "data": {"epoch": self.epoch, "batch": self.consumed, "batches_per_epoch": self.per_epoch},
            "class_names": list(self.dataset.class_names), "num_classes": self.dataset.num_classes,
            "best_miou": self.best_miou if math.isfinite(self.best_miou) else None, "versions": self.versions,
            "stall_warned": self.stall_warned,
        }

    def check_stall(self, losses: dict[str, float], steps: int) -> None:
        """At a log interval: the stalled-learning warning when the interval's mean classification loss (all
        ranks', on the host already) is still above stall_ratio x the label prior."""
        cls_loss = losses["cls"]
        text = (f"the classification loss (mean of the last {steps} iterations) is {cls_loss:.4f}, against the "
                f"label prior {self.prior_loss:.4f} (the loss of predicting each class's training frequency whatever "
                f"the image)")
        self._stalled(cls_loss, self.prior_loss, text, False, {"split": "train", "window": steps})

    def check_val_stall(self, classifier: dict[str, Any]) -> None:
        """After a validation: the stalled-learning warning when the classification loss on val is still above
        stall_ratio x the loss there of predicting the training split's class frequencies."""
        loss, prior = classifier["loss"], classifier.get("prior_loss", math.nan)
        text = (f"the classification loss on '{self.cfg.data.val_split}' ({classifier['num_images']} images) is "
                f"{loss:.4f}, against {prior:.4f} there for predicting each class's training frequency whatever "
                f"the image")
        self._stalled(loss, prior, text, True, {"split": "val", "num_images": classifier["num_images"]})

    def _stalled(self, loss: float, prior: float, text: str, on_val: bool, record: dict[str, Any]) -> None:
        """One warning (train.log) and a metrics.jsonl record per run, from iteration stall_from on, when
        loss > train.stall_ratio x prior (the same figures on every rank: the checkpoints agree)."""
        it = self.iteration
        if self.stall_warned is not None or self.stall_from is None or it < self.stall_from or not prior > 0:
            return
        ratio = loss / prior
        if not ratio > self.cfg.train.stall_ratio:  # a NaN loss is no stall (it is another problem)
            return
        self.stall_warned = it
        self.logs.warning(stall_message(self.cfg, it, text, ratio, on_val))
        self.logs.metrics({"iteration": it, "kind": "stalled", "cls_loss": loss, "prior_loss": prior,
                           "ratio": ratio, "stall_ratio": self.cfg.train.stall_ratio, **record})

    def save(self, name: str) -> None:
        """Checkpoint ``name`` in the work dir (every rank takes part in gathering the RNG states)."""
        state = self.checkpoint_state()
        if self.ctx.is_main:
            save_checkpoint(state, self.work_dir / name)

    def validate(self) -> None:
        """Validation now; a new best seg mIoU is kept as best.pt."""
        self.last_val, classifier = _validate(self.network, self.val_dataset, self.cfg, self.ctx.device, self.logs,
                                              self.iteration, self.cfg.data.val_limit, self.train_frequency)
        self.check_val_stall(classifier)
        seg = self.last_val.get("seg", math.nan)
        if math.isfinite(seg) and seg > self.best_miou:
            self.best_miou = seg
            self.save(BEST_NAME)
            if self.ctx.is_main:
                self.logs.line(f"iter {self.iteration} new best seg mIoU {seg:.2f}: {self.work_dir / BEST_NAME}")

    def loop(self, stop_after: int | None) -> dict[str, Any]:
        cfg, ctx, tc = self.cfg, self.ctx, self.cfg.train
        loader, sampler = build_train_loader(self.dataset, cfg, ctx, self.micro)
        find_unused = _needs_find_unused(cfg, self.iteration)
        model = _wrap(self.network, ctx, find_unused)
        names = loss_names(cfg)
        sums = {k: torch.zeros((), device=ctx.device) for k in names}
        since_log, last_losses = 0, {}
        log_every = tc.log_interval if tc.log_interval > 0 else tc.iterations
        ckpt_every = tc.ckpt_interval if tc.ckpt_interval > 0 else tc.iterations
        batches = iterate_batches(loader, sampler, self.epoch, self.consumed, self.micro)
        interval_start = time.perf_counter()
        while self.iteration < tc.iterations and (stop_after is None or self.iteration < stop_after):
            if find_unused and not _needs_find_unused(cfg, self.iteration) and ctx.distributed:
                del model  # the warm-up wrapper's hooks go with it
                find_unused = False
                model = _wrap(self.network, ctx, find_unused)
            micro_batches = []
            for _ in range(self.accumulation):
                self.epoch, self.consumed, batch = next(batches)
                micro_batches.append(batch)
            result = train_step(model, micro_batches, self.iteration, cfg, self.optimizer, self.scheduler,
                                self.scaler, ctx.device)
            self.iteration += 1
            for k in names:
                sums[k] += result.losses[k]
            since_log += 1
            self.logs.advance()
            it = self.iteration
            if it % log_every == 0 or it == tc.iterations:
                seconds = (time.perf_counter() - interval_start, time.perf_counter() - self.started)
                last_losses = _log_losses(self.logs, sums, since_log, self.optimizer, it, self.epoch, cfg, seconds)
                self.check_stall(last_losses, since_log)
                since_log, interval_start = 0, time.perf_counter()
            if ctx.is_main and tc.image_log_interval > 0 and it % tc.image_log_interval == 0:
                _log_images(self.logs, self.network, result.batch, result, cfg, ctx.device, it)
            if self.val_dataset is not None and (it % tc.val_interval == 0 or it == tc.iterations):
                self.validate()
            if it % ckpt_every == 0 or it == tc.iterations or (stop_after is not None and it >= stop_after):
                self.save(LAST_NAME)
                if ctx.is_main and tc.keep_checkpoints > 0 and it % ckpt_every == 0:
                    keep_interval_checkpoint(self.work_dir, it, tc.keep_checkpoints)
                self.last_saved = it
        return self.finish(last_losses)

    def finish(self, last_losses: dict[str, float]) -> dict[str, Any]:
        cfg, it = self.cfg, self.iteration
        if self.val_dataset is not None and cfg.data.val_limit > 0 and it == cfg.train.iterations and self.last_saved >= 0:
            # the subset served during training; the final model is scored on the whole split
            _validate(self.network, self.val_dataset, cfg, self.ctx.device, self.logs, it, 0, self.train_frequency,
                      "val_full")
        if self.last_saved != it:  # e.g. resumed at the end already
            self.save(LAST_NAME)
        du.barrier()
        seconds = time.perf_counter() - self.started
        if self.ctx.is_main:
            self.logs.line(f"finished at iteration {it} in {seconds:.0f} s; last checkpoint {self.work_dir / LAST_NAME}")
        best_path = self.work_dir / BEST_NAME
        return {
            "iteration": it, "work_dir": str(self.work_dir), "last_checkpoint": str(self.work_dir / LAST_NAME),
            "best_checkpoint": str(best_path) if best_path.is_file() else None,
            "best_miou": self.best_miou if math.isfinite(self.best_miou) else None,
            "val": self.last_val, "losses": last_losses, "seconds": seconds, "stall_warned": self.stall_warned,
        }


def _without_pretrained(cfg: Config) -> Config:
    """A copy of cfg that builds the network without loading weights (a resumed run's come from its checkpoint)."""
    import copy

    from wsss.models.weights import RANDOM_INIT

    cfg = copy.deepcopy(cfg)
    cfg.model.pretrained = RANDOM_INIT
    return cfg


def _validate(network: nn.Module, dataset: Dataset, cfg: Config, device: torch.device, logs: RunLogger,
              iteration: int, limit: int, train_frequency: np.ndarray,
              name: str = "val") -> tuple[dict[str, float], dict[str, Any]]:
    """Validation (:func:`wsss.engine.inference.validate`, all ranks take part) on ``limit`` images (0 = all),
    logged to TensorBoard / W&B (``<name>/<key>_miou``, ``<name>/cls_loss``, ``<name>/cls_f1``), train.log and
    metrics.jsonl -> (the mIoUs, the classifier's scores with "prior_loss": the loss of predicting
    ``train_frequency``, the training split's class frequencies, on these images)."""
    from wsss.engine.inference import VAL_KEYS, validate

    with fork_rng(device):  # training RNG untouched
        results = validate(network, dataset, cfg, device, limit, train_frequency)
    network.train()
    mious = {k: _miou(results[k]) for k in VAL_KEYS if k in results}
    cls = results["cls"]
    logs.scalars({**{f"{name}/{k}_miou": v for k, v in mious.items()},
                  f"{name}/cls_loss": cls["loss"], f"{name}/cls_f1": cls["macro_f1"]}, iteration)
    count = results[VAL_KEYS[0]]["num_images"]
    logs.line(f"iter {iteration} {name} mIoU ({count} images) " + " ".join(f"{k} {v:.2f}" for k, v in mious.items())
              + f"; classifier loss {cls['loss']:.4f} (training frequencies {cls['prior_loss']:.4f}) "
                f"macro F1 {cls['macro_f1']:.3f}")
    per_class = {k: dict(zip(results[k].get("class_names") or range(len(results[k]["iou"])), results[k]["iou"]))
                 for k in mious}
    classifier = {k: cls[k] for k in ("loss", "prior_loss", "macro_f1", "micro_f1", "per_class_f1")}
    logs.metrics({"iteration": iteration, "kind": name, "num_images": count, "miou": mious,
                  "per_class_iou": per_class, "classifier": classifier})
    return mious, cls


def _log_losses(logs: RunLogger, sums: dict[str, Tensor], steps: int, optimizer: torch.optim.Optimizer,
                iteration: int, epoch: int, cfg: Config, seconds: tuple[float, float]) -> dict[str, float]:
    """Mean losses of the last ``steps`` iterations over all ranks (the one host sync per log interval) to
    the bar, train.log, TensorBoard / W&B and metrics.jsonl; the sums are reset -> the means.
    seconds: (of the interval, since the run started)."""
    names = tuple(sums)
    means = du.all_reduce_mean(torch.stack([sums[k] for k in names]) / steps).tolist()
    losses = dict(zip(names, means))
    for k in names:
        sums[k].zero_()
    lr = optimizer.param_groups[0]["lr"]
    logs.scalars({**{f"loss/{k}": v for k, v in losses.items()}, "lr": lr}, iteration,
                 {**{k: f"{v:.4f}" for k, v in losses.items()}, "lr": f"{lr:.2e}"})
    logs.line(f"iter {iteration}/{cfg.train.iterations} epoch {epoch} "
              + " ".join(f"{k} {v:.4f}" for k, v in losses.items()) + f" lr {lr:.3e}")
    rate = steps / max(seconds[0], 1e-9)
    logs.metrics({"iteration": iteration, "kind": "train", "epoch": epoch, "losses": losses, "lr": lr,
                  "seconds": round(seconds[1], 3), "iterations_per_s": rate,
                  "images_per_s": rate * cfg.data.total_batch_size})
    return losses


def _log_images(logs: RunLogger, network: nn.Module, batch: dict[str, Any], result: StepResult, cfg: Config,
                device: torch.device, iteration: int) -> None:
    """TensorBoard grid of the step's images; pieces the step skipped (warm-up: labels; before the
    AFA-label iteration: the AFA label) are computed here without gradients or RNG side effects."""
    pseudo = result.pseudo
    seg_logits = result.seg_logits
    images = batch["image"][:MAX_LOGGED_IMAGES].to(device)
    no_afa = pseudo is not None and pseudo.afa_label is None and cfg.model.method == "afa"
    if pseudo is None or no_afa or seg_logits is None:
        labels = batch["label"][:MAX_LOGGED_IMAGES].to(device)
        valid_box = batch["valid_box"][:MAX_LOGGED_IMAGES].to(device)
        with fork_rng(device), torch.no_grad():
            if cfg.model.method == "toco":
                from wsss.engine.toco_step import toco_pseudo_labels

                pseudo = toco_pseudo_labels(network, images, labels, valid_box, cfg)
            else:
                pseudo = make_pseudo_labels(network, images, labels, valid_box, cfg, with_afa=True)
            if seg_logits is None:  # eval mode: BatchNorm statistics untouched
                network.eval()
                try:
                    with autocast(device, cfg.train.precision):
                        seg_logits = network(images, with_seg=True, with_affinity=False).seg_logits
                finally:
                    network.train()
    logs.image("train/image_cam_par_afa_seg", image_grid(images, pseudo, seg_logits, cfg), iteration)


__all__ = [
    "NO_TIMER", "PhaseTimer", "StepLabels", "StepResult", "build_optimizer", "build_scaler",
    "make_pseudo_labels", "seed_everything", "train", "train_step",
]
