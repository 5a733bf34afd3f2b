"""The mask decoder head learns: each cross-attention variant lowers a pseudo-label loss.

A tiny batch of the demo data (2 images of 64 x 64, 3 digit classes), its exact masks standing
in for pseudo labels with an ignored strip, a small random conv backbone giving 4 maps at
strides 4, 8, 16, 16, and pixel cross-entropy with ignore_index=255 on the final and every aux
prediction (wsss.method.losses.balanced_seg_loss did not exist yet when this was written).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.config import IMAGENET_MEAN, IMAGENET_STD, MaskDecoderConfig
from wsss.data.io import read_image, read_label_png
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


@pytest.fixture(scope="module")
def demo_batch(demo_data_3cls):
    """Normalized images [2, 3, 64, 64] and pseudo labels [2, 64, 64] (255 = ignore)."""
    root = demo_data_3cls  # 3 digit classes (NUM_CLASSES - 1); its first 2 training images (tests/conftest.py)
    names = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:2]
    images = np.stack([read_image(root / "JPEGImages" / f"{n}.jpg") for n in names])
    labels = np.stack([read_label_png(root / "SegmentationClass" / f"{n}.png") for n in names])
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    images = (images - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    labels = torch.from_numpy(labels).long()
    labels[:, :4, :] = IGNORE  # an uncertain / padded strip, as in pseudo labels
    return images, labels


def seg_loss(logits, label):
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, label, ignore_index=IGNORE)


@pytest.mark.parametrize("variant", ["standard", "masked", "kmeans", "soft"])
def test_each_cross_attention_variant_lowers_the_pseudo_label_loss(variant, demo_batch):
    torch.manual_seed(0)
    cfg = MaskDecoderConfig(cross_attention=variant, num_queries=8, num_layers=3, hidden_dim=32, num_heads=2,
                            ffn_dim=64, soft_mask_scales=[8.0, 4.0])
    backbone = TinyBackbone()
    head = MaskDecoderHead(backbone.out_channels, NUM_CLASSES, cfg)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    images, label = demo_batch

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
