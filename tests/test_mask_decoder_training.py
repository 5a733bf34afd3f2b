"""The mask decoder head learns: each cross-attention variant lowers a pseudo-label loss.

Written against a tiny synthetic batch (wsss/data/demo.py and wsss/method/losses.py did not
exist yet): images whose colour is a function of a blocky pseudo label (with ignored pixels),
a small random conv backbone giving 4 maps at strides 4, 8, 16, 16, and plain pixel
cross-entropy with ignore_index=255 on the final and every aux prediction.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.config import MaskDecoderConfig
from wsss.models.mask_decoder import MaskDecoderHead

NUM_CLASSES = 4
IGNORE = 255
STEPS = 30


class TinyBackbone(nn.Module):
    """Four stages, finest first, at 1/4, 1/8, 1/16, 1/16 (the AFA strides 4, 2, 2, 1)."""

    def __init__(self, channels=(8, 12, 16, 24)):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.out_channels = list(channels)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, c1, 4, stride=4), nn.GELU()),
            nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GELU()),
            nn.Sequential(nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.GELU()),
            nn.Sequential(nn.Conv2d(c3, c4, 3, padding=1), nn.GELU()),
        ])

    def forward(self, x):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def synthetic_batch(batch: int = 2, size: int = 32, seed: int = 0):
    """Blocky pseudo label [B, size, size] (0 = background, 255 = ignore) and matching images."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, NUM_CLASSES, (batch, 4, 4), generator=g)
    label = blocks.repeat_interleave(size // 4, 1).repeat_interleave(size // 4, 2)
    palette = torch.rand(NUM_CLASSES, 3, generator=g)
    images = palette[label].permute(0, 3, 1, 2) + 0.1 * torch.randn(batch, 3, size, size, generator=g)
    label[:, :2, :] = IGNORE  # a padded / uncertain strip
    return images, label


def seg_loss(logits, label):
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, label, ignore_index=IGNORE)


@pytest.mark.parametrize("variant", ["standard", "masked", "kmeans", "soft"])
def test_each_cross_attention_variant_lowers_the_pseudo_label_loss(variant):
    torch.manual_seed(0)
    cfg = MaskDecoderConfig(cross_attention=variant, num_queries=8, num_layers=3, hidden_dim=32, num_heads=2,
                            ffn_dim=64, soft_mask_scales=[8.0, 4.0])
    backbone = TinyBackbone()
    head = MaskDecoderHead(backbone.out_channels, NUM_CLASSES, cfg)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    images, label = synthetic_batch()

    losses = []
    for _ in range(STEPS):
        seg, aux = head(backbone(images))
        loss = seg_loss(seg, label) + sum(seg_loss(a, label) for a in aux) / len(aux)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
