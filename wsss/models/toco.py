"""The ToCo network (token contrast, Ru et al., CVPR 2023): a plain ViT, a CAM classifier on its last block's
patch tokens and an auxiliary one on an intermediate block's, the class-token projection heads (student and EMA
teacher, :mod:`wsss.models.toco_heads`) and a LargeFOV seg head on the last tokens.

    net = build_network(cfg, num_classes=21)       # cfg.model.method == "toco"
    out = net(images)                              # NetworkOutput with aux_cls_logits, aux_cams, class_tokens
    cams, aux = net.cams_with_aux(images)          # the CAM passes of the training step
    teacher = net.teach(class_tokens)              # the EMA head on (detached) class tokens

:class:`ToCoViT` runs a timm VisionTransformer as the official ``forward_features``: patch embedding, the
position embedding resampled bicubically (no anti-aliasing) to the input's grid at every call, the blocks, the
final norm; it returns the class token and the patch tokens after the norm, and the patch tokens of block
``aux_layer`` before it. As there, the position embedding is not trained. The optimizer groups are AFA's five (:func:`wsss.models.network.param_groups`): the
classifiers and the student projection head are the new heads (lr x ``train.head_lr_mult``); the teacher head
has no gradient (it follows the student by :func:`wsss.models.toco_heads.ema_update`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.config import Config, TrainConfig
from wsss.errors import ConfigError
from wsss.models.backbones import TIMM_PREFIX, _timm_family, create_timm_model
from wsss.models.heads import CamClassifier
from wsss.models.network import NetworkOutput, build_seg_head, param_groups
from wsss.models.toco_heads import ProjectionHead, ema_update


class ToCoViT(nn.Module):
    """images [B, 3, H, W] -> (class token [B, D], tokens [B, D, h, w] after the final norm, aux tokens
    [B, D, h, w] of block ``aux_layer`` before it), h = H // patch, w = W // patch."""

    def __init__(self, model: nn.Module, aux_layer: int, name: str) -> None:
        super().__init__()
        depth = len(model.blocks)
        if not -depth <= aux_layer < depth:
            raise ConfigError(f"toco.aux_layer={aux_layer} but {name} has {depth} blocks")
        if getattr(model, "cls_token", None) is None or model.num_prefix_tokens != 1 or model.no_embed_class:
            raise ConfigError(f"{name}: ToCo needs a ViT with one class token and no register tokens")
        self.model = model
        model.pos_embed.requires_grad_(False)  # the official ViT keeps its (pretrained) position embedding fixed
        self.aux_index = aux_layer % depth
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.embed_dim = int(model.embed_dim)
        self.out_channels = [self.embed_dim]
        grid = model.patch_embed.grid_size
        self.pos_grid = (int(grid[0]), int(grid[1]))

    def _position_embedding(self, h: int, w: int) -> Tensor:
        pos = self.model.pos_embed
        patch = pos[:, 1:].reshape(1, *self.pos_grid, -1).permute(0, 3, 1, 2)
        if (h, w) != self.pos_grid:  # at the same size bicubic is the identity: skip it
            patch = F.interpolate(patch, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], patch.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, _, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        m = self.model
        tokens = m.patch_embed.norm(m.patch_embed.proj(x).flatten(2).transpose(1, 2))
        x = torch.cat([m.cls_token.expand(b, -1, -1), tokens], dim=1) + self._position_embedding(h, w)
        x = m.norm_pre(m.pos_drop(x))
        aux = None
        for i, block in enumerate(m.blocks):
            x = block(x)
            if i == self.aux_index:
                aux = x
        x = m.norm(x)
        if self.aux_index == len(m.blocks) - 1:
            aux = x  # the official code replaces the last block's output by the normed one

        def grid(t: Tensor) -> Tensor:
            return t[:, 1:].transpose(1, 2).reshape(b, -1, h, w)

        return x[:, 0], grid(x), grid(aux)


