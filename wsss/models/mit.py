"""Mix Transformer (MiT), the SegFormer encoder, exposing raw attention logits for AFA.

SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers
(Xie et al., NeurIPS 2021, arXiv 2105.15203). Module and parameter names follow the
official ``mix_transformer.py`` so the published ImageNet ``mit_b*.pth`` files load
as they are (``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``, ...); the
Hugging Face ``nvidia/mit-b*`` checkpoints (both the transformers 4 naming
``encoder.block.0.0.attention.self.query.weight`` and the transformers 5 naming
``stages.0.blocks.0.attention.q_proj.weight``) are converted on load.

AFA (Ru et al., CVPR 2022) changes two things: stage strides are configurable
(``[4, 2, 2, 1]`` puts stage 4 at 1/16), and the last ``attn_blocks`` blocks of
stage 4 return their raw attention logits q.k^T (or, for the CAM passes, the q and k
they are the product of: :mod:`wsss.models.attn_factors`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, DropPath, trunc_normal_
from torch import Tensor, nn

from wsss.errors import ConfigError, WsssError
from wsss.models.attn_factors import AttnFactors, AttnRecord, concat_attn, record_mode
from wsss.models.weights import RANDOM_INIT, download_from_hf, load_state_dict_checked, read_state_dict

# LayerNorm epsilon of the blocks and stage norms in the official code (patch-embed and
# spatial-reduction norms use the PyTorch default 1e-5).
_BLOCK_NORM_EPS = 1e-6
_MLP_RATIO = 4
_PATCH_KERNELS = (7, 3, 3, 3)
_REDUCED = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class MiTSpec:
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    sr_ratios: tuple[int, int, int, int]


_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)
_SR = (8, 4, 2, 1)
MIT_SPECS: dict[str, MiTSpec] = {
    "mit_b0": MiTSpec((32, 64, 160, 256), (2, 2, 2, 2), _HEADS, _SR),
    "mit_b1": MiTSpec(_WIDE, (2, 2, 2, 2), _HEADS, _SR),
    "mit_b2": MiTSpec(_WIDE, (3, 4, 6, 3), _HEADS, _SR),
    "mit_b3": MiTSpec(_WIDE, (3, 4, 18, 3), _HEADS, _SR),
    "mit_b4": MiTSpec(_WIDE, (3, 8, 27, 3), _HEADS, _SR),
    "mit_b5": MiTSpec(_WIDE, (3, 6, 40, 3), _HEADS, _SR),
    # Not a published model: small enough to train from scratch on 128 px images on a CPU.
    # Stage 4 has two blocks so the default afa.attn_blocks = 2 works.
    "mit_tiny": MiTSpec((32, 64, 128, 160), (1, 1, 1, 2), (1, 2, 4, 5), _SR),
}
HF_REPOS = {f"mit_b{i}": f"nvidia/mit-b{i}" for i in range(6)}


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows + LayerNorm: [B, C_in, H, W] -> tokens [B, h*w, C], (h, w)."""

    def __init__(self, in_chans: int, embed_dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (h, w)


def conv_stem(out_channels: int, width: int) -> nn.Sequential:
    """Early convolutions in place of the first patch embedding's 7x7 stride-4 conv (Xiao et al., "Early
    Convolutions Help Transformers See Better", NeurIPS 2021): 3x3 stride 2 -> BN -> GELU -> 3x3 -> BN -> GELU
    -> 3x3 stride 2, ``width`` channels inside; [B, 3, H, W] -> [B, out_channels, H/4, W/4]."""
    return nn.Sequential(
        ConvNormAct(3, width, 3, stride=2, act_layer="gelu"),
        ConvNormAct(width, width, 3, act_layer="gelu"),
        nn.Conv2d(width, out_channels, 3, stride=2, padding=1),
    )


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values are spatially reduced by ``sr_ratio``."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, hw: tuple[int, int], record: str | None = None) -> tuple[Tensor, AttnRecord]:
        """x [B, N, C] -> (out [B, N, C], what ``record`` asks: None; "logits", the raw q.k^T
        [B, heads, N, M]; or "factors", those logits as :class:`AttnFactors` (q, k))."""
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)  # [B, h, N, d]
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        k, v = self.kv(x).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # The logits only where AFA asks for them. With autograd the explicit softmax(logits) @ v is the faster
        # way to the output (its backward reuses the logits); without (the CAM passes), and wherever no logits
        # are asked, fused SDPA is (measured: 53 vs 77 ms per block at 900 tokens, 2 CPU threads).
        kept: AttnRecord = None
        if record == "factors":
            kept = AttnFactors(q, k)
        elif record == "logits":
            kept = q @ k.transpose(-2, -1)
        if isinstance(kept, Tensor) and torch.is_grad_enabled():
            out = (kept * self.scale).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), kept


