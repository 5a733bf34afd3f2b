"""Specification of the heads (wsss/models/heads.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss.errors import ConfigError
from wsss.models.heads import AffinityHead, CamClassifier, SegFormerHead


def test_cam_classifier_gmp_logits_classify_max_pooled_features_and_cams_are_dense():
    torch.manual_seed(0)
    head = CamClassifier(16, 5, "gmp")
    features = torch.randn(2, 16, 6, 7)
    logits, cams = head(features)
    assert logits.shape == (2, 5) and cams.shape == (2, 5, 6, 7)
    weight = head.classifier.weight.flatten(1)
    torch.testing.assert_close(logits, features.amax(dim=(2, 3)) @ weight.T)
    torch.testing.assert_close(cams, torch.einsum("bdhw,kd->bkhw", features, weight))
    assert head.classifier.bias is None
    assert (cams < 0).any()  # raw: no ReLU


def test_cam_classifier_gap_logits_are_the_mean_of_the_cams():
    head = CamClassifier(16, 5, "gap")
    logits, cams = head(torch.randn(2, 16, 6, 7))
    torch.testing.assert_close(logits, cams.mean(dim=(2, 3)), atol=1e-6, rtol=1e-5)


def test_cam_classifier_rejects_unknown_pooling():
    with pytest.raises(ConfigError, match="model.cam_pooling"):
        CamClassifier(16, 5, "max")


def test_segformer_head_gives_c_classes_at_stage1_resolution():
    head = SegFormerHead([32, 64, 160, 256], num_classes=21, embed_dim=64)
    features = [torch.randn(2, c, 32 // s, 40 // s) for c, s in zip([32, 64, 160, 256], [1, 2, 4, 4])]
    assert head(features).shape == (2, 21, 32, 40)


def _reference_affinity(head: AffinityHead, logits: torch.Tensor) -> torch.Tensor:
    """The published formulation: symmetrize every map, 1x1 conv, sigmoid."""
    return torch.sigmoid(head.proj(logits + logits.transpose(2, 3)))[:, 0]


def test_affinity_head_is_symmetric_in_unit_interval_and_matches_the_published_formula():
    torch.manual_seed(0)
    head = AffinityHead(attn_maps=6)
    logits = torch.randn(2, 6, 20, 20) * 5
    affinity = head(logits)
    assert affinity.shape == (2, 20, 20)
    torch.testing.assert_close(affinity, affinity.transpose(1, 2))
    assert affinity.min() >= 0 and affinity.max() <= 1
    torch.testing.assert_close(affinity, _reference_affinity(head, logits), atol=1e-6, rtol=1e-5)


def test_affinity_head_passes_gradient_to_the_attention_logits():
    head = AffinityHead(attn_maps=4)
    logits = torch.randn(1, 4, 9, 9, requires_grad=True)
    F.binary_cross_entropy(head(logits), torch.ones(1, 9, 9)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert head.proj.weight.grad is not None and head.proj.bias.grad is not None


def test_affinity_head_under_bf16_autocast():
    head = AffinityHead(attn_maps=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        affinity = head(torch.randn(1, 4, 9, 9).bfloat16())
    assert affinity.dtype == torch.bfloat16 and torch.equal(affinity, affinity.transpose(1, 2))
