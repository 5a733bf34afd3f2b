"""The pseudo-label pipeline, in one place (AFA, Ru et al., CVPR 2022; docs/method.md sec. 3-5).

    maps = cam_maps(cam_fn, images, labels, params, affinity_scale=1.5)    multi-scale CAMs (+ affinity)
    out = pseudo_labels(images01, maps, params, valid_box)                 training: PAR label, AFA label
    probs = cam_probabilities(images01, maps, params, ("par",), size)      evaluation: class probabilities

``cam_fn(images, with_affinity) -> (raw CAMs [B', K, h, w], affinity [B', N, N] | None)`` is the
network's CAM path (``AFANetwork.cam_forward``, or a wrapper of it); everything here is plain
tensor code without gradients, with plain values (:class:`PseudoLabelParams`) instead of the
config (``wsss.engine.runtime.pseudo_label_params`` builds them from it).

Present classes: with ``class_index`` (:func:`present_classes`) the whole pipeline runs on the
K' classes present in the batch instead of all K (absent classes are exactly zero everywhere:
masked CAMs, -inf before each softmax, channel-wise PAR and random walk, so the labels are the
same); the labels come back in the full class ids 0..K.

Shapes: B images, K foreground classes, C = K + 1 (background = 0), H x W input size,
N = h * w tokens of the affinity's grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from wsss.method.affinity import propagate_cams
from wsss.method.cam import (
    CamFn, cam_scores, cams_with_background, multiscale_cam, refine_cams_to_label, refine_probs, refine_probs_to_label,
    scaled_par_kernel,
)
from wsss.method.ops import resize
from wsss.method.par import ParKernel, ParParams

PROB_EPS = 1e-8  # guard of the final per-pixel normalization of class probabilities
# What cam_probabilities can return: "cam" (CAM scores with a constant background), "par" (PAR-refined
# CAM probabilities), "afa" (random walk + PAR), "rw" (random walk alone, the authors' validation AFA row).
PROB_OUTPUTS = ("cam", "par", "afa", "rw")

PhaseFn = Callable[[str], contextlib.AbstractContextManager]


def _no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _float32(x: Tensor) -> contextlib.AbstractContextManager:
    """Post-processing runs in float32 also when the caller runs the network under autocast."""
    return torch.autocast(x.device.type, enabled=False)


@dataclass(frozen=True)
class PseudoLabelParams:
    """Every setting of the pipeline, as plain values (config keys in brackets)."""

    scales: tuple[float, ...]  # CAM scales (cam.scales)
    flip: bool  # also the flipped images (cam.flip)
    bg_high: float  # training label: background score, high threshold (cam.bg_threshold_high)
    bg_low: float  # ... low threshold (cam.bg_threshold_low)
    bg_eval: float  # evaluation background score of CAM / PAR / AFA probabilities (cam.bg_threshold_eval)
    rw_bg_eval: float  # background score of the validation random walk, "rw" (afa.bg_threshold_eval)
    affinity_scale: float  # the CAM scale whose affinity drives the training random walk (afa.affinity_scale)
    radius: int  # random-walk window radius on the token grid (afa.radius)
    rw_power: int  # (afa.rw_power)
    rw_eps: float  # (afa.rw_eps)
    par: ParParams  # (par.*)
    ignore_index: int = 255  # (data.ignore_index)


def present_classes(labels: Tensor) -> Tensor:
    """labels [B, K] multi-hot -> long [B, K'] (K' = most classes any image has, >= 1): each
    image's present classes in ascending order, padded with absent ones.

    Call it on the CPU copy of the labels (as loaded): K' is read without a device sync.
    """
    absent = (labels <= 0).to(torch.int8)
    order = torch.sort(absent, dim=1, stable=True).indices
    k = max(1, int((labels > 0).sum(dim=1).max())) if labels.numel() else 1
    return order[:, :k]


def to_class_ids(label: Tensor, class_index: Tensor | None, ignore_index: int) -> Tensor:
    """label [B, H, W] in 0..K' (+ ignore) over the classes of ``class_index`` [B, K'] -> 0..K (+ ignore)."""
    if class_index is None:
        return label
    b, k = class_index.shape
    lookup = torch.cat([class_index.new_zeros(b, 1), class_index + 1], dim=1)  # compact -> full class id
    full = lookup.gather(1, label.clamp(max=k).flatten(1)).view_as(label)
    return torch.where(label == ignore_index, label, full)


def _compact(cam_fn: CamFn, class_index: Tensor) -> CamFn:
    """cam_fn restricted to the channels of class_index [B, K'] (its batch may hold the images twice)."""

    def compact_fn(x: Tensor, with_affinity: bool) -> tuple[Tensor, Tensor | None]:
        cams, affinity = cam_fn(x, with_affinity)
        copies = cams.shape[0] // class_index.shape[0]  # 2 with the flipped images
        index = class_index.expand(copies, -1, -1).reshape(-1, class_index.shape[1])
        return cams.gather(1, index[:, :, None, None].expand(-1, -1, *cams.shape[-2:])), affinity

    return compact_fn


class CamMaps(NamedTuple):
    cams: Tensor  # [B, K', H, W] float32 in [0, 1], multi-scale, label-masked
    labels: Tensor  # [B, K'] 1 = the channel's class is present
    class_index: Tensor | None  # long [B, K']: the class of each channel; None = all K classes in order
    affinity: Tensor | None  # [B, N, N] of the affinity_scale pass
    grid: tuple[int, int] | None  # its token grid (h, w)


def cam_maps(
    cam_fn: CamFn,
    images: Tensor,
    labels: Tensor,
    params: PseudoLabelParams,
    affinity_scale: float | None,
    msc: bool = True,
    class_index: Tensor | None = None,
) -> CamMaps:
    """Multi-scale + flip CAMs (``multiscale_cam``; scale 1 without flip when not ``msc``).

    images [B, 3, H, W] normalized, labels [B, K]; affinity_scale: the scale whose affinity
    is returned (None: no affinity). class_index [B, K'] (:func:`present_classes`, on any
    device): run on those channels only.
    """
    scales = params.scales if msc else (1.0,)
    present = labels
    if class_index is not None:
        class_index = class_index.to(images.device, non_blocking=True)
        present = labels.gather(1, class_index)
        cam_fn = _compact(cam_fn, class_index)
    cams, affinity, grid = multiscale_cam(cam_fn, images, present, scales, params.flip and msc, affinity_scale)
    return CamMaps(cams, present, class_index, affinity, grid)


@dataclass
class PseudoLabels:
    label: Tensor  # long [B, H, W] PAR-refined CAM label, 0..K, ignore_index = uncertain or padding
    afa_label: Tensor | None  # long [B, H, W] random walk + PAR label (None: not asked, or no affinity)


def pseudo_labels(
    images01: Tensor,
    maps: CamMaps,
    params: PseudoLabelParams,
    valid_box: Tensor | None = None,
    with_afa: bool = True,
    phase: PhaseFn = _no_phase,
) -> PseudoLabels:
    """The training pseudo labels (docs/method.md sec. 3, "AFA label").

    images01 [B, 3, H, W] RGB in [0, 1]; maps from :func:`cam_maps`; valid_box long [B, 4]
    (y0, y1, x0, x1) or None, best on the host (the AFA branch reads its values: a device copy costs a
    sync). label: high / low background thresholds + PAR + combination;
    afa_label (``with_afa`` and an affinity in ``maps``): the CAMs propagated by the random walk
    on the affinity's grid with the same two background scores, then PAR inside each valid box.
    One PAR kernel serves both. ``phase(name)``: a context manager per step (timing hook).
    """
    ignore = params.ignore_index
    with _float32(images01), phase("pseudo_label_par"):
        kernel = scaled_par_kernel(images01, params.par)
        label = refine_cams_to_label(images01, maps.cams, maps.labels, (params.bg_high, params.bg_low), params.par,
                                     valid_box, ignore, kernel)
        label = to_class_ids(label, maps.class_index, ignore)
    afa_label = None
    if with_afa and maps.affinity is not None:
        with _float32(images01), phase("affinity_random_walk"):
            probs = propagate_cams(maps.cams, maps.labels, maps.affinity, (params.bg_high, params.bg_low),
                                   params.radius, params.rw_power, params.rw_eps, maps.grid)
        with _float32(images01), phase("pseudo_label_par"):
            afa_label = refine_probs_to_label(images01, probs[:, 0], probs[:, 1], params.par, valid_box, ignore,
                                              kernel)
            afa_label = to_class_ids(afa_label, maps.class_index, ignore)
    return PseudoLabels(label, afa_label)


def _normalize(probs: Tensor, size: Sequence[int]) -> Tensor:
    """[B, C, h, w] non-negative scores -> resized to ``size``, summing to 1 over C."""
    probs = resize(probs, size)
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(PROB_EPS)


def cam_probabilities(
    images01: Tensor,
    maps: CamMaps,
    params: PseudoLabelParams,
    outputs: Sequence[str],
    out_size: Sequence[int],
    kernel: ParKernel | None = None,
) -> dict[str, Tensor]:
    """Class probabilities from the CAMs, for evaluation and pseudo-label files (docs/method.md sec. 9).

    images01 [B, 3, H, W] in [0, 1]; maps over all K classes (no class_index) -> {output:
    probs [B, C, H0, W0] float32 summing to 1 over C} (H0 x W0 = out_size), outputs of PROB_OUTPUTS:

    - "cam": [background = ``bg_eval``, CAMs] normalized (its argmax is the CAM label);
    - "par": softmax over background (``bg_eval``) + present classes at ``par.scale``, PAR;
    - "afa": the random walk of the CAMs (background ``bg_eval``) on the affinity's grid, PAR;
    - "rw": the random walk with background ``rw_bg_eval``, no PAR.

    ``kernel``: :func:`eval_par_kernel` of these images when the caller already has it (it depends on the
    images and ``params.par`` only, so one serves several ``bg_eval``).
    """
    unknown = [o for o in outputs if o not in PROB_OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output '{unknown[0]}' (expected one of {', '.join(PROB_OUTPUTS)})")
    if maps.affinity is None and ("afa" in outputs or "rw" in outputs):
        raise ValueError("outputs 'afa' / 'rw' need CAM maps with an affinity")
    with _float32(images01):
        return _cam_probabilities(images01, maps, params, outputs, out_size, kernel)


def eval_par_kernel(images01: Tensor, params: PseudoLabelParams) -> ParKernel:
    """The PAR kernel :func:`cam_probabilities` refines with, in float32 as it makes it."""
    with _float32(images01):
        return scaled_par_kernel(images01, params.par)


def _cam_probabilities(images01: Tensor, maps: CamMaps, params: PseudoLabelParams, outputs: Sequence[str],
                       out_size: Sequence[int], kernel: ParKernel | None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}

    def walk(bg_score: float) -> Tensor:
        return propagate_cams(maps.cams, maps.labels, maps.affinity, bg_score, params.radius, params.rw_power,
                              params.rw_eps, maps.grid)

    if "cam" in outputs:
        out["cam"] = _normalize(cam_scores(maps.cams, maps.labels, params.bg_eval), out_size)
    if "rw" in outputs:
        out["rw"] = _normalize(walk(params.rw_bg_eval), out_size)
    if "par" in outputs or "afa" in outputs:
        if kernel is None:
            kernel = scaled_par_kernel(images01, params.par)  # once for par and afa
        if "par" in outputs:
            probs = cams_with_background(resize(maps.cams, kernel.size), maps.labels, [params.bg_eval])[:, 0]
            out["par"] = _normalize(refine_probs(probs, kernel, params.par.iterations), out_size)
        if "afa" in outputs:
            out["afa"] = _normalize(refine_probs(walk(params.bg_eval), kernel, params.par.iterations), out_size)
    return {o: out[o] for o in outputs}


__all__ = [
    "PROB_OUTPUTS", "CamMaps", "PseudoLabelParams", "PseudoLabels", "cam_maps", "cam_probabilities", "eval_par_kernel",
    "present_classes", "pseudo_labels", "to_class_ids",
]