class DWConv(nn.Module):
    """3x3 depthwise conv on tokens (Mix-FFN's implicit position encoding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, *hw)
        if x.device.type == "cpu" and (x.dtype in _REDUCED or torch.is_autocast_enabled("cpu")):
            # PyTorch has no fast reduced-precision depthwise conv on CPU (it loops over the
            # channels, ~50x slower than fp32); this memory-bound layer runs in fp32 there.
            with torch.autocast("cpu", enabled=False):
                w = self.dwconv.weight.float()
                out = F.conv2d(x.float(), w, self.dwconv.bias.float(), padding=1, groups=c).to(x.dtype)
        else:
            out = self.dwconv(x)
        return out.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), hw)))


class MiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * _MLP_RATIO)

    def forward(self, x: Tensor, hw: tuple[int, int], record: str | None = None) -> tuple[Tensor, AttnRecord]:
        out, kept = self.attn(self.norm1(x), hw, record)
        x = x + self.drop_path(out)
        x = x + self.drop_path(self.mlp(self.norm2(x), hw))
        return x, kept


class MixVisionTransformer(nn.Module):
    """MiT encoder. ``forward(x, with_attn)`` -> (4 features [B, C_i, H/s_i, W/s_i], logits | None).

    The logits are the raw q.k^T of the last ``attn_blocks`` blocks of stage 4, concatenated
    over blocks: [B, attn_blocks * heads_4, N, N] with N = h4 * w4 (stage 4 has no spatial
    reduction, so keys = queries = the stage-4 tokens). With ``factored`` they come as
    :class:`AttnFactors` (q, k [B, attn_blocks * heads_4, N, d]) and are never multiplied out.
    """

    def __init__(
        self,
        spec: MiTSpec,
        strides: list[int] | tuple[int, ...] = (4, 2, 2, 1),
        attn_blocks: int = 2,
        drop_path_rate: float = 0.0,
        name: str = "mit",
        stem_width: int = 0,
        conv_stages: int = 0,
    ) -> None:
        super().__init__()
        if len(strides) != 4 or any(int(s) < 1 for s in strides):
            raise ConfigError(f"model.strides must be 4 positive integers, got {list(strides)}")
        if stem_width < 0 or (stem_width > 0 and int(strides[0]) != 4):
            raise ConfigError(
                f"model.conv_stem={stem_width}: expected 0 (the published patch embedding) or a positive width "
                f"with model.strides[0] = 4 (the stem's two stride-2 convs), strides are {list(strides)}"
            )
        if not 0 <= conv_stages <= 3 or (conv_stages and stem_width):
            raise ConfigError(
                f"model.conv_stages={conv_stages}: expected 0 to 3 (stage 4 stays a transformer for AFA), and 0 "
                f"with model.conv_stem={stem_width} (the first conv stage replaces the stem): set one of them to 0"
            )
        if any(int(s) not in (1, 2, 4) for s in strides[:conv_stages]):
            raise ConfigError(f"model.conv_stages={conv_stages} needs strides 1, 2 or 4 in its stages (max pooling "
                              f"halves the resolution), strides are {list(strides)}")
        if not 1 <= attn_blocks <= spec.depths[3]:
            raise ConfigError(
                f"afa.attn_blocks={attn_blocks} but the last stage of {name} has {spec.depths[3]} blocks"
            )
        if spec.sr_ratios[3] != 1:
            raise ConfigError(f"{name}: the last stage must not reduce keys (sr ratio 1) to give N x N attention")
        self.spec = spec
        self.attn_blocks = attn_blocks
        self.out_channels = list(spec.embed_dims)
        self.attn_maps = attn_blocks * spec.num_heads[3]
        self.feature_strides = [math.prod(strides[: i + 1]) for i in range(4)]
        rates = torch.linspace(0, drop_path_rate, sum(spec.depths)).tolist()
        in_chans, first = 3, 0
        for i in range(4):
            dim = spec.embed_dims[i]
            self.add_module(f"patch_embed{i + 1}", OverlapPatchEmbed(in_chans, dim, _PATCH_KERNELS[i], int(strides[i])))
            blocks = [] if i < conv_stages else [
                MiTBlock(dim, spec.num_heads[i], spec.sr_ratios[i], rates[first + j]) for j in range(spec.depths[i])
            ]
            self.add_module(f"block{i + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{i + 1}", nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS))
            in_chans, first = dim, first + spec.depths[i]
        if stem_width:
            self.patch_embed1.proj = conv_stem(spec.embed_dims[0], stem_width)
        self.apply(_init_weights)
        for i in range(conv_stages):  # PyTorch's default initialisation, as a plain CNN's
            stage_in = 3 if i == 0 else spec.embed_dims[i - 1]
            getattr(self, f"patch_embed{i + 1}").proj = conv_stage(stage_in, spec.embed_dims[i], int(strides[i]))

    def forward(
        self, x: Tensor, with_attn: bool = False, factored: bool = False
    ) -> tuple[list[Tensor], Tensor | AttnFactors | None]:
        features: list[Tensor] = []
        kept: list = []
        mode = record_mode(with_attn, factored)
        for i in range(1, 5):
            x, hw = getattr(self, f"patch_embed{i}")(x)
            blocks = getattr(self, f"block{i}")
            for j, block in enumerate(blocks):
                record = mode if i == 4 and j >= len(blocks) - self.attn_blocks else None
                x, block_kept = block(x, hw, record)
                if block_kept is not None:
                    kept.append(block_kept)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, *hw)
            features.append(x)
        return features, concat_attn(kept) if with_attn else None


def _init_weights(m: nn.Module) -> None:
    """The official initialisation (truncated normal linears, He-normal convs)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def conv_stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """A convolutional MiT stage (``model.conv_stages``), a plain CNN's blocks: per halving of the resolution two
    3x3 conv -> BN -> ReLU and a 2x2 max pooling (two convs without pooling at stride 1);
    [B, in, H, W] -> [B, out, H / stride, W / stride]."""
    halvings = int(stride).bit_length() - 1
    layers: list[nn.Module] = []
    for i in range(max(halvings, 1)):
        layers += [ConvNormAct(in_channels if i == 0 else out_channels, out_channels, 3, act_layer="relu"),
                   ConvNormAct(out_channels, out_channels, 3, act_layer="relu")]
        if halvings:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- #
