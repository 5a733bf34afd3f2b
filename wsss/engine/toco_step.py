"""One ToCo micro-step (model.method "toco"): the forward, pseudo labels and losses of a micro-batch, as the
official ``scripts/dist_train_voc_seg_neg.py`` loop body; :func:`wsss.engine.trainer.train_step` runs it in place
of AFA's and does the backward and the optimizer step.

Per micro-batch (``batch`` from the training loader with :class:`wsss.data.transforms.ToCoViews`: ``image``
global view 1, ``global_view2``, ``local_image``; ``label``, ``valid_box``):

1. the teacher projection head takes its EMA step towards the student (toco.momentum);
2. without gradients, multi-scale + flip CAMs of view 1, main and auxiliary (one pass per scale for both);
3. the uncertain region of the auxiliary CAMs (cam.bg_threshold_high / low) places toco.num_local_crops local
   crops of toco.local_crop_size in ``local_image``; a crop mostly in certain background is a CTC negative;
4. the forward of view 1 + view 2 (one backbone pass) and of the local crops: image logits, auxiliary logits,
   the last block's tokens, seg logits, student / teacher projections;
5. losses: classification + auxiliary classification, PTC on the last tokens with the auxiliary CAM's token
   label, CTC (from toco.contrast_from_iter on); after train.cam_iters also the balanced seg loss on the PAR-refined CAM label (train.seg_loss_weight)
   and the dense-energy loss (train.reg_loss_weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from wsss.config import Config
from wsss.data.transforms import denormalize
from wsss.engine.runtime import autocast, pseudo_label_params, unwrap
from wsss.engine.trainer import dense_energy_term
from wsss.method.cam import multiscale_cam, refine_cams_to_label
from wsss.method.losses import balanced_seg_loss, classification_loss
from wsss.method.ops import resize
from wsss.method.toco import (
    class_token_contrast_loss,
    local_crops,
    patch_token_contrast_loss,
    sample_crop_corners,
    token_label,
    token_pair_labels,
    uncertain_region_mask,
)

TOCO_LOSS_NAMES = ("total", "cls", "cls_aux", "ptc", "ctc", "seg", "reg")


def toco_cams(network: nn.Module, images: Tensor, labels: Tensor, cfg: Config) -> tuple[Tensor, Tensor]:
    """Multi-scale (+ flip) CAMs and auxiliary CAMs of ``images`` [B, 3, H, W] -> each [B, K, H, W] in [0, 1]
    (``wsss.method.cam.multiscale_cam`` on both at once: each channel is normalized on its own)."""
    k = labels.shape[1]

    def cam_fn(x: Tensor, with_affinity: bool) -> tuple[Tensor, None]:
        with autocast(images.device, cfg.train.precision):
            cams, aux = network.cams_with_aux(x)
        return torch.cat([cams, aux], dim=1).float(), None

    both = multiscale_cam(cam_fn, images, torch.cat([labels, labels], dim=1), cfg.cam.scales, cfg.cam.flip).cams
    return both[:, :k], both[:, k:]


def toco_pseudo_labels(network: nn.Module, images: Tensor, labels: Tensor, valid_box: Tensor, cfg: Config,
                       cams: Tensor | None = None) -> Any:
    """The PAR-refined CAM label of ``images`` (the seg target; ``cams`` from :func:`toco_cams` when the caller
    has them) -> StepLabels(cams, label)."""
    from wsss.engine.trainer import StepLabels

    with torch.no_grad():
        if cams is None:
            cams = toco_cams(network, images, labels, cfg)[0]
        images01 = denormalize(images.float(), cfg.data.mean, cfg.data.std)
        label = refine_cams_to_label(images01, cams, labels, (cfg.cam.bg_threshold_high, cfg.cam.bg_threshold_low),
                                     pseudo_label_params(cfg).par, valid_box, cfg.data.ignore_index)
    return StepLabels(cams, label)


def toco_micro_step(model: nn.Module, batch: dict[str, Any], iteration: int, cfg: Config, device: torch.device,
                    timer: Any) -> tuple[Tensor, dict[str, Tensor], Any, Any]:
    """-> (total loss, losses by TOCO_LOSS_NAMES, the NetworkOutput, StepLabels | None), as ``_micro_step``."""
    tc, t = cfg.train, cfg.toco
    network = unwrap(model)
    warmup = iteration < tc.cam_iters
    images = batch["image"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True)
    valid_box = batch["valid_box"].to(device, non_blocking=True)
    view2 = batch["global_view2"].to(device, non_blocking=True)
    local_source = batch["local_image"].to(device, non_blocking=True)
    high, low, ignore = cfg.cam.bg_threshold_high, cfg.cam.bg_threshold_low, cfg.data.ignore_index

    network.update_teacher(t.momentum)  # the official forward does it first, every iteration
    with torch.no_grad():
        with timer.phase("multiscale_cam"):
            cams, aux_cams = toco_cams(network, images, labels, cfg)
        region = uncertain_region_mask(aux_cams, labels, high, low)
        corners = sample_crop_corners(region, t.num_local_crops, t.local_crop_size)
        crops, flags = local_crops(local_source, region, corners, t.local_crop_size)

    with timer.phase("forward"), autocast(device, tc.precision):
        out = model(images, with_seg=not warmup, global_view2=view2, local_views=crops.flatten(0, 1))

    pseudo = None
    if not warmup:
        with timer.phase("pseudo_label_par"):
            source = aux_cams if iteration < t.seg_label_from_aux_until else cams  # official COCO: aux first
            # the host copy of the boxes, as AFA's step
            pseudo = toco_pseudo_labels(network, images, labels, batch["valid_box"], cfg, source)
    with timer.phase("losses"):
        cls_loss = classification_loss(out.cls_logits.float(), labels)
        aux_loss = classification_loss(out.aux_cls_logits.float(), labels)
        ctc_loss = class_token_contrast_loss(out.proj_student.float(), out.proj_teacher.float(), flags, t.temperature)
        tokens = out.features[0]
        with torch.no_grad():
            grid_cams = resize(aux_cams, tokens.shape[-2:])
            token_labels = token_label(grid_cams, labels, high, low, valid_box, tuple(images.shape[-2:]), ignore,
                                       t.ptc_label_box, bg=cfg.cam.bg_threshold_eval)
            pairs = token_pair_labels(token_labels, ignore)
        ptc_loss = patch_token_contrast_loss(tokens.float(), pairs)
        contrast = 1.0 if iteration >= t.contrast_from_iter else 0.0  # official COCO: weight 0 at first
        total = (tc.cls_loss_weight * cls_loss + t.aux_cls_loss_weight * aux_loss
                 + contrast * (t.ptc_loss_weight * ptc_loss + t.ctc_loss_weight * ctc_loss))
        seg_loss = reg_loss = cls_loss.new_zeros(())
        if pseudo is not None:
            seg_loss = balanced_seg_loss(out.seg_logits.float(), pseudo.label, ignore)
            total = total + tc.seg_loss_weight * seg_loss
            if tc.reg_loss_weight > 0:
                reg_loss = dense_energy_term(images, out.seg_logits, valid_box, cfg)
                total = total + tc.reg_loss_weight * reg_loss
    losses = {"total": total, "cls": cls_loss, "cls_aux": aux_loss, "ptc": ptc_loss, "ctc": ctc_loss,
              "seg": seg_loss, "reg": reg_loss}
    return total, losses, out, pseudo


__all__ = ["TOCO_LOSS_NAMES", "toco_cams", "toco_micro_step", "toco_pseudo_labels"]
