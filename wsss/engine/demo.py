"""``wsss demo``: the whole method on the embedded digits dataset, from scratch on a CPU.

    run_demo("work_dirs/demo", "data/demo")

1. builds the demo dataset in ``data_dir`` unless one is there (``wsss.data.demo``);
2. trains ``configs/demo.yaml`` (``data.root`` = data_dir, ``train.work_dir`` = work_dir), in bf16
   where the device runs it natively (``native_bf16``), else fp32, unless train.precision is given;
3. writes CAM, PAR-refined and AFA-propagated pseudo labels of the training split and scores
   them against its masks; scores the segmentation head on the val split;
4. prints one table: those mIoUs beside two trivial predictions on the same split --
   everything background, and the TRUE foreground mask painted with one randomly chosen
   present class per image (seeded) -- plus the classifier's F1 on val.

The second baseline knows the exact object shapes and the image's classes, and only has
to tell the digits of a two-digit image apart; a method above it localises and
classifies better than perfect shapes with a coin-flip class.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss.config import Config, load_config
from wsss.engine.metrics import ConfusionMatrix, ImageScores
from wsss.errors import WsssError
from wsss.models.weights import RANDOM_INIT

logger = logging.getLogger(__name__)

BASELINE_SEED = 0
DEMO_CONFIGS = {"afa": "demo", "toco": "demo-toco"}  # the demo's method -> its config
CLASSIFIER_THRESHOLD = 0.5  # on the sigmoid of the image-level logits


def baseline_mious(cfg: Config, split: str, seed: int = BASELINE_SEED) -> dict[str, float]:
    """mIoU of "all background" and "true foreground, one random present class per image" on ``split``."""
    from wsss.data.datasets import build_dataset

    dataset = build_dataset(cfg.data, split, train=False, long_side=None)
    rng = np.random.default_rng(seed)
    ignore = cfg.data.ignore_index
    background = ConfusionMatrix(dataset.num_classes, ignore_index=ignore)
    random_class = ConfusionMatrix(dataset.num_classes, ignore_index=ignore)
    for i in range(len(dataset)):
        mask = dataset.load_mask(i).astype(np.int64)
        background.update(np.zeros_like(mask), mask)
        foreground = (mask != 0) & (mask != ignore)
        present = np.unique(mask[foreground])
        pred = np.zeros_like(mask)
        if len(present):
            pred[foreground] = rng.choice(present)
        random_class.update(pred, mask)
    return {"all_background": background.compute()["miou"], "random_class": random_class.compute()["miou"]}


def classifier_f1(checkpoint: str | Path, cfg: Config, split: str) -> dict[str, Any]:
    """Image-level scores on ``split`` (sigmoid > 0.5; :class:`wsss.engine.metrics.ImageScores`): "macro_f1"
    (mean of per-class F1), "micro_f1", "per_class_f1", "loss" (the classification loss)."""
    from wsss.data.datasets import build_dataset
    from wsss.engine.checkpoint import load_network

    network, _, _ = load_network(checkpoint, "cpu")
    dataset = build_dataset(cfg.data, split, train=False, long_side=cfg.eval.long_side)
    scores = ImageScores(dataset.num_classes - 1, threshold=CLASSIFIER_THRESHOLD)
    with torch.inference_mode():
        for i in range(len(dataset)):
            item = dataset[i]
            scores.update(network(item["image"][None], with_seg=False, with_affinity=False).cls_logits,
                          item["label"])
    result = scores.compute()
    return {k: result[k] for k in ("macro_f1", "micro_f1", "per_class_f1", "loss")}


def native_bf16(device: str) -> bool:
    """Whether ``device`` ("auto" | "cpu" | "cuda[:N]") runs bf16 natively, i.e. faster than fp32.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: oneDNN's bf16 support (AVX-512 BF16 or AMX);
    without it bf16 autocast is emulated and several times slower than fp32.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _weights_text(pretrained: str) -> str:
    """model.pretrained ("none" | "hub" | a file) -> how the header names the starting weights."""
    if pretrained == RANDOM_INIT:
        return "from scratch"
    return "from hub weights" if pretrained == "hub" else f"from weights '{pretrained}'"


