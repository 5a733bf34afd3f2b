"""Losses (docs/method.md sec. 5 and 7): classification, balanced segmentation, affinity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wsss.method.losses import affinity_loss, balanced_seg_loss, classification_loss

IGNORE = 255


def test_classification_loss_is_multilabel_soft_margin():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    sig = torch.sigmoid
    expected = -(torch.log(sig(logits[0, 0])) + torch.log(1 - sig(logits[0, 1])) + torch.log(sig(logits[0, 2]))) / 3
    torch.testing.assert_close(classification_loss(logits, labels), expected)


def test_balanced_seg_loss_equals_half_bg_mean_plus_half_fg_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 3)
    label = torch.tensor([[[0, 0, 1], [2, IGNORE, 0], [3, 3, 0]], [[0, 1, 1], [1, 1, IGNORE], [IGNORE, 0, 2]]])
    logp = logits.log_softmax(dim=1)
    bg, fg = [], []
    for b in range(2):
        for y in range(3):
            for x in range(3):
                c = int(label[b, y, x])
                if c == IGNORE:
                    continue
                (bg if c == 0 else fg).append(-logp[b, c, y, x])
    expected = 0.5 * (sum(bg) / len(bg) + sum(fg) / len(fg))
    torch.testing.assert_close(balanced_seg_loss(logits, label, IGNORE), expected)


def test_balanced_seg_loss_upsamples_logits_to_the_label_size():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    label = torch.randint(0, 3, (1, 16, 16))
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(balanced_seg_loss(logits, label), balanced_seg_loss(up, label))


def test_balanced_seg_loss_is_finite_without_foreground_or_with_everything_ignored():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    only_bg = torch.zeros(1, 4, 4, dtype=torch.long)
    loss = balanced_seg_loss(logits, only_bg, IGNORE)
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(logits, only_bg))
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    all_ignored = torch.full((1, 4, 4), IGNORE)
    assert balanced_seg_loss(logits, all_ignored, IGNORE).item() == 0.0


def test_affinity_loss_equals_formula():
    pred = torch.tensor([[[0.9, 0.2, 0.4], [0.3, 0.8, 0.6], [0.1, 0.7, 0.5]]])
    labels = torch.tensor([[[1, 0, IGNORE], [0, 1, 1], [IGNORE, 1, 0]]])
    pos = (1 - 0.9) + (1 - 0.8) + (1 - 0.6) + (1 - 0.7)  # 4 positives
    neg = 0.2 + 0.3 + 0.5  # 3 negatives
    expected = 0.5 * pos / (4 + 1) + 0.5 * neg / (3 + 1)
    assert math.isclose(affinity_loss(pred, labels).item(), expected, rel_tol=1e-6)


def test_affinity_loss_is_zero_when_everything_is_ignored_and_differentiable():
    pred = torch.rand(2, 5, 5, requires_grad=True)
    assert affinity_loss(pred, torch.full((2, 5, 5), IGNORE)).item() == 0.0
    affinity_loss(pred, torch.randint(0, 2, (2, 5, 5))).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
