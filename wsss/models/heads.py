"""The new (randomly initialised) heads of the AFA network.

- :class:`CamClassifier`: 1x1 conv without bias on stage-4 features; pooled features give
  the image-level logits, the same conv applied densely gives the CAMs (Zhou et al., 2016).
- :class:`SegFormerHead`: the all-MLP decoder of SegFormer (Xie et al., NeurIPS 2021).
- :class:`AffinityHead`: AFA's affinity from attention (Ru et al., CVPR 2022, sec. 3.2):
  symmetrized raw attention logits, a 1x1 conv over the maps, sigmoid.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.errors import ConfigError


class CamClassifier(nn.Module):
    """features [B, D, h, w] -> (logits [B, K], cams [B, K, h, w]).

    ``pooling`` "gmp" (AFA: global max pooling of the features, then the classifier) or
    "gap" (average). CAMs are raw (no ReLU, no normalisation).
    """

    def __init__(self, in_channels: int, num_classes: int, pooling: Literal["gmp", "gap"] = "gmp") -> None:
        super().__init__()
        if pooling not in ("gmp", "gap"):
            raise ConfigError(f"model.cam_pooling must be 'gmp' or 'gap', got {pooling!r}")
        self.pooling = pooling
        self.classifier = nn.Conv2d(in_channels, num_classes, 1, bias=False)

    def cam(self, features: Tensor) -> Tensor:
        """features [B, D, h, w] -> raw CAMs [B, K, h, w]."""
        return self.classifier(features)

    def logits(self, features: Tensor) -> Tensor:
        """features [B, D, h, w] -> image-level logits [B, K]."""
        pooled = features.amax(dim=(2, 3)) if self.pooling == "gmp" else features.mean(dim=(2, 3))
        return F.linear(pooled, self.classifier.weight.flatten(1))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.logits(features), self.cam(features)


class SegFormerHead(nn.Module):
    """features: 4 maps [B, C_i, H_i, W_i] (finest first) -> seg logits [B, C, H_1, W_1].

    Each stage is projected to ``embed_dim`` (a linear layer = 1x1 conv), upsampled to
    stage 1, concatenated, fused by 1x1 conv + BatchNorm + ReLU, then classified.
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
        projected = [
            F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size
            else proj(f)
            for proj, f in zip(self.linear_c, features)
        ]
        fused = self.linear_fuse(torch.cat(projected[::-1], dim=1))  # coarsest first, as SegFormer
        return self.linear_pred(self.dropout(fused))


class AffinityHead(nn.Module):
    """attn_logits [B, M, N, N] -> predicted affinity [B, N, N] in [0, 1].

    A = sigmoid(sum_m w_m (S_m + S_m^T) + b): the 1x1 conv over the M maps of the
    symmetrized logits. The conv is linear, so it is applied first (an einsum over M) and
    the result symmetrized once: one [B, N, N] transpose instead of M of them. Not
    detached: the affinity loss trains the attention's q / k.
    """

    def __init__(self, attn_maps: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(attn_maps, 1, 1, bias=True)  # kept a conv: the published layer
        # AFA's initialisation of this layer.
        nn.init.kaiming_normal_(self.proj.weight, a=math.sqrt(5), mode="fan_out")

    def forward(self, attn_logits: Tensor) -> Tensor:
        combined = torch.einsum("bmij,m->bij", attn_logits, self.proj.weight.flatten().to(attn_logits.dtype))
        return torch.sigmoid(combined + combined.transpose(1, 2) + self.proj.bias.to(combined.dtype))
