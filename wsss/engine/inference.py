"""Inference: segmentation and CAM predictions, validation, pseudo labels, checkpoint evaluation.

The library behind ``wsss pseudolabel``, ``wsss eval --checkpoint`` and the validation
during training (docs/method.md sec. 3, 5, 9 and 10):

- :func:`predict_seg`: seg head logits averaged over the flip, MAX over scales, softmax,
  resized to the original size (the AFA test protocol).
- :func:`cam_probs` / :func:`predict_cam_probs`: class probabilities from CAMs, "cam", "par",
  "afa" (and validation's "rw"), by the pipeline of :mod:`wsss.method.pseudo_labels`.
- :func:`validate`: CAM, AFA and seg mIoU of a network on a dataset (what the trainer logs).
- :func:`generate_pseudo_labels`: label PNGs for a split (restartable, torchrun-sharded,
  optional DenseCRF in worker processes, optional mIoU of what was written).
- :func:`evaluate_checkpoint`: the test protocol on a split (optionally writing the VOC
  evaluation-server layout for the test split), or a sweep of the background threshold of
  a CAM target (:func:`cam_labels_per_bg_threshold`: one CAM pass, a label per threshold).

Everything runs under ``torch.inference_mode``; the forward passes under the precision rule
of :func:`wsss.engine.runtime.autocast`, post-processing in float32. Split-level loops go
through :func:`wsss.engine.runner.run_over_split`. Distributed (torchrun): rank r takes the
split's images r, r + world, ...; confusion matrices are summed over the ranks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from wsss.config import Config
from wsss.data.io import read_label_png
from wsss.data.transforms import denormalize
from wsss.engine.distributed import barrier, joined, rank_and_world, sum_over_ranks
from wsss.engine.metrics import ConfusionMatrix, ImageScores
from wsss.engine.runner import (
    crf_pool, load_for_inference, run_over_split, save_label, save_npy, to_float16, to_label,
)
from wsss.engine.runtime import network_method, pseudo_label_params, unwrap
from wsss.errors import DatasetError, WsssError
from wsss.files import atomic_write
from wsss.method.ops import resize, scaled_size
from wsss.method.pseudo_labels import CamMaps, PseudoLabelParams, cam_maps, cam_probabilities, eval_par_kernel

logger = logging.getLogger(__name__)

CAM_METHODS = ("cam", "par", "afa")
EVAL_TARGETS = ("seg", *CAM_METHODS)
VOC_SERVER_DIR = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"


# --------------------------------------------------------------------------- predictions of one image


@torch.inference_mode()
def predict_seg(
    network: nn.Module,
    image: Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: Sequence[int] | None = None,
) -> Tensor:
    """Segmentation probabilities of one image (the AFA test protocol, docs/method.md sec. 10).

    image [1, 3, h, w] normalized -> probs [C, H0, W0] float32 (H0 x W0 = ``out_size``,
    default h x w). Per scale s the image is resized to (int(s*h), int(s*w)); the image and
    its flip go through ONE forward (batch 2) and the logits are averaged (flip undone);
    every scale's logits are resized to the logit grid of the first scale and the
    elementwise MAX is taken; then resize to ``out_size`` and softmax over classes.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"predict_seg expects one image [1, 3, h, w], got shape {tuple(image.shape)}")
    net = unwrap(network)
    size = image.shape[-2:]
    best: Tensor | None = None
    for scale in scales:
        x = image if scale == 1.0 else resize(image, scaled_size(size, scale))
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        logits = net(x, with_seg=True, with_affinity=False).seg_logits.float()
        if flip:
            logits = (logits[:1] + logits[1:].flip(-1)) * 0.5
        if best is None:
            best = logits
        else:
            best = torch.maximum(best, resize(logits, best.shape[-2:]))
    if best is None:
        raise ValueError("predict_seg needs at least one scale")
    return resize(best, out_size or size).softmax(dim=1)[0]


