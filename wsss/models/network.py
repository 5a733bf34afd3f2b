"""The assembled AFA network: backbone + CAM classifier + segmentation head + affinity head.

A backbone whose four maps share one stride (a plain ViT / DeiT) also gets a feature pyramid in front of
the seg head (``model.seg_pyramid``, :class:`~wsss.models.heads.ViTFeaturePyramid`); MiT and PVT-v2 do not.

    net = build_network(cfg, num_classes=21)        # C classes incl. background
    out = net(images)                               # NetworkOutput, training pass
    cams, affinity = net.cam_forward(images, True)  # the ``cam_fn`` of multiscale_cam
    optimizer = torch.optim.AdamW(net.param_groups(cfg.train), betas=cfg.train.betas)

Optimizer parameter groups (docs/method.md sec. 7), always the same five, in
this order, each dict with "name", "params", "lr", "lr_mult", "weight_decay" (a scheduler
sets ``group["lr"] = lr_now * group["lr_mult"]``):

- ``backbone``       every backbone parameter not in a norm layer: lr x 1
- ``backbone_norm``  the backbone's LayerNorm / BatchNorm / GroupNorm parameters:
                     lr x 0 when ``train.freeze_backbone_norm`` (as the published code),
                     else lr x 1. Frozen by a zero learning rate, not ``requires_grad=False``,
                     so the groups, the optimizer state and a resumed run look the same
                     whichever way the flag is set.
- ``cam_afa_heads``  classifier + affinity 1x1 conv: lr x ``train.head_lr_mult``
- ``seg_head``       segmentation head (and its feature pyramid, if any): lr x ``train.head_lr_mult``
                     (SegFormer head) or x ``model.mask_decoder.lr_mult`` (mask decoder)
- ``seg_head_no_decay``  the head parameters its ``no_weight_decay()`` names (the mask
                     decoder's query / level embeddings and soft-mask scales, as
                     Mask2Former): the seg head's lr, weight decay 0; empty for the
                     SegFormer head
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from wsss.config import Config, TrainConfig
from wsss.errors import ConfigError
from wsss.models.backbones import TIMM_PREFIX, create_backbone
from wsss.models.heads import (
    ATTN_NORMS,
    AffinityHead,
    CamClassifier,
    LargeFOVHead,
    SegFormerHead,
    ViTFeaturePyramid,
)
from wsss.models.mit import MIT_SPECS

SEG_HEADS = ("segformer", "mask_decoder", "largefov")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


@dataclass
class NetworkOutput:
    cls_logits: Tensor  # [B, K]
    cams: Tensor  # [B, K, h, w] raw (no ReLU), stage-4 grid
    seg_logits: Tensor | None  # [B, C, H1, W1] at the finest map's resolution (1/4 for MiT / PVT / ViT + pyramid)
    seg_aux: list[Tensor] = field(default_factory=list)  # mask decoder deep supervision, [] for SegFormer
    affinity: Tensor | None = None  # [B, N, N] in [0, 1], N = h * w
    features: list[Tensor] = field(default_factory=list)  # the 4 backbone maps (ToCo: the last block's tokens)
    aux_cls_logits: Tensor | None = None  # ToCo: [B, K] of the auxiliary classifier (toco.aux_layer's tokens)
    aux_cams: Tensor | None = None  # ToCo: [B, K, h, w] raw auxiliary CAMs
    class_tokens: Tensor | None = None  # ToCo: [B, D] the class token after the final norm
    proj_student: Tensor | None = None  # ToCo: [(2 + n) B, P] student projections of the global + local views
    proj_teacher: Tensor | None = None  # ToCo: [2 B, P] teacher projections of the global views (no gradient)


def resolve_attn_norm(backbone_name: str, attn_norm: str) -> str:
    """afa.attn_norm for ``backbone_name`` (model.backbone) -> "none" | "standardize".

    "auto": "none" (raw q.k^T, the published head) for a MiT, "standardize" for a timm backbone,
    whose (pretrained) logits are large enough to saturate the head's sigmoid (AffinityHead).
    """
    if attn_norm in ATTN_NORMS:
        return attn_norm
    if attn_norm != "auto":
        raise ConfigError(f"afa.attn_norm must be 'auto', 'none' or 'standardize', got {attn_norm!r}")
    name = backbone_name.strip()
    if name in MIT_SPECS:
        return "none"
    if name.startswith(TIMM_PREFIX):
        return "standardize"
    raise ConfigError(f"afa.attn_norm='auto' does not know backbone {name!r}; set 'none' or 'standardize'")


class AFANetwork(nn.Module):
    """Backbone + CAM classifier + seg head + AFA affinity head (``num_classes`` = C incl. background).

    ``attn_norm``: the resolved afa.attn_norm ("none" | "standardize", see :func:`resolve_attn_norm`),
    kept as ``self.attn_norm`` for the run's log.
    """

    method = "afa"

    def __init__(
        self, backbone: nn.Module, seg_head: nn.Module, num_classes: int, cam_pooling: str = "gmp",
        attn_norm: str = "none", seg_pyramid: nn.Module | None = None, cam_topk: float = 0.25,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"the network needs at least 2 classes (background + 1), got {num_classes}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.classifier = CamClassifier(backbone.out_channels[-1], num_classes - 1, cam_pooling, cam_topk)
        self.affinity_head = AffinityHead(backbone.attn_maps, attn_norm)
        self.attn_norm = self.affinity_head.attn_norm
        self.seg_head = seg_head
        self.seg_pyramid = seg_pyramid  # maps the backbone's features for the seg head only (None: as they are)

    def forward(self, images: Tensor, with_seg: bool = True, with_affinity: bool = True) -> NetworkOutput:
        """images [B, 3, H, W] normalized -> NetworkOutput (seg / affinity None when not asked)."""
        features, attn_logits = self.backbone(images, with_attn=with_affinity)
        cls_logits, cams = self.classifier(features[-1])
        seg_logits, seg_aux = None, []
        if with_seg:
            seg_out = self.seg_head(self.seg_pyramid(features) if self.seg_pyramid is not None else features)
            seg_logits, seg_aux = seg_out if isinstance(seg_out, tuple) else (seg_out, [])
        affinity = self.affinity_head(attn_logits) if with_affinity else None
        return NetworkOutput(cls_logits, cams, seg_logits, list(seg_aux), affinity, features)

    def cam_forward(self, images: Tensor, with_affinity: bool = False) -> tuple[Tensor, Tensor | None]:
        """images [B, 3, H, W] -> (raw CAMs [B, K, h, w], affinity [B, N, N] | None).

        Backbone + classifier (+ affinity head) only: no seg head, no pooled logits, and
        attention only when ``with_affinity``, as q / k factors (:mod:`wsss.models.attn_factors`).
        """
        features, attn = self.backbone(images, with_attn=with_affinity, factored=True)
        cams = self.classifier.cam(features[-1])
        return cams, self.affinity_head(attn) if with_affinity else None

    def param_groups(self, train_cfg: TrainConfig) -> list[dict]:
        """The five optimizer groups of the module docstring; every trainable parameter once."""
        seg_modules = [m for m in (self.seg_pyramid, self.seg_head) if m is not None]
        heads = [*self.classifier.parameters(), *self.affinity_head.parameters()]
        return param_groups(self.backbone, heads, seg_modules, train_cfg, getattr(self.seg_head, "lr_mult", None))


def param_groups(backbone: nn.Module, head_params: list, seg_modules: list[nn.Module], train_cfg: TrainConfig,
                 seg_lr_mult: float | None = None) -> list[dict]:
    """The five optimizer groups of the module docstring for a network of ``backbone``, its new heads'
    parameters (lr x train.head_lr_mult) and the seg head's modules (lr x ``seg_lr_mult``, default
    head_lr_mult; the parameters a module's ``no_weight_decay()`` names go to the no-decay group)."""
    norm_ids = {id(p) for m in backbone.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    head_mult = train_cfg.head_lr_mult
    seg_mult = head_mult if seg_lr_mult is None else seg_lr_mult
    seg, seg_no_decay = [], []
    for module in seg_modules:
        no_decay_fn = getattr(module, "no_weight_decay", None)
        no_decay = set(no_decay_fn()) if no_decay_fn is not None else set()
        for n, p in module.named_parameters():
            (seg_no_decay if n in no_decay else seg).append(p)
    norm_mult = 0.0 if train_cfg.freeze_backbone_norm else 1.0
    specs = [
        ("backbone", [p for p in trainable if id(p) not in norm_ids], 1.0),
        ("backbone_norm", [p for p in trainable if id(p) in norm_ids], norm_mult),
        ("cam_afa_heads", head_params, head_mult),
        ("seg_head", seg, seg_mult),
        ("seg_head_no_decay", seg_no_decay, seg_mult),
    ]
    return [
        {
            "name": name,
            "params": [p for p in params if p.requires_grad],
            "lr": train_cfg.lr * mult,
            "lr_mult": mult,
            "weight_decay": 0.0 if name.endswith("_no_decay") else train_cfg.weight_decay,
        }
        for name, params, mult in specs
    ]


def build_seg_head(cfg: Config, in_channels: list[int], num_classes: int) -> nn.Module:
    kind = cfg.model.seg_head
    if kind == "largefov":
        if cfg.model.method != "toco":
            raise ConfigError("model.seg_head 'largefov' is ToCo's head (model.method 'toco'); the AFA network "
                              "takes 'segformer' or 'mask_decoder'")
        return LargeFOVHead(in_channels[-1], num_classes)
    if kind == "segformer":
        return SegFormerHead(in_channels, num_classes, cfg.model.seg_embed_dim, cfg.model.seg_dropout)
    if kind == "mask_decoder":
        from wsss.models.mask_decoder import MaskDecoderHead

        return MaskDecoderHead(in_channels, num_classes, cfg.model.mask_decoder)
    raise ConfigError(f"model.seg_head must be one of {', '.join(SEG_HEADS)}, got {kind!r}")


def build_seg_pyramid(kind: str, backbone: nn.Module) -> ViTFeaturePyramid | None:
    """model.seg_pyramid for ``backbone`` -> the pyramid in front of the seg head, or None.

    "auto": a pyramid when the backbone's four maps share one stride (a plain ViT / DeiT), none for a
    hierarchical backbone (MiT, PVT-v2: the published network). "vit" on a hierarchical backbone is an error.
    """
    single_stride = len(set(backbone.feature_strides)) == 1
    if kind == "auto":
        kind = "vit" if single_stride else "none"
    if kind == "none":
        return None
    if kind != "vit":
        raise ConfigError(f"model.seg_pyramid must be 'auto', 'none' or 'vit', got {kind!r}")
    if not single_stride:
        raise ConfigError(f"model.seg_pyramid='vit' needs a backbone whose four maps share one stride (a plain "
                          f"ViT / DeiT); this one has strides {list(backbone.feature_strides)}: use 'auto' or 'none'")
    return ViTFeaturePyramid(list(backbone.out_channels))


def build_network(cfg: Config, num_classes: int) -> nn.Module:
    """The network of ``cfg.model`` for ``num_classes`` = C classes including background: an AFANetwork
    (afa.attn_norm "auto" resolved for the backbone: ``network.attn_norm``), or with model.method "toco" a
    :class:`wsss.models.toco.ToCoNetwork`."""
    if cfg.model.method == "toco":
        from wsss.models.toco import build_toco_network

        return build_toco_network(cfg, num_classes)
    backbone = create_backbone(cfg.model, cfg.afa.attn_blocks)  # first: its error names the accepted backbones
    attn_norm = resolve_attn_norm(cfg.model.backbone, cfg.afa.attn_norm)
    pyramid = build_seg_pyramid(cfg.model.seg_pyramid, backbone)
    in_channels = pyramid.out_channels if pyramid is not None else backbone.out_channels
    seg_head = build_seg_head(cfg, list(in_channels), num_classes)
    return AFANetwork(backbone, seg_head, num_classes, cfg.model.cam_pooling, attn_norm, pyramid, cfg.model.cam_topk)