# checkpoint conversion

# Hugging Face names (relative to one block) -> official names. Both transformers
# generations: 4.x (hub files) and 5.x (SegformerModel.state_dict() today).
_HF_BLOCK_RENAMES = {
    "layer_norm_1": "norm1", "layernorm_before": "norm1",
    "layer_norm_2": "norm2", "layernorm_after": "norm2",
    "attention.self.query": "attn.q", "attention.q_proj": "attn.q",
    "attention.self.key": "attn.k", "attention.k_proj": "attn.k",
    "attention.self.value": "attn.v", "attention.v_proj": "attn.v",
    "attention.self.sr": "attn.sr", "attention.sequence_reduction.sequence_reduction": "attn.sr",
    "attention.self.layer_norm": "attn.norm", "attention.sequence_reduction.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "mlp.dense1": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "mlp.dense2": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
}
_HF_PATCH = re.compile(
    r"^(?:encoder\.patch_embeddings\.(\d)|stages\.(\d)\.patch_embeddings)\.(proj|layer_norm)\.(\w+)$"
)
_HF_BLOCK = re.compile(r"^(?:encoder\.block\.(\d)|stages\.(\d)\.blocks)\.(\d+)\.(.+)\.(\w+)$")
_HF_NORM = re.compile(r"^(?:encoder\.layer_norm\.(\d)|stages\.(\d)\.layer_norm)\.(\w+)$")
# Classifier / decoder keys of image-classification or segmentation checkpoints.
_DROPPED_PREFIXES = ("head.", "classifier.", "decode_head.")