def _cam_pass(
    network: nn.Module,
    image: Tensor,
    label: Tensor,
    cfg: Config,
    methods: Sequence[str],
    msc: bool,
    affinity_scale: float | None,
) -> tuple[CamMaps, Tensor, PseudoLabelParams]:
    """The network part of :func:`cam_probs`: (CAM maps, the image in [0, 1], the pipeline's params)."""
    unknown = [m for m in methods if m not in (*CAM_METHODS, "rw")]
    if unknown:
        raise WsssError(f"CAM method must be one of {', '.join(CAM_METHODS)}; got '{unknown[0]}'")
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"cam_probs expects one image [1, 3, h, w], got shape {tuple(image.shape)}")
    net = unwrap(network)
    check_cam_methods(net, methods)
    label = label.reshape(1, -1).to(image.device, torch.float32)
    if "afa" not in methods and "rw" not in methods:
        affinity_scale = None
    elif affinity_scale is None:
        affinity_scale = cfg.afa.affinity_scale if msc else 1.0
    params = pseudo_label_params(cfg)

    def cam_fn(x: Tensor, with_affinity: bool) -> tuple[Tensor, Tensor | None]:
        cams, affinity = net.cam_forward(x, with_affinity=with_affinity)
        return cams.float(), None if affinity is None else affinity.float()

    maps = cam_maps(cam_fn, image, label, params, affinity_scale, msc=msc)
    if affinity_scale is not None and maps.affinity is None:
        raise WsssError("the network returned no affinity; method 'afa' needs the AFA affinity head")
    return maps, denormalize(image.float(), cfg.data.mean, cfg.data.std), params


def default_cam_method(network: nn.Module) -> str:
    """The pseudo labels a network's method trains its seg head on: "afa" for AFA, "par" for ToCo."""
    return "par" if network_method(network) == "toco" else "afa"


def check_cam_methods(network: nn.Module, methods: Sequence[str]) -> None:
    """A WsssError when ``methods`` ask for the random walk of a network without AFA's affinity head."""
    if network_method(network) != "afa" and {"afa", "rw"} & set(methods):
        raise WsssError("'afa' (the random walk with AFA's learned affinity) needs an AFA network; this "
                        f"checkpoint is model.method '{network_method(network)}', which has no affinity head: use "
                        "cam or par")


def cam_probs(
    network: nn.Module,
    image: Tensor,
    label: Tensor,
    cfg: Config,
    methods: Sequence[str],
    msc: bool = True,
    out_size: Sequence[int] | None = None,
    affinity_scale: float | None = None,
) -> dict[str, Tensor]:
    """One multi-scale CAM pass, several outputs: method -> probs [C, H0, W0] float32.

    image [1, 3, h, w] normalized with ``data.mean`` / ``data.std``; label [K] or [1, K] image-level
    multi-hot labels (absent classes get probability 0); H0 x W0 = ``out_size`` (default h x w).
    CAMs: ``cam.scales`` with ``cam.flip`` when ``msc``, else scale 1 without flip; methods:
    ``wsss.method.pseudo_labels.PROB_OUTPUTS`` ("cam", "par", "afa", and "rw": validation's AFA row).
    ``affinity_scale``: the CAM scale whose affinity the random walk uses (default:
    ``afa.affinity_scale`` with msc, else 1).
    """
    maps, images01, params = _cam_pass(network, image, label, cfg, methods, msc, affinity_scale)
    probs = cam_probabilities(images01, maps, params, methods, tuple(out_size or image.shape[-2:]))
    return {m: p[0] for m, p in probs.items()}


