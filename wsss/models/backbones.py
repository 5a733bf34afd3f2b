"""Backbones by name: MiT (SegFormer) or a timm ViT / DeiT / PVT-v2, with attention logits.

Every backbone has the same small interface (:class:`Backbone`):

    features, attn_logits = backbone(images, with_attn=True)
    # features: 4 maps [B, C_i, H_i, W_i]; attn_logits: [B, attn_blocks * heads, N, N]
    features, factors = backbone(images, with_attn=True, factored=True)
    # factors: AttnFactors(q, k), each [B, attn_blocks * heads, N, d], with q @ k^T = attn_logits

``attn_logits`` are the RAW q.k^T (before scaling and softmax) of the last
``attn_blocks`` transformer blocks, over patch tokens only (no class, register
or distillation tokens), N = tokens of the last stage. Only those blocks compute
q.k^T explicitly, and only when ``with_attn`` is True; all other attention is
fused ``F.scaled_dot_product_attention``. With ``factored`` the logits are not multiplied
out at all (:mod:`wsss.models.attn_factors`) and every attention is fused.

Names (``model.backbone``): ``mit_b0`` .. ``mit_b5``, ``mit_tiny``, or
``timm:<name>`` for a timm VisionTransformer (``vit_*``, ``deit_*``, optionally with
a pretrained tag like ``vit_small_patch16_224.augreg_in21k``) or PVT-v2
(``pvt_v2_b0`` .. ``pvt_v2_b5``).

- ViT / DeiT: any input size (position embeddings resampled per forward); the four
  "stages" are the patch tokens of four evenly spaced blocks (e.g. 3, 6, 9, 12 of 12),
  after the final LayerNorm, all at the patch stride. ``model.strides`` does not apply.
- PVT-v2: its four stages; ``model.strides`` sets the stride of each stage's overlapping
  patch embedding like for MiT (the default [4, 2, 2, 1] puts stage 4 at 1/16).
"""

from __future__ import annotations

import difflib
import math
import sys
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from wsss.config import ModelConfig
from wsss.errors import ConfigError, WsssError, first_line
from wsss.models.attn_factors import AttnFactors, concat_attn, record_mode
from wsss.models.mit import MIT_SPECS, create_mit
from wsss.models.weights import RANDOM_INIT, load_state_dict_checked, read_state_dict

TIMM_PREFIX = "timm:"
# timm modules whose models we know how to take apart, and which family they are.
_TIMM_FAMILIES = {
    "timm.models.vision_transformer": "vit",
    "timm.models.deit": "vit",
    "timm.models.pvt_v2": "pvt",
}
ACCEPTED_NAMES = (
    f"{', '.join(MIT_SPECS)}, or 'timm:<name>' for a timm ViT / DeiT / PVT-v2 "
    "(e.g. 'timm:vit_small_patch16_224', 'timm:deit_tiny_patch16_224', 'timm:pvt_v2_b1')"
)


class Backbone(Protocol):
    """What the network needs from a backbone (an nn.Module: MixVisionTransformer, TimmBackbone)."""

    out_channels: list[int]  # channels of the 4 feature maps
    feature_strides: list[int]  # input pixels per feature cell, per map
    attn_maps: int  # attn_blocks * heads: channels of the attention logits

    def __call__(
        self, x: Tensor, with_attn: bool = False, factored: bool = False
    ) -> tuple[list[Tensor], Tensor | AttnFactors | None]: ...


