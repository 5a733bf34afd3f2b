"""The official AFA code against ours, side by side: one training iteration by phase, memory, PAR, equivalence.

    python3 bench/vs_official.py --official-dir /tmp/afa_official            # CPU, fp32, 2 threads
    python3 bench/vs_official.py --official-dir /tmp/afa_official --iters 9 --warmup 2 --threads 4
    python3 bench/vs_official.py --official-dir /tmp/afa_official --iters 1 --warmup 0 --par-repeats 1 --threads 1

``--official-dir`` is a checkout of https://github.com/rulixiang/afa (not vendored, not a dependency: its
modules are imported from there at run time). What the official side imports but cannot or need not load
here is stubbed in ``bench/official_stubs/`` (mmcv's ConvModule; imageio, matplotlib, pydensecrf only where
they are missing), a folder put on ``sys.path`` only in the official side's process.

Both sides run in their own child process (``--child``), set up once and driven by this process over a pipe:

- Set-up. The official side builds ``WeTr`` (``wetr/model_attn_aff.py``: MiT-B1, stride [4, 2, 2, 1], 21
  classes, embedding 256, ``gmp`` pooling, no pretrained weights) after ``torch.manual_seed(--seed)``, the PAR
  module, the ``PolyWarmupAdamW`` with the four parameter groups, and the random-walk masks as
  ``scripts/dist_train_voc.py`` does, with the values of ``configs/voc_attn_reg.yaml`` and of the script's
  argument defaults (read from the files). It writes its initial state dict and the batch to a temporary
  folder. Ours builds the network of ``load_config("voc", ...)`` (MiT-B1, ``model.pretrained=none``, crop
  320, batch 2) and loads the official weights through ``map_official_state_dict`` (every official tensor
  to exactly one of ours, nothing left over on either side). The batch (``_common.synthetic_batch``): 2
  random 8-bit images of 320 x 320, normalized, the last 40 columns padding (``valid_box``), 1 and 2 of 20
  classes; pixels whose official uint8 round trip (``denormalize_img``) would truncate to the value below
  are nudged up by one ulp, so both sides de-normalize to the same 8-bit image.
- Equivalence: one iteration each on those inputs with drop-path and the seg head's dropout set to 0 on both
  sides (the official multi-scale CAM runs in train mode; ours then reuses the training pass's scale-1 CAMs,
  exact without drop-path): CAMs, seg logits, losses within float tolerance; the PAR-refined CAM label, the
  AFA (random walk + PAR) label and the affinity label compared pixel by pixel. Twice: with the recipe's
  background scores, and with ``LOW_THRESHOLDS`` on both sides, whose labels have plenty of foreground where
  the recipe's leave almost none on a random-init network.
- Timing: ``--warmup`` + ``--iters`` iterations per side, interleaved (official, ours, ours, official, ...),
  medians. Official: the body of the script's training loop, phase by phase, calling its functions
  (``multi_scale_cam_with_aff_mat``, ``cam_to_label``, ``propagte_aff_cam_with_bkg``,
  ``refine_cams_with_cls_label``, ``refine_cams_with_bkg_v2``, ``cams_to_affinity_label``, ``get_aff_loss``,
  the script's ``get_seg_loss``), at an iteration past 6000 (the AFA label is the seg target); the logging
  every 200 iterations and the data loading are left out. Ours: ``wsss.engine.trainer.train_step`` with a
  ``PhaseTimer``, as ``bench/train_step.py`` drives it, at ``max(afa_label_iter, cam_iters)``. Both with the
  drop-path (0.1) and dropout (0.1) of their recipes, fp32, CPU. Every iteration starts from the initial
  weights (restored outside the timing): the same iteration each time, and a non-finite official loss (its
  seg loss is NaN when the seg target has no foreground pixel) cannot leave NaN weights behind. Host memory:
  ours keeps freed memory for reuse (``train.keep_host_memory``, on by default, as in training); the official
  side runs with glibc's defaults, as it ships, or with the same setting (``--official-allocator kept``).
- Memory: each child's RSS right after set-up (imports, network, optimizer, batch) and its peak RSS at the
  end (``ru_maxrss``), and the growth over the set-up.
- PAR alone: the official ``PAR`` module (input images halved as in ``refine_cams_with_bkg_v2``) against
  ``wsss.method.par`` (``scaled_par_kernel`` + ``apply_par_kernel``) on 2 x 21 x 160 x 160 masks and
  2 x 3 x 320 x 320 images, the official settings, interleaved, median of ``--par-repeats``.

Ratios: time official / ours (above 1: ours is faster), memory ours / official (below 1: ours uses less).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

HERE = Path(__file__).resolve().parent
STUBS = HERE / "official_stubs"
# Files of the official repository this benchmark imports or reads.
OFFICIAL_FILES = ("wetr/model_attn_aff.py", "wetr/mix_transformer.py", "wetr/segformer_head.py", "wetr/PAR.py",
                  "utils/camutils.py", "utils/imutils.py", "utils/losses.py", "utils/optimizer.py",
                  "scripts/dist_train_voc.py", "configs/voc_attn_reg.yaml")
SCRIPT = "scripts/dist_train_voc.py"
CONFIG = "configs/voc_attn_reg.yaml"
# Literals of the official script's training loop (checked against the script's text at set-up).
# The second equivalence check's background scores (both sides): on a random-init network the recipe's
# (0.55 / 0.35) leave almost no foreground in the labels (PAR label 0.4 %, AFA label 0 %); these leave mostly
# foreground (PAR label 68.6 % foreground, 0.7 % background; AFA label 82.2 % foreground).
LOW_THRESHOLDS = (0.3, 0.2)
AFA_LABEL_AFTER = 6000  # `if n_iter <= 6000: refined_aff_label = refined_pseudo_label`
LOSS_WEIGHTS = (1.0, 0.1, 0.1)  # `loss = 1.0 * cls_loss + 0.1 * seg_loss + 0.1 * aff_loss` after cam_iters
EMBEDDING_DIM = 256  # `WeTr(..., embedding_dim=256, ...)`
NUM_CLASSES = 21
PHASES = ("forward", "multiscale_cam", "pseudo_label_par", "affinity_random_walk", "losses", "backward",
          "optimizer")
PHASE_TITLES = {
    "forward": "training forward", "multiscale_cam": "multi-scale CAM", "pseudo_label_par": "pseudo labels + PAR",
    "affinity_random_walk": "affinity + random walk", "losses": "(losses)", "backward": "backward",
    "optimizer": "optimizer",
}
CAM_ATOL = 1e-4  # CAMs in [0, 1]
LOGIT_ATOL = 1e-3
LOSS_RTOL = 1e-4


class OfficialCodeMissing(Exception):
    pass


def check_official_dir(path: Path) -> None:
    missing = [f for f in OFFICIAL_FILES if not (path / f).is_file()]
    if missing:
        raise OfficialCodeMissing(f"--official-dir {path} does not hold the official AFA code (no {missing[0]}); "
                                  "point it at a checkout of https://github.com/rulixiang/afa")


# --------------------------------------------------------------------------- weight mapping (ours <- official)

# (official name pattern, our name template): the official WeTr -> wsss AFANetwork.
WEIGHT_RULES: tuple[tuple[str, str], ...] = (
    (r"encoder\.(.+)", r"backbone.\1"),  # the MiT: official module names on both sides
    (r"classifier\.weight", "classifier.classifier.weight"),
    (r"attn_proj\.(weight|bias)", r"affinity_head.proj.\1"),
    (r"decoder\.linear_c([1-4])\.proj\.(weight|bias)", "seg_head.linear_c.{stage}.\\2"),  # Linear -> 1x1 conv
    (r"decoder\.linear_fuse\.conv\.weight", "seg_head.linear_fuse.0.weight"),  # mmcv ConvModule: conv, bn, ReLU
    (r"decoder\.linear_fuse\.bn\.(.+)", r"seg_head.linear_fuse.1.\1"),
    (r"decoder\.linear_pred\.(weight|bias)", r"seg_head.linear_pred.\1"),
)


def map_official_state_dict(official: dict[str, Any], ours: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The official ``WeTr`` state dict -> ours (names of ``ours``), and how many tensors were reshaped.

    Every official parameter and buffer must match exactly one rule of ``WEIGHT_RULES`` and land on a
    distinct name of ours with the same number of elements (the SegFormer head's Linear weights [out, in]
    become our 1x1 conv weights [out, in, 1, 1]; every other shape must be equal), and every tensor of ours
    must be covered: anything left over on either side raises ValueError, listing it.
    """
    mapped: dict[str, Any] = {}
    problems: list[str] = []
    reshaped = 0
    for name, tensor in official.items():
        targets = []
        for pattern, template in WEIGHT_RULES:
            m = re.fullmatch(pattern, name)
            if m:
                template = template.replace("{stage}", str(int(m[1]) - 1)) if "{stage}" in template else template
                targets.append(m.expand(template))
        if len(targets) != 1:
            problems.append(f"official {name}: {len(targets)} rules match")
            continue
        target = targets[0]
        if target not in ours:
            problems.append(f"official {name} -> {target}: no such tensor of ours")
        elif target in mapped:
            problems.append(f"official {name} -> {target}: mapped twice")
        elif tuple(tensor.shape) != tuple(ours[target].shape):
            if tensor.numel() != ours[target].numel() or tensor.dim() != 2 or tuple(ours[target].shape[2:]) != (1, 1):
                problems.append(f"official {name} {tuple(tensor.shape)} -> {target} {tuple(ours[target].shape)}")
            else:
                mapped[target] = tensor.reshape(ours[target].shape)
                reshaped += 1
        else:
            mapped[target] = tensor
    problems += [f"ours {name}: no official tensor" for name in ours if name not in mapped]
    if problems:
        raise ValueError("weight mapping incomplete:\n  " + "\n  ".join(problems))
    return mapped, reshaped


