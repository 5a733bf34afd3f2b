"""Specification of the heads (wsss/models/heads.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss.errors import ConfigError
from wsss.method.affinity import affinity_labels
from wsss.method.losses import affinity_loss
from wsss.models.attn_factors import AttnFactors
from wsss.models.heads import AffinityHead, CamClassifier, SegFormerHead, standardize_attn_logits


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


def test_cam_classifier_topk_pools_each_channels_largest_tokens_between_max_and_mean():
    torch.manual_seed(0)
    features = torch.randn(2, 16, 6, 7)  # 42 tokens
    weight_from = CamClassifier(16, 5, "gmp")
    logits = {}
    for name, pooling, topk in (("max", "gmp", 0.25), ("mean", "gap", 0.25), ("one", "topk", 1 / 42),
                                ("all", "topk", 1.0), ("quarter", "topk", 0.25)):
        head = CamClassifier(16, 5, pooling, topk)
        head.load_state_dict(weight_from.state_dict())
        logits[name] = head(features)[0]
    torch.testing.assert_close(logits["one"], logits["max"])
    torch.testing.assert_close(logits["all"], logits["mean"], atol=1e-6, rtol=1e-5)
    ranked = features.flatten(2).sort(dim=-1, descending=True).values[..., :10]  # round(0.25 * 42) = 10 tokens
    expected = ranked.mean(dim=-1) @ weight_from.classifier.weight.flatten(1).T
    torch.testing.assert_close(logits["quarter"], expected)


def test_cam_classifier_rejects_unknown_pooling_and_a_topk_outside_the_tokens():
    with pytest.raises(ConfigError, match="model.cam_pooling"):
        CamClassifier(16, 5, "max")
    for topk in (0.0, 1.5):
        with pytest.raises(ConfigError, match="model.cam_topk"):
            CamClassifier(16, 5, "topk", topk)


def test_segformer_head_gives_c_classes_at_stage1_resolution():
    head = SegFormerHead([32, 64, 160, 256], num_classes=21, embed_dim=64)
    features = [torch.randn(2, c, 32 // s, 40 // s) for c, s in zip([32, 64, 160, 256], [1, 2, 4, 4])]
    assert head(features).shape == (2, 21, 32, 40)


def _published_segformer_head(head: SegFormerHead, features: list[torch.Tensor]) -> torch.Tensor:
    """SegFormer's order: project, upsample to stage 1, concatenate coarsest first, fuse, classify."""
    size = features[0].shape[-2:]
    up = [F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False)
          for proj, f in zip(head.linear_c, features)]
    return head.linear_pred(head.dropout(head.linear_fuse(torch.cat(up[::-1], dim=1))))


@pytest.mark.parametrize("train", [True, False])
def test_segformer_head_equals_the_published_order_in_output_and_gradients(train):
    torch.manual_seed(0)
    head = SegFormerHead([32, 64, 160, 256], num_classes=21, embed_dim=64, dropout=0.0).train(train)
    if not train:  # non-trivial running statistics
        head.linear_fuse[1].running_mean.normal_()
        head.linear_fuse[1].running_var.uniform_(0.5, 2.0)
    features = [torch.randn(2, c, 32 // s, 40 // s) for c, s in zip([32, 64, 160, 256], [1, 2, 4, 4])]
    grads = []
    for forward in (head, lambda f: _published_segformer_head(head, f)):
        head.zero_grad()
        out = forward(features)
        out.square().mean().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in head.named_parameters()}))
    (out, g), (ref, g_ref) = grads
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for name, grad in g_ref.items():
        if train and name.startswith("linear_c.") and name.endswith(".bias"):
            # in train mode BatchNorm removes any per-channel constant: these gradients are 0 up to rounding
            assert grad.abs().max() < 1e-6 and g[name].abs().max() < 1e-6
        else:
            torch.testing.assert_close(g[name], grad, atol=1e-6, rtol=1e-4, msg=name)


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