def is_hf_state_dict(state: dict[str, Tensor]) -> bool:
    return any(_HF_PATCH.match(k.removeprefix("segformer.")) for k in state)


def convert_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face SegFormer (``segformer.`` prefix optional) -> official MiT names.

    Separate key / value projections are concatenated into the official ``attn.kv``.
    Keys that match no known pattern are kept as they are (and reported as unexpected).
    """
    out: dict[str, Tensor] = {}
    key_value: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("segformer.")
        new = _convert_hf_key(key) or key
        m = re.match(r"^(.*\.attn\.)(k|v)\.(\w+)$", new)
        if m:
            key_value.setdefault(f"{m[1]}kv.{m[3]}", {})[m[2]] = value
        else:
            out[new] = value
    for key, parts in key_value.items():
        if set(parts) == {"k", "v"}:
            out[key] = torch.cat([parts["k"], parts["v"]], dim=0)  # official kv weight = [k; v]
        else:  # incomplete pair: keep it under its own name so it is reported
            out.update({key.replace(".kv.", f".{p}."): t for p, t in parts.items()})
    return out


def _convert_hf_key(key: str) -> str | None:
    if m := _HF_PATCH.match(key):
        stage_a, stage_b, part, param = m.groups()
        return f"patch_embed{int(stage_a or stage_b) + 1}.{'proj' if part == 'proj' else 'norm'}.{param}"
    if m := _HF_BLOCK.match(key):
        stage_a, stage_b, j, inner, param = m.groups()
        if inner in _HF_BLOCK_RENAMES:
            return f"block{int(stage_a or stage_b) + 1}.{j}.{_HF_BLOCK_RENAMES[inner]}.{param}"
    if m := _HF_NORM.match(key):
        stage_a, stage_b, param = m.groups()
        return f"norm{int(stage_a or stage_b) + 1}.{param}"
    return None


def prepare_mit_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any supported naming -> official MiT names, classifier / decoder keys dropped."""
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    if is_hf_state_dict(state):
        state = convert_hf_state_dict(state)
    return {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}


def load_mit_weights(model: MixVisionTransformer, pretrained: str, name: str) -> None:
    """``pretrained``: a local file (official or Hugging Face naming) or "hub" (``nvidia/mit-b*``)."""
    if pretrained == "hub":
        if name not in HF_REPOS:
            raise WsssError(f"no published weights for '{name}'; set model.pretrained to 'none' or a file path")
        path = download_from_hf(HF_REPOS[name], ("model.safetensors", "pytorch_model.bin"))
        source = f"'{HF_REPOS[name]}' ({path.name})"
    else:
        path, source = pretrained, f"'{pretrained}'"
    load_state_dict_checked(model, prepare_mit_state_dict(read_state_dict(path)), source)


def create_mit(
    name: str,
    strides: list[int] | tuple[int, ...] = (4, 2, 2, 1),
    attn_blocks: int = 2,
    drop_path_rate: float = 0.0,
    pretrained: str = RANDOM_INIT,
    stem_width: int = 0,
    conv_stages: int = 0,
) -> MixVisionTransformer:
    if name not in MIT_SPECS:
        raise ConfigError(f"unknown MiT '{name}'; expected one of {', '.join(MIT_SPECS)}")
    if stem_width and pretrained != RANDOM_INIT:
        raise ConfigError(
            f"model.conv_stem={stem_width} replaces the first patch embedding, so the weights of model.pretrained="
            f"{pretrained!r} would not fit it: set model.pretrained=none (train from scratch) or model.conv_stem=0"
        )
    if conv_stages and pretrained != RANDOM_INIT:
        raise ConfigError(
            f"model.conv_stages={conv_stages} replaces transformer stages, so the weights of model.pretrained="
            f"{pretrained!r} would not fit them: set model.pretrained=none (train from scratch) or model.conv_stages=0"
        )
    model = MixVisionTransformer(MIT_SPECS[name], strides, attn_blocks, drop_path_rate, name, stem_width, conv_stages)
    if pretrained != RANDOM_INIT:
        load_mit_weights(model, pretrained, name)
    return model