# --------------------------------------------------------------------------- reading the official files


def _official_script_values(official_dir: Path) -> dict[str, Any]:
    """From the official script: its argparse defaults ({"radius": 8, ...}), the PAR(...) keywords, and the
    functions ``get_mask_by_radius`` / ``get_seg_loss`` (compiled from its source, not imported: importing the
    script needs omegaconf, tensorboard and its datasets module)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    path = official_dir / SCRIPT
    source = path.read_text()
    tree = ast.parse(source)
    values: dict[str, Any] = {"defaults": {}, "par": {}, "functions": {}}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            flag = ast.literal_eval(node.args[0]) if node.args else ""
            for kw in node.keywords:
                if kw.arg == "default":
                    values["defaults"][flag.lstrip("-")] = ast.literal_eval(kw.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "PAR":
            values["par"] = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    namespace: dict[str, Any] = {"np": np, "torch": torch, "F": F}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("get_mask_by_radius", "get_seg_loss"):
            module = ast.Module(body=[node], type_ignores=[])
            exec(compile(module, str(path), "exec"), namespace)  # noqa: S102  (the official function, from its file)
            values["functions"][node.name] = namespace[node.name]
    compact = source.replace(" ", "")
    for literal in (f"ifn_iter<={AFA_LABEL_AFTER}:", "loss=1.0*cls_loss+0.1*seg_loss+0.1*aff_loss",
                    f"embedding_dim={EMBEDDING_DIM}"):
        if literal not in compact:
            raise OfficialCodeMissing(f"{path}: expected `{literal}` in the training loop; the script changed")
    missing = {"radius", "crop_size", "high_thre", "low_thre", "pooling"} - set(values["defaults"])
    if missing or set(values["par"]) != {"num_iter", "dilations"} or len(values["functions"]) != 2:
        raise OfficialCodeMissing(f"{path}: could not read {sorted(missing) or 'PAR(...) / its functions'}")
    return values


def _load_yaml(path: Path) -> Any:
    """YAML as OmegaConf (the official code's loader) reads it: also ``6e-5`` / ``1e-6`` are floats (plain
    PyYAML, YAML 1.1, takes a float without a dot for a string)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    float_re = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                              |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                              |\.[0-9_]+(?:[eE][-+][0-9]+)?
                              |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.VERBOSE)
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_re, list("-+0123456789."))
    return yaml.load(path.read_text(), Loader=Loader)  # a SafeLoader subclass


