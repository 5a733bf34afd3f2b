"""The new (randomly initialised) heads of the AFA network.

- :class:`CamClassifier`: 1x1 conv without bias on stage-4 features; pooled features give
  the image-level logits, the same conv applied densely gives the CAMs (Zhou et al., 2016).
- :class:`SegFormerHead`: the all-MLP decoder of SegFormer (Xie et al., NeurIPS 2021).
- :class:`LargeFOVHead`: DeepLab-LargeFOV's classifier (Chen et al., ICLR 2015) on the last map, ToCo's seg head.
- :class:`ViTFeaturePyramid`: strides 4 / 8 / 16 / 16 from a plain ViT's four single-stride maps,
  for the seg head (not part of the published network, which has a hierarchical MiT).
- :class:`AffinityHead`: AFA's affinity from attention (Ru et al., CVPR 2022, sec. 3.2):
  symmetrized raw attention logits (optionally standardized per map), a 1x1 conv over the maps, sigmoid.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from wsss.errors import ConfigError
from wsss.models.attn_factors import AttnFactors


class CamClassifier(nn.Module):
    """features [B, D, h, w] -> (logits [B, K], cams [B, K, h, w]).

    ``pooling`` "gmp" (AFA: global max pooling of the features, then the classifier), "gap" (average) or
    "topk" (the mean of each feature channel's largest ``topk`` fraction of tokens, at least one: between
    the two). CAMs are raw (no ReLU, no normalisation).
    """

    def __init__(
        self, in_channels: int, num_classes: int, pooling: Literal["gmp", "gap", "topk"] = "gmp", topk: float = 0.25,
    ) -> None:
        super().__init__()
        if pooling not in ("gmp", "gap", "topk"):
            raise ConfigError(f"model.cam_pooling must be 'gmp', 'gap' or 'topk', got {pooling!r}")
        if not 0.0 < topk <= 1.0:
            raise ConfigError(f"model.cam_topk must be a fraction of the tokens in (0, 1], got {topk}")
        self.pooling = pooling
        self.topk = topk
        self.classifier = nn.Conv2d(in_channels, num_classes, 1, bias=False)

    def cam(self, features: Tensor) -> Tensor:
        """features [B, D, h, w] -> raw CAMs [B, K, h, w]."""
        return self.classifier(features)

    def logits(self, features: Tensor) -> Tensor:
        """features [B, D, h, w] -> image-level logits [B, K]."""
        if self.pooling == "gmp":
            pooled = features.amax(dim=(2, 3))
        elif self.pooling == "gap":
            pooled = features.mean(dim=(2, 3))
        else:
            tokens = features.flatten(2)
            k = max(1, round(self.topk * tokens.shape[-1]))
            pooled = tokens.topk(k, dim=-1, sorted=False).values.mean(dim=-1)
        return F.linear(pooled, self.classifier.weight.flatten(1))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.logits(features), self.cam(features)


class SegFormerHead(nn.Module):
    """features: 4 maps [B, C_i, H_i, W_i] (finest first) -> seg logits [B, C, H_1, W_1].

    Each stage is projected to ``embed_dim`` (a linear layer = 1x1 conv), upsampled to
    stage 1, concatenated, fused by 1x1 conv + BatchNorm + ReLU, then classified.

    Computed in another order with the same parameters: projection, upsampling and the fuse conv
    are all linear, so each stage's projection is composed with its slice of the fuse conv into one
    1x1 conv, applied at the stage's own resolution, and only its ``embed_dim`` channels are
    upsampled and summed. The [B, 4 * embed_dim, H_1, W_1] concatenation is never formed, and the
    fuse conv's cost falls from 4 maps at stage-1 size to one map per stage at its own size (MiT-B1,
    crop 320: about 8x fewer multiply-adds in the head). Same numbers up to float rounding.
    """

    def __init__(
        self, in_channels: list[int], num_classes: int, embed_dim: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)
        self.linear_fuse = nn.Sequential(
            nn.Conv2d(embed_dim * len(in_channels), embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        conv, norm, act = self.linear_fuse
        # the fuse conv's input channels: the projected maps concatenated coarsest first, as SegFormer
        fuse = conv.weight.flatten(1).unflatten(1, (len(features), -1)).flip(1)  # [E, stage, E], finest first
        fused = None
        for i, (proj, f) in enumerate(zip(self.linear_c, features)):
            weight = fuse[:, i] @ proj.weight.flatten(1)  # [E, C_i]: fuse slice after projection, as one conv
            y = F.conv2d(f, weight[:, :, None, None], fuse[:, i] @ proj.bias)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            fused = y if fused is None else fused + y
        return self.linear_pred(self.dropout(act(norm(fused))))


class LargeFOVHead(nn.Module):
    """features [B, D, h, w] -> seg logits [B, C, h, w]: 3x3 conv (dilation 5) -> ReLU -> 3x3 conv (dilation 5)
    -> ReLU -> 1x1 conv, ``embed_dim`` wide, no biases (ToCo's ``LargeFOV``, PyTorch's default init as there)."""

    def __init__(self, in_channels: int, num_classes: int, embed_dim: int = 512, dilation: int = 5) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, embed_dim, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim, embed_dim, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim, num_classes, 1, bias=False),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class ViTFeaturePyramid(nn.Module):
    """Four maps at one stride s, finest-to-be first -> maps at strides s/4, s/2, s, s.

    A plain ViT / DeiT gives the seg head four blocks' tokens, all at its patch stride (16): a head on
    them predicts 16 x 16-pixel cells, whose best mIoU is far below what a stride-4 head can reach on
    thin or small objects (``bench/stride_ceiling.py``). As DPT's "reassemble" step (Ranftl et al.,
    ICCV 2021) and ViTDet's simple feature pyramid (Li et al., ECCV 2022), learned 2 x 2 transposed
    convolutions bring the earliest block to s/4 (two of them, with LayerNorm + GELU between, halving the
    channels each time) and the second to s/2 (one); the last two stay at s (the CAMs and the affinity
    use the last block's grid, which the pyramid does not touch). The SegFormer head's per-map projection
    follows, so there is no extra projection here. ``out_channels``: C/4, C/2, C, C of the input widths.
    """

    def __init__(self, in_channels: list[int]) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ConfigError(f"the ViT feature pyramid expects 4 maps, got {len(in_channels)} ({in_channels})")
        c1, c2 = in_channels[0], in_channels[1]
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(c1, c1 // 2, 2, stride=2), LayerNorm2d(c1 // 2), nn.GELU(),
            nn.ConvTranspose2d(c1 // 2, c1 // 4, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(c2, c2 // 2, 2, stride=2)
        self.out_channels = [c1 // 4, c2 // 2, in_channels[2], in_channels[3]]

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [self.up4(features[0]), self.up2(features[1]), features[2], features[3]]


ATTN_NORMS = ("none", "standardize")  # resolved values of afa.attn_norm ("auto" is resolved by the network)
# Floor on the per-map variance of the logits under "standardize": a constant map (all pairs equal, e.g. N = 1)
# gives 0 instead of 0/0. Far below the variance of real logits (std >= ~1), so it does not break scale-freeness.
ATTN_NORM_EPS = 1e-6


def standardize_attn_logits(attn_logits: Tensor, eps: float = ATTN_NORM_EPS) -> Tensor:
    """attn_logits [B, M, N, N] -> per sample and map zero mean, unit std over the N x N pairs, same shape/dtype.

    Statistics in float32 (bf16 sums over N^2 ~ 10^5 pairs lose digits); the result is cast back to the
    input dtype, so the rest of the head runs as with raw logits. The mean and (population) std of S and
    S^T are the same, so standardizing commutes with the head's symmetrization (see AffinityHead).

    The statistics are NOT detached. Standardization makes the head exactly invariant to a per-map
    scale and shift of the logits; with the true gradient, the gradient reaching the logits is orthogonal
    to those directions, so the affinity loss cannot move the scale (= the temperature of the backbone's
    own attention softmax, which reads the same logits) and the std cannot collapse or blow up to make
    the loss easier: every map the head sees has unit std whatever q / k do. Detached statistics would
    send a gradient that the forward pass ignores along the scale direction (pushing the logits' magnitude
    to grow or shrink with no effect on the loss) -- a drift of the attention temperature for nothing.
    """
    x = attn_logits.float()
    var, mean = torch.var_mean(x, dim=(-2, -1), correction=0, keepdim=True)
    return ((x - mean) * torch.rsqrt(var + eps)).to(attn_logits.dtype)


class AffinityHead(nn.Module):
    """attn_logits [B, M, N, N] -> predicted affinity [B, N, N] in [0, 1].

    A = sigmoid(sum_m w_m (S_m + S_m^T) + b): the 1x1 conv over the M maps of the
    symmetrized logits. The conv is linear, so it is applied first (an einsum over M) and
    the result symmetrized once: one [B, N, N] transpose instead of M of them. Not
    detached: the affinity loss trains the attention's q / k.

    ``attn_norm`` (afa.attn_norm, resolved): "none" feeds the raw logits q.k^T (the published
    head, for MiT); "standardize" first maps every S_m to (S_m - mean) / std over its N x N pairs
    (:func:`standardize_attn_logits`), so that the head's initial sigmoid is not saturated by
    large-scale logits (a pretrained ViT-S/14: mean |S| ~ 47, max ~ 300, sigmoid > 0.99 on every
    pair, no gradient). Standardizing each map before the conv keeps the conv-then-symmetrize
    shortcut exact: the stats of S_m and S_m^T are the same, so it equals standardizing after.

    ``attn_logits`` may also come as :class:`AttnFactors` (q, k), as the CAM passes give them:
    with "none" the sum over maps is then one product of the weighted queries and the keys, and
    the [B, M, N, N] logits are never formed.
    """

    def __init__(self, attn_maps: int, attn_norm: str = "none") -> None:
        super().__init__()
        if attn_norm not in ATTN_NORMS:
            raise ConfigError(f"AffinityHead attn_norm must be one of {', '.join(ATTN_NORMS)}, got {attn_norm!r}")
        self.attn_norm = attn_norm
        self.proj = nn.Conv2d(attn_maps, 1, 1, bias=True)  # kept a conv: the published layer
        # AFA's initialisation of this layer.
        nn.init.kaiming_normal_(self.proj.weight, a=math.sqrt(5), mode="fan_out")

    def extra_repr(self) -> str:
        return f"attn_norm={self.attn_norm!r}"

    def forward(self, attn_logits: Tensor | AttnFactors) -> Tensor:
        weight = self.proj.weight.flatten()
        if isinstance(attn_logits, AttnFactors) and self.attn_norm == "none":
            # sum_m w_m q_m k_m^T = [w_1 q_1, ..., w_M q_M] @ [k_1, ..., k_M]^T: one [N, M*d] x [M*d, N] product
            q, k = attn_logits
            b, m, n, d = q.shape
            weighted = (q * weight.to(q.dtype).view(1, m, 1, 1)).transpose(1, 2).reshape(b, n, m * d)
            combined = weighted @ k.transpose(1, 2).reshape(b, n, m * d).transpose(1, 2)
        else:
            if isinstance(attn_logits, AttnFactors):  # standardizing needs the maps themselves
                attn_logits = attn_logits.logits()
            if self.attn_norm == "standardize":
                attn_logits = standardize_attn_logits(attn_logits)
            b, _, n, _ = attn_logits.shape
            # sum_m w_m S_m as one [M] x [M, N*N] product per image (no permuted copy of the logits, as einsum makes)
            combined = torch.matmul(weight.to(attn_logits.dtype), attn_logits.flatten(2)).view(b, n, n)
        return torch.sigmoid(combined + combined.transpose(1, 2) + self.proj.bias.to(combined.dtype))
