"""Inference: segmentation and CAM predictions, validation, pseudo labels, checkpoint evaluation.

The library behind ``wsss pseudolabel``, ``wsss eval --checkpoint`` and the validation
during training (docs/method.md sec. 3, 5, 9 and 10):

- :func:`predict_seg`: seg head logits averaged over the flip, MAX over scales, softmax,
  resized to the original size (the AFA test protocol).
- :func:`predict_cam_probs`: class probabilities from CAMs: "cam" (constant background
  channel at ``cam.bg_threshold_eval``), "par" (PAR-refined), "afa" (random walk with the
  predicted affinity, then PAR).
- :func:`validate`: CAM, AFA and seg mIoU of a network on a dataset (what the trainer logs).
- :func:`generate_pseudo_labels`: label PNGs for a split (restartable, torchrun-sharded,
  optional DenseCRF in worker processes, optional mIoU of what was written).
- :func:`evaluate_checkpoint`: the test protocol on a split (optionally writing the VOC
  evaluation-server layout for the test split).

Everything runs under ``torch.inference_mode``; the forward passes run under autocast
when ``train.precision`` asks for it (bf16 / fp16 on CUDA, bf16 on CPU), post-processing
in float32. Distributed (torchrun): rank r takes the split's images r, r + world, ...;
confusion matrices are summed over the ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from wsss.config import IMAGENET_MEAN, IMAGENET_STD, AfaConfig, CamConfig, Config, ParConfig
from wsss.data.io import write_label_png
from wsss.data.transforms import denormalize
from wsss.engine.distributed import barrier, cleanup_distributed, init_distributed, is_initialized
from wsss.engine.metrics import ConfusionMatrix
from wsss.errors import DatasetError, WsssError

logger = logging.getLogger(__name__)

CAM_METHODS = ("cam", "par", "afa")
EVAL_TARGETS = ("seg", "cam", "afa")
PROB_EPS = 1e-8  # guard of the final per-pixel normalization of class probabilities
VOC_SERVER_DIR = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"


# --------------------------------------------------------------------------- devices and precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``train.precision``: bf16 / fp16 on CUDA, bf16 on CPU, otherwise none (fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # fp16 autocast on CPU is slow and unsupported by some kernels


def _unwrap(network: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / compiled wrapper."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of [B, C, h, w] to ``size`` (no-op when it already has it)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    from wsss.method.cam import scaled_size

    return scaled_size(size, scale)


def _normalize_probs(probs: Tensor) -> Tensor:
    """[..., C, H, W] non-negative scores -> probabilities summing to 1 over C."""
    return probs / probs.sum(dim=-3, keepdim=True).clamp_min(PROB_EPS)


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
    net = _unwrap(network)
    size = image.shape[-2:]
    best: Tensor | None = None
    for scale in scales:
        x = image if scale == 1.0 else _resize(image, _scaled_size(size, scale))
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        logits = net(x, with_seg=True, with_affinity=False).seg_logits.float()
        if flip:
            logits = (logits[:1] + logits[1:].flip(-1)) * 0.5
        if best is None:
            best = logits
        else:
            best = torch.maximum(best, _resize(logits, best.shape[-2:]))
    if best is None:
        raise ValueError("predict_seg needs at least one scale")
    return _resize(best, out_size or size).softmax(dim=1)[0]


def _cam_probs(
    network: nn.Module,
    image: Tensor,
    label: Tensor,
    methods: Sequence[str],
    cam_cfg: CamConfig,
    par_cfg: ParConfig,
    afa_cfg: AfaConfig,
    msc: bool,
    out_size: Sequence[int] | None,
    mean: Sequence[float],
    std: Sequence[float],
    affinity_scale: float | None = None,
) -> dict[str, Tensor]:
    """One multi-scale CAM pass, several outputs: method -> probs [C, H0, W0].

    Methods: those of :func:`predict_cam_probs`, and "rw" (validation's AFA row: the random walk with
    background score ``afa.bg_threshold_eval``, no PAR). ``affinity_scale``: the CAM scale whose affinity the
    random walk uses (default: ``afa.affinity_scale`` with msc, else 1).
    """
    from wsss.method.affinity import propagate_cams
    from wsss.method.cam import cams_with_background, multiscale_cam, scaled_par_kernel
    from wsss.method.par import apply_par_kernel

    unknown = [m for m in methods if m not in (*CAM_METHODS, "rw")]
    if unknown:
        raise WsssError(f"CAM method must be one of {', '.join(CAM_METHODS)}; got '{unknown[0]}'")
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"predict_cam_probs expects one image [1, 3, h, w], got shape {tuple(image.shape)}")
    net = _unwrap(network)
    label = label.reshape(1, -1).to(image.device, torch.float32)
    size = image.shape[-2:]
    out_size = tuple(out_size or size)
    scales = list(cam_cfg.scales) if msc else [1.0]
    if "afa" not in methods and "rw" not in methods:
        affinity_scale = None
    elif affinity_scale is None:
        affinity_scale = afa_cfg.affinity_scale if msc else 1.0
    grid: dict[str, tuple[int, int]] = {}

    def cam_fn(x: Tensor, with_affinity: bool) -> tuple[Tensor, Tensor | None]:
        cams, affinity = net.cam_forward(x, with_affinity=with_affinity)
        if with_affinity:
            grid["size"] = tuple(cams.shape[-2:])  # the token grid the affinity lives on
        return cams.float(), None if affinity is None else affinity.float()

    cams, affinity = multiscale_cam(cam_fn, image, label, scales, flip=cam_cfg.flip if msc else False,
                                    affinity_scale=affinity_scale)  # [1, K, h, w] in [0, 1]
    # post-processing in float32 even when the caller runs the network under autocast
    with torch.autocast(image.device.type, enabled=False):
        threshold = cam_cfg.bg_threshold_eval
        out: dict[str, Tensor] = {}
        if "cam" in methods:
            # scores, not a softmax: the argmax is exactly cam_to_label's (bg wins ties)
            scores = torch.cat([torch.full_like(cams[:, :1], threshold), cams], dim=1)
            out["cam"] = _normalize_probs(_resize(scores, out_size))[0]
        if affinity is None and affinity_scale is not None:
            raise WsssError("the network returned no affinity; method 'afa' needs the AFA affinity head")
        if "rw" in methods:
            rw = propagate_cams(cams, label, affinity, afa_cfg.bg_threshold_eval, afa_cfg, grid_size=grid["size"])
            out["rw"] = _normalize_probs(_resize(rw, out_size))[0]
        if "par" in methods or "afa" in methods:
            kernel = scaled_par_kernel(denormalize(image.float(), mean, std), par_cfg)  # once for par and afa
            par_size = kernel.shape[-2:]
            if "par" in methods:
                probs = cams_with_background(_resize(cams, par_size), label, [threshold])[:, 0]
                refined = apply_par_kernel(probs, kernel, par_cfg.dilations, par_cfg.iterations)
                out["par"] = _normalize_probs(_resize(refined, out_size))[0]
            if "afa" in methods:
                rw = propagate_cams(cams, label, affinity, threshold, afa_cfg, grid_size=grid["size"])
                refined = apply_par_kernel(_resize(rw, par_size), kernel, par_cfg.dilations, par_cfg.iterations)
                out["afa"] = _normalize_probs(_resize(refined, out_size))[0]
    return {m: out[m] for m in methods}


@torch.inference_mode()
def predict_cam_probs(
    network: nn.Module,
    image: Tensor,
    label: Tensor,
    cam_cfg: CamConfig,
    par_cfg: ParConfig,
    afa_cfg: AfaConfig,
    method: str = "cam",
    msc: bool = True,
    out_size: Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Class probabilities of one image from its CAMs.

    image [1, 3, h, w] normalized with ``mean`` / ``std`` (``data.mean`` / ``data.std``);
    label [K] or [1, K] image-level multi-hot labels (absent classes get probability 0)
    -> probs [C, H0, W0] float32 summing to 1 over C (H0 x W0 = ``out_size``, default h x w).

    CAMs: ``multiscale_cam`` over ``cam.scales`` with ``cam.flip`` when ``msc``, else scale 1
    without flip. Background score = ``cam.bg_threshold_eval``.
    - "cam": [background score, CAMs] normalized to sum 1; argmax = ``cam_to_label``.
    - "par": softmax over background + present classes at ``par.scale`` of h x w, PAR.
    - "afa": random walk with the predicted affinity of the ``afa.affinity_scale`` pass
      (scale 1 without msc) on its token grid (``propagate_cams``), then PAR.
    """
    return _cam_probs(network, image, label, [method], cam_cfg, par_cfg, afa_cfg, msc, out_size, mean, std)[method]


