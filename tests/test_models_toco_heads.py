"""ToCo's projection head and the teacher's EMA (wsss.models.toco_heads); equality with the official CTCHead
and its EMA is checked by bench/toco_vs_official.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss.models.toco_heads import ProjectionHead, ema_update


def test_projection_head_is_a_normalised_mlp_then_unit_rows():
    torch.manual_seed(0)
    head = ProjectionHead(12, out_dim=7, hidden_dim=16, bottleneck_dim=5, layers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 16), (16, 5)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    x = torch.randn(4, 12)
    z = F.normalize(head.mlp(x), dim=-1)
    rows = head.last_weight / head.last_weight.norm(dim=1, keepdim=True)
    out = head(x)
    assert torch.allclose(out, z @ rows.T, atol=1e-6)
    assert out.abs().max() <= 1 + 1e-6  # cosines of unit vectors
    # scaling the last layer's rows changes nothing: its gain is fixed at 1
    with torch.no_grad():
        head.last_weight.mul_(torch.rand(7, 1) * 5 + 0.1)
    assert torch.allclose(head(x), out, atol=1e-6)


def test_projection_head_with_one_layer_and_the_error_for_none():
    assert len(ProjectionHead(8, out_dim=4, bottleneck_dim=3, layers=1).mlp) == 1
    with pytest.raises(ValueError, match="at least 1 layer"):
        ProjectionHead(8, layers=0)


def test_ema_update_moves_the_teacher_by_one_minus_momentum_towards_the_student():
    torch.manual_seed(1)
    student, teacher = ProjectionHead(6, 4, 8, 3), ProjectionHead(6, 4, 8, 3)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * s, atol=1e-7)
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    with pytest.raises(ValueError, match="parameters"):
        ema_update(teacher, ProjectionHead(6, 4, 8, 3, layers=2), 0.9)
