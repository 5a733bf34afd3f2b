"""Specification of the query-based mask decoder head (wsss/models/mask_decoder.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.config import MaskDecoderConfig
from wsss.errors import ConfigError
from wsss.models.mask_decoder import (
    SEMANTIC_EPS,
    KMeansCrossAttention,
    MaskDecoderHead,
    MultiHeadAttention,
    kmeans_assignment,
    kmeans_update,
    masked_attention_mask,
    semantic_log_probs,
    soft_attention_bias,
)

VARIANTS = ["standard", "masked", "kmeans", "soft"]
IN_CHANNELS = [8, 12, 16, 24]
NUM_CLASSES = 4  # background + 3


def tiny_cfg(cross_attention: str, **overrides) -> MaskDecoderConfig:
    values = dict(cross_attention=cross_attention, num_queries=6, num_layers=4, hidden_dim=16, num_heads=2,
                  ffn_dim=32, soft_mask_scales=[8.0, 4.0])
    values.update(overrides)
    return MaskDecoderConfig(**values)


def tiny_features(batch: int = 2, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Backbone-like maps, finest first, AFA strides (1/4, 1/8, 1/16, 1/16)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [size, size // 2, size // 4, size // 4]
    return [torch.randn(batch, c, s, s, generator=g) for c, s in zip(IN_CHANNELS, sizes)]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def explicit_attention(attn: MultiHeadAttention, query, key, value, bias) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_h) + bias) V written out, bias [B, H, Q, S] (or broadcastable)."""
    h = attn.num_heads
    q, k, v = (split_heads(p(x), h) for p, x in ((attn.q_proj, query), (attn.k_proj, key), (attn.v_proj, value)))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    out = logits.softmax(dim=-1) @ v
    b, _, n, dh = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, h * dh))


# --------------------------------------------------------------------------- #
# head interface


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_returns_seg_logits_at_stage1_and_one_aux_per_layer(variant):
    cfg = tiny_cfg(variant)
    head = MaskDecoderHead(IN_CHANNELS, NUM_CLASSES, cfg)
    seg, aux = head(tiny_features())
    assert seg.shape == (2, NUM_CLASSES, 16, 16)
    assert len(aux) == cfg.num_layers
    assert all(a.shape == seg.shape for a in aux)
    assert all(torch.isfinite(t).all() for t in [seg, *aux])


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_outputs_are_logs_of_a_semantic_probability_map(variant):
    cfg = tiny_cfg(variant)
    seg, aux = MaskDecoderHead(IN_CHANNELS, NUM_CLASSES, cfg)(tiny_features())
    for logits in [seg, *aux]:
        probs = logits.exp() - SEMANTIC_EPS  # sum_q p_q(c) * sigmoid(m_q): in [0, num_queries]
        assert probs.min() >= -1e-6 and probs.max() <= cfg.num_queries + 1e-4
        assert logits.min() >= math.log(SEMANTIC_EPS) - 1e-5
        normalized = logits.softmax(dim=1)
        assert torch.allclose(normalized, probs.add(SEMANTIC_EPS) / probs.add(SEMANTIC_EPS).sum(1, keepdim=True),
                              atol=1e-6)


def test_semantic_log_probs_is_the_maskformer_sum_over_queries():
    g = torch.Generator().manual_seed(1)
    class_logits = torch.randn(2, 5, NUM_CLASSES + 1, generator=g, dtype=torch.float64)
    mask_logits = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    expected = torch.zeros(2, NUM_CLASSES, 3, 4, dtype=torch.float64)
    for q in range(5):
        probs = class_logits[:, q].softmax(dim=-1)[:, :NUM_CLASSES]  # no-object column dropped
        expected += probs[:, :, None, None] * mask_logits[:, q, None].sigmoid()
    logits = semantic_log_probs(class_logits, mask_logits)
    assert torch.allclose(logits, (expected + SEMANTIC_EPS).log())
    # cross-entropy on these "logits" is -log(p_y / sum_c p_c), as for a SegFormer head
    target = torch.randint(0, NUM_CLASSES, (2, 3, 4), generator=g)
    p = expected + SEMANTIC_EPS
    manual = -(p.gather(1, target[:, None]) / p.sum(1, keepdim=True)).log().mean()
    assert torch.allclose(F.cross_entropy(logits, target), manual)