def _namespace(value: Any) -> Any:
    """A YAML mapping -> nested SimpleNamespace (the attribute access the official code uses on its config)."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


# --------------------------------------------------------------------------- the two sides (child processes)


class StochasticDepth:
    """The drop-path probabilities (timm ``DropPath``) and dropout rates (``Dropout2d``) of a network: recorded
    at set-up (the recipe's), set to 0 for the equivalence check, then restored."""

    def __init__(self, network: Any, seg_head: Any) -> None:
        from timm.layers import DropPath
        from torch import nn

        self.recipe = [(m, "drop_prob", m.drop_prob) for m in network.modules() if isinstance(m, DropPath)]
        self.recipe += [(m, "p", m.p) for m in seg_head.modules() if isinstance(m, nn.Dropout2d)]

    def rates(self) -> tuple[float, float]:
        """(largest drop-path probability, largest dropout rate) of the recipe."""
        drop_path = [v for _, attr, v in self.recipe if attr == "drop_prob"]
        dropout = [v for _, attr, v in self.recipe if attr == "p"]
        return round(max(drop_path, default=0.0), 6), round(max(dropout, default=0.0), 6)

    def set(self, deterministic: bool) -> None:
        for module, attr, value in self.recipe:
            setattr(module, attr, 0.0 if deterministic else value)


class OfficialSide:
    """The official network, PAR, optimizer and training-loop body (``scripts/dist_train_voc.py``)."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        official_dir = Path(args.official_dir).resolve()
        sys.path[:0] = [str(STUBS), str(official_dir)]  # the mmcv stub first, then the official packages
        sys.path.append(str(STUBS / "fallback"))  # only where the real package is missing
        import numpy as np
        import torch
        from _common import exact_uint8_round_trip, synthetic_batch
        from utils import camutils, imutils, losses
        from utils.optimizer import PolyWarmupAdamW
        from wetr.model_attn_aff import WeTr
        from wetr.PAR import PAR

        self.torch, self.np, self.camutils, self.imutils, self.losses = torch, np, camutils, imutils, losses
        script = _official_script_values(official_dir)
        self.get_seg_loss = script["functions"]["get_seg_loss"]
        defaults = script["defaults"]
        cfg = _namespace(_load_yaml(official_dir / CONFIG))
        # the script's overrides of the config by its arguments (their defaults)
        cfg.dataset.crop_size = defaults["crop_size"]
        cfg.cam.high_thre, cfg.cam.low_thre = defaults["high_thre"], defaults["low_thre"]
        self.cfg, self.radius = cfg, defaults["radius"]
        if cfg.dataset.num_classes != NUM_CLASSES:
            raise OfficialCodeMissing(f"{CONFIG}: num_classes {cfg.dataset.num_classes}, expected {NUM_CLASSES}")

        torch.manual_seed(args.seed)
        self.wetr = WeTr(backbone=cfg.backbone.config, stride=cfg.backbone.stride, num_classes=NUM_CLASSES,
                         embedding_dim=EMBEDDING_DIM, pretrained=False, pooling=defaults["pooling"])
        self.wetr.train()
        param_groups = self.wetr.get_param_groups()
        self.par = PAR(**script["par"])
        opt = cfg.optimizer
        self.optimizer = PolyWarmupAdamW(
            params=[
                {"params": param_groups[0], "lr": opt.learning_rate, "weight_decay": opt.weight_decay},
                {"params": param_groups[1], "lr": 0.0, "weight_decay": 0.0},
                {"params": param_groups[2], "lr": opt.learning_rate * 10, "weight_decay": opt.weight_decay},
                {"params": param_groups[3], "lr": opt.learning_rate * 10, "weight_decay": opt.weight_decay},
            ],
            lr=opt.learning_rate, weight_decay=opt.weight_decay, betas=opt.betas,
            warmup_iter=cfg.scheduler.warmup_iter, max_iter=cfg.train.max_iters,
            warmup_ratio=cfg.scheduler.warmup_ratio, power=cfg.scheduler.power,
        )
        crop = cfg.dataset.crop_size
        self.infer_size = int((crop * max(cfg.cam.scales)) // 16)
        get_mask_by_radius = script["functions"]["get_mask_by_radius"]
        self.attn_mask = get_mask_by_radius(h=crop // 16, w=crop // 16, radius=self.radius)
        self.attn_mask_infer = get_mask_by_radius(h=self.infer_size, w=self.infer_size, radius=self.radius)
        self.n_iter = max(AFA_LABEL_AFTER, cfg.train.cam_iters) + 1  # every phase runs, the AFA label is the target

        generator = torch.Generator().manual_seed(args.seed)
        batch = synthetic_batch(args.batch, crop, NUM_CLASSES - 1, generator, (0.485, 0.456, 0.406),
                                (0.229, 0.224, 0.225))
        batch["image"] = exact_uint8_round_trip(batch["image"], self.imutils.denormalize_img)
        self.inputs, self.cls_labels, self.img_box = batch["image"], batch["label"], batch["valid_box"]
        self.bkg_cls = torch.ones(size=(args.batch, 1))
        torch.save(batch, workdir / "batch.pt")
        self.init_path = workdir / "official_init.pt"
        torch.save(self.wetr.state_dict(), self.init_path)
        self.depth = StochasticDepth(self.wetr, self.wetr.decoder)  # (WeTr.dropout is unused)
        self.info = {
            "crop": crop, "batch": args.batch, "cam scales": list(cfg.cam.scales),
            "bg threshold high / low": [cfg.cam.high_thre, cfg.cam.low_thre], "random-walk radius": self.radius,
            "PAR dilations": list(self.par.dilations), "PAR iterations": self.par.num_iter,
            "PAR w1 / w2": [self.par.w1, self.par.w2], "lr": opt.learning_rate, "weight decay": opt.weight_decay,
            "betas": list(opt.betas), "warm-up iters / ratio": [cfg.scheduler.warmup_iter, cfg.scheduler.warmup_ratio],
            "iterations": cfg.train.max_iters, "cls-only iterations": f"n_iter <= {cfg.train.cam_iters}",
            "AFA label as seg target": f"n_iter > {AFA_LABEL_AFTER}", "loss weights cls / seg / aff": list(LOSS_WEIGHTS),
            "drop-path / seg dropout": list(self.depth.rates()), "CAM pooling": defaults["pooling"],
            "iteration timed": self.n_iter,
            "parameters": sum(p.numel() for p in self.wetr.parameters()),
        }

    def set_thresholds(self, high: float, low: float) -> None:
        """The two background scores (the script's --high_thre / --low_thre) of the next iterations."""
        self.cfg.cam.high_thre, self.cfg.cam.low_thre = high, low

    def step(self, timer: Any, capture: bool = False) -> dict[str, Any]:
        """The body of the official training loop (``for n_iter in range(cfg.train.max_iters)``), by phase."""
        torch, cu, cfg = self.torch, self.camutils, self.cfg
        f = torch.nn.functional
        inputs, cls_labels, img_box, n_iter = self.inputs, self.cls_labels, self.img_box, self.n_iter
        inputs_denorm = self.imutils.denormalize_img2(inputs.clone())

        with timer.phase("forward"):
            cls, segs, attns, attn_pred = self.wetr(inputs, seg_detach=False)
        with timer.phase("multiscale_cam"):
            cams, aff_mat = cu.multi_scale_cam_with_aff_mat(self.wetr, inputs=inputs, scales=cfg.cam.scales)
        with timer.phase("pseudo_label_par"):
            valid_cam, pseudo_label = cu.cam_to_label(cams.detach(), cls_label=cls_labels, img_box=img_box,
                                                      ignore_mid=True, cfg=cfg)
        with timer.phase("affinity_random_walk"):
            valid_cam_resized = f.interpolate(valid_cam, size=(self.infer_size, self.infer_size), mode="bilinear",
                                              align_corners=False)
            aff_cam_l = cu.propagte_aff_cam_with_bkg(valid_cam_resized, aff=aff_mat.detach().clone(),
                                                     mask=self.attn_mask_infer, cls_labels=cls_labels,
                                                     bkg_score=cfg.cam.low_thre)
            aff_cam_l = f.interpolate(aff_cam_l, size=pseudo_label.shape[1:], mode="bilinear", align_corners=False)
            aff_cam_h = cu.propagte_aff_cam_with_bkg(valid_cam_resized, aff=aff_mat.detach().clone(),
                                                     mask=self.attn_mask_infer, cls_labels=cls_labels,
                                                     bkg_score=cfg.cam.high_thre)
            aff_cam_h = f.interpolate(aff_cam_h, size=pseudo_label.shape[1:], mode="bilinear", align_corners=False)
            bkg_cls = self.bkg_cls.to(cams.device)
            _cls_labels = torch.cat((bkg_cls, cls_labels), dim=1)
        with timer.phase("pseudo_label_par"):
            refined_aff_cam_l = cu.refine_cams_with_cls_label(self.par, inputs_denorm, cams=aff_cam_l,
                                                              labels=_cls_labels, img_box=img_box)
            refined_aff_label_l = refined_aff_cam_l.argmax(dim=1)
            refined_aff_cam_h = cu.refine_cams_with_cls_label(self.par, inputs_denorm, cams=aff_cam_h,
                                                              labels=_cls_labels, img_box=img_box)
            refined_aff_label_h = refined_aff_cam_h.argmax(dim=1)
            refined_aff_label = refined_aff_label_h.clone()
            refined_aff_label[refined_aff_label_h == 0] = cfg.dataset.ignore_index
            refined_aff_label[(refined_aff_label_h + refined_aff_label_l) == 0] = 0
            refined_aff_label = cu.ignore_img_box(refined_aff_label, img_box=img_box,
                                                  ignore_index=cfg.dataset.ignore_index)
            refined_pseudo_label = cu.refine_cams_with_bkg_v2(self.par, inputs_denorm, cams=cams,
                                                              cls_labels=cls_labels, cfg=cfg, img_box=img_box)
        with timer.phase("affinity_random_walk"):
            aff_label = cu.cams_to_affinity_label(refined_pseudo_label, mask=self.attn_mask,
                                                  ignore_index=cfg.dataset.ignore_index)
        afa_label = refined_aff_label
        with timer.phase("losses"):
            aff_loss, pos_count, neg_count = self.losses.get_aff_loss(attn_pred, aff_label)
            seg_logits = segs
            segs = f.interpolate(segs, size=refined_pseudo_label.shape[1:], mode="bilinear", align_corners=False)
            if n_iter <= AFA_LABEL_AFTER:
                refined_aff_label = refined_pseudo_label
            seg_loss = self.get_seg_loss(segs, refined_aff_label.type(torch.long),
                                         ignore_index=cfg.dataset.ignore_index)
            cls_loss = f.multilabel_soft_margin_loss(cls, cls_labels)
            w_cls, w_seg, w_aff = LOSS_WEIGHTS
            if n_iter <= cfg.train.cam_iters:
                loss = 1.0 * cls_loss + 0.0 * seg_loss + 0.0 * aff_loss
            else:
                loss = w_cls * cls_loss + w_seg * seg_loss + w_aff * aff_loss
            logged = {"cls_loss": cls_loss.item(), "seg_loss": seg_loss.item(), "aff_loss": aff_loss.item()}
        with timer.phase("optimizer"):
            self.optimizer.zero_grad()
        with timer.phase("backward"):
            loss.backward()
        with timer.phase("optimizer"):
            self.optimizer.step()
        del attns, pos_count, neg_count
        self.last_loss = loss.item()
        if not capture:
            return {}
        seg_par = self.get_seg_loss(segs, refined_pseudo_label.type(torch.long), ignore_index=cfg.dataset.ignore_index)
        return {
            "cams": valid_cam.detach(), "label": refined_pseudo_label.long(), "afa_label": afa_label.long(),
            "aff_label": aff_label, "seg_logits": seg_logits.detach(),
            "losses": {"cls": logged["cls_loss"], "seg": logged["seg_loss"], "aff": logged["aff_loss"],
                       "total": self.last_loss, "seg, PAR-label target": seg_par.item()},
        }

    def restore(self) -> None:
        """The initial weights and BatchNorm statistics again (outside the timing)."""
        self.wetr.load_state_dict(self.torch.load(self.init_path, mmap=True))

    def par_inputs(self, seed: int) -> tuple[Any, Any]:
        return _par_inputs(self.torch, seed)

    def par_run(self, images01: Any, masks: Any) -> Any:
        """PAR as ``refine_cams_with_bkg_v2`` calls it: images halved (bilinear), then the module."""
        torch = self.torch
        h, w = images01.shape[-2:]
        with torch.no_grad():
            small = torch.nn.functional.interpolate(images01, size=[h // 2, w // 2], mode="bilinear",
                                                    align_corners=False)
            return self.par(small, masks)


class OursSide:
    """Our network (official weights), optimizer and ``train_step``, as ``bench/train_step.py`` runs them."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        import torch
        from _common import bench_config, build_training

        from wsss.engine.runtime import pseudo_label_params
        from wsss.engine.trainer import PhaseTimer, train_step

        self.torch, self.train_step = torch, train_step
        self.device = torch.device("cpu")
        batch = torch.load(workdir / "batch.pt")
        crop = int(batch["image"].shape[-1])
        self.cfg = cfg = bench_config("voc", "mit_b1", crop, args.batch, "fp32", "cpu", args.overrides)
        self.network, self.optimizer, self.scheduler, self.scaler = build_training(cfg, NUM_CLASSES, self.device,
                                                                                  args.seed)
        self.init_path = workdir / "official_init.pt"
        self.mapped, self.reshaped = self.restore()
        self.batch = batch
        self.iteration = max(cfg.train.afa_label_iter, cfg.train.cam_iters)
        self.timer = PhaseTimer(self.device)
        self.params = pseudo_label_params(cfg)
        self.depth = StochasticDepth(self.network, self.network.seg_head)
        tc, pp = cfg.train, self.params
        self.info = {
            "crop": crop, "batch": args.batch, "cam scales": list(pp.scales),
            "bg threshold high / low": [pp.bg_high, pp.bg_low], "random-walk radius": pp.radius,
            "PAR dilations": list(pp.par.dilations), "PAR iterations": pp.par.iterations,
            "PAR w1 / w2": [pp.par.w1, pp.par.w2], "lr": tc.lr, "weight decay": tc.weight_decay,
            "betas": list(tc.betas), "warm-up iters / ratio": [tc.warmup_iters, tc.warmup_ratio],
            "iterations": tc.iterations, "cls-only iterations": f"iteration < {tc.cam_iters}",
            "AFA label as seg target": f"iteration >= {tc.afa_label_iter}",
            "loss weights cls / seg / aff": [tc.cls_loss_weight, tc.seg_loss_weight, tc.aff_loss_weight],
            "drop-path / seg dropout": list(self.depth.rates()), "CAM pooling": cfg.model.cam_pooling,
            "iteration timed": self.iteration,
            "parameters": sum(p.numel() for p in self.network.parameters()),
            "weights": f"{self.mapped} official tensors mapped ({self.reshaped} Linear -> 1x1 conv)",
            "keep host memory": tc.keep_host_memory,
        }

    def set_thresholds(self, high: float, low: float) -> None:
        """cam.bg_threshold_high / low of the next iterations."""
        self.cfg.cam.bg_threshold_high, self.cfg.cam.bg_threshold_low = high, low

    def restore(self) -> tuple[int, int]:
        """The official initial weights, mapped -> (tensors mapped, of them reshaped)."""
        official = self.torch.load(self.init_path, mmap=True)
        state, reshaped = map_official_state_dict(official, self.network.state_dict())
        self.network.load_state_dict(state, strict=True)
        return len(state), reshaped

    def step(self, timer: Any, capture: bool = False) -> dict[str, Any]:
        from wsss.method.affinity import affinity_labels, label_to_grid
        from wsss.method.losses import balanced_seg_loss
        from wsss.method.pseudo_labels import present_classes

        result = self.train_step(self.network, self.batch, self.iteration, self.cfg, self.optimizer, self.scheduler,
                                 self.scaler, self.device, timer)
        self.last_loss = float(result.losses["total"])
        if not capture:
            return {}
        torch, pseudo = self.torch, result.pseudo
        class_index = present_classes(self.batch["label"])
        cams = torch.zeros(pseudo.cams.shape[0], NUM_CLASSES - 1, *pseudo.cams.shape[-2:])
        cams.scatter_(1, class_index[:, :, None, None].expand(-1, -1, *cams.shape[-2:]), pseudo.cams.float())
        stride = self.network.backbone.feature_strides[-1]  # the main pass's token grid, as the trainer's
        token_grid = (self.batch["image"].shape[-2] // stride, self.batch["image"].shape[-1] // stride)
        aff_label = affinity_labels(label_to_grid(pseudo.label, token_grid), self.cfg.afa.radius,
                                    self.cfg.data.ignore_index)
        return {
            "cams": cams, "label": pseudo.label, "afa_label": pseudo.afa_label, "aff_label": aff_label,
            "seg_logits": result.seg_logits,
            "losses": {**{k: float(result.losses[k]) for k in ("cls", "seg", "aff", "total")},
                       "seg, PAR-label target": float(balanced_seg_loss(result.seg_logits, pseudo.label,
                                                                        self.cfg.data.ignore_index))},
        }

    def par_inputs(self, seed: int) -> tuple[Any, Any]:
        return _par_inputs(self.torch, seed)

    def par_run(self, images01: Any, masks: Any) -> Any:
        from wsss.method.cam import scaled_par_kernel
        from wsss.method.par import apply_par_kernel

        with self.torch.no_grad():
            return apply_par_kernel(masks, scaled_par_kernel(images01, self.params.par), self.params.par.iterations)


def _par_inputs(torch: Any, seed: int) -> tuple[Any, Any]:
    """2 x 3 x 320 x 320 8-bit images in [0, 1] and 2 x 21 x 160 x 160 softmax masks, the same on both sides."""
    generator = torch.Generator().manual_seed(seed + 1)
    images01 = torch.randint(0, 256, (2, 3, 320, 320), generator=generator).float() / 255.0
    masks = torch.randn(2, 21, 160, 160, generator=generator).softmax(dim=1)
    return images01, masks


def child_main(args: argparse.Namespace) -> None:
    """One side: set up, then answer the parent's commands (one per line on stdin, one JSON line each)."""
    reply_to = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the code prints goes to the log, not into the replies
    workdir = Path(args.workdir)

    def reply(obj: dict[str, Any]) -> None:
        reply_to.write(json.dumps(obj) + "\n")

    try:
        import torch
        from _common import current_rss, peak_rss, timed_step

        from wsss.engine.runtime import keep_host_memory
        from wsss.engine.trainer import PhaseTimer

        if args.child == "official" and args.official_allocator == "kept":
            keep_host_memory(True)  # ours applies it in build_training, as the trainer, per train.keep_host_memory

        torch.set_num_threads(args.threads)
        side = OfficialSide(args, workdir) if args.child == "official" else OursSide(args, workdir)
        timer = side.timer if isinstance(side, OursSide) else PhaseTimer("cpu")
        par_images, par_masks = side.par_inputs(args.seed)
    except Exception as exc:  # noqa: BLE001  (reported to the parent, which prints the log)
        reply({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        return
    recipe_thresholds = tuple(side.info["bg threshold high / low"])
    reply({"ready": True, "setup_rss": current_rss(), "info": side.info, "threads": torch.get_num_threads()})

    def check(high: float, low: float) -> dict[str, Any]:
        side.restore()
        side.depth.set(deterministic=True)
        side.set_thresholds(high, low)
        out = side.step(timer, capture=True)
        side.set_thresholds(*recipe_thresholds)
        side.depth.set(deterministic=False)
        path = workdir / f"check_{args.child}_{high}_{low}.pt"
        torch.save(out, path)
        return {"file": str(path)}

    def step() -> dict[str, Any]:
        side.restore()  # every timed iteration is the same one: same weights, same batch
        row = timed_step(lambda: side.step(timer), timer)
        return {**row, "finite": bool(torch.isfinite(torch.tensor(side.last_loss)))}

    def par_once() -> dict[str, Any]:
        start = time.perf_counter()
        out = side.par_run(par_images, par_masks)
        seconds = time.perf_counter() - start
        torch.save(out, workdir / f"par_{args.child}.pt")
        return {"seconds": seconds}

    commands: dict[str, Callable[..., dict[str, Any]]] = {
        "check": check,
        "step": step,
        "par": par_once,
        "finish": lambda: {"peak_rss": peak_rss()},
    }
    for line in sys.stdin:
        command, *numbers = line.split()
        try:
            reply(commands[command](*map(float, numbers)))
        except Exception as exc:  # noqa: BLE001
            reply({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
            return
        if command == "finish":
            return


# --------------------------------------------------------------------------- the parent


class Child:
    """A side's child process: ``ask(command)`` -> its JSON reply; a failure exits with its log."""

    def __init__(self, side: str, args: argparse.Namespace, workdir: Path) -> None:
        self.side = side
        self.log_path = workdir / f"{side}.log"
        self.log: IO[str] = open(self.log_path, "w")  # noqa: SIM115  (closed in close())
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--official-dir", args.official_dir,
               "--workdir", str(workdir), "--threads", str(args.threads), "--seed", str(args.seed),
               "--batch", str(args.batch), "--official-allocator", args.official_allocator, *args.overrides]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        reply = json.loads(line) if line.strip() else {"error": f"exited with status {self.proc.wait()}"}
        if "error" in reply:
            self.log.flush()
            log = self.log_path.read_text().strip().splitlines()[-25:]
            trace = reply.get("trace", "")
            sys.exit(f"{self.side} side failed: {reply['error']}\n{trace}" + "\n".join(log))
        return reply

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def _label_row(name: str, a: Any, b: Any, kinds: tuple[str, str] = ("background", "foreground")) -> str:
    if a.shape != b.shape:
        return f"  {name:<34} shapes differ: official {tuple(a.shape)}, ours {tuple(b.shape)}"
    differ = int((a.long() != b.long()).sum())
    a = a.long()
    parts = {kinds[0]: a == 0, kinds[1]: (a > 0) & (a != 255), "ignored": a == 255}
    mix = ", ".join(f"{k} {100 * float(v.float().mean()):.1f}%" for k, v in parts.items())
    if differ == 0:
        return f"  {name:<34} same labels ({a.numel()} values; official: {mix})"
    return (f"  {name:<34} MISMATCH: {differ} of {a.numel()} differ ({100 * differ / a.numel():.4f}%; "
            f"official: {mix})")


def equivalence_report(official: dict[str, Any], ours: dict[str, Any], thresholds: tuple[float, float]) -> list[str]:
    lines = [("equivalence: one iteration per side, same weights and batch, drop-path 0 and seg dropout 0 on both, "
              f"background scores high / low {thresholds[0]} / {thresholds[1]}")]
    for key, name, atol in (("cams", "CAMs (label-masked, 20 classes)", CAM_ATOL),
                            ("seg_logits", "seg logits", LOGIT_ATOL)):
        a, b = official[key].float(), ours[key].float()
        diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
        verdict = "ok" if diff <= atol else "DIFFERENT"
        lines.append(f"  {name:<34} max |diff| {diff:.2e} (tolerance {atol:g}) {verdict}  {list(a.shape)}")
    lines.append(_label_row("PAR-refined CAM label", official["label"], ours["label"]))
    lines.append(_label_row("AFA label (random walk + PAR)", official["afa_label"], ours["afa_label"]))
    lines.append(_label_row("affinity label", official["aff_label"], ours["aff_label"], ("negative", "positive")))
    for key in ("cls", "seg", "aff", "total", "seg, PAR-label target"):
        a, b = official["losses"][key], ours["losses"][key]
        rel = abs(a - b) / max(abs(a), 1e-12)
        verdict = "ok" if rel <= LOSS_RTOL else "DIFFERENT"
        lines.append(f"  {key + ' loss':<34} official {a:.6f}  ours {b:.6f}  rel. diff {rel:.1e} {verdict}")
    afa = official["afa_label"]
    if math.isnan(official["losses"]["seg"]) and not ((afa > 0) & (afa != 255)).any():
        lines.append("  the official seg loss is NaN: its target (the AFA label) has no foreground pixel and the "
                     "official get_seg_loss averages the foreground cross-entropy over no pixels (0/0); ours counts "
                     "an empty part as 0 (balanced_seg_loss). The last row compares the two seg losses on the PAR "
                     "label (the target up to iteration 6000), which has both parts.")
    return lines


def config_report(official: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    lines = [f"{'setting':<30} {'official':<34} ours"]
    for key, a in official.items():
        b = ours.get(key)
        mark = "" if a == b or key in ("cls-only iterations", "AFA label as seg target", "iteration timed") else "  <>"
        lines.append(f"{key:<30} {json.dumps(a):<34} {json.dumps(b)}{mark}")
    lines.append(f"{'weights':<30} {ours.get('weights')}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", required=True, help="a checkout of https://github.com/rulixiang/afa")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per side (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per side first")
    parser.add_argument("--par-repeats", type=int, default=5, help="timed PAR runs per side (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--official-allocator", choices=["default", "kept"], default="default",
                        help="the official side's host allocator: glibc's defaults, as it ships (default), or "
                             "kept, the setting of our train.keep_host_memory (on by default on our side)")
    parser.add_argument("--child", choices=["official", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides of our side (e.g. par.iterations=10)")
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    try:
        check_official_dir(Path(args.official_dir))
    except OfficialCodeMissing as exc:
        sys.exit(f"error: {exc}")

    import torch  # the parent compares the children's outputs
    from _common import load_average

    load_start = load_average(minutes=3)
    workdir = Path(tempfile.mkdtemp(prefix="vs_official_"))
    try:
        official = Child("official", args, workdir)  # first: it writes the weights and the batch
        try:
            ours = Child("ours", args, workdir)
        except SystemExit:
            official.close()
            raise
        sides = (official, ours)
        thresholds = [tuple(official.ready["info"]["bg threshold high / low"]), LOW_THRESHOLDS]
        checks = [[torch.load(child.ask(f"check {high} {low}")["file"]) for child in sides] for high, low in thresholds]
        rows: dict[str, list[dict[str, float]]] = {"official": [], "ours": []}
        for i in range(args.warmup + args.iters if args.iters > 0 else 0):
            for child in sides if i % 2 == 0 else sides[::-1]:  # who goes first alternates
                row = child.ask("step")
                if i >= args.warmup:
                    rows[child.side].append(row)
        par_times: dict[str, list[float]] = {"official": [], "ours": []}
        for i in range(1 + args.par_repeats if args.par_repeats > 0 else 0):
            for child in sides if i % 2 == 0 else sides[::-1]:
                seconds = child.ask("par")["seconds"]
                if i >= 1:
                    par_times[child.side].append(seconds)
        par_out = [torch.load(workdir / f"par_{child.side}.pt") for child in sides] if args.par_repeats > 0 else []
        peaks = {child.side: child.ask("finish")["peak_rss"] for child in sides}
        for child in sides:
            child.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = load_average(minutes=3)

    info = official.ready["info"]
    print(f"AFA, official code ({args.official_dir}) vs ours (wsss): MiT-B1, batch {args.batch}, crop {info['crop']}, "
          f"CPU, fp32, {official.ready['threads']} threads per side, torch {torch.__version__}")
    print(f"host allocator: official {args.official_allocator} (--official-allocator), ours "
          f"{'kept' if ours.ready['info']['keep host memory'] else 'default'} (train.keep_host_memory)")
    print(f"load average at start: {load_start}")
    sections = [config_report(info, ours.ready["info"]),
                *(equivalence_report(*pair, bg) for pair, bg in zip(checks, thresholds))]
    if rows["official"]:
        sections.append(timing_report(rows, args))
    setup = {child.side: child.ready["setup_rss"] for child in sides}
    sections.append(memory_report(setup, peaks))
    if par_out:
        sections.append(par_report(par_out, par_times, info, args))
    for lines in sections:
        print()
        print("\n".join(lines))
    print(f"load average at end: {load_end} (other processes on the machine slow both sides)")


def timing_report(rows: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> list[str]:
    med = {side: {p: statistics.median(r.get(p, 0.0) for r in rs) for p in ("total", "cpu", *PHASES)}
           for side, rs in rows.items()}
    lines = [(f"one training iteration, median of {args.iters} after {args.warmup} warm-up, sides interleaved "
             "(seconds; ratio = official / ours)"),
             f"| {'phase':<26} | {'official':>9} | {'ours':>9} | {'ratio':>7} |",
             f"|{'-' * 28}|{'-' * 11}|{'-' * 11}|{'-' * 9}|"]
    for phase in (*PHASES, "total", "cpu"):
        title = {"total": "iteration total", "cpu": "  CPU time, all threads"}.get(phase, PHASE_TITLES.get(phase))
        a, b = med["official"][phase], med["ours"][phase]
        ratio = f"{a / b:6.2f}x" if b > 0 else "    n/a"
        lines.append(f"| {title:<26} | {a:9.3f} | {b:9.3f} | {ratio:>7} |")
    lines.append("ours counts its affinity labels in (losses), the official cams_to_affinity_label is in 'affinity + "
                 "random walk'; de-normalizing the images is in no phase (only in the total) on both sides; every "
                 "iteration starts from the initial weights (restored outside the timing)")
    for side, rs in rows.items():
        bad = sum(not r.get("finite", True) for r in rs)
        if bad:
            lines.append(f"{side}: the loss was not finite in {bad} of {len(rs)} timed iterations (a seg target "
                         "without foreground, see above); the arithmetic costs the same")
    return lines


def memory_report(setup: dict[str, int], peaks: dict[str, int]) -> list[str]:
    gib = 2**30
    lines = ["memory of each side's process (GiB; ratio = ours / official)",
             f"| {'':<26} | {'official':>9} | {'ours':>9} | {'ratio':>7} |",
             f"|{'-' * 28}|{'-' * 11}|{'-' * 11}|{'-' * 9}|"]
    growth = {side: peaks[side] - setup[side] for side in peaks}
    for name, values in (("RSS after set-up", setup), ("peak RSS", peaks), ("growth over set-up", growth)):
        a, b = values["official"] / gib, values["ours"] / gib
        lines.append(f"| {name:<26} | {a:9.3f} | {b:9.3f} | {b / a:6.2f}x |")
    return lines


def par_report(par_out: list[Any], par_times: dict[str, list[float]], info: dict[str, Any],
               args: argparse.Namespace) -> list[str]:
    import torch

    p_off, p_ours = par_out
    diff = float((p_off - p_ours).abs().max())
    t_off, t_ours = statistics.median(par_times["official"]), statistics.median(par_times["ours"])
    same = "equal within float tolerance" if torch.allclose(p_off, p_ours, rtol=1e-4, atol=1e-5) else "DIFFERENT"
    return [(f"PAR alone (official wetr/PAR.py vs wsss.method.par): masks {list(p_off.shape)}, images [2, 3, 320, 320] "
            f"halved, dilations {info['PAR dilations']}, {info['PAR iterations']} iterations, median of "
            f"{args.par_repeats}, interleaved"),
            (f"  official {t_off * 1e3:.1f} ms, ours {t_ours * 1e3:.1f} ms, official / ours {t_off / t_ours:.2f}x; "
            f"max |diff| {diff:.2e}: {same}")]


if __name__ == "__main__":
    main()