# --------------------------------------------------------------------------- split-level machinery


def _dist_info() -> tuple[int, int]:
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _distributed(device_spec: str) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world, device for ``train.device``); joins the torchrun process group when
    WORLD_SIZE > 1 and none is initialized yet, and leaves it again at the end."""
    created = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_initialized()
    ctx = init_distributed(device_spec)
    try:
        yield ctx.rank, ctx.world_size, ctx.device
    finally:
        if created:
            cleanup_distributed()


def _sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    if not is_initialized():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class _Items(Dataset):
    """The eval items of ``indices`` of a dataset, with the index and optionally the raw uint8 image."""

    def __init__(self, dataset: Any, indices: Sequence[int], raw_image: bool) -> None:
        self.dataset, self.indices, self.raw_image = dataset, list(indices), raw_image

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        item = dict(self.dataset[index])
        item["index"] = index
        if self.raw_image:
            item["raw"] = self.dataset.load_image(index)
        return item


def _loader(dataset: Any, indices: Sequence[int], raw_image: bool, num_workers: int) -> DataLoader:
    workers = min(num_workers, len(indices))
    return DataLoader(_Items(dataset, indices, raw_image), batch_size=None, shuffle=False, num_workers=workers,
                      persistent_workers=False)


PredictFn = Callable[[dict[str, Any]], Tensor]


def _predictions(
    dataset: Any,
    indices: Sequence[int],
    predict: PredictFn,
    device: torch.device,
    precision: str,
    crf_pool: Any | None,
    num_workers: int,
) -> Iterator[tuple[dict[str, Any], Tensor | np.ndarray]]:
    """Yield (item, probs [C, H0, W0]) per index, in order: a device tensor, or a float32
    array after DenseCRF (run in ``crf_pool``'s worker processes while the next images go
    through the network)."""
    loader = _loader(dataset, indices, crf_pool is not None, num_workers)

    def forward() -> Iterator[tuple[dict[str, Any], Any, Any]]:
        for item in loader:
            with torch.inference_mode(), autocast_context(device, precision):
                probs = predict(item)
            if crf_pool is None:
                yield item, None, probs
            else:
                yield item, np.asarray(item.pop("raw")), probs.float().cpu().numpy()

    if crf_pool is None:
        for item, _, probs in forward():
            yield item, probs
    else:
        yield from crf_pool.imap(((item, raw, probs) for item, raw, probs in forward()))


def _to_label(probs: Tensor | np.ndarray) -> np.ndarray:
    """probs [C, H, W] -> uint8 [H, W] argmax (on the device for a tensor, then one copy)."""
    if isinstance(probs, Tensor):
        return probs.max(dim=0).indices.to(torch.uint8).cpu().numpy()  # = argmax, faster on CPU
    return probs.argmax(axis=0).astype(np.uint8)


def _to_float16(probs: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(probs, Tensor):
        return probs.to(torch.float16).cpu().numpy()
    return probs.astype(np.float16)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same directory and rename, so a killed run
    leaves either the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic_write(path, write)


def _save_label(path: Path, label: np.ndarray) -> None:
    _atomic_write(path, lambda tmp: write_label_png(tmp, label))


def _crf_pool(cfg: Config, enabled: bool) -> Any | None:
    if not enabled:
        return None
    from wsss.engine.crf import CrfPool

    return CrfPool(cfg.eval.crf_workers, cfg.eval)


def _load(checkpoint: str | Path, overrides: Sequence[str],
          data_root: str | Path | None) -> tuple[nn.Module, Config, dict]:
    """Network (on the CPU, eval mode), config (overrides and ``data_root`` applied), metadata."""
    from wsss.engine.checkpoint import load_network

    network, cfg, meta = load_network(checkpoint, torch.device("cpu"), list(overrides))
    if data_root is not None:
        cfg.data.root = str(data_root)
    network.eval()
    return network, cfg, meta


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
        _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(options, indent=1)))


def _check_labels_available(dataset: Any, what: str) -> None:
    if not dataset.has_masks:
        raise DatasetError(
            f"split '{dataset.split}' of '{dataset.root}' has no masks, so no image-level labels; {what} "
            "needs the image labels (use a split with masks)"
        )


# --------------------------------------------------------------------------- validation during training


VAL_KEYS = ("cam", "afa", "seg", "par")


def validation_subset(size: int, limit: int) -> list[int]:
    """Indices of ``limit`` images spread evenly over a split of ``size`` (all when limit <= 0 or >= size):
    a fixed subset that, unlike the first N, samples the whole split (COCO's val list is ordered by id)."""
    if limit <= 0 or limit >= size:
        return list(range(size))
    return [i * size // limit for i in range(limit)]


def _validation_maps(net: nn.Module, image: Tensor, label: Tensor, out_size: Sequence[int],
                     cfg: Config) -> dict[str, Tensor]:
    """The label maps [H0, W0] that :func:`validate` scores, for one image [1, 3, h, w] at its own size."""
    seg = predict_seg(net, image, [1.0], flip=False, out_size=out_size)
    # one multi-scale + flip CAM pass; the affinity of its scale-1 pass, which in eval mode is the plain forward
    probs = _cam_probs(net, image, label, ("cam", "par", "rw"), cfg.cam, cfg.par, cfg.afa, True, out_size,
                       cfg.data.mean, cfg.data.std, affinity_scale=1.0)
    # max(...).indices = argmax(dim=0), faster on CPU
    return {"seg": seg.max(dim=0).indices, "cam": probs["cam"].max(dim=0).indices,
            "afa": probs["rw"].max(dim=0).indices, "par": probs["par"].max(dim=0).indices}


def validate(network: nn.Module, dataset: Any, cfg: Config, device: torch.device | str,
             limit: int = 0) -> dict[str, dict[str, Any]]:
    """Validation mIoUs as the authors measure them, plus our PAR-refined CAM (docs/method.md, "Validation").

    ``dataset``: an eval dataset at the images' own size (``build_dataset(..., train=False,
    long_side=None)``). -> {"cam", "afa", "seg", "par"}: each ``ConfusionMatrix.compute()`` plus
    ``num_images``; with ground-truth image labels, per image at its own size:

    - cam: multi-scale + flip CAMs (``cam.scales``, ``cam.flip``), background score
      ``cam.bg_threshold_eval`` (0.45), no PAR;
    - afa: those CAMs propagated by the random walk with the affinity of the plain (scale 1)
      forward pass on its token grid, background score ``afa.bg_threshold_eval`` (0.35), no PAR;
    - seg: the seg head, one scale, no flip, no CRF;
    - par (ours, not in the authors' logs): the cam probabilities refined by PAR.

    ``limit`` > 0: the fixed subset of :func:`validation_subset` only. The network is put in eval mode and restored;
    under torch.distributed each rank takes every world-th image and the matrices are summed.
    """
    device = torch.device(device)
    rank, world = _dist_info()
    indices = validation_subset(len(dataset), limit)[rank::world]
    names = dataset.class_names
    matrices = {k: ConfusionMatrix(dataset.num_classes, device=device, class_names=names) for k in VAL_KEYS}
    net = _unwrap(network)
    was_training = net.training
    net.eval()
    try:
        loader = _loader(dataset, indices, raw_image=False, num_workers=cfg.data.num_workers)
        for item in tqdm(loader, desc="validation", unit="img", leave=False, disable=rank != 0):
            image = item["image"][None].to(device, non_blocking=True)
            mask = item["mask"].to(device, non_blocking=True)
            label = item["label"].to(device, non_blocking=True)
            with torch.inference_mode(), autocast_context(device, cfg.train.precision):
                maps = _validation_maps(net, image, label, mask.shape, cfg)
            for key, prediction in maps.items():
                matrices[key].update(prediction, mask)
    finally:
        net.train(was_training)
    total = int(_sum_over_ranks([len(indices)], device)[0])
    results = {}
    for key, cm in matrices.items():
        results[key] = cm.reduce_().compute()
        results[key]["num_images"] = total
    return results


# --------------------------------------------------------------------------- pseudo labels


def default_pseudo_label_dir(checkpoint: str | Path, split: str, method: str) -> Path:
    """<the checkpoint's folder>/pseudo_labels/<split>_<method>: next to the run that made them."""
    return Path(checkpoint).resolve().parent / "pseudo_labels" / f"{split}_{method}"


def generate_pseudo_labels(
    checkpoint: str | Path,
    split: str | None = None,
    out_dir: str | Path | None = None,
    method: str = "afa",
    msc: bool = True,
    crf: bool = False,
    save_probs: bool = False,
    evaluate: bool = False,
    data_root: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any] | None:
    """Write pseudo labels of ``split`` as VOC-palette PNGs ``<out_dir>/<name>.png``.

    method: "cam" | "par" | "afa" (see :func:`predict_cam_probs`), from the GT image labels
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
    evaluate=True: the mIoU
    of the written labels (skipped ones included) against the split's masks, summed over
    ranks, is printed (rank 0) and returned; otherwise returns None.
    """
    from wsss.data.datasets import build_dataset
    from wsss.engine.metrics import format_table

    if method not in CAM_METHODS:
        raise WsssError(f"method must be one of {', '.join(CAM_METHODS)}; got '{method}'")
    network, cfg, meta = _load(checkpoint, overrides, data_root)
    split = split or cfg.data.train_split
    with _distributed(cfg.train.device) as (rank, world, device):
        network.to(device)
        dataset = build_dataset(cfg.data, split, train=False, long_side=None)
        _check_labels_available(dataset, f"pseudo labels (method '{method}')")
        out = Path(out_dir) if out_dir is not None else default_pseudo_label_dir(checkpoint, split, method)
        out.mkdir(parents=True, exist_ok=True)
        _check_run_options(out, _run_options(checkpoint, meta, cfg, split, method, msc, crf), rank)

        def done(index: int) -> bool:
            name = dataset.names[index]
            return (out / f"{name}.png").is_file() and (not save_probs or (out / f"{name}.npy").is_file())

        mine = list(range(rank, len(dataset), world))
        todo = [i for i in mine if not done(i)]
        skipped = sorted(set(mine).difference(todo))
        cm = ConfusionMatrix(dataset.num_classes, device=device, class_names=dataset.class_names) if evaluate else None

        def predict(item: dict[str, Any]) -> Tensor:
            image = item["image"][None].to(device, non_blocking=True)
            return predict_cam_probs(network, image, item["label"].to(device), cfg.cam, cfg.par, cfg.afa, method,
                                     msc, item["mask"].shape, cfg.data.mean, cfg.data.std)

        start = time.perf_counter()
        pool = _crf_pool(cfg, crf)
        try:
            with tqdm(total=len(todo), desc=f"pseudo labels ({method})", disable=rank != 0, unit="img") as bar:
                for item, probs in _predictions(dataset, todo, predict, device, cfg.train.precision, pool,
                                                cfg.data.num_workers):
                    label = _to_label(probs)
                    name = item["name"]
                    if save_probs:
                        _save_npy(out / f"{name}.npy", _to_float16(probs))
                    _save_label(out / f"{name}.png", label)  # last: its presence marks the image done
                    if cm is not None:
                        cm.update(label, item["mask"].numpy())
                    bar.update(1)
        finally:
            if pool is not None:
                pool.close()
        elapsed = time.perf_counter() - start
        if cm is not None:
            from wsss.data.io import read_label_png

            for index in skipped:
                cm.update(read_label_png(out / f"{dataset.names[index]}.png"), dataset.load_mask(index))
        written, skipped_total, seconds = _sum_over_ranks([len(todo), len(skipped), elapsed], device)
        barrier()
        if rank == 0:
            rate = written / max(elapsed, 1e-9)
            print(f"wrote {int(written)} pseudo labels to {out} ({int(skipped_total)} already there, skipped) "
                  f"in {elapsed:.1f} s: {rate:.2f} images/s" + (f" over {world} processes" if world > 1 else ""))
        if cm is None:
            return None
        result = cm.reduce_().compute()
        result.update({"num_images": len(dataset), "split": split, "method": method, "msc": msc, "crf": crf,
                       "out_dir": str(out)})
        if rank == 0:
            print(format_table(result))
        return result


# --------------------------------------------------------------------------- checkpoint evaluation


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str = "val",
    target: str = "seg",
    msc: bool = False,
    crf: bool = False,
    save_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any] | None:
    """Score a checkpoint on ``split`` with the test protocol (docs/method.md sec. 10).

    Images are resized so the long side is ``eval.long_side``. target "seg": seg head,
    with ``eval.scales`` + flip when ``msc`` (else one scale, no flip); "cam" / "afa":
    :func:`predict_cam_probs` (``cam.scales`` + flip when ``msc``) with the GT image labels.
    Probabilities are resized to the original size; ``crf``: DenseCRF (``eval.crf_*``).
    -> ``ConfusionMatrix.compute()`` dict plus ``num_images``, ``split``, ``target``, ``msc``,
    ``crf`` (summed over torchrun ranks), for the caller's ``format_table``.
    ``save_dir``: also write the predicted label PNGs there; for a split without masks
    (VOC ``test``) they go to the evaluation-server layout
    ``<save_dir>/results/VOC2012/Segmentation/comp6_test_cls/<name>.png`` and None is returned.
    """
    from wsss.data.datasets import build_dataset

    if target not in EVAL_TARGETS:
        raise WsssError(f"target must be one of {', '.join(EVAL_TARGETS)}; got '{target}'")
    network, cfg, _ = _load(checkpoint, overrides, data_root)
    with _distributed(cfg.train.device) as (rank, world, device):
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

        def predict(item: dict[str, Any]) -> Tensor:
            image = item["image"][None].to(device, non_blocking=True)
            out_size = tuple(int(v) for v in item["size"])
            if target == "seg":
                scales = cfg.eval.scales if msc else [1.0]
                return predict_seg(network, image, scales, flip=cfg.eval.flip and msc, out_size=out_size)
            return predict_cam_probs(network, image, item["label"].to(device), cfg.cam, cfg.par, cfg.afa,
                                     target, msc, out_size, cfg.data.mean, cfg.data.std)

        indices = list(range(rank, len(dataset), world))
        cm = ConfusionMatrix(dataset.num_classes, device=device, class_names=dataset.class_names)
        start = time.perf_counter()
        pool = _crf_pool(cfg, crf)
        try:
            desc = f"eval {target}{' msc' if msc else ''}{' crf' if crf else ''}"
            with tqdm(total=len(indices), desc=desc, disable=rank != 0, unit="img") as bar:
                for item, probs in _predictions(dataset, indices, predict, device, cfg.train.precision, pool,
                                                cfg.data.num_workers):
                    if isinstance(probs, Tensor) and save is None:
                        cm.update(probs.max(dim=0).indices, item["mask"].to(device))  # = argmax, on the device
                    else:
                        label = _to_label(probs)
                        if save is not None:
                            _save_label(save / f"{item['name']}.png", label)
                        if has_gt:
                            cm.update(label, item["mask"].numpy())
                    bar.update(1)
        finally:
            if pool is not None:
                pool.close()
        elapsed = time.perf_counter() - start
        barrier()
        if rank == 0:
            where = f"; predictions in {save}" if save is not None else ""
            logger.info("evaluated %d images in %.1f s%s", len(dataset), elapsed, where)
        if not has_gt:
            if rank == 0:
                print(f"wrote {len(dataset)} predictions of split '{split}' to {save} (no ground truth to score)")
            return None
        result = cm.reduce_().compute()
        result.update({"num_images": len(dataset), "split": split, "target": target, "msc": msc, "crf": crf})
        return result


__all__ = [
    "autocast_context", "default_pseudo_label_dir", "evaluate_checkpoint", "generate_pseudo_labels",
    "predict_cam_probs", "predict_seg", "validate",
]