def create_backbone(model_cfg: ModelConfig, attn_blocks: int) -> nn.Module:
    """The backbone named by ``model_cfg.backbone``, weights per ``model_cfg.pretrained``:
    "none" = random init, a file path = that file, "hub" = download by name."""
    name = model_cfg.backbone.strip()
    if name in MIT_SPECS:
        return create_mit(
            name, model_cfg.strides, attn_blocks, model_cfg.drop_path_rate, model_cfg.pretrained, model_cfg.conv_stem,
            model_cfg.conv_stages,
        )
    if name.startswith(TIMM_PREFIX):
        if model_cfg.conv_stem or model_cfg.conv_stages:
            raise ConfigError(f"model.conv_stem (and model.conv_stages) is for a MiT backbone trained from scratch, "
                              f"not '{name}': set it to 0")
        return create_timm_backbone(
            name[len(TIMM_PREFIX):], model_cfg.strides, attn_blocks, model_cfg.drop_path_rate, model_cfg.pretrained
        )
    close = difflib.get_close_matches(name, list(MIT_SPECS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"unknown model.backbone '{name}'{hint}; expected {ACCEPTED_NAMES}")


# --------------------------------------------------------------------------- #
# timm


class _AttentionWithLogits(nn.Module):
    """Shared core of the timm attention wrappers below.

    A wrapper adopts the wrapped module's own submodules (qkv / q / kv / proj, ...), so it
    reuses the same weights under the same state-dict names, and replaces only the
    attention product: fused SDPA normally; when ``record`` is "logits", explicit softmax of
    the scaled q.k^T, keeping the raw q.k^T over patch tokens in ``logits``; when it is
    "factors", fused SDPA, keeping the patch tokens' q and k as :class:`AttnFactors`.
    """

    def __init__(self, attn: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_heads: int = attn.num_heads
        self.head_dim: int = attn.head_dim
        self.scale: float = attn.scale
        self.attn_drop = attn.attn_drop
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.num_prefix_tokens = num_prefix_tokens
        self.record: str | None = None
        self.logits: Tensor | AttnFactors | None = None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """q [B, h, N, d], k / v [B, h, M, d] -> [B, h, N, d]."""
        if self.record is not None and attn_mask is not None:
            raise WsssError("attention logits cannot be recorded for a masked attention call")
        prefix = self.num_prefix_tokens
        if self.record == "logits":
            logits = q @ k.transpose(-2, -1)
            self.logits = logits[:, :, prefix:, prefix:]
            return self.attn_drop((logits * self.scale).softmax(dim=-1)) @ v
        if self.record == "factors":
            self.logits = AttnFactors(q[:, :, prefix:], k[:, :, prefix:])
        p = self.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)


class ViTAttentionWithLogits(_AttentionWithLogits):
    """Replaces ``timm.layers.Attention`` in a ViT / DeiT block."""

    def __init__(self, attn: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__(attn, num_prefix_tokens)
        self.qkv = attn.qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.norm = attn.norm
        self.gate = getattr(attn, "gate", None)
        self.attn_dim: int = getattr(attn, "attn_dim", self.num_heads * self.head_dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise WsssError("causal attention is not supported by the AFA backbone wrapper")
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._attend(self.q_norm(q), self.k_norm(k), v, attn_mask)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))


class PvtAttentionWithLogits(_AttentionWithLogits):
    """Replaces ``timm.models.pvt_v2.Attention`` in a last-stage block (no key reduction)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__(attn, num_prefix_tokens=0)
        self.q = attn.q
        self.kv = attn.kv

    def forward(self, x: Tensor, feat_size: list[int]) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj_drop(self.proj(self._attend(q, k, v).transpose(1, 2).reshape(b, n, c)))


class TimmBackbone(nn.Module):
    """A timm ViT / DeiT / PVT-v2 as a :class:`Backbone` (see the module docstring)."""

    def __init__(self, model: nn.Module, family: str, strides: list[int], attn_blocks: int, name: str) -> None:
        super().__init__()
        self.model = model
        self.family = family
        if family == "vit":
            blocks, depth = model.blocks, len(model.blocks)
            if not 1 <= attn_blocks <= depth:
                raise ConfigError(f"afa.attn_blocks={attn_blocks} but timm:{name} has {depth} blocks")
            # Four evenly spaced blocks stand in for the four stages (3, 6, 9, 12 of 12).
            self.feature_indices = [max(round(depth * (i + 1) / 4) - 1, 0) for i in range(4)]
            patch = model.patch_embed.patch_size[0]
            self.out_channels = [model.embed_dim] * 4
            self.feature_strides = [patch] * 4
            last_blocks = blocks[depth - attn_blocks:]
            for block in last_blocks:
                if not hasattr(block.attn, "qkv"):
                    raise WsssError(f"timm:{name}: its attention ({type(block.attn).__name__}) is not supported")
                block.attn = ViTAttentionWithLogits(block.attn, model.num_prefix_tokens)
        else:
            last = model.stages[3].blocks
            if not 1 <= attn_blocks <= len(last):
                raise ConfigError(
                    f"afa.attn_blocks={attn_blocks} but the last stage of timm:{name} has {len(last)} blocks"
                )
            self._set_pvt_strides(strides)
            self.out_channels = [stage.blocks[0].norm1.normalized_shape[0] for stage in model.stages]
            self.feature_strides = [math.prod(strides[: i + 1]) for i in range(4)]
            last_blocks = last[len(last) - attn_blocks:]
            for block in last_blocks:
                if block.attn.sr is not None or block.attn.pool is not None:
                    raise WsssError(f"timm:{name}: the last stage reduces its keys; AFA needs N x N attention")
                block.attn = PvtAttentionWithLogits(block.attn)
        self.recorders = [block.attn for block in last_blocks]
        self.attn_maps = attn_blocks * self.recorders[0].num_heads

    def _set_pvt_strides(self, strides: list[int]) -> None:
        if len(strides) != 4 or any(int(s) < 1 for s in strides):
            raise ConfigError(f"model.strides must be 4 positive integers, got {list(strides)}")
        embeds = [self.model.patch_embed] + [stage.downsample for stage in self.model.stages[1:]]
        for embed, stride in zip(embeds, strides):
            embed.proj.stride = (int(stride), int(stride))

    def forward(
        self, x: Tensor, with_attn: bool = False, factored: bool = False
    ) -> tuple[list[Tensor], Tensor | AttnFactors | None]:
        for recorder in self.recorders:
            recorder.record = record_mode(with_attn, factored)
        try:
            if self.family == "vit":
                features = self.model.forward_intermediates(
                    x, indices=self.feature_indices, norm=True, output_fmt="NCHW", intermediates_only=True
                )
            else:
                features = self.model.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
            logits = concat_attn([r.logits for r in self.recorders]) if with_attn else None
        finally:
            for recorder in self.recorders:
                recorder.record, recorder.logits = None, None
        return list(features), logits


def _timm_family(name: str) -> str:
    import timm
    from timm.models import model_entrypoint

    if not timm.is_model(name):
        candidates = timm.list_models(["vit_*", "deit*", "pvt_v2*"])
        close = difflib.get_close_matches(name.split(".")[0], candidates, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown timm model '{name}'{hint}; model.backbone must be {ACCEPTED_NAMES}")
    module = model_entrypoint(name).__module__
    if module not in _TIMM_FAMILIES:
        raise ConfigError(
            f"timm model '{name}' ({module}) is not supported; model.backbone must be {ACCEPTED_NAMES}"
        )
    return _TIMM_FAMILIES[module]


def create_timm_backbone(
    name: str, strides: list[int], attn_blocks: int, drop_path_rate: float = 0.0, pretrained: str = RANDOM_INIT
) -> TimmBackbone:
    family = _timm_family(name)
    kwargs: dict = {"dynamic_img_size": True, "dynamic_img_pad": True} if family == "vit" else {}
    model = create_timm_model(name, drop_path_rate, pretrained, **kwargs)
    return TimmBackbone(model, family, list(strides), attn_blocks, name)


def create_timm_model(name: str, drop_path_rate: float = 0.0, pretrained: str = RANDOM_INIT, **kwargs) -> nn.Module:
    """The timm model ``name`` without its classifier, weights per ``pretrained`` ("hub", a file path or
    "none"); a hub download that fails (offline, unknown tag) is one WsssError naming the fix."""
    import timm

    _timm_family(name)
    kwargs = {"num_classes": 0, "drop_path_rate": drop_path_rate, **kwargs}
    if pretrained == "hub":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- offline, unknown tag, HTTP errors: all mean "no weights"
            first = first_line(exc)
            try:
                hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
            except RuntimeError:  # an unknown pretrained tag
                hub_id = None
            where = f" (https://huggingface.co/{hub_id})" if hub_id else ""
            raise WsssError(
                f"could not load the pretrained weights of timm:{name} from the hub ({first}); download them{where} "
                "and set model.pretrained to the file path, or model.pretrained=none to train from random weights"
            ) from None
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if pretrained != RANDOM_INIT:
            _load_timm_file(model, pretrained, name)
    return model


def _load_timm_file(model: nn.Module, path: str, name: str) -> None:
    """A timm (or original-format, via timm's filter) state dict; classifier keys dropped."""
    state = read_state_dict(path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:  # noqa: BLE001 -- timm's converters assume a well-formed file
            raise WsssError(f"weight file '{path}' could not be converted for timm:{name}: {exc}") from None
    classifier = model.pretrained_cfg.get("classifier") or "head"
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(tuple(h + "." for h in heads))}
    load_state_dict_checked(model, state, f"'{path}'")