def test_soft_mask_scales_must_match_heads():
    with pytest.raises(ConfigError, match="soft_mask_scales"):
        MaskDecoderHead(IN_CHANNELS, NUM_CLASSES, tiny_cfg("soft", soft_mask_scales=[1.0, 2.0, 3.0]))


def test_hidden_dim_must_be_divisible_by_heads():
    with pytest.raises(ConfigError, match="hidden_dim"):
        MaskDecoderHead(IN_CHANNELS, NUM_CLASSES, tiny_cfg("standard", hidden_dim=20, num_heads=3,
                                                           soft_mask_scales=[1.0] * 3))


# --------------------------------------------------------------------------- #
# soft (HODOR)


def test_soft_attention_equals_explicit_formula_in_outputs_and_gradients():
    torch.manual_seed(0)
    heads, dim, b, nq, ns = 2, 8, 2, 3, 5
    attn = MultiHeadAttention(dim, heads).double()
    query, key = torch.randn(b, nq, dim, dtype=torch.float64), torch.randn(b, ns, dim, dtype=torch.float64)
    mask_logits = torch.randn(b, nq, ns, dtype=torch.float64, requires_grad=True)
    scales = torch.tensor([8.0, 2.0], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(b, nq, dim, dtype=torch.float64)

    out = attn(query, key, key, soft_attention_bias(mask_logits, scales))
    grad_m, grad_s = torch.autograd.grad((out * upstream).sum(), [mask_logits, scales])

    bias = -scales.view(1, heads, 1, 1) * (1 - mask_logits.sigmoid().unsqueeze(1))
    expected = explicit_attention(attn, query, key, key, bias)
    exp_grad_m, exp_grad_s = torch.autograd.grad((expected * upstream).sum(), [mask_logits, scales])

    assert torch.allclose(out, expected, atol=1e-10)
    assert torch.allclose(grad_m, exp_grad_m, atol=1e-10)
    assert torch.allclose(grad_s, exp_grad_s, atol=1e-10)
    assert grad_m.abs().sum() > 0 and (grad_s != 0).all()


def test_soft_head_sends_gradients_to_per_head_scales():
    head = MaskDecoderHead(IN_CHANNELS, NUM_CLASSES, tiny_cfg("soft"))
    seg, aux = head(tiny_features())
    (seg.logsumexp(1).mean() + seg[:, 1].mean()).backward()
    for layer in head.layers:
        assert layer.soft_mask_scales.grad is not None and (layer.soft_mask_scales.grad != 0).all()
    assert torch.equal(head.layers[0].soft_mask_scales.detach(), torch.tensor([8.0, 4.0]))


# --------------------------------------------------------------------------- #
# masked (Mask2Former)


def test_masked_attention_with_an_empty_mask_row_attends_everywhere_without_nan():
    torch.manual_seed(0)
    heads, dim, b, nq, ns = 2, 8, 1, 3, 6
    attn = MultiHeadAttention(dim, heads)
    query, key = torch.randn(b, nq, dim), torch.randn(b, ns, dim)
    mask_logits = torch.randn(b, nq, ns).requires_grad_()
    with torch.no_grad():
        mask_logits[:, 0] = -5.0  # query 0: sigmoid < 0.5 everywhere -> empty mask
        mask_logits[:, 1, :3] = 5.0
        mask_logits[:, 1, 3:] = -5.0  # query 1: attends to the first 3 keys only

    attend = masked_attention_mask(mask_logits, 0.5)
    assert attend.shape == (b, 1, nq, ns) and attend.dtype == torch.bool
    assert attend[0, 0, 0].all() and attend[0, 0, 1].tolist() == [True] * 3 + [False] * 3

    out = attn(query, key, key, attend)
    unmasked = attn(query, key, key)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 0], unmasked[:, 0], atol=1e-6)
    only_first3 = attn(query[:, 1:2], key[:, :3], key[:, :3])
    assert torch.allclose(out[:, 1], only_first3[:, 0], atol=1e-6)

    out.sum().backward()
    assert mask_logits.grad is None  # the mask is detached
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_masked_attention_threshold_is_on_the_sigmoid():
    logits = torch.tensor([[[0.0, -0.01, 0.01, 2.0]]])
    assert masked_attention_mask(logits, 0.5)[0, 0, 0].tolist() == [True, False, True, True]
    assert masked_attention_mask(logits, 0.8)[0, 0, 0].tolist() == [False, False, False, True]