@torch.inference_mode()
def cam_labels_per_bg_threshold(
    network: nn.Module,
    image: Tensor,
    label: Tensor,
    cfg: Config,
    method: str,
    bg_thresholds: Sequence[float],
    msc: bool = True,
    out_size: Sequence[int] | None = None,
) -> Tensor:
    """One multi-scale CAM pass, the label of ``method`` ("cam" | "par" | "afa") at each background
    score of ``bg_thresholds`` (in place of ``cam.bg_threshold_eval``) -> long [T, H0, W0].

    What :func:`evaluate_checkpoint` sweeps: the network and the PAR kernel run once, only the
    background score, PAR and the random walk are repeated per threshold. Arguments as :func:`cam_probs`.
    """
    if method not in CAM_METHODS:
        raise WsssError(f"method must be one of {', '.join(CAM_METHODS)}; got '{method}'")
    maps, images01, params = _cam_pass(network, image, label, cfg, [method], msc, None)
    size = tuple(out_size or image.shape[-2:])
    kernel = eval_par_kernel(images01, params) if method != "cam" else None
    labels = [cam_probabilities(images01, maps, replace(params, bg_eval=float(t)), [method], size, kernel)[method][0]
              .max(dim=0).indices for t in bg_thresholds]  # max(...).indices: = argmax, faster on CPU
    return torch.stack(labels)


@torch.inference_mode()
def predict_cam_probs(
    network: nn.Module,
    image: Tensor,
    label: Tensor,
    cfg: Config,
    method: str = "cam",
    msc: bool = True,
    out_size: Sequence[int] | None = None,
) -> Tensor:
    """Class probabilities of one image from its CAMs: :func:`cam_probs` of one method -> [C, H0, W0].

    - "cam": [background score ``cam.bg_threshold_eval``, CAMs] normalized to sum 1;
    - "par": softmax over background + present classes at ``par.scale`` of h x w, PAR;
    - "afa": random walk with the predicted affinity of the ``afa.affinity_scale`` pass
      (scale 1 without msc) on its token grid, then PAR.
    """
    return cam_probs(network, image, label, cfg, [method], msc, out_size)[method]


# --------------------------------------------------------------------------- checks and run options


def _check_labels_available(dataset: Any, what: str) -> None:
    if not dataset.has_masks:
        raise DatasetError(
            f"split '{dataset.split}' of '{dataset.root}' has no masks, so no image-level labels; {what} "
            "needs the image labels (use a split with masks)"
        )


RUN_OPTIONS_FILE = "pseudo_labels.json"


def _run_options(checkpoint: str | Path, meta: dict, cfg: Config, split: str, method: str, msc: bool,
                 crf: bool) -> dict[str, Any]:
    """Everything that decides the labels of a pseudo-label directory."""
    options: dict[str, Any] = {
        "checkpoint": str(Path(checkpoint).resolve()), "iteration": meta.get("iteration"), "split": split,
        "method": method, "msc": msc, "crf": crf,
        "cam": asdict(cfg.cam), "par": asdict(cfg.par), "afa": asdict(cfg.afa),
    }
    if crf:
        options["eval_crf"] = {k: v for k, v in asdict(cfg.eval).items() if k.startswith("crf_") and k != "crf_workers"}
    return options


def _check_run_options(out: Path, options: dict[str, Any], rank: int) -> None:
    """Refuse to resume into a directory written with other options (the skipped images would
    silently keep labels of another run); rank 0 records the options of a new directory."""
    path = out / RUN_OPTIONS_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != options:
            changed = sorted(k for k in {*options, *(previous or {})}
                             if (previous or {}).get(k) != options.get(k)) if isinstance(previous, dict) else ["?"]
            raise WsssError(
                f"'{out}' holds pseudo labels written with other options ({', '.join(changed)} differ, see "
                f"'{path}'); choose another output directory or delete it to start over")
    elif rank == 0:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(options, indent=1)))


# --------------------------------------------------------------------------- validation during training


VAL_KEYS = ("cam", "afa", "seg", "par", "cam_aux")


def validation_keys(network: nn.Module) -> tuple[str, ...]:
    """What :func:`validate` scores for ``network``: AFA's cam / afa / seg / par, ToCo's cam / seg / par / cam_aux."""
    if network_method(network) == "toco":
        return ("cam", "seg", "par", "cam_aux")
    return ("cam", "afa", "seg", "par")