def format_demo_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = result["baselines"]
    f1 = result["classifier"]
    times = result["seconds"]
    head = f"{'':<40}{'mIoU %':>9}{'all bg':>9}{'true fg + random class':>24}"
    lines = [
        f"wsss demo{' (ToCo)' if result.get('method') == 'toco' else ''}: {result['backbone']} "
        f"{_weights_text(result.get('pretrained', RANDOM_INIT))}, "
        f"{result['iterations']} iterations, {result['precision']}; "
        f"{times['total']:.0f} s (train {times['train']:.0f} s, pseudo labels {times['pseudo_labels']:.0f} s, "
        f"evaluation {times['evaluation']:.0f} s)",
        head, "-" * len(head),
        f"pseudo labels on '{result['train_split']}' ({result['train_images']} images)",
    ]
    names = {"cam": "CAM", "par": "PAR-refined CAM", "afa": "AFA (random walk + PAR)"}
    for method in (m for m in ("cam", "par", "afa") if m in rows):
        lines.append(f"  {names[method]:<38}{_fmt(rows[method]):>9}{_fmt(base['train']['all_background']):>9}"
                     f"{_fmt(base['train']['random_class']):>24}")
    lines.append(f"segmentation head on '{result['val_split']}' ({result['val_images']} images)")
    lines.append(f"  {'seg head (single scale, no CRF)':<38}{_fmt(rows['seg']):>9}"
                 f"{_fmt(base['val']['all_background']):>9}{_fmt(base['val']['random_class']):>24}")
    lines.append("-" * len(head))
    lines.append(f"classifier on '{result['val_split']}': macro F1 {f1['macro_f1']:.3f} (mean of per-class F1; "
                 f"micro F1 {f1['micro_f1']:.3f}), sigmoid > {CLASSIFIER_THRESHOLD}")
    lines.append(f"outputs: {result['work_dir']}")
    return "\n".join(lines)


def run_demo(
    work_dir: str | Path = "work_dirs/demo",
    data_dir: str | Path = "data/demo",
    pretrained: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    method: str = "afa",
) -> dict[str, Any]:
    """Build data (if missing), train, pseudo-label, evaluate -> results (``format_demo_table`` prints them).

    ``method``: "afa" (configs/demo.yaml) or "toco" (configs/demo-toco.yaml: no AFA row, ToCo has no affinity).
    """
    from wsss.data.demo import build_demo_dataset
    from wsss.engine.checkpoint import LAST_NAME
    from wsss.engine.inference import evaluate_checkpoint, generate_pseudo_labels
    from wsss.engine.trainer import train

    start = time.perf_counter()
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    if not (data_dir / "classes.txt").is_file():
        logger.info("building the demo dataset in %s ...", data_dir)
        build_demo_dataset(data_dir)
    extra = [f"data.root={data_dir}", f"train.work_dir={work_dir}"]
    if pretrained:  # the demo's conv stem is for training from scratch: weights hold the published patch embedding
        extra += ["model.conv_stem=0", f"model.pretrained={pretrained}"]
    if method not in DEMO_CONFIGS:
        raise WsssError(f"the demo's method must be one of {', '.join(DEMO_CONFIGS)}, got {method!r}")
    cfg = load_config(DEMO_CONFIGS[method], extra + list(overrides))
    if not any(o.strip().startswith("train.precision=") for o in overrides):
        cfg.train.precision = "bf16" if native_bf16(cfg.train.device) else "fp32"  # bf16 where it is faster

    resume = None
    if (work_dir / LAST_NAME).is_file():  # a demo run is there: continue it (a finished one only re-scores)
        logger.info("continuing the demo run in %s (delete it to start over)", work_dir)
        resume = "auto"
    summary = train(cfg, resume=resume)
    trained = time.perf_counter()
    checkpoint = Path(summary["last_checkpoint"])
    rows: dict[str, float] = {}
    for target in ("cam", "par", "afa") if cfg.model.method == "afa" else ("cam", "par"):
        out_dir = work_dir / "pseudo_labels" / f"{cfg.data.train_split}_{target}"
        result = generate_pseudo_labels(checkpoint, split=cfg.data.train_split, out_dir=out_dir, method=target,
                                        msc=True, evaluate=True)
        rows[target] = result["miou"]
        train_images = result["num_images"]
    labelled = time.perf_counter()
    seg = evaluate_checkpoint(checkpoint, split=cfg.data.val_split, target="seg")
    rows["seg"] = seg["miou"]
    classifier = classifier_f1(checkpoint, cfg, cfg.data.val_split)
    baselines = {"train": baseline_mious(cfg, cfg.data.train_split), "val": baseline_mious(cfg, cfg.data.val_split)}
    done = time.perf_counter()
    result = {
        "rows": rows, "baselines": baselines, "classifier": classifier, "work_dir": str(work_dir),
        "method": cfg.model.method, "backbone": cfg.model.backbone, "pretrained": cfg.model.pretrained,
        "precision": cfg.train.precision,
        "iterations": summary["iteration"],
        "train_split": cfg.data.train_split, "val_split": cfg.data.val_split, "train_images": train_images,
        "val_images": seg.get("num_images"), "checkpoint": str(checkpoint),
        "seconds": {"total": done - start, "train": trained - start, "pseudo_labels": labelled - trained,
                    "evaluation": done - labelled},
    }
    return result


__all__ = ["baseline_mious", "classifier_f1", "format_demo_table", "native_bf16", "run_demo"]
