"""Typed configuration: one dataclass per section, YAML files, dotted overrides.

Defaults are the published AFA values for PASCAL VOC 2012 (Ru et al., CVPR
2022; see docs/method.md). ``configs/<name>.yaml`` files only list what
differs from these defaults. Every hyper-parameter of the method lives here;
no number of the method hides in a function body.

    cfg = load_config("voc", ["train.lr=1e-4", "cam.scales=[1.0,0.5]"])
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from wsss.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    # folder layout: "voc" (VOC 2012 + SBD), "coco" (`wsss data coco-masks` output), "custom" (+ classes.txt)
    dataset: Literal["voc", "coco", "custom"] = "voc"
    root: str = "data/VOCdevkit/VOC2012"  # the dataset's folder (`--data-root` sets it)
    train_split: str = "train_aug"  # split file the training reads (VOC train_aug is built when missing)
    val_split: str = "val"  # split of the validation during training and the default of `wsss eval`
    # validate during training on N images of val_split spread evenly over it (a fixed subset); 0 = all.
    # With a subset, the whole split is validated once more at the end of training.
    val_limit: int = 0
    crop_size: int = 512  # side of the square training crop, in pixels (padded where the image is smaller)
    rescale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random rescale factor [low, high]
    hflip: bool = True  # random horizontal flip of the training images
    # random rotation of the training images by a multiple of 90 degrees (not in the published recipe): for data
    # whose classes look the same in any orientation (objects seen from above, cells, drawn shapes)
    rot90: bool = False
    color_jitter: bool = False  # random colour jitter of the training images (not in the published recipe)
    # brightness, contrast, saturation, hue of the colour jitter (torchvision ColorJitter)
    color_jitter_strength: list[float] = field(default_factory=lambda: [0.3, 0.3, 0.3, 0.05])
    # colour (RGB, 0..255) of the padding of a crop larger than the rescaled image: black as the official code;
    # [123.675, 116.28, 103.53] pads with the mean colour (0 after normalization), as mmsegmentation
    pad_rgb: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # RGB mean of the normalization (ImageNet)
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # RGB std of the normalization (ImageNet)
    ignore_index: int = 255  # label value of "ignore" in masks and pseudo labels
    # The recipe's total batch per optimizer step (VOC 4 = 2 GPUs x 2, COCO 8 = 4 GPUs x 2). It is split
    # into world size x images per forward x accumulation steps (see train.accumulation_steps).
    total_batch_size: int = 4
    batch_size: int = 2  # images per forward pass and process (at most; lowered when the total needs it)
    num_workers: int = 4  # DataLoader worker processes per training / inference process


@dataclass
class MaskDecoderConfig:
    # standard softmax, Mask2Former "masked", kMaX-DeepLab "kmeans" or HODOR "soft" cross-attention (docs/heads.md)
    cross_attention: Literal["standard", "masked", "kmeans", "soft"] = "masked"
    num_queries: int = 100  # learned object queries
    num_layers: int = 9  # decoder layers (each one predicts and is supervised: deep supervision)
    hidden_dim: int = 256  # width of the queries and the pixel features (divisible by num_heads and by 4)
    num_heads: int = 8  # attention heads of the cross- and self-attention
    ffn_dim: int = 2048  # hidden width of each layer's feed-forward network
    # HODOR per-head soft-mask scales s_h (learnable); one per head.
    soft_mask_scales: list[float] = field(default_factory=lambda: [32.0, 32.0, 16.0, 16.0, 8.0, 8.0, 4.0, 4.0])
    mask_threshold: float = 0.5  # Mask2Former: attend where sigmoid(mask) >= 0.5
    # Learning rate of the decoder = train.lr x lr_mult (instead of train.head_lr_mult, which suits
    # the SegFormer MLP head but makes a transformer decoder trained from scratch diverge).
    lr_mult: float = 1.0


@dataclass
class ModelConfig:
    # The single-stage method: "afa" (AFA + PAR, Ru et al. CVPR 2022: the afa section) or "toco" (token contrast,
    # Ru et al. CVPR 2023: the toco section; needs a plain timm ViT / DeiT backbone and seg_head "largefov").
    method: Literal["afa", "toco"] = "afa"
    # "mit_b0".."mit_b5", "timm:<name>" (e.g. "timm:vit_small_patch16_224"),
    # or "mit_tiny" (a small MiT for CPU demos and tests).
    backbone: str = "mit_b1"
    # "hub" = ImageNet weights by name (MiT: Hugging Face nvidia/mit-b*, timm: its own hub; cached the usual
    # way); a local file (.pth / .bin / .safetensors); "none" = random initialisation (an explicit choice).
    pretrained: str = "hub"
    strides: list[int] = field(default_factory=lambda: [4, 2, 2, 1])  # MiT stage strides; AFA keeps stage 4 at 1/16
    drop_path_rate: float = 0.1  # stochastic depth of the backbone blocks
    # MiT only, from scratch only: the width of a convolutional stem (three 3x3 convs, mit.conv_stem) in place
    # of the first patch embedding's 7x7 stride-4 conv; 0 = the published patch embedding.
    conv_stem: int = 0
    # MiT only, from scratch only: the first N stages (0-3) are a plain CNN's blocks (two 3x3 conv + BN + ReLU,
    # 2x2 max pooling per halving) in place of their patch embedding's conv and transformer blocks; stage 4, whose
    # attention feeds AFA, stays a transformer. Not in the paper: for classes told by shape, which MiT from scratch
    # does not learn from a few hundred images (docs/benchmarks.md, what a from-scratch model needs to learn shapes).
    conv_stages: int = 0
    # Image logits from the features: "gmp" (published), "gap", or "topk": the mean of each feature channel's
    # largest cam_topk fraction of tokens. Not in the paper; on the gray demo variant topk is the one pooling
    # with which PAR improved on the CAMs (docs/benchmarks.md, the gray variant).
    cam_pooling: Literal["gmp", "gap", "topk"] = "gmp"
    cam_topk: float = 0.25  # with cam_pooling "topk": the fraction of tokens averaged per channel
    # "segformer": the published all-MLP head (AFA); "mask_decoder": a query-based mask transformer
    # (mask_decoder); "largefov": two dilated 3x3 convs and a 1x1 on the last map (DeepLab-LargeFOV, ToCo's head)
    seg_head: Literal["segformer", "mask_decoder", "largefov"] = "segformer"
    # Feature pyramid between backbone and seg head. A plain ViT / DeiT gives four maps at its patch stride
    # (16), too coarse for thin structures; "vit" upsamples the first two to strides 4 and 8 with transposed
    # convolutions (heads.ViTFeaturePyramid); "auto" = "vit" for a backbone whose four maps share one stride,
    # "none" otherwise (MiT / PVT-v2 are hierarchical already: the published network, unchanged).
    seg_pyramid: Literal["auto", "none", "vit"] = "auto"
    seg_embed_dim: int = 256  # embedding width of the SegFormer head
    seg_dropout: float = 0.1  # Dropout2d before the SegFormer head's classifier (published head)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)  # read with seg_head "mask_decoder"


@dataclass
class TrainConfig:
    iterations: int = 20000  # optimizer steps of the whole run
    cam_iters: int = 2000  # classification only up to here
    afa_label_iter: int = 6000  # seg target switches to AFA-propagated labels here
    lr: float = 6e-5  # AdamW learning rate of the backbone (the peak, after the warm-up)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay
    head_lr_mult: float = 10.0  # lr multiplier of the classifier, the AFA conv and the seg head
    freeze_backbone_norm: bool = True  # backbone norm layers get lr 0 (the published optimizer groups)
    warmup_iters: int = 1500  # linear lr warm-up steps, then the poly decay
    warmup_ratio: float = 1e-6  # lr factor at step 0 of the warm-up
    poly_power: float = 1.0  # exponent p of the decay (1 - t / iterations)^p after the warm-up
    cls_loss_weight: float = 1.0  # weight of the multi-label classification loss
    seg_loss_weight: float = 0.1  # weight of the balanced segmentation loss (after cam_iters)
    aff_loss_weight: float = 0.1  # weight of the affinity loss (after cam_iters)
    # Gradient accumulation: micro-batches per optimizer step. 0 = derived from data.total_batch_size,
    # the world size and data.batch_size; a positive value must agree with them.
    accumulation_steps: int = 0
    # Official COCO script: from afa_label_iter on, the affinity labels also come from the AFA label
    # (random walk + PAR). The official VOC script keeps them on the PAR-refined CAM label (false).
    afa_label_for_affinity: bool = False
    sync_bn: bool = True  # SyncBatchNorm under DDP on accelerators: the seg head's (official code), a conv stem's
    # Dense-energy (CRF) regularisation loss on the seg output (Tang et al., ECCV 2018); the released AFA
    # code has it commented out (weight 0.01 there): 0 = off. Gaussian bilateral kernel at reg_scale of the
    # crop, limited to a (2 reg_radius + 1)^2 window (see docs/method.md).
    reg_loss_weight: float = 0.0
    reg_sigma_rgb: float = 15.0  # colour bandwidth of the regularisation kernel (RGB on 0..255)
    reg_sigma_xy: float = 100.0  # spatial bandwidth of the regularisation kernel, pixels of the crop
    reg_scale: float = 0.5  # the regularisation loss runs at this fraction of the crop size
    reg_radius: int = 5  # window radius of the regularisation kernel, pixels at reg_scale
    # autocast of every phase: "bf16" on any device, "fp16" on CUDA only (with a grad scaler), "fp32" = none
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # torch.compile the backbone (every pass; one graph per input shape and grad mode; same checkpoints). Off by
    # default: no measurable gain on 2 CPU cores in short runs, and compiled drop-path draws other random numbers.
    compile: bool = False
    # glibc (Linux) only, set once per process when training starts: keep freed host memory for the next
    # iteration instead of returning it and faulting it in again (2 CPU cores: the VOC multi-scale CAM passes
    # 1.25 -> 1.13 s); false = glibc's defaults.
    keep_host_memory: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # seed of the weights, the augmentation and drop-path (a resumed run continues exactly)
    log_interval: int = 50  # iterations between loss lines in train.log / metrics.jsonl
    # Stalled-learning check: from this iteration on, the mean classification loss of each log interval and that
    # on val at each validation are compared with stall_ratio x the loss of predicting each class's training
    # frequency for every image; the first time one is above, one warning and a {"kind": "stalled"} record in
    # metrics.jsonl. -1 = auto: warmup_iters + 500 (voc / coco 2000, demo 600); 0 = never.
    stall_check_iter: int = -1
    stall_ratio: float = 0.9  # stall_check_iter warns while a cls loss > stall_ratio x the label prior's loss
    val_interval: int = 2000  # iterations between validations (and one at the end); 0 = no validation
    ckpt_interval: int = 1000  # iterations between writes of last.pt (and one at the end)
    keep_checkpoints: int = 0  # also keep the last N interval checkpoints (iter_<N>.pt) besides last.pt / best.pt
    # "tensorboard" (<work_dir>/tb) and / or "wandb" (Weights & Biases; pip install 'wsss[wandb]'; WANDB_MODE=offline
    # to log without an account). metrics.jsonl and train.log are always written.
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "wsss"  # Weights & Biases project of the "wandb" logger
    image_log_interval: int = 500  # iterations between TensorBoard image grids; 0 = none
    work_dir: str = "work_dirs/voc"  # where the run writes its files (`--work-dir` sets it)


@dataclass
class CamConfig:
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5])  # image scales of the multi-scale CAM
    flip: bool = True  # add the horizontal flip at each CAM scale (elementwise max)
    bg_threshold_high: float = 0.55  # background score of the training labels: foreground must beat it
    bg_threshold_low: float = 0.35  # background score below which a pixel is sure background; between: ignored
    # the one background score of CAM labels in validation and evaluation (ToCo: also of the PTC token label)
    bg_threshold_eval: float = 0.45
    # Training's scale-1 unflipped CAMs: "always" = from the training pass (one forward less per iteration; with
    # drop-path another random sample than a separate pass, docs/method.md sec. 11.4); "exact" = only where that is
    # identical (no active drop-path / dropout / batch-statistics BatchNorm); "never" = a separate pass (official).
    reuse_train_pass: Literal["always", "exact", "never"] = "always"


@dataclass
class ParConfig:
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])  # 8 neighbours at each dilation
    w1: float = 0.3  # temperature of the RGB and the position affinity terms
    w2: float = 0.01  # weight of the position term added to the RGB term
    iterations: int = 10  # refinement steps m <- kernel * m
    scale: float = 0.5  # PAR runs at this fraction of the input resolution


@dataclass
class AfaConfig:
    attn_blocks: int = 2  # last blocks whose raw attention logits feed the AFA head
    radius: int = 8  # Chebyshev window radius on the token grid
    rw_power: int = 2  # elementwise power of the affinity before the random walk
    rw_eps: float = 0.1  # T = A / (column sums + eps)
    affinity_scale: float = 1.5  # the CAM scale whose affinity drives the random walk
    bg_threshold_eval: float = 0.35  # background score of the random walk in validation (official validate())
    # Scale of the raw attention logits fed to the AFA head: "none" = raw q.k^T (official, MiT);
    # "standardize" = per map zero mean, unit std over the token pairs (scale-free: pretrained ViTs, whose
    # logits saturate the head's sigmoid); "auto" = none for MiT backbones, standardize for timm ones.
    attn_norm: Literal["auto", "none", "standardize"] = "auto"


@dataclass
class ToCoConfig:
    """Token contrast (model.method "toco"); the defaults are the official VOC script's."""

    aux_layer: int = -3  # the block (Python index into the blocks) whose patch tokens give the auxiliary CAM
    aux_cls_loss_weight: float = 1.0  # weight of the auxiliary classification loss
    ptc_loss_weight: float = 0.2  # patch-token contrast on the last block's tokens, pairs from the aux CAM
    ctc_loss_weight: float = 0.5  # class-token contrast between the global and local views
    temperature: float = 0.5  # of the CTC loss
    momentum: float = 0.9  # EMA of the teacher projection head, every iteration
    num_local_crops: int = 8  # local crops from the uncertain region (the CTC sees 2 global + these)
    local_crop_size: int = 96  # side of a local crop, pixels of the training crop
    proj_dim: int = 1024  # output width of the projection heads
    proj_hidden_dim: int = 2048  # hidden width of their MLP
    proj_bottleneck_dim: int = 256  # width before the unit-row last layer
    proj_layers: int = 3  # linear layers of the MLP
    view2_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # random resized crop of global view 2
    # the views' photometric augmentation (DINO's): colour jitter strengths (brightness, contrast, saturation, hue)
    view_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    view_jitter_p: float = 0.8  # probability of the colour jitter, each view
    view_grayscale_p: float = 0.2  # probability of grayscale, each view
    view_blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # Gaussian blur sigma range
    view_blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # blur probability: view 1, 2, local
    view_solarize_p: float = 0.2  # probability of solarization, global view 2 only
    # Official COCO schedule: the PTC and CTC losses count from this iteration on (weight 0 before; VOC: 0)
    contrast_from_iter: int = 0
    seg_label_from_aux_until: int = 0  # the seg target is the refined auxiliary CAM label until here (COCO)
    # The padding box of the PTC pseudo label: "official" applies the crop's pixel box to the token grid as the
    # official code does (slices in pixels on a grid of tokens); "grid" scales it to the grid (docs/method.md)
    ptc_label_box: Literal["official", "grid"] = "official"