class ToCoNetwork(nn.Module):
    """ToCoViT + classifier + auxiliary classifier + projection heads + seg head (C classes incl. background)."""

    method = "toco"

    def __init__(self, backbone: ToCoViT, seg_head: nn.Module, num_classes: int, projection: ProjectionHead,
                 cam_pooling: str = "gmp", cam_topk: float = 0.25) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"the network needs at least 2 classes (background + 1), got {num_classes}")
        self.num_classes = num_classes
        self.backbone = backbone
        dim = backbone.embed_dim
        self.classifier = CamClassifier(dim, num_classes - 1, cam_pooling, cam_topk)
        self.aux_classifier = CamClassifier(dim, num_classes - 1, cam_pooling, cam_topk)
        self.proj_head = projection
        self.proj_head_t = copy.deepcopy(projection)  # the teacher starts as the student
        self.proj_head_t.requires_grad_(False)
        self.seg_head = seg_head

    def forward(self, images: Tensor, with_seg: bool = True, with_affinity: bool = False,
                global_view2: Tensor | None = None, local_views: Tensor | None = None) -> NetworkOutput:
        """images [B, 3, H, W] normalized -> NetworkOutput (no affinity: ToCo has no affinity head).

        For the CTC loss give ``global_view2`` [B, 3, H, W] and ``local_views`` [n B, 3, s, s] (crop-major): the
        output's ``proj_student`` [(2 + n) B, P] are the student head's projections of the class tokens of
        ``images``, ``global_view2``, then the local views, ``proj_teacher`` [2 B, P] the teacher head's of the two
        global views. One backbone pass serves ``images`` and ``global_view2`` (the official code runs three over
        them: the training pass, the teacher's and the student's, which without drop-path or dropout are the same
        pass), one the local views.
        """
        b = images.shape[0]
        x = images if global_view2 is None else torch.cat([images, global_view2])
        cls_token, tokens, aux = self.backbone(x)
        tokens, aux = tokens[:b], aux[:b]
        cls_logits, cams = self.classifier(tokens)
        aux_logits, aux_cams = self.aux_classifier(aux)
        seg_logits = self.seg_head(tokens) if with_seg else None
        out = NetworkOutput(cls_logits, cams, seg_logits, features=[tokens], aux_cls_logits=aux_logits,
                            aux_cams=aux_cams, class_tokens=cls_token[:b])
        if global_view2 is not None and local_views is not None:
            local_tokens = self.backbone(local_views)[0]
            out.proj_student = self.proj_head(torch.cat([cls_token, local_tokens]))
            out.proj_teacher = self.teach(cls_token)
        return out

    def cams_with_aux(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images -> (raw CAMs, raw auxiliary CAMs), each [B, K, h, w] (the official ``cam_only`` pass)."""
        _, tokens, aux = self.backbone(images)
        return self.classifier.cam(tokens), self.aux_classifier.cam(aux)

    def cam_forward(self, images: Tensor, with_affinity: bool = False) -> tuple[Tensor, None]:
        """images -> (raw CAMs [B, K, h, w], None): the ``cam_fn`` of the CAM pipeline (no affinity)."""
        return self.classifier.cam(self.backbone(images)[1]), None

    def project(self, class_tokens: Tensor) -> Tensor:
        """class tokens [N, D] -> the student head's projections [N, proj_dim]."""
        return self.proj_head(class_tokens)

    @torch.no_grad()
    def teach(self, class_tokens: Tensor) -> Tensor:
        """class tokens [N, D] -> the teacher head's projections [N, proj_dim], no gradient."""
        return self.proj_head_t(class_tokens.detach())

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        ema_update(self.proj_head_t, self.proj_head, momentum)

    def param_groups(self, train_cfg: TrainConfig) -> list[dict]:
        heads = [*self.classifier.parameters(), *self.aux_classifier.parameters(), *self.proj_head.parameters()]
        return param_groups(self.backbone, heads, [self.seg_head], train_cfg)


def build_toco_network(cfg: Config, num_classes: int) -> ToCoNetwork:
    name = cfg.model.backbone.strip()
    if not name.startswith(TIMM_PREFIX) or _timm_family(name[len(TIMM_PREFIX):]) != "vit":
        raise ConfigError(f"model.method 'toco' needs a plain ViT / DeiT backbone ('timm:vit_base_patch16_224', "
                          f"'timm:deit_base_patch16_224', ...), got model.backbone '{name}'")
    if cfg.model.conv_stem or cfg.model.conv_stages:
        raise ConfigError("model.conv_stem (and model.conv_stages) is for a MiT backbone; with model.method "
                          "'toco' set it to 0")
    timm_name = name[len(TIMM_PREFIX):]
    model = create_timm_model(timm_name, cfg.model.drop_path_rate, cfg.model.pretrained)
    backbone = ToCoViT(model, cfg.toco.aux_layer, name)
    t = cfg.toco
    projection = ProjectionHead(backbone.embed_dim, t.proj_dim, t.proj_hidden_dim, t.proj_bottleneck_dim,
                                t.proj_layers)
    seg_head = build_seg_head(cfg, backbone.out_channels, num_classes)
    return ToCoNetwork(backbone, seg_head, num_classes, projection, cfg.model.cam_pooling, cfg.model.cam_topk)


__all__ = ["ToCoNetwork", "ToCoViT", "build_toco_network"]
