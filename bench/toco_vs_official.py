"""The official ToCo code against ours, side by side on identical inputs: its losses, crops and heads, then its
network, pseudo labels and one whole training iteration, then the iteration's time and memory.

    python3 bench/toco_vs_official.py --official-dir /tmp/toco_official
    python3 bench/toco_vs_official.py --official-dir /tmp/toco_official --repeats 20 --iteration-repeats 5

``--official-dir`` is a checkout of https://github.com/rulixiang/ToCo (not vendored, not a dependency: its files
are imported from there at run time). What does not load as shipped:

- ``model/losses.py`` imports the compiled ``bilateralfilter`` extension at module level for its dense-energy
  loss; an empty stand-in module is registered under that name, and the dense-energy loss is left out of the
  comparison (w_reg = 0 on both sides);
- ``model/backbone/vit.py`` imports helpers of an old timm and registers its models in timm's registry under
  timm's own names: it runs without its import lines, with today's timm layers (``DropPath``, ``to_2tuple``,
  ``trunc_normal_``) and a ``register_model`` that registers nothing; ``model/model_seg_neg.py`` runs the same
  way, with that ViT and ``model/decoder/conv_head.py``.

Losses and parts, on random inputs of the VOC recipe's shapes (448 crop, ViT-B/16: a 28 x 28 token grid, 768
channels, batch 2, 20 classes; CTC: 10 crops, 1024-dimensional projections, temperature 0.5), seeds fixed:

- the pair labels (``label_to_aff_mask`` / ``token_pair_labels``) and the uncertain-region mask
  (``cam_to_roi_mask2`` / ``uncertain_region_mask``, thresholds 0.7 / 0.25): equal element by element;
- the 8 local crops of 96 pixels and their flags (``crop_from_roi_neg`` / ``local_crops``) at the corners the
  official code draws (its global-RNG draw replayed for ours; ``sample_crop_corners``, ours, draws the same
  distribution with another stream);
- the PTC loss (``get_masked_ptc_loss``) and its gradient; the CTC loss (``CTCLoss_neg``) and its gradients for
  student and teacher, with some, none or all local crops negative;
- the projection head (``CTCHead``, official weights loaded into ``wsss.models.toco_heads.ProjectionHead``):
  output and gradients, and the teacher after a student step and three EMA updates (m = 0.9).

The whole iteration: the official ``network("vit_base_patch16_224", 21, aux_layer=-3)`` (no pretrained weights,
drop-path 0 as the script has it) and ours (``voc-toco``, ``model.pretrained=none``) with its weights (every
tensor of ours from exactly one official one); a batch of 2 (global view 1 of 8-bit pixels that survive the
official uint8 round trip, view 2, the local crops' source; 1 and 2 of 20 classes; the last eighth of the
columns padding); ``--crop`` (default 320: a 20 x 20 grid, the position embedding resampled from 14 x 14). The
official side runs the body of the training loop of ``scripts/dist_train_voc_seg_neg.py`` at iteration 2001
(every loss counts) through its own functions (``multi_scale_cam2``, ``cam_to_roi_mask2``, ``crop_from_roi_neg``,
the model with the crops, ``CTCLoss_neg``, ``cam_to_label``, ``refine_cams_with_bkg_v2`` with its ``PAR``,
``get_seg_loss``, ``label_to_aff_mask``, ``get_masked_ptc_loss``) and the backward; ours
``wsss.engine.toco_step.toco_micro_step`` and the backward, the crop corners the official draw replayed.
Compared: CAMs and auxiliary CAMs (present classes; ours zeroes the absent ones), the uncertain region, crops
and flags, image and auxiliary logits, the last block's tokens, seg logits, student and teacher projections,
the PTC token label and the PAR-refined seg label (pixel by pixel), every loss, and the gradient of every
trainable parameter. Twice: with the recipe's background scores (0.7 / 0.25), and with 0.35 / 0.1, whose labels
have plenty of foreground where the recipe's leave almost none on a random-init network.

Tolerances (float32): losses and crops rtol 1e-5 / atol 1e-6; network outputs max |diff| <= 1e-5 x max
|official| (timm's fused attention against the official explicit softmax orders the sums differently over 12
blocks); gradients max |diff| <= 1e-4 x max |official| + 1e-8 per tensor (the floor: on a random-init network
the class tokens are all alike, the CTC loss is flat and the projection head's gradients, about 1e-7, are float
noise; its gradients on non-degenerate inputs are checked above at the tight tolerance). The script prints one
line per quantity, "same" or "DIFFERENT", and exits 1 if any differs.

Timing and memory: each side in a spawned process of its own builds its network (ours with its own
initialisation), then runs ``--iteration-warmup`` untimed and ``--iteration-repeats`` timed training iterations
at the recipe's background scores, every one from the initial weights (restored outside the timing), with the
optimizer step: the official ``PolyWarmupAdamW`` over its four groups after the loop body; ours
``wsss.engine.trainer.train_step``. Printed: the median seconds per iteration, the RSS after set-up and the peak
(VmHWM), the load average, and the ratios (time official / ours: above 1 ours is faster; peak RSS ours /
official). CPU fp32, ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import warnings
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsss.models.toco_heads import ProjectionHead, ema_update  # noqa: E402

from wsss.method.toco import (  # noqa: E402
    class_token_contrast_loss,
    local_crops,
    patch_token_contrast_loss,
    token_pair_labels,
    uncertain_region_mask,
)

IGNORE = 255


def load_official_head(official_dir: Path) -> tuple[type, object]:
    """``CTCHead`` and ``network._EMA_update_encoder_teacher`` of the official ``model/model_seg_neg.py``, taken
    out of the file alone (importing it would build its ViT backbones and decoders)."""
    path = official_dir / "model" / "model_seg_neg.py"
    if not path.is_file():
        sys.exit(f"error: --official-dir {official_dir} is not a checkout of rulixiang/ToCo: missing {path}")
    tree = ast.parse(path.read_text())
    head = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CTCHead")
    network = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "network")
    ema = next(n for n in network.body if isinstance(n, ast.FunctionDef) and n.name == "_EMA_update_encoder_teacher")
    namespace = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional}
    exec(compile(ast.Module(body=[head, ema], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["CTCHead"], namespace["_EMA_update_encoder_teacher"]


def load_official(official_dir: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The official ``model/losses.py`` and ``utils/camutils.py`` as modules; exits with a message if absent."""
    files = [official_dir / "model" / "losses.py", official_dir / "utils" / "camutils.py"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(f"error: --official-dir {official_dir} is not a checkout of rulixiang/ToCo: "
                 f"missing {', '.join(missing)}")
    sys.modules.setdefault("bilateralfilter", types.SimpleNamespace(bilateralfilter=None, bilateralfilter_batch=None))
    modules = []
    for name, path in zip(("toco_losses", "toco_camutils"), files):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def _exec_without_imports(path: Path, namespace: dict) -> dict:
    """Run a file's top-level code except its imports in ``namespace`` (which supplies what they would bind)."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def load_official_network(official_dir: Path) -> tuple[type, type, types.ModuleType]:
    """The official ``network`` (``model/model_seg_neg.py``) with its ViT (``model/backbone/vit.py``) and LargeFOV
    (``model/decoder/conv_head.py``), the ``PAR`` class (``model/PAR.py``) and ``utils/imutils.py``.

    ``vit.py`` imports helpers of an old timm and registers its models in timm's registry under timm's own
    names; it runs here without its imports, with today's timm layers and a ``register_model`` that registers
    nothing (our side builds ``vit_base_patch16_224`` from timm's registry, which must stay timm's)."""
    from functools import partial

    import numpy as np
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.layers import DropPath, to_2tuple, trunc_normal_

    def no_pretrained(*_args, **_kwargs):
        raise RuntimeError("the benchmark builds the official ViT without pretrained weights")

    nn, F = torch.nn, torch.nn.functional
    vit = _exec_without_imports(official_dir / "model" / "backbone" / "vit.py", {
        "torch": torch, "nn": nn, "F": F, "partial": partial, "np": np, "DropPath": DropPath,
        "to_2tuple": to_2tuple, "trunc_normal_": trunc_normal_, "IMAGENET_DEFAULT_MEAN": IMAGENET_DEFAULT_MEAN,
        "IMAGENET_DEFAULT_STD": IMAGENET_DEFAULT_STD, "load_pretrained": no_pretrained,
        "register_model": lambda fn: fn, "resnet26d": None, "resnet50d": None})
    modules = {}
    for name, rel in (("toco_conv_head", "model/decoder/conv_head.py"), ("toco_par", "model/PAR.py"),
                      ("toco_imutils", "utils/imutils.py")):
        spec = importlib.util.spec_from_file_location(name, official_dir / rel)
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    encoder = types.SimpleNamespace(vit_base_patch16_224=vit["vit_base_patch16_224"])
    seg_neg = _exec_without_imports(official_dir / "model" / "model_seg_neg.py", {
        "torch": torch, "nn": nn, "F": F, "encoder": encoder, "decoder": modules["toco_conv_head"]})
    return seg_neg["network"], modules["toco_par"].PAR, modules["toco_imutils"]


def official_names(official: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict[str, str]:
    """Ours' state-dict keys -> the official network's key of the same tensor: every tensor of ours from exactly
    one official tensor; the official ViT's unused ImageNet head and the weight-norm gains (fixed at 1, checked)
    are the only ones left over."""
    renames = {"classifier.weight": "classifier.classifier.weight",
               "aux_classifier.weight": "aux_classifier.classifier.weight",
               "decoder.conv6.weight": "seg_head.layers.0.weight", "decoder.conv7.weight": "seg_head.layers.2.weight",
               "decoder.conv8.weight": "seg_head.layers.4.weight"}
    names, left = {}, []
    for key in official:
        if key.startswith("encoder."):
            target = "backbone.model." + key[len("encoder."):]
        elif key.startswith(("proj_head.", "proj_head_t.")):
            target = key.replace("last_layer.weight_v", "last_weight")
        else:
            target = renames.get(key, key)
        if target in ours and target not in names:
            names[target] = key
        else:
            left.append(key)
    missing = sorted(set(ours) - set(names))
    unexpected = [k for k in left if not (k.startswith("encoder.head.") or k.endswith("last_layer.weight_g"))]
    unit_gains = all(bool((official[k] == 1).all()) for k in left if k.endswith("last_layer.weight_g"))
    if missing or unexpected or not unit_gains:
        raise RuntimeError(f"weight mapping: ours without an official tensor {missing}, official left over "
                           f"{unexpected}, weight-norm gains all 1: {unit_gains}")
    return names


def official_corners(region: torch.Tensor, num_crops: int, size: int) -> torch.Tensor:
    """The official corner draw of one image, replayed: candidates in row-major order, one randperm."""
    margin = size // 2
    inner = region[margin : region.shape[0] - margin, margin : region.shape[1] - margin]
    candidates = (inner <= 1).nonzero()
    if candidates.shape[0] < num_crops:
        candidates = (inner >= 0).nonzero()
    return candidates[torch.randperm(candidates.shape[0])[:num_crops]]


def compare(name: str, a: torch.Tensor, b: torch.Tensor, exact: bool = False, scale_rtol: float | None = None) -> bool:
    """One printed row: ``a`` (official) against ``b`` (ours). Labels ``exact``; a network's activations within
    ``scale_rtol`` x their largest |official value| (a ViT-B's float32 sums are ordered differently on the two
    sides: timm's fused attention against the official explicit softmax); anything else within rtol 1e-5 /
    atol 1e-6."""
    a, b = a.detach(), b.detach()
    if exact:
        same = a.shape == b.shape and bool((a.long() == b.long()).all())
        diff = "equal" if same else f"{int((a.long() != b.long()).sum())} elements differ"
    elif a.shape != b.shape:
        same, diff = False, "shapes differ"
    else:
        err = (a.double() - b.double()).abs().max().item()
        if scale_rtol is None:
            same = torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)
            diff = f"max |diff| {err:.2e}"
        else:
            scale = max(a.abs().max().item(), 1e-30)
            same = err <= scale_rtol * scale
            diff = f"max |diff| {err:.2e}, / max |official| {err / scale:.1e}"
    print(f"{name:<44} {'same' if same else 'DIFFERENT':<10} {diff}", flush=True)
    return same


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# The official script's defaults (scripts/dist_train_voc_seg_neg.py) the iteration below uses.
OFFICIAL = {"cam_scales": (1.0, 0.5, 1.5), "high_thre": 0.7, "low_thre": 0.25, "bkg_thre": 0.5, "w_ptc": 0.2,
            "w_ctc": 0.5, "w_seg": 0.1, "temp": 0.5, "momentum": 0.9, "aux_layer": -3, "ncrops": 10,
            "local_crop_size": 96, "par_dilations": [1, 2, 4, 8, 12, 24], "par_iters": 10}
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-8  # gradients: max |diff| <= RTOL x max |official gradient| + ATOL
ACT_RTOL = 1e-5  # network outputs: max |diff| / max |official value|
# Background scores of the iteration check: the recipe's, and lower ones whose labels have plenty of foreground
# where the recipe's leave almost none on a random-init network.
THRESHOLD_CASES = ((0.7, 0.25), (0.35, 0.1))
N_ITER = 2001  # past the warm-up of the official loop (n_iter <= 2000): every loss counts


def iteration_batch(crop: int, generator: torch.Generator, denormalize_uint8) -> dict[str, torch.Tensor]:
    """A batch of 2 as the ToCo training loader gives it: global view 1 (``image``, 8-bit pixels that survive
    the official uint8 round trip), view 2, the local crops' source, labels (1 and 2 classes of 20) and the
    padding boxes."""
    from _common import exact_uint8_round_trip, synthetic_batch

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    batch = synthetic_batch(2, crop, 20, generator, mean, std, toco_views=True)
    batch["image"] = exact_uint8_round_trip(batch["image"], denormalize_uint8)
    return batch


def official_iteration(model, par, losses, camutils, imutils, batch, crop_seed: int, high: float,
                       low: float) -> dict:
    """The body of the official training loop at iteration ``N_ITER`` (scripts/dist_train_voc_seg_neg.py),
    through the official functions, with w_reg = 0 (the dense-energy loss needs the compiled bilateral
    filter), then the backward. -> the quantities compared."""
    F, o = torch.nn.functional, {**OFFICIAL, "high_thre": high, "low_thre": low}
    inputs, cls_label, img_box = batch["image"], batch["label"], batch["valid_box"]
    inputs_denorm = imutils.denormalize_img2(inputs.clone())
    cams, cams_aux = camutils.multi_scale_cam2(model, inputs=inputs, scales=o["cam_scales"])
    roi_mask = camutils.cam_to_roi_mask2(cams_aux.detach(), cls_label=cls_label, low_thre=o["low_thre"],
                                         hig_thre=o["high_thre"])
    torch.manual_seed(crop_seed)
    local, flags = camutils.crop_from_roi_neg(images=batch["local_image"], roi_mask=roi_mask,
                                              crop_num=o["ncrops"] - 2, crop_size=o["local_crop_size"])
    roi_crops = [inputs, batch["global_view2"]] + local
    cls, segs, fmap, cls_aux, out_t, out_s = model(inputs, crops=roi_crops, n_iter=N_ITER)
    cls_loss = F.multilabel_soft_margin_loss(cls, cls_label)
    cls_loss_aux = F.multilabel_soft_margin_loss(cls_aux, cls_label)
    ctc_loss = losses.CTCLoss_neg(ncrops=o["ncrops"], temp=o["temp"])(out_s, out_t, flags)
    thresholds = {"bkg_thre": o["bkg_thre"], "high_thre": o["high_thre"], "low_thre": o["low_thre"]}
    valid_cam, _ = camutils.cam_to_label(cams.detach(), cls_label=cls_label, img_box=img_box, ignore_mid=True,
                                         ignore_index=IGNORE, **thresholds)
    refined = camutils.refine_cams_with_bkg_v2(par, inputs_denorm, cams=valid_cam, cls_labels=cls_label,
                                               high_thre=o["high_thre"], low_thre=o["low_thre"],
                                               ignore_index=IGNORE, img_box=img_box)
    segs_up = F.interpolate(segs, size=refined.shape[1:], mode="bilinear", align_corners=False)
    seg_loss = losses.get_seg_loss(segs_up, refined.type(torch.long), ignore_index=IGNORE)
    resized_aux = F.interpolate(cams_aux, size=fmap.shape[2:], mode="bilinear", align_corners=False)
    _, token_label_aux = camutils.cam_to_label(resized_aux.detach(), cls_label=cls_label, img_box=img_box,
                                               ignore_mid=True, ignore_index=IGNORE, **thresholds)
    ptc_loss = losses.get_masked_ptc_loss(fmap, camutils.label_to_aff_mask(token_label_aux))
    loss = (cls_loss + cls_loss_aux + o["w_ptc"] * ptc_loss + o["w_ctc"] * ctc_loss + o["w_seg"] * seg_loss)
    loss.backward()
    return {"cams": cams, "cams_aux": cams_aux, "region": roi_mask, "crops": torch.stack(local), "flags": flags,
            "cls_logits": cls, "aux_logits": cls_aux, "tokens": fmap, "seg_logits": segs, "proj_student": out_s,
            "proj_teacher": out_t, "label": refined, "token_label": token_label_aux,
            "losses": {"cls": cls_loss, "cls_aux": cls_loss_aux, "ptc": ptc_loss, "ctc": ctc_loss, "seg": seg_loss,
                       "total": loss}}


def ours_iteration(network, cfg, batch, crop_seed: int, timer=None) -> dict:
    """``wsss.engine.toco_step.toco_micro_step`` at iteration ``N_ITER``, then the backward; the local-crop
    corners are the official draw replayed (``official_corners`` under ``crop_seed``). -> the quantities
    compared (recorded on the way through the step's own functions)."""
    from wsss.engine import toco_step
    from wsss.engine.trainer import NO_TIMER

    seen: dict = {}
    originals = {name: getattr(toco_step, name) for name in ("toco_cams", "sample_crop_corners", "local_crops",
                                                             "token_label", "uncertain_region_mask")}

    def record(name, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            seen.setdefault(name, out)
            return out
        return wrapped

    def replay_corners(region, num_crops, size, generator=None):
        torch.manual_seed(crop_seed)
        return torch.stack([official_corners(region[i], num_crops, size) for i in range(region.shape[0])])

    toco_step.toco_cams = record("toco_cams", originals["toco_cams"])
    toco_step.sample_crop_corners = replay_corners
    for name in ("local_crops", "token_label", "uncertain_region_mask"):
        setattr(toco_step, name, record(name, originals[name]))
    try:
        total, losses, out, pseudo = toco_step.toco_micro_step(network, batch, N_ITER, cfg, torch.device("cpu"),
                                                               timer or NO_TIMER)
        total.backward()
    finally:
        for name, fn in originals.items():
            setattr(toco_step, name, fn)
    cams, cams_aux = seen["toco_cams"]
    crops, flags = seen["local_crops"]
    return {"cams": cams, "cams_aux": cams_aux, "region": seen["uncertain_region_mask"], "crops": crops,
            "flags": flags, "cls_logits": out.cls_logits, "aux_logits": out.aux_cls_logits,
            "tokens": out.features[0], "seg_logits": out.seg_logits, "proj_student": out.proj_student,
            "proj_teacher": out.proj_teacher, "label": pseudo.label, "token_label": seen["token_label"],
            "losses": {k: losses[k] for k in ("cls", "cls_aux", "ptc", "ctc", "seg", "total")}}


def compare_grads(name: str, official_net, ours_net, prefixes: tuple[str, ...], mapping: dict[str, str]) -> bool:
    """The gradients of the parameters of ours under ``prefixes`` against the official ones they were loaded
    from: "same" when every tensor is within GRAD_RTOL x its largest official |gradient| + GRAD_ATOL (float32
    sums over a ViT-B are ordered differently on the two sides: a scale-relative tolerance; the absolute floor
    for gradients that are themselves at float32 noise, e.g. the projection head's on a random-init network,
    whose class tokens are all alike)."""
    official = dict(official_net.named_parameters())
    worst_rel = worst_abs = 0.0
    count, ok = 0, True
    for key, param in ours_net.named_parameters():
        if not param.requires_grad or not key.startswith(prefixes):
            continue
        ref = official[mapping[key]].grad
        got = param.grad
        if ref is None or got is None or ref.shape != got.shape:
            ok = False
            continue
        scale = ref.abs().max().item()
        err = (ref.double() - got.double()).abs().max().item()
        worst_rel, worst_abs, count = max(worst_rel, err / max(scale, 1e-30)), max(worst_abs, err), count + 1
        ok &= err <= GRAD_RTOL * scale + GRAD_ATOL
    print(f"{name:<44} {'same' if ok else 'DIFFERENT':<10} {count} tensors, max |diff| {worst_abs:.1e}, "
          f"/ max |official| {worst_rel:.1e}", flush=True)
    return ok


def build_sides(official_dir: Path, crop: int, seed: int, high: float, low: float,
                only: str | None = None) -> types.SimpleNamespace:
    """The official network (``network('vit_base_patch16_224', 21, aux_layer=-3)``, no pretrained weights, after
    ``torch.manual_seed(seed)``), its PAR module, and ours (``voc-toco`` at ``crop``, w_reg 0, fp32, background
    scores ``high`` / ``low``) with the official weights loaded; both in train mode. ``only`` "official" or
    "ours": that side alone (ours then with its own initialisation), the other None."""
    from wsss.config import load_config
    from wsss.models.network import build_network

    network_cls, par_cls, imutils = load_official_network(official_dir)
    torch.manual_seed(seed)
    official = ours = names = None
    if only != "ours":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm, as the official code has it
            official = network_cls(backbone="vit_base_patch16_224", num_classes=21, pretrained=False,
                                   init_momentum=OFFICIAL["momentum"], aux_layer=OFFICIAL["aux_layer"]).train()
    par = par_cls(num_iter=OFFICIAL["par_iters"], dilations=OFFICIAL["par_dilations"])
    cfg = load_config("voc-toco", ["model.pretrained=none", f"data.crop_size={crop}", "data.batch_size=2",
                                   "data.total_batch_size=2", "train.reg_loss_weight=0", "train.precision=fp32",
                                   "train.device=cpu", f"cam.bg_threshold_high={high}",
                                   f"cam.bg_threshold_low={low}"])
    if only != "official":
        ours = build_network(cfg, 21).train()
    if official is not None and ours is not None:
        official_state = official.state_dict()
        names = official_names(official_state, ours.state_dict())
        ours.load_state_dict({key: official_state[name] for key, name in names.items()})
    return types.SimpleNamespace(official=official, par=par, imutils=imutils, ours=ours, cfg=cfg, names=names)


def iteration_check(args, losses, camutils) -> bool:
    """The network, the pseudo labels and one whole iteration, official against ours, for each of
    ``THRESHOLD_CASES``."""
    ok = True
    for high, low in THRESHOLD_CASES:
        sides = build_sides(args.official_dir, args.crop, args.seed, high, low)
        batch = iteration_batch(args.crop, torch.Generator().manual_seed(args.seed + 2), sides.imutils.denormalize_img)
        crop_seed = args.seed + 3
        print(f"\none iteration, the official network (ViT-B/16, LargeFOV, CTC heads; no pretrained weights) and "
              f"ours with its weights; crop {args.crop}, batch 2, iteration {N_ITER}, w_reg 0, background scores "
              f"{high} / {low}:")
        a = official_iteration(sides.official, sides.par, losses, camutils, sides.imutils, batch, crop_seed, high, low)
        o = ours_iteration(sides.ours, sides.cfg, batch, crop_seed)
        present = batch["label"][:, :, None, None]
        rows = (("CAMs (multi_scale_cam2, present classes)", "cams", "scaled"),
                ("aux CAMs (present classes)", "cams_aux", "scaled"),
                ("uncertain-region mask of the aux CAMs", "region", "exact"),
                ("local crops", "crops", "close"), ("local crop flags", "flags", "exact"),
                ("image logits", "cls_logits", "scaled"), ("aux image logits", "aux_logits", "scaled"),
                ("last block's tokens (fmap)", "tokens", "scaled"), ("seg logits (LargeFOV)", "seg_logits", "scaled"),
                ("student projections (10 crops)", "proj_student", "scaled"),
                ("teacher projections (2 global views)", "proj_teacher", "scaled"),
                ("PTC token label (cam_to_label, grid)", "token_label", "exact"),
                ("seg label (refine_cams_with_bkg_v2)", "label", "exact"))
        for name, key, kind in rows:
            x, y = a[key], o[key]
            if key.startswith("cams"):
                x, y = x * present, y * present
            ok &= compare(name, x, y, exact=kind == "exact", scale_rtol=ACT_RTOL if kind == "scaled" else None)
        label = a["label"]
        mix = {"background": label == 0, "foreground": (label > 0) & (label != IGNORE), "ignored": label == IGNORE}
        print(f"{'':<44} (seg label: " + ", ".join(f"{k} {100 * float(v.float().mean()):.1f}%"
                                                   for k, v in mix.items()) + ")")
        for key in ("cls", "cls_aux", "ptc", "ctc", "seg", "total"):
            ok &= compare(f"{key} loss", a["losses"][key], o["losses"][key])
        for name, prefixes in (("grads: ViT backbone", ("backbone.",)),
                               ("grads: classifiers", ("classifier.", "aux_classifier.")),
                               ("grads: student projection head", ("proj_head.",)),
                               ("grads: seg head", ("seg_head.",))):
            ok &= compare_grads(name, sides.official, sides.ours, prefixes, sides.names)
    return ok


def time_side(side: str, official_dir: Path, crop: int, seed: int, threads: int, warmup: int,
              repeats: int) -> dict:
    """In a child process of its own: set one side up, run ``warmup`` + ``repeats`` training iterations (with
    the optimizer step: the official ``PolyWarmupAdamW`` with its four groups / ``train_step``), every one from
    the initial weights (restored outside the timing) -> seconds per iteration and the process's RSS."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import current_rss, peak_rss

    from wsss.engine.runtime import keep_host_memory

    torch.set_num_threads(threads)
    if side == "ours":
        keep_host_memory(True)  # as the trainer does (train.keep_host_memory), before anything is allocated
    losses, camutils = load_official(official_dir)
    high, low = THRESHOLD_CASES[0]
    sides = build_sides(official_dir, crop, seed, high, low, only=side)
    batch = iteration_batch(crop, torch.Generator().manual_seed(seed + 2), sides.imutils.denormalize_img)
    if side == "official":
        spec = importlib.util.spec_from_file_location("toco_optimizer", official_dir / "utils" / "optimizer.py")
        optimizer_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(optimizer_module)
        net, groups, lr, wd = sides.official, sides.official.get_param_groups(), 6e-5, 1e-2
        optim = optimizer_module.PolyWarmupAdamW(
            params=[{"params": g, "lr": lr * m, "weight_decay": wd} for g, m in zip(groups, (1, 1, 10, 10))],
            lr=lr, weight_decay=wd, betas=(0.9, 0.999), warmup_iter=1500, max_iter=20000, warmup_ratio=1e-6,
            power=0.9)

        def step():
            optim.zero_grad()
            official_iteration(net, sides.par, losses, camutils, sides.imutils, batch, seed + 3, high, low)
            optim.step()
    else:
        from wsss.engine.schedule import build_scheduler
        from wsss.engine.trainer import build_optimizer, build_scaler, train_step

        net = sides.ours
        optim = build_optimizer(net, sides.cfg)
        scheduler, scaler = build_scheduler(optim, sides.cfg.train), build_scaler(sides.cfg, torch.device("cpu"))

        def step():
            train_step(net, batch, N_ITER, sides.cfg, optim, scheduler, scaler, torch.device("cpu"))
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    setup_rss = current_rss()
    times = []
    for i in range(warmup + repeats):
        net.load_state_dict(initial)
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"side": side, "times": times, "setup_rss": setup_rss, "peak_rss": peak_rss(),
            "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-dir", type=Path, required=True, help="checkout of rulixiang/ToCo")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop", type=int, default=320, help="training crop of the whole-iteration check")
    parser.add_argument("--iteration-repeats", type=int, default=3, help="timed iterations per side (0: none)")
    parser.add_argument("--iteration-warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    losses, camutils = load_official(args.official_dir)
    generator = torch.Generator().manual_seed(args.seed)
    ok = True

    # Pair labels from an auxiliary pseudo label: background, classes 3 and 7, ignored tokens.
    b, c, h, w, k = 2, 768, 28, 28, 20
    grid = torch.tensor([0, 3, 7, IGNORE])[torch.randint(0, 4, (b, h, w), generator=generator)]
    ok &= compare("pair labels (label_to_aff_mask)", camutils.label_to_aff_mask(grid.clone(), IGNORE),
                  token_pair_labels(grid), exact=True)

    cams = torch.rand(b, k, h * 16, w * 16, generator=generator)
    labels = (torch.rand(b, k, generator=generator) < 0.15).float()
    labels[:, 0] = 1
    ok &= compare("uncertain-region mask (cam_to_roi_mask2)",
                  camutils.cam_to_roi_mask2(cams, labels, hig_thre=0.7, low_thre=0.25),
                  uncertain_region_mask(cams, labels, high=0.7, low=0.25), exact=True)

    # Local crops: the official function draws its corners with the global RNG (one randperm per image over
    # the candidates in row-major order); the same draw, replayed, gives ours the same corners.
    # CAMs fading to 0 towards the left edge: certain background there, so some crops are negative.
    ramp = torch.linspace(0, 1, w * 16) ** 2
    region = uncertain_region_mask(cams * ramp, labels, high=0.7, low=0.25)
    view = torch.rand(b, 3, h * 16, w * 16, generator=generator)
    n_local, size, seed = 8, 96, args.seed + 1
    torch.manual_seed(seed)
    official_crops, official_flags = camutils.crop_from_roi_neg(view, region, crop_num=n_local, crop_size=size)
    torch.manual_seed(seed)
    corners = torch.stack([official_corners(region[i], n_local, size) for i in range(b)])
    crops, flags = local_crops(view, region, corners, size)
    ok &= compare("local crops (crop_from_roi_neg)", torch.stack(official_crops), crops)
    ok &= compare("local crop flags", official_flags, flags, exact=True)
    print(f"{'':<44} ({int((flags == 0).sum())} of {b * n_local} local crops negative)")

    tokens = torch.randn(b, c, h, w, generator=generator)
    pair_labels = token_pair_labels(grid)

    def ptc(fn):
        x = tokens.clone().requires_grad_(True)
        loss = fn(x, pair_labels)
        loss.backward()
        return loss, x.grad

    official_ptc, ours_ptc = ptc(losses.get_masked_ptc_loss), ptc(patch_token_contrast_loss)
    ok &= compare("PTC loss", official_ptc[0], ours_ptc[0])
    ok &= compare("PTC d loss / d tokens", official_ptc[1], ours_ptc[1])

    n_crops, dim, temperature = 10, 1024, 0.5
    student = torch.nn.functional.normalize(torch.randn(n_crops * b, dim, generator=generator), dim=-1) * 2
    teacher = torch.nn.functional.normalize(torch.randn(2 * b, dim, generator=generator), dim=-1) * 2
    some = torch.ones(b, n_crops)
    some[0, [3, 5, 6]] = 0
    some[1, [2, 9]] = 0
    none_negative = torch.ones(b, n_crops)
    all_negative = torch.ones(b, n_crops)
    all_negative[:, 2:] = 0
    official_ctc = losses.CTCLoss_neg(ncrops=n_crops, temp=temperature)

    def ctc(fn, flags):
        s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
        loss = fn(s, t, flags)
        loss.backward()
        return loss, s.grad, t.grad

    for case, flags in (("some negative", some), ("no negative", none_negative), ("all local negative", all_negative)):
        a = ctc(official_ctc, flags)
        o = ctc(lambda s, t, f: class_token_contrast_loss(s, t, f, temperature), flags)
        ok &= compare(f"CTC loss, {case}", a[0], o[0])
        ok &= compare(f"CTC d loss / d student, {case}", a[1], o[1])
        ok &= compare(f"CTC d loss / d teacher, {case}", a[2], o[2])

    # The projection heads: the official CTCHead's weights loaded into ours, then forward, gradients, and
    # three EMA updates of the teacher (momentum 0.9) after a gradient step of the student.
    CTCHead, official_ema = load_official_head(args.official_dir)
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm, as the official code uses it
        official_heads = [CTCHead(in_dim=768, out_dim=1024) for _ in range(2)]
    official_heads[1].load_state_dict(official_heads[0].state_dict())
    ours_heads = [ProjectionHead(768, 1024) for _ in range(2)]
    for official_head, ours_head in zip(official_heads, ours_heads):
        state = {k: v for k, v in official_head.state_dict().items() if k.startswith("mlp.")}
        state["last_weight"] = official_head.state_dict()["last_layer.weight_v"]
        ours_head.load_state_dict(state)
    tokens_in = torch.randn(n_crops * b, 768, generator=generator)

    def head_pass(head):
        x = tokens_in.clone().requires_grad_(True)
        out = head(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out, x.grad

    a, o = head_pass(official_heads[0]), head_pass(ours_heads[0])
    ok &= compare("projection head output (CTCHead)", a[0], o[0])
    ok &= compare("projection head d out / d tokens", a[1], o[1])
    ok &= compare("projection head d out / d last layer", official_heads[0].last_layer.weight_v.grad,
                  ours_heads[0].last_weight.grad)
    for heads in (official_heads, ours_heads):
        with torch.no_grad():
            for param in heads[0].parameters():
                if param.grad is not None:
                    param.sub_(0.5 * param.grad)
    holder = types.SimpleNamespace(proj_head=official_heads[0], proj_head_t=official_heads[1], init_momentum=0.9)
    for _ in range(3):
        official_ema(holder)
        ema_update(ours_heads[1], ours_heads[0], 0.9)
    ok &= compare("teacher head after 3 EMA updates, output", official_heads[1](tokens_in), ours_heads[1](tokens_in))

    print(f"\nforward + backward, median of {args.repeats}, {args.threads} threads, CPU fp32:")
    def official_ptc_with_labels(x, _):
        return losses.get_masked_ptc_loss(x, camutils.label_to_aff_mask(grid.clone(), IGNORE))

    def ours_ptc_with_labels(x, _):
        return patch_token_contrast_loss(x, token_pair_labels(grid))

    def ours_ctc(s, t, f):
        return class_token_contrast_loss(s, t, f, temperature)

    rows = (
        ("pair labels + PTC", lambda: ptc(official_ptc_with_labels), lambda: ptc(ours_ptc_with_labels)),
        ("CTC", lambda: ctc(official_ctc, some), lambda: ctc(ours_ctc, some)),
    )
    for name, official_fn, ours_fn in rows:
        t_official, t_ours = median_seconds(official_fn, args.repeats), median_seconds(ours_fn, args.repeats)
        print(f"{name:<20} official {t_official * 1e3:8.2f} ms   ours {t_ours * 1e3:8.2f} ms   "
              f"ratio {t_official / t_ours:5.2f}x   load {os.getloadavg()[0]:.2f}", flush=True)
    ok &= iteration_check(args, losses, camutils)
    if args.iteration_repeats > 0:
        from _common import run_in_child

        print(f"\none training iteration with the optimizer step, crop {args.crop}, batch 2, background scores "
              f"{THRESHOLD_CASES[0][0]} / {THRESHOLD_CASES[0][1]}, CPU fp32, {args.threads} threads; each side in a "
              f"process of its own, {args.iteration_warmup} untimed + {args.iteration_repeats} timed, median:")
        results = {}
        for side in ("official", "ours"):
            r = run_in_child(time_side, {"side": side}, side, args.official_dir, args.crop, args.seed, args.threads,
                             args.iteration_warmup, args.iteration_repeats)
            if "error" in r:
                print(f"{side:<10} failed: {r['error']}")
                ok = False
                continue
            results[side] = r
            print(f"{side:<10} {statistics.median(r['times']):7.2f} s / iteration   RSS after set-up "
                  f"{r['setup_rss'] / 2**20:6.0f} MiB, peak {r['peak_rss'] / 2**20:6.0f} MiB   load {r['load']:.2f}",
                  flush=True)
        if len(results) == 2:
            a, o = results["official"], results["ours"]
            print(f"ratio      time official / ours {statistics.median(a['times']) / statistics.median(o['times']):.2f}x"
                  f"   peak RSS ours / official {o['peak_rss'] / a['peak_rss']:.2f}")
    print("\nall same" if ok else "\nsome quantities DIFFER")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