@dataclass
class EvalConfig:
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.75])  # test scales of --msc (max over them)
    flip: bool = True  # with --msc: average each scale's logits with the flipped image's
    long_side: int = 512  # test images are resized so their long side is this
    crf: bool = False  # not read: `--crf` of wsss eval / predict / pseudolabel switches DenseCRF on
    crf_iterations: int = 10  # DenseCRF mean-field iterations
    crf_gaussian_sxy: float = 3.0  # DenseCRF Gaussian (smoothness) kernel: spatial std, pixels
    crf_gaussian_compat: float = 3.0  # DenseCRF Gaussian kernel: weight
    crf_bilateral_sxy: float = 64.0  # DenseCRF bilateral (appearance) kernel: spatial std, pixels
    crf_bilateral_srgb: float = 5.0  # DenseCRF bilateral kernel: colour std (RGB on 0..255)
    crf_bilateral_compat: float = 4.0  # DenseCRF bilateral kernel: weight
    crf_workers: int = 2  # processes running DenseCRF in parallel


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    par: ParConfig = field(default_factory=ParConfig)
    afa: AfaConfig = field(default_factory=AfaConfig)
    toco: ToCoConfig = field(default_factory=ToCoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- #
# loading and validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where lossless."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(valid)}")


def _set(obj: Any, path: list[str], value: Any, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    name = path[0]
    key = f"{prefix}{name}"
    if name not in hints:
        raise _unknown_key(key, [f.name for f in fields(obj)])
    tp = hints[name]
    if len(path) > 1:
        if not is_dataclass(tp):
            raise ConfigError(f"config key '{key}' is {_type_name(tp)}, it has no sub-key '{path[1]}'")
        _set(getattr(obj, name), path[1:], value, f"{key}.")
        return
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of its sub-keys, got {value!r}")
        for sub, v in value.items():
            _set(getattr(obj, name), [str(sub)], v, f"{key}.")
        return
    setattr(obj, name, _coerce(value, tp, key))


def apply_mapping(cfg: Config, mapping: dict[str, Any], source: str = "") -> Config:
    """Apply a nested mapping (as read from YAML) onto ``cfg`` in place."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source or 'config'} must be a mapping of sections, got {type(mapping).__name__}")
    for key, value in mapping.items():
        _set(cfg, [str(key)], value)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key.split("."), value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks the types alone cannot express."""
    checks = [
        (cfg.data.crop_size > 0, "data.crop_size must be positive"),
        (cfg.data.batch_size > 0, "data.batch_size must be positive"),
        (cfg.data.total_batch_size > 0, "data.total_batch_size must be positive"),
        (cfg.train.accumulation_steps >= 0, "train.accumulation_steps must be >= 0 (0 = derived)"),
        (cfg.train.reg_loss_weight >= 0, "train.reg_loss_weight must be >= 0"),
        (cfg.train.keep_checkpoints >= 0, "train.keep_checkpoints must be >= 0"),
        (cfg.train.stall_check_iter >= -1,
         f"train.stall_check_iter must be -1 (auto: train.warmup_iters + 500), 0 (no stalled-learning check) or "
         f"the iteration of the first check, got {cfg.train.stall_check_iter}"),
        (0 < cfg.train.stall_ratio < float("inf"),
         f"train.stall_ratio must be a positive number (the stalled-learning warning fires while the mean "
         f"classification loss is above stall_ratio x the label prior loss), got {cfg.train.stall_ratio}"),
        (set(cfg.train.loggers) <= {"tensorboard", "wandb"},
         f"train.loggers must be a list of 'tensorboard' and / or 'wandb', got {cfg.train.loggers}"),
        (cfg.train.reg_sigma_rgb > 0 and cfg.train.reg_sigma_xy > 0,
         "train.reg_sigma_rgb and train.reg_sigma_xy must be positive"),
        (0 < cfg.train.reg_scale <= 1, "train.reg_scale must be in (0, 1]"),
        (cfg.train.reg_radius >= 1, "train.reg_radius must be >= 1"),
        (cfg.model.pretrained.strip() != "",
         "model.pretrained must be 'hub', 'none' or the path of a weight file (got an empty string)"),
        (len(cfg.data.rescale_range) == 2 and 0 < cfg.data.rescale_range[0] <= cfg.data.rescale_range[1],
         "data.rescale_range must be [low, high] with 0 < low <= high"),
        (len(cfg.data.mean) == 3 and len(cfg.data.std) == 3, "data.mean and data.std must have 3 values"),
        (len(cfg.data.pad_rgb) == 3 and all(0 <= v <= 255 for v in cfg.data.pad_rgb),
         "data.pad_rgb must be 3 values in 0..255"),
        (len(cfg.model.strides) == 4, "model.strides must have 4 values, one per stage"),
        (len(cfg.train.betas) == 2, "train.betas must be [beta1, beta2]"),
        (cfg.train.iterations > 0, "train.iterations must be positive"),
        (0 <= cfg.train.cam_iters <= cfg.train.afa_label_iter,
         "train.cam_iters must be >= 0 and <= train.afa_label_iter"),
        (0 < cfg.cam.bg_threshold_low <= cfg.cam.bg_threshold_high < 1,
         "cam thresholds must satisfy 0 < bg_threshold_low <= bg_threshold_high < 1"),
        (len(cfg.cam.scales) > 0 and all(s > 0 for s in cfg.cam.scales), "cam.scales must be positive numbers"),
        (cfg.model.method != "afa" or cfg.afa.affinity_scale in cfg.cam.scales,
         f"afa.affinity_scale ({cfg.afa.affinity_scale}) must be one of cam.scales {cfg.cam.scales}"),
        (cfg.afa.attn_blocks >= 1, "afa.attn_blocks must be >= 1"),
        (cfg.afa.radius >= 0, "afa.radius must be >= 0"),
        (len(cfg.par.dilations) > 0 and all(d > 0 for d in cfg.par.dilations), "par.dilations must be positive"),
        (0 < cfg.par.scale <= 1, "par.scale must be in (0, 1]"),
        (len(cfg.eval.scales) > 0 and all(s > 0 for s in cfg.eval.scales), "eval.scales must be positive numbers"),
        (len(cfg.model.mask_decoder.soft_mask_scales) == cfg.model.mask_decoder.num_heads,
         "model.mask_decoder.soft_mask_scales must have one value per head (model.mask_decoder.num_heads)"),
        (cfg.model.mask_decoder.lr_mult > 0, "model.mask_decoder.lr_mult must be positive"),
        (0 <= cfg.model.seg_dropout < 1, "model.seg_dropout must be in [0, 1)"),
        (len(cfg.data.color_jitter_strength) == 4 and all(v >= 0 for v in cfg.data.color_jitter_strength)
         and cfg.data.color_jitter_strength[3] <= 0.5,
         "data.color_jitter_strength must be [brightness, contrast, saturation, hue], >= 0, hue <= 0.5"),
        *_toco_checks(cfg),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _toco_checks(cfg: Config) -> list[tuple[bool, str]]:
    t = cfg.toco
    checks = [
        (t.temperature > 0, "toco.temperature must be positive"),
        (0 <= t.momentum < 1, "toco.momentum must be in [0, 1)"),
        (t.num_local_crops >= 0, "toco.num_local_crops must be >= 0"),
        (t.proj_layers >= 1, "toco.proj_layers must be >= 1"),
        (t.contrast_from_iter >= 0 and t.seg_label_from_aux_until >= 0,
         "toco.contrast_from_iter and toco.seg_label_from_aux_until must be >= 0"),
        (len(t.view2_scale) == 2 and 0 < t.view2_scale[0] <= t.view2_scale[1] <= 1,
         "toco.view2_scale must be [low, high] with 0 < low <= high <= 1"),
        (len(t.view_jitter) == 4 and all(v >= 0 for v in t.view_jitter) and t.view_jitter[3] <= 0.5,
         "toco.view_jitter must be [brightness, contrast, saturation, hue], >= 0, hue <= 0.5"),
        (len(t.view_blur_sigma) == 2 and 0 < t.view_blur_sigma[0] <= t.view_blur_sigma[1],
         "toco.view_blur_sigma must be [low, high] with 0 < low <= high"),
        (len(t.view_blur_p) == 3 and all(0 <= p <= 1 for p in t.view_blur_p),
         "toco.view_blur_p must be 3 probabilities (global view 1, global view 2, local source)"),
        (all(0 <= p <= 1 for p in (t.view_jitter_p, t.view_grayscale_p, t.view_solarize_p)),
         "toco.view_jitter_p, view_grayscale_p and view_solarize_p must be probabilities"),
    ]
    if cfg.model.method == "toco":
        checks += [
            (0 < t.local_crop_size < cfg.data.crop_size,
             f"toco.local_crop_size ({t.local_crop_size}) must be positive and smaller than data.crop_size "
             f"({cfg.data.crop_size})"),
            (cfg.model.seg_head == "largefov",
             f"model.method 'toco' has the LargeFOV seg head: set model.seg_head to 'largefov' "
             f"(got {cfg.model.seg_head!r})"),
        ]
    return checks


def builtin_config_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("wsss.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder named like a config is not one
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        text, source = path.read_text(), str(path)
    else:
        res = resources.files("wsss.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"unknown config '{name_or_path}'; expected one of {', '.join(builtin_config_names())} "
                "or a path to a .yaml file"
            )
        text, source = res.read_text(), f"configs/{name_or_path}.yaml"
    try:
        mapping = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{source}' is not valid YAML: {exc}") from None
    return mapping, source


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (a built-in name or a path), then ``key=value`` overrides.

    A YAML file may name a ``base`` config whose values it extends.
    """
    cfg = Config()
    if name_or_path:
        chain: list[tuple[dict[str, Any], str]] = []
        seen: set[str] = set()
        current: str | None = name_or_path
        while current:
            if current in seen:
                raise ConfigError(f"config '{current}' names itself as its base")
            seen.add(current)
            mapping, source = _read_yaml(current)
            if not isinstance(mapping, dict):
                raise ConfigError(f"config file '{source}' must be a mapping of sections")
            base = mapping.pop("base", None)
            chain.append((mapping, source))
            if base is not None and Path(current).exists() and not Path(str(base)).is_absolute():
                sibling = Path(current).parent / str(base)
                base = str(sibling) if sibling.exists() else base
            current = base
        for mapping, source in reversed(chain):
            apply_mapping(cfg, mapping, source)
    return apply_overrides(cfg, overrides or [])


def config_from_dict(mapping: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a checkpoint)."""
    cfg = apply_mapping(Config(), mapping)
    if "attn_norm" not in mapping.get("afa", {}):  # written before the key existed: raw logits were used
        cfg.afa.attn_norm = "none"
    if cfg.model.pretrained == "":  # checkpoints written before "none" existed meant random initialisation
        cfg.model.pretrained = "none"
    validate(cfg)
    return cfg


__all__ = [
    "AfaConfig", "CamConfig", "Config", "DataConfig", "EvalConfig", "MaskDecoderConfig", "ModelConfig",
    "ParConfig", "TrainConfig", "apply_overrides", "config_from_dict", "load_config",
]