@pytest.mark.parametrize("attn_norm", ["none", "standardize"])
def test_affinity_head_under_bf16_autocast(attn_norm):
    head = AffinityHead(attn_maps=4, attn_norm=attn_norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        affinity = head(torch.randn(1, 4, 9, 9).bfloat16())
    assert affinity.dtype == torch.bfloat16 and torch.equal(affinity, affinity.transpose(1, 2))


def _saturated(affinity: torch.Tensor) -> float:
    """Fraction of pairs whose sigmoid is outside (0.01, 0.99): |pre-activation| > 4.6, gradient < 0.01."""
    return ((affinity <= 0.01) | (affinity >= 0.99)).float().mean().item()


def _vit_like_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(attn_logits [2, 16, 64, 64], token classes [2, 8, 8]): raw logits with the statistics of a pretrained
    ViT-S/14 (mean |x| 47, max ~250-300) in which same-class token pairs are 1 noise std higher (a learnable
    affinity), plus a per-map offset."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.zeros(2, 8, 8, dtype=torch.long)
    classes[0, :, 4:] = 1
    classes[0, 5:, :3] = 2
    classes[1, 2:6, 2:6] = 1
    classes[1, :, 7] = 2
    flat = classes.flatten(1)
    same = (flat[:, :, None] == flat[:, None, :]).float()[:, None]  # [2, 1, 64, 64]
    logits = torch.randn(2, 16, 64, 64, generator=g) + same + 0.5 * torch.randn(2, 16, 1, 1, generator=g)
    return logits * (47 / logits.abs().mean()), classes


def test_affinity_head_none_is_bit_identical_to_the_raw_logit_formula_and_the_default():
    torch.manual_seed(0)
    head = AffinityHead(attn_maps=6, attn_norm="none")
    assert AffinityHead(attn_maps=6).attn_norm == "none"  # MiT networks keep the published head
    logits = torch.randn(2, 6, 20, 20) * 30
    combined = torch.einsum("bmij,m->bij", logits, head.proj.weight.flatten())
    by_hand = torch.sigmoid(combined + combined.transpose(1, 2) + head.proj.bias)
    assert torch.equal(head(logits), by_hand)


@pytest.mark.parametrize("attn_norm", ["none", "standardize"])
def test_affinity_head_on_query_key_factors_equals_the_head_on_their_logits(attn_norm):
    torch.manual_seed(0)
    head = AffinityHead(attn_maps=6, attn_norm=attn_norm)
    q = (torch.randn(2, 6, 20, 8) * 3).requires_grad_()
    k = (torch.randn(2, 6, 20, 8) * 3).requires_grad_()
    factored = head(AttnFactors(q, k))
    torch.testing.assert_close(factored, head(q @ k.transpose(-2, -1)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(factored, factored.transpose(1, 2))
    F.binary_cross_entropy(factored, torch.ones(2, 20, 20)).backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0 and head.proj.weight.grad.abs().sum() > 0


def test_affinity_head_rejects_an_unresolved_or_unknown_attn_norm():
    for bad in ("auto", "layernorm"):
        with pytest.raises(ConfigError, match="attn_norm"):
            AffinityHead(attn_maps=4, attn_norm=bad)


def test_standardize_gives_zero_mean_unit_std_maps_and_guards_constant_maps():
    logits = torch.randn(2, 3, 10, 10) * 40 + 7
    logits[1, 2] = 5.0  # a constant map: 0, not 0 / 0
    z = standardize_attn_logits(logits)
    torch.testing.assert_close(z[0].mean(dim=(-2, -1)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[0].std(dim=(-2, -1), correction=0), torch.ones(3))
    assert torch.equal(z[1, 2], torch.zeros(10, 10))
    bf16 = standardize_attn_logits(logits.bfloat16())
    assert bf16.dtype == torch.bfloat16


def test_standardized_head_is_invariant_to_the_scale_and_offset_of_the_logits():
    torch.manual_seed(0)
    head = AffinityHead(attn_maps=16, attn_norm="standardize")
    logits, _ = _vit_like_logits()
    reference = head(logits)
    for scale in (0.1, 10.0):
        torch.testing.assert_close(head(logits * scale), reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head(logits - 123.0), reference, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(AffinityHead(16, "none")(logits * 0.1), AffinityHead(16, "none")(logits))


def test_standardize_statistics_are_not_detached_so_no_gradient_moves_the_logits_scale_or_mean():
    """The head ignores a per-map scale / shift of the logits, so the true gradient has no component along
    them (a detached mean / std would send one: a drift of the backbone's attention temperature for nothing)."""
    torch.manual_seed(0)
    head = AffinityHead(attn_maps=16, attn_norm="standardize")
    logits, classes = _vit_like_logits()
    logits.requires_grad_(True)
    affinity_loss(head(logits), affinity_labels(classes, radius=8)).backward()
    grad, x = logits.grad, logits.detach()
    assert grad.abs().sum() > 0
    along_scale = (grad * x).sum(dim=(-2, -1))  # d loss / d log(scale) of each map [2, 16]
    along_shift = grad.sum(dim=(-2, -1))  # d loss / d offset of each map
    assert (along_scale.abs() < 1e-4 * (grad * x).abs().sum(dim=(-2, -1))).all()
    assert (along_shift.abs() < 1e-4 * grad.abs().sum(dim=(-2, -1))).all()


@pytest.mark.usefixtures("one_thread")
def test_vit_scale_logits_saturate_the_raw_head_and_the_standardized_head_learns_the_affinity():
    """Issue 13: pretrained-ViT-sized logits put (almost) every pair of the raw head's sigmoid at 0 or 1 at
    init; standardized, the same head starts unsaturated and learns the block affinity at the recipe's head lr.

    300 AdamW steps, not 50: Adam moves each of the head's 17 weights by <= lr per step, 50 x 6e-4 = 0.03
    against an init std of 0.58, too little for any head to change its output by 30 %."""
    logits, classes = _vit_like_logits()
    assert 46 < logits.abs().mean() < 48 and 200 < logits.abs().max() < 320
    torch.manual_seed(0)
    raw = AffinityHead(attn_maps=16, attn_norm="none")
    torch.manual_seed(0)
    head = AffinityHead(attn_maps=16, attn_norm="standardize")
    with torch.no_grad():
        assert _saturated(raw(logits)) > 0.97  # measured 0.984: pre-activation std ~190
        assert _saturated(head(logits)) < 0.5  # measured 0.23: std ~3
    labels = affinity_labels(classes, radius=8)
    optimizer = torch.optim.AdamW(head.parameters(), lr=6e-4, weight_decay=0.01)
    losses = []
    for _ in range(300):
        loss = affinity_loss(head(logits), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])  # measured 0.27 -> 0.13