class _AuxCams:
    """A ToCo network seen through its auxiliary classifier (``cam_forward`` gives the auxiliary CAMs)."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def cam_forward(self, images: Tensor, with_affinity: bool = False) -> tuple[Tensor, None]:
        return self.network.cams_with_aux(images)[1], None


def validation_subset(size: int, limit: int) -> list[int]:
    """Indices of ``limit`` images spread evenly over a split of ``size`` (all when limit <= 0 or >= size):
    a fixed subset that, unlike the first N, samples the whole split (COCO's val list is ordered by id)."""
    if limit <= 0 or limit >= size:
        return list(range(size))
    return [i * size // limit for i in range(limit)]


def _validation_maps(net: nn.Module, image: Tensor, label: Tensor, out_size: Sequence[int],
                     cfg: Config) -> tuple[dict[str, Tensor], Tensor]:
    """What :func:`validate` scores, for one image [1, 3, h, w] at its own size: the label maps [H0, W0] and the
    image-level logits [1, K] of the plain forward."""
    out = net(image, with_seg=True, with_affinity=False)  # predict_seg at one scale without flip, + the classifier
    seg = resize(out.seg_logits.float(), out_size)[0]
    # max(...).indices = argmax(dim=0), faster on CPU
    if network_method(net) == "toco":  # no affinity; the auxiliary CAM as the official validate()
        probs = cam_probs(net, image, label, cfg, ("cam", "par"), True, out_size)
        aux = cam_probs(_AuxCams(net), image, label, cfg, ("cam",), True, out_size)["cam"]
        maps = {"seg": seg.max(dim=0).indices, "cam": probs["cam"].max(dim=0).indices,
                "par": probs["par"].max(dim=0).indices, "cam_aux": aux.max(dim=0).indices}
        return maps, out.cls_logits
    # one multi-scale + flip CAM pass; the affinity of its scale-1 pass, which in eval mode is the plain forward
    probs = cam_probs(net, image, label, cfg, ("cam", "par", "rw"), True, out_size, affinity_scale=1.0)
    maps = {"seg": seg.max(dim=0).indices, "cam": probs["cam"].max(dim=0).indices,
            "afa": probs["rw"].max(dim=0).indices, "par": probs["par"].max(dim=0).indices}
    return maps, out.cls_logits


def validate(network: nn.Module, dataset: Any, cfg: Config, device: torch.device | str,
             limit: int = 0, prior_frequencies: Sequence[float] | None = None) -> dict[str, dict[str, Any]]:
    """Validation mIoUs as the authors measure them, plus our PAR-refined CAM (docs/method.md, "Validation").

    ``dataset``: an eval dataset at the images' own size (``build_dataset(..., train=False,
    long_side=None)``). -> {"cam", "afa", "seg", "par"}: each ``ConfusionMatrix.compute()`` plus
    ``num_images``, and "cls": the classifier's ``ImageScores.compute()`` (loss, F1 at sigmoid > 0.5, the label
    frequencies; with ``prior_frequencies``, e.g. the training split's class frequencies, the loss of predicting
    them); with ground-truth image labels, per image at its own size:

    - cam: multi-scale + flip CAMs (``cam.scales``, ``cam.flip``), background score
      ``cam.bg_threshold_eval`` (0.45), no PAR;
    - afa: those CAMs propagated by the random walk with the affinity of the plain (scale 1)
      forward pass on its token grid, background score ``afa.bg_threshold_eval`` (0.35), no PAR;
    - seg: the seg head, one scale, no flip, no CRF;
    - par (ours, not in the authors' logs): the cam probabilities refined by PAR;
    - a ToCo network (model.method "toco") has no afa row but "cam_aux": the auxiliary CAMs as the cam row.

    ``limit`` > 0: the fixed subset of :func:`validation_subset` only. The network is put in eval mode and restored;
    under torch.distributed each rank takes every world-th image and the matrices are summed.
    """
    device = torch.device(device)
    rank, world = rank_and_world()
    indices = validation_subset(len(dataset), limit)[rank::world]
    names = dataset.class_names
    matrices = {k: ConfusionMatrix(dataset.num_classes, device=device, class_names=names)
                for k in validation_keys(network)}
    scores = ImageScores(dataset.num_classes - 1, device=device)
    net = unwrap(network)
    was_training = net.training
    net.eval()

    def maps(item: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        image = item["image"][None].to(device, non_blocking=True)
        label = item["label"].to(device, non_blocking=True)
        return _validation_maps(net, image, label, item["mask"].shape, cfg)

    try:
        outputs = run_over_split(dataset, indices, maps, device, cfg.train.precision, num_workers=cfg.data.num_workers)
        for item, (predictions, cls_logits) in tqdm(outputs, total=len(indices), desc="validation", unit="img",
                                                    leave=False, disable=rank != 0):
            mask = item["mask"].to(device, non_blocking=True)
            for key, prediction in predictions.items():
                matrices[key].update(prediction, mask)
            scores.update(cls_logits, item["label"])
    finally:
        net.train(was_training)
    total = int(sum_over_ranks([len(indices)], device)[0])
    results = {}
    for key, cm in matrices.items():
        results[key] = cm.reduce_().compute()
        results[key]["num_images"] = total
    results["cls"] = scores.reduce_().compute(prior_frequencies)
    return results


# --------------------------------------------------------------------------- pseudo labels


def default_pseudo_label_dir(checkpoint: str | Path, split: str, method: str) -> Path:
    """<the checkpoint's folder>/pseudo_labels/<split>_<method>: next to the run that made them."""
    return Path(checkpoint).resolve().parent / "pseudo_labels" / f"{split}_{method}"


def _write_labels(outputs: Any, out: Path, save_probs: bool, cm: ConfusionMatrix | None) -> None:
    """(item, probs) -> ``<out>/<name>.png`` (and ``.npy``), scored into ``cm`` when given."""
    for item, probs in outputs:
        label = to_label(probs)
        if save_probs:
            save_npy(out / f"{item['name']}.npy", to_float16(probs))
        save_label(out / f"{item['name']}.png", label)  # last: its presence marks the image done
        if cm is not None:
            cm.update(label, item["mask"].numpy())


def _split_share(names: Sequence[str], out: Path, save_probs: bool, rank: int,
                 world_size: int) -> tuple[list[int], list[int]]:
    """This rank's share of a split's image indices (names[rank::world_size]) and the part of it still to write:
    the images without their ``<name>.png`` (or ``<name>.npy`` with save_probs) in ``out``."""

    def done(index: int) -> bool:
        name = names[index]
        return (out / f"{name}.png").is_file() and (not save_probs or (out / f"{name}.npy").is_file())

    mine = list(range(rank, len(names), world_size))
    return mine, [i for i in mine if not done(i)]


def generate_pseudo_labels(
    checkpoint: str | Path,
    split: str | None = None,
    out_dir: str | Path | None = None,
    method: str | None = None,
    msc: bool = True,
    crf: bool = False,
    save_probs: bool = False,
    evaluate: bool = False,
    data_root: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Write pseudo labels of ``split`` as VOC-palette PNGs ``<out_dir>/<name>.png``.

    method: "cam" | "par" | "afa" (see :func:`predict_cam_probs`; default :func:`default_cam_method`, what the
    network's method trains its seg head on), from the GT image labels
    of the split (the standard WSSS protocol), at the original image size; msc: multi-scale
    + flip CAMs (``cam.scales``); crf: DenseCRF (``eval.crf_*``) in ``eval.crf_workers``
    processes; save_probs: also ``<name>.npy`` (float16 [C, H, W] class probabilities).
    split default: the run's ``data.train_split``; out_dir default:
    ``<the checkpoint's folder>/pseudo_labels/<split>_<method>``; data_root replaces the
    checkpoint's ``data.root``; overrides: ``section.key=value`` strings.

    Restartable: images whose files exist are skipped; files are written via a temporary
    file and a rename. The options that decide the labels (checkpoint, method, msc, crf, the
    cam / par / afa settings) are kept in ``<out_dir>/pseudo_labels.json``; resuming into a
    directory written with other options is an error. Under torchrun rank r labels names[r::world].
    -> {"out_dir", "split", "method", "msc", "crf", "written", "skipped", "seconds"} (summed over
    ranks), and with evaluate=True the mIoU of the written labels (skipped ones included) against
    the split's masks (``ConfusionMatrix.compute()`` keys, ``num_images``).
    """
    from wsss.data.datasets import build_dataset

    if method is not None and method not in CAM_METHODS:
        raise WsssError(f"method must be one of {', '.join(CAM_METHODS)}; got '{method}'")
    network, cfg, meta = load_for_inference(checkpoint, overrides, data_root)
    method = method or default_cam_method(network)
    check_cam_methods(network, [method])
    split = split or cfg.data.train_split
    with joined(cfg.train.device) as ctx:
        network.to(ctx.device)
        dataset = build_dataset(cfg.data, split, train=False, long_side=None)
        _check_labels_available(dataset, f"pseudo labels (method '{method}')")
        out = Path(out_dir) if out_dir is not None else default_pseudo_label_dir(checkpoint, split, method)
        out.mkdir(parents=True, exist_ok=True)
        _check_run_options(out, _run_options(checkpoint, meta, cfg, split, method, msc, crf), ctx.rank)

        mine, todo = _split_share(dataset.names, out, save_probs, ctx.rank, ctx.world_size)
        cm = ConfusionMatrix(dataset.num_classes, device=ctx.device, class_names=dataset.class_names) if evaluate else None

        def predict(item: dict[str, Any]) -> Tensor:
            image = item["image"][None].to(ctx.device, non_blocking=True)
            return predict_cam_probs(network, image, item["label"].to(ctx.device), cfg, method, msc,
                                     item["mask"].shape)

        start = time.perf_counter()
        with crf_pool(cfg, crf) as pool:
            outputs = run_over_split(dataset, todo, predict, ctx.device, cfg.train.precision, pool,
                                     cfg.data.num_workers)
            _write_labels(tqdm(outputs, total=len(todo), desc=f"pseudo labels ({method})", disable=ctx.rank != 0,
                               unit="img"), out, save_probs, cm)
        if cm is not None:  # the labels written by an earlier, interrupted run count too
            for index in sorted(set(mine).difference(todo)):
                cm.update(read_label_png(out / f"{dataset.names[index]}.png"), dataset.load_mask(index))
        elapsed = time.perf_counter() - start
        written, skipped = sum_over_ranks([len(todo), len(mine) - len(todo)], ctx.device)
        barrier()
        if ctx.rank == 0:
            logger.info("wrote %d pseudo labels to %s (%d already there, skipped) in %.1f s: %.2f images/s%s",
                        written, out, skipped, elapsed, written / max(elapsed, 1e-9),
                        f" over {ctx.world_size} processes" if ctx.world_size > 1 else "")
        result: dict[str, Any] = {"out_dir": str(out), "split": split, "method": method, "msc": msc, "crf": crf,
                                  "written": int(written), "skipped": int(skipped), "seconds": elapsed}
        if cm is not None:
            result.update(cm.reduce_().compute(), num_images=len(dataset))
        return result


# --------------------------------------------------------------------------- checkpoint evaluation


def _eval_predict_fn(network: nn.Module, cfg: Config, target: str, msc: bool, device: torch.device,
                     bg_thresholds: Sequence[float] = ()) -> Callable[[dict[str, Any]], Tensor]:
    """item -> probs [C, H0, W0] at the original size: the seg head (``eval.scales`` + flip with msc) or the
    CAM probabilities of ``target`` with the item's GT image labels; with ``bg_thresholds``: the labels of
    ``target`` at each of them, long [T, H0, W0]."""

    def predict(item: dict[str, Any]) -> Tensor:
        image = item["image"][None].to(device, non_blocking=True)
        out_size = tuple(int(v) for v in item["size"])
        if target == "seg":
            scales = cfg.eval.scales if msc else [1.0]
            return predict_seg(network, image, scales, flip=cfg.eval.flip and msc, out_size=out_size)
        label = item["label"].to(device)
        if bg_thresholds:
            return cam_labels_per_bg_threshold(network, image, label, cfg, target, bg_thresholds, msc, out_size)
        return predict_cam_probs(network, image, label, cfg, target, msc, out_size)

    return predict


def _check_bg_thresholds(bg_thresholds: Sequence[float], target: str, crf: bool, save_dir: Any) -> None:
    if not bg_thresholds:
        return
    if target == "seg":
        raise WsssError("background thresholds are swept for a CAM target (cam, par, afa), not for 'seg': the seg "
                        "head predicts its own background")
    if crf or save_dir is not None:
        raise WsssError("a background-threshold sweep scores one prediction per threshold; it takes neither "
                        "CRF nor a directory to save to (run again with the chosen cam.bg_threshold_eval for those)")
    bad = [t for t in bg_thresholds if not 0 < t < 1]
    if bad:
        raise WsssError(f"background thresholds must lie in (0, 1); got {bad[0]}")


def _sweep_result(cms: Sequence[ConfusionMatrix], bg_thresholds: Sequence[float]) -> dict[str, Any]:
    """Confusion matrices, one per background threshold -> the best one's ``compute()`` dict plus
    ``bg_threshold`` (the best) and ``sweep``: per threshold its mIoU and ``fg_ratio`` (predicted /
    true foreground pixels, class 0 = background: below 1 the labels under-cover the objects)."""
    rows = []
    for cm, t in zip(cms, bg_thresholds):
        matrix = cm.matrix
        true_fg = int(matrix[1:].sum())
        rows.append({"bg_threshold": float(t), **cm.compute(),
                     "fg_ratio": int(matrix[:, 1:].sum()) / true_fg if true_fg else math.nan})
    best = max(rows, key=lambda r: r["miou"] if math.isfinite(r["miou"]) else -math.inf)
    result = {k: v for k, v in best.items() if k != "fg_ratio"}
    result["sweep"] = [{"bg_threshold": r["bg_threshold"], "miou": r["miou"], "fg_ratio": r["fg_ratio"]}
                       for r in rows]
    return result


def _score_item(item: dict[str, Any], output: Any, cms: Sequence[ConfusionMatrix], sweep: bool, save: Path | None,
                has_gt: bool, device: torch.device) -> None:
    """One image of :func:`evaluate_checkpoint` into its confusion matrices (and its label PNG into ``save``):
    ``output`` is a label per threshold [T, H0, W0] in a sweep (one matrix each), else probabilities."""
    if sweep:
        mask = item["mask"].to(device)
        for cm, label in zip(cms, output):
            cm.update(label, mask)
        return
    if isinstance(output, Tensor) and save is None:
        cms[0].update(output.max(dim=0).indices, item["mask"].to(device))  # = argmax, on the device
        return
    label = to_label(output)
    if save is not None:
        save_label(save / f"{item['name']}.png", label)
    if has_gt:
        cms[0].update(label, item["mask"].numpy())


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str = "val",
    target: str = "seg",
    msc: bool = False,
    crf: bool = False,
    save_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    overrides: Sequence[str] = (),
    bg_thresholds: Sequence[float] = (),
) -> dict[str, Any] | None:
    """Score a checkpoint on ``split`` with the test protocol (docs/method.md sec. 10).

    Images are resized so the long side is ``eval.long_side``. target "seg": seg head,
    with ``eval.scales`` + flip when ``msc`` (else one scale, no flip); "cam" / "par" / "afa":
    :func:`predict_cam_probs` (``cam.scales`` + flip when ``msc``) with the GT image labels.
    Probabilities are resized to the original size; ``crf``: DenseCRF (``eval.crf_*``).
    -> ``ConfusionMatrix.compute()`` dict plus ``num_images``, ``split``, ``target``, ``msc``,
    ``crf`` (summed over torchrun ranks), for the caller's ``format_table``.
    ``save_dir``: also write the predicted label PNGs there; for a split without masks
    (VOC ``test``) they go to the evaluation-server layout
    ``<save_dir>/results/VOC2012/Segmentation/comp6_test_cls/<name>.png`` and None is returned.
    ``bg_thresholds`` (a CAM target, no crf / save_dir): score the labels at each of these background
    scores in place of ``cam.bg_threshold_eval``, from one network pass per image; the result is the
    best threshold's, with ``bg_threshold`` and ``sweep`` (:func:`_sweep_result`) added.
    """
    from wsss.data.datasets import build_dataset

    if target not in EVAL_TARGETS:
        raise WsssError(f"target must be one of {', '.join(EVAL_TARGETS)}; got '{target}'")
    bg_thresholds = tuple(float(t) for t in bg_thresholds)
    _check_bg_thresholds(bg_thresholds, target, crf, save_dir)
    network, cfg, _ = load_for_inference(checkpoint, overrides, data_root)
    check_cam_methods(network, [target])
    with joined(cfg.train.device) as ctx:
        device = ctx.device
        network.to(device)
        dataset = build_dataset(cfg.data, split, train=False, long_side=cfg.eval.long_side)
        has_gt = dataset.has_masks
        if not has_gt and save_dir is None:
            raise WsssError(f"split '{split}' has no masks to score against; give a directory to save the "
                            "predictions to (--save DIR) for the evaluation server")
        if target != "seg":
            _check_labels_available(dataset, f"target '{target}'")
        save = None
        if save_dir is not None:
            save = Path(save_dir) / VOC_SERVER_DIR if not has_gt else Path(save_dir)
            save.mkdir(parents=True, exist_ok=True)
        indices = list(range(ctx.rank, len(dataset), ctx.world_size))
        cms = [ConfusionMatrix(dataset.num_classes, device=device, class_names=dataset.class_names)
               for _ in bg_thresholds or (None,)]
        start = time.perf_counter()
        with crf_pool(cfg, crf) as pool:
            predict = _eval_predict_fn(network, cfg, target, msc, device, bg_thresholds)
            outputs = run_over_split(dataset, indices, predict, device, cfg.train.precision, pool,
                                     cfg.data.num_workers)
            desc = f"eval {target}{' msc' if msc else ''}{' crf' if crf else ''}"
            if bg_thresholds:
                desc += f", {len(bg_thresholds)} bg thresholds"
            for item, output in tqdm(outputs, total=len(indices), desc=desc, disable=ctx.rank != 0, unit="img"):
                _score_item(item, output, cms, bool(bg_thresholds), save, has_gt, device)
        barrier()
        if ctx.rank == 0:
            where = f"; predictions in {save}" if save is not None else ""
            logger.info("evaluated %d images of split '%s' in %.1f s%s", len(dataset), split,
                        time.perf_counter() - start, where)
        if not has_gt:
            return None
        for cm in cms:
            cm.reduce_()
        result = _sweep_result(cms, bg_thresholds) if bg_thresholds else cms[0].compute()
        result.update({"num_images": len(dataset), "split": split, "target": target, "msc": msc, "crf": crf})
        return result


__all__ = [
    "cam_labels_per_bg_threshold", "cam_probs", "default_pseudo_label_dir", "evaluate_checkpoint",
    "generate_pseudo_labels", "predict_cam_probs", "predict_seg", "validate",
]
