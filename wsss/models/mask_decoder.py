"""Query-based mask-transformer segmentation head with switchable cross-attention.

One decoder (Mask2Former layout: Cheng et al., CVPR 2022) whose cross-attention is one of

- ``standard``: softmax over all keys (plain SDPA);
- ``masked``:   Mask2Former masked attention -- a query attends only where
                sigmoid(previous mask) >= ``mask_threshold`` (mask detached; a query whose
                mask is empty attends everywhere);
- ``kmeans``:   kMaX-DeepLab k-means cross-attention (Yu et al., ECCV 2022) -- every pixel
                is assigned to the query with the largest mask logit (one-hot argmax, no
                gradient) and each query adds the SUM of its pixels' values;
- ``soft``:     HODOR differentiable soft-masked attention (Athar et al., 2022) --
                logits_h = QK^T / sqrt(d_h) - s_h * (1 - M), M = sigmoid(previous mask), NOT
                detached, s_h learnable per head.

Layout: a light pixel decoder (1x1 lateral projections of the 4 backbone stages, FPN top-down
sum, 3x3 conv to per-pixel mask features at stage 1), then ``num_layers`` decoder layers
(cross-attention -> self-attention -> FFN, post-norm residuals, no dropout) reading the coarser
stages round robin (stage 4, 3, 2: level = layer % 3) with a level embedding and a sine
positional encoding. Every prediction (class logits over C + 1 with a no-object column, mask
logits = mask embedding of the query . per-pixel features) is returned for deep supervision.

Semantic output (MaskFormer): ``seg[c] = sum_q softmax(class_q)[c] * sigmoid(mask_q)`` with the
no-object column dropped. The head returns ``log(seg + SEMANTIC_EPS)`` so every consumer can
treat it like logits: ``F.cross_entropy`` on it is ``-log(seg_y / sum_c seg_c)`` (up to eps),
``softmax`` gives the normalized semantic map and ``argmax`` the predicted class, exactly as for
the SegFormer head. ``seg`` is not a distribution over classes (it may sum to more or less than
1 at a pixel); each entry lies in [0, num_queries].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.config import MaskDecoderConfig
from wsss.errors import ConfigError

# Added to the semantic map before the log: keeps the "logits" finite (>= log(eps)) and the
# cross-entropy gradient bounded where every query gives a class ~0 probability.
SEMANTIC_EPS = 1e-6

CROSS_ATTENTIONS = ("standard", "masked", "kmeans", "soft")


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------- #
# attention math (pure functions, vectorized over batch, heads, queries and keys)


def masked_attention_mask(mask_logits: Tensor, threshold: float) -> Tensor:
    """Mask2Former boolean attention mask, True = attend (SDPA convention).

    mask_logits [B, Q, S] -> bool [B, 1, Q, S] (broadcast over heads), detached. A query whose
    mask is empty everywhere attends to all keys: such rows are reset BEFORE the attention,
    so SDPA never sees a fully masked row (zeros there, NaN in a manual softmax).
    """
    with torch.no_grad():
        attend = mask_logits.detach().float().sigmoid() >= threshold
        attend = attend | ~attend.any(dim=-1, keepdim=True)
    return attend.unsqueeze(1)


def soft_attention_bias(mask_logits: Tensor, scales: Tensor) -> Tensor:
    """HODOR additive bias -s_h * (1 - M), M = sigmoid(mask logits), differentiable in both.

    mask_logits [B, Q, S], scales [H] -> [B, H, Q, S] in float32 (float64 stays float64).
    """
    soft_mask = _at_least_float32(mask_logits).sigmoid()
    return -_at_least_float32(scales).view(1, -1, 1, 1) * (1.0 - soft_mask.unsqueeze(1))


def kmeans_assignment(logits: Tensor) -> Tensor:
    """One-hot argmax over queries: logits [B, Q, S] -> float32 [B, Q, S] (ties: lowest index), no gradient."""
    with torch.no_grad():
        index = logits.detach().max(dim=1, keepdim=True).indices  # = argmax (first maximum), faster on CPU
        return torch.zeros(logits.shape, device=logits.device, dtype=torch.float32).scatter_(1, index, 1.0)


def kmeans_update(logits: Tensor, values: Tensor) -> Tensor:
    """kMaX k-means cross-attention update before its projection.

    logits [B, Q, S] (mask logits of every query at every key pixel), values [B, S, D]
    -> [B, Q, D] (at least float32): for every query the SUM of the values of the pixels assigned to it
    (argmax over queries). The assignment carries no gradient; the values do. The sum over up
    to S pixels runs in float32 also under autocast.
    """
    assignment = kmeans_assignment(logits)
    with torch.autocast(device_type=values.device.type, enabled=False):
        values = _at_least_float32(values)
        return torch.einsum("bqs,bsd->bqd", assignment.to(values.dtype), values)


def sine_position_encoding(height: int, width: int, dim: int, device: torch.device,
                           temperature: float = 10000.0) -> Tensor:
    """DETR 2D sine encoding, coordinates normalized to (0, 2*pi]: -> [height * width, dim].

    The first dim / 2 channels encode y, the rest x; dim must be divisible by 4.
    """
    quarter = dim // 4
    freq = temperature ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    y = (torch.arange(height, device=device, dtype=torch.float32) + 1) / height * 2 * math.pi
    x = (torch.arange(width, device=device, dtype=torch.float32) + 1) / width * 2 * math.pi
    pos_y = y[:, None] / freq  # [h, dim/4]
    pos_x = x[:, None] / freq  # [w, dim/4]
    pos_y = torch.cat([pos_y.sin(), pos_y.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    pos_x = torch.cat([pos_x.sin(), pos_x.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([pos_y, pos_x], dim=2).reshape(height * width, 4 * quarter)


def semantic_log_probs(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """MaskFormer semantic inference as "logits".

    class_logits [B, Q, C + 1] (last column = no object), mask_logits [B, Q, H, W]
    -> log(sum_q softmax(class_q)[:C] * sigmoid(mask_q) + SEMANTIC_EPS) [B, C, H, W], float32 (or float64).
    Computed in float32 (also under autocast): the log of small probabilities is where
    bf16 would hurt.
    """
    with torch.autocast(device_type=mask_logits.device.type, enabled=False):
        class_probs = _at_least_float32(class_logits).softmax(dim=-1)[..., :-1]
        seg = torch.einsum("bqc,bqhw->bchw", class_probs, _at_least_float32(mask_logits).sigmoid())
        return (seg + SEMANTIC_EPS).log()


# --------------------------------------------------------------------------- #
# layers


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PixelDecoder(nn.Module):
    """1x1 lateral projections, FPN top-down sum, 3x3 conv to mask features.

    forward(features: 4 maps [B, C_i, H_i, W_i], finest first) -> list of 4 maps
    [B, D, H_i, W_i] (the FPN outputs, finest first). ``mask_conv`` turns an FPN map into
    per-pixel mask features; the head applies it at stage 1 (and, for kmeans, at the key level).
    """

    def __init__(self, in_channels: list[int], hidden_dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), _group_norm(hidden_dim)) for c in in_channels
        )
        self.mask_conv = nn.Sequential(
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False), _group_norm(hidden_dim), nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 1),
        )

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        laterals = [proj(f) for proj, f in zip(self.lateral, features)]
        outs = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):  # stage strides may repeat (AFA: 1/16 twice): resize by size
            outs.append(lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False))
        return outs[::-1]


class MultiHeadAttention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention (batch first).

    forward(query [B, Q, D], key [B, S, D], value [B, S, D], attn_mask None | bool (True = attend)
    | float additive, broadcastable to [B, H, Q, S]) -> [B, Q, D].
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"model.mask_decoder.hidden_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        q, k, v = self._split(self.q_proj(query)), self._split(self.k_proj(key)), self._split(self.v_proj(value))
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)  # SDPA wants the float mask in the query dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        b, h, n, dh = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * dh))


class KMeansCrossAttention(nn.Module):
    """kMaX k-means cross-attention: C <- C + norm(proj(sum of assigned pixel values)).

    forward(queries [B, Q, D], memory [B, S, D], logits [B, Q, S]) -> [B, Q, D]. The norm's
    scale starts at 0 (kMaX: BN gamma 0), so the layer starts as the identity.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        nn.init.zeros_(self.norm.weight)

    def forward(self, queries: Tensor, memory: Tensor, logits: Tensor) -> Tensor:
        update = kmeans_update(logits, self.v_proj(memory)).to(queries.dtype)
        return queries + self.norm(self.out_proj(update))