# --------------------------------------------------------------------------- #
# kmeans (kMaX-DeepLab)


def test_kmeans_update_is_the_sum_over_assigned_pixels():
    g = torch.Generator().manual_seed(0)
    b, nq, ns, d = 2, 4, 9, 3
    logits = torch.randn(b, nq, ns, generator=g)
    values = torch.randn(b, ns, d, generator=g)
    expected = torch.zeros(b, nq, d)
    for i in range(b):
        for s in range(ns):
            expected[i, int(logits[i, :, s].argmax())] += values[i, s]
    assert torch.allclose(kmeans_update(logits, values), expected, atol=1e-6)

    assignment = kmeans_assignment(logits)
    assert torch.equal(assignment.sum(dim=1), torch.ones(b, ns))  # every pixel to exactly one query


def test_kmeans_update_sends_no_gradient_through_the_assignment():
    g = torch.Generator().manual_seed(0)
    b, nq, ns, d = 2, 4, 9, 3
    logits = torch.randn(b, nq, ns, generator=g, requires_grad=True)
    values = torch.randn(b, ns, d, generator=g, requires_grad=True)
    upstream = torch.randn(b, nq, d, generator=g)
    (kmeans_update(logits, values) * upstream).sum().backward()
    assert logits.grad is None
    owner = logits.detach().argmax(dim=1)  # [b, ns]
    expected = upstream.gather(1, owner[..., None].expand(b, ns, d))  # each pixel gets its cluster's grad
    assert torch.allclose(values.grad, expected)


def test_kmeans_cross_attention_starts_as_identity():
    torch.manual_seed(0)
    layer = KMeansCrossAttention(8)
    queries, memory, logits = torch.randn(2, 3, 8), torch.randn(2, 10, 8), torch.randn(2, 3, 10)
    assert torch.equal(layer(queries, memory, logits), queries)


def test_kmeans_aux_predictions_train_the_assignment_logits():
    """The argmax cannot train the logits that drive it; deep supervision of them must."""
    head = MaskDecoderHead(IN_CHANNELS, NUM_CLASSES, tiny_cfg("kmeans", num_layers=1))
    seg, aux = head(tiny_features())
    head.zero_grad()
    aux[0].logsumexp(1).mean().backward()
    # aux[0] = prediction of the learnable queries at the stage-4 key resolution
    assert head.query_feat.weight.grad.abs().sum() > 0
    assert head.pixel_decoder.lateral[3][0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- #
# precision and training


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_runs_under_bf16_autocast_with_float32_outputs(variant):
    head = MaskDecoderHead(IN_CHANNELS, NUM_CLASSES, tiny_cfg(variant))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seg, aux = head(tiny_features())
        loss = sum(F.cross_entropy(t, torch.zeros(2, 16, 16, dtype=torch.long)) for t in [seg, *aux])
    loss.backward()
    assert seg.dtype == torch.float32 and all(a.dtype == torch.float32 for a in aux)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