class DecoderLayer(nn.Module):
    """cross-attention -> self-attention -> FFN, post-norm residuals, no dropout."""

    def __init__(self, cfg: MaskDecoderConfig):
        super().__init__()
        dim = cfg.hidden_dim
        self.cross_attention = cfg.cross_attention
        self.mask_threshold = cfg.mask_threshold
        if cfg.cross_attention == "kmeans":
            self.cross_attn: nn.Module = KMeansCrossAttention(dim)
        else:
            self.cross_attn = MultiHeadAttention(dim, cfg.num_heads)
            self.cross_norm = nn.LayerNorm(dim)
        if cfg.cross_attention == "soft":
            self.soft_mask_scales = nn.Parameter(torch.tensor(cfg.soft_mask_scales, dtype=torch.float32))
        self.self_attn = MultiHeadAttention(dim, cfg.num_heads)
        self.self_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.ReLU(inplace=True), nn.Linear(cfg.ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                mask_logits: Tensor) -> Tensor:
        """queries, query_pos [B, Q, D]; memory, memory_pos [B, S, D]; mask_logits [B, Q, S]
        (kmeans: the layer's own logits; otherwise the previous prediction at key resolution)."""
        if self.cross_attention == "kmeans":
            queries = self.cross_attn(queries, memory, mask_logits)
        else:
            attn_mask = None
            if self.cross_attention == "masked":
                attn_mask = masked_attention_mask(mask_logits, self.mask_threshold)
            elif self.cross_attention == "soft":
                attn_mask = soft_attention_bias(mask_logits, self.soft_mask_scales)
            out = self.cross_attn(queries + query_pos, memory + memory_pos, memory, attn_mask)
            queries = self.cross_norm(queries + out)
        q = queries + query_pos
        queries = self.self_norm(queries + self.self_attn(q, q, queries))
        return self.ffn_norm(queries + self.ffn(queries))


class MLP(nn.Module):
    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


# --------------------------------------------------------------------------- #
# the head


class MaskDecoderHead(nn.Module):
    """Query-based mask decoder producing semantic "logits" (see the module docstring).

    in_channels: the 4 backbone stage widths, finest first; num_classes: C incl. background.
    forward(features: 4 maps [B, C_i, H_i, W_i], finest first, stage 1 at 1/4)
    -> (seg_logits [B, C, H1, W1], aux: list of num_layers maps [B, C, H1, W1]).
    ``aux`` are the earlier predictions for deep supervision, oldest first:
    standard / masked / soft -- the prediction of the learnable queries, then of each layer but
    the last; kmeans -- each layer's own assignment logits (computed from its input queries
    at its key resolution, upsampled), which the argmax cannot train.
    """

    NUM_LEVELS = 3  # the decoder reads stages 4, 3, 2 round robin

    def __init__(self, in_channels: list[int], num_classes: int, cfg: MaskDecoderConfig):
        super().__init__()
        if len(in_channels) != 4:
            raise ConfigError(f"the mask decoder expects 4 backbone stages, got {len(in_channels)} ({in_channels})")
        if cfg.cross_attention not in CROSS_ATTENTIONS:
            raise ConfigError(f"model.mask_decoder.cross_attention must be one of {', '.join(CROSS_ATTENTIONS)}, "
                              f"got {cfg.cross_attention!r}")
        if cfg.hidden_dim % 4:
            raise ConfigError(f"model.mask_decoder.hidden_dim must be divisible by 4, got {cfg.hidden_dim}")
        if cfg.cross_attention == "soft" and len(cfg.soft_mask_scales) != cfg.num_heads:
            raise ConfigError("model.mask_decoder.soft_mask_scales must have one value per head "
                              f"({cfg.num_heads}), got {cfg.soft_mask_scales}")
        dim = cfg.hidden_dim
        self.cfg = cfg
        self.num_classes = num_classes
        self.lr_mult = cfg.lr_mult  # read by AFANetwork.param_groups
        self.pixel_decoder = PixelDecoder(in_channels, dim)
        self.query_feat = nn.Embedding(cfg.num_queries, dim)
        self.query_pos = nn.Embedding(cfg.num_queries, dim)
        self.level_embed = nn.Embedding(self.NUM_LEVELS, dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes + 1)  # + no-object
        self.mask_embed = MLP(dim, 3)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters AdamW must not decay: embeddings and soft-mask scales (Mask2Former)."""
        embeddings = ("query_feat", "query_pos", "level_embed")
        return {name for name, _ in self.named_parameters()
                if name.split(".")[0] in embeddings or name.endswith("soft_mask_scales")}

    def _pixel_features(self, fpn_map: Tensor) -> Tensor:
        """[B, D, h, w] FPN map -> per-pixel mask features (L2-normalized for kmeans, as kMaX)."""
        features = self.pixel_decoder.mask_conv(fpn_map)
        return F.normalize(features, dim=1) if self.cfg.cross_attention == "kmeans" else features

    def predict(self, queries: Tensor, pixel_features: Tensor) -> tuple[Tensor, Tensor]:
        """queries [B, Q, D], pixel_features [B, D, h, w]
        -> (class_logits [B, Q, C + 1], mask_logits [B, Q, h, w])."""
        queries = self.decoder_norm(queries)
        mask_logits = torch.einsum("bqd,bdhw->bqhw", self.mask_embed(queries), pixel_features)
        return self.class_head(queries), mask_logits

    def forward(self, features: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        fpn = self.pixel_decoder(features)
        mask_features = self._pixel_features(fpn[0])
        out_size = mask_features.shape[-2:]
        batch = mask_features.shape[0]

        # keys: stages 4, 3, 2 flattened, + level embedding; sine positional encoding
        levels = fpn[:0:-1]
        memories, positions, sizes = [], [], []
        for i, level in enumerate(levels):
            h, w = level.shape[-2:]
            sizes.append((h, w))
            memories.append(level.flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            positions.append(sine_position_encoding(h, w, self.cfg.hidden_dim, level.device).to(level.dtype))

        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_pos.weight.unsqueeze(0).expand(batch, -1, -1)
        kmeans = self.cfg.cross_attention == "kmeans"
        aux: list[Tensor] = []
        if not kmeans:
            class_logits, mask_logits = self.predict(queries, mask_features)
        for index, layer in enumerate(self.layers):
            lvl = index % self.NUM_LEVELS
            if kmeans:  # the layer's own prediction at its key resolution drives the assignment
                class_logits, key_logits = self.predict(queries, self._pixel_features(levels[lvl]))
                mask_logits = F.interpolate(key_logits, size=out_size, mode="bilinear", align_corners=False)
            else:
                key_logits = F.interpolate(mask_logits, size=sizes[lvl], mode="bilinear", align_corners=False)
            aux.append(semantic_log_probs(class_logits, mask_logits))
            queries = layer(queries, query_pos, memories[lvl], positions[lvl], key_logits.flatten(2))
            if not kmeans:
                class_logits, mask_logits = self.predict(queries, mask_features)
        if kmeans:
            class_logits, mask_logits = self.predict(queries, mask_features)
        return semantic_log_probs(class_logits, mask_logits), aux


__all__ = [
    "CROSS_ATTENTIONS", "MaskDecoderHead", "SEMANTIC_EPS", "kmeans_assignment", "kmeans_update",
    "masked_attention_mask", "semantic_log_probs", "sine_position_encoding", "soft_attention_bias",
]
