"""Affinity labels, window, random walk and propagation (docs/method.md sec. 5)."""

from __future__ import annotations

import torch

from wsss.config import AfaConfig
from wsss.method.affinity import (
    affinity_labels,
    label_to_grid,
    propagate_cams,
    random_walk,
    transition_matrix,
    window_mask,
)
from wsss.method.cam import cams_with_background

IGNORE = 255


def brute_force_window(h, w, r):
    n = h * w
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            mask[i, j] = abs(i // w - j // w) <= r and abs(i % w - j % w) <= r
    return mask


def test_window_mask_equals_brute_force_loop():
    for h, w, r in [(5, 7, 2), (4, 4, 0), (3, 6, 8)]:
        assert torch.equal(window_mask(h, w, r), brute_force_window(h, w, r))


def test_window_mask_is_cached_per_grid_radius_and_device():
    assert window_mask(6, 5, 2, "cpu") is window_mask(6, 5, 2, torch.device("cpu"))
    assert window_mask(6, 5, 2) is not window_mask(6, 5, 3)


def test_window_mask_made_under_inference_mode_is_usable_with_autograd():
    with torch.inference_mode():
        window_mask(3, 7, 1)
    affinity = torch.rand(1, 21, 21, requires_grad=True)
    transition_matrix(affinity, (3, 7), 1, 2, 0.1).sum().backward()
    assert affinity.grad is not None


def test_affinity_labels_one_for_same_label_zero_otherwise_background_pairs_positive():
    grid = torch.tensor([[[0, 0, 1], [2, 1, 0]]])  # 2 x 3, all pairs inside radius 8
    y = affinity_labels(grid, radius=8, ignore_index=IGNORE)
    flat = grid.view(-1)
    expected = (flat[:, None] == flat[None, :]).long()
    assert torch.equal(y[0], expected)
    assert y[0].diagonal().eq(1).all()
    assert y[0, 0, 1] == 1 and y[0, 0, 5] == 1  # background with background


def test_affinity_labels_ignore_pairs_outside_radius():
    grid = torch.zeros(1, 4, 5, dtype=torch.long)
    y = affinity_labels(grid, radius=1, ignore_index=IGNORE)
    window = brute_force_window(4, 5, 1)
    assert y[0][~window].eq(IGNORE).all() and y[0][window].eq(1).all()


def test_affinity_labels_ignore_pairs_with_an_ignored_pixel():
    grid = torch.tensor([[[1, IGNORE], [1, 0]]])
    y = affinity_labels(grid, radius=8, ignore_index=IGNORE)[0]
    assert y[1].eq(IGNORE).all() and y[:, 1].eq(IGNORE).all()
    assert y[0, 2] == 1 and y[0, 3] == 0 and y[3, 3] == 1


def test_label_to_grid_is_nearest_and_keeps_ignore():
    label = torch.tensor([[[1, 1, IGNORE, IGNORE], [1, 1, IGNORE, IGNORE], [0, 0, 2, 2], [0, 0, 2, 2]]])
    assert label_to_grid(label, (2, 2)).tolist() == [[[1, IGNORE], [0, 2]]]


def test_random_walk_with_identity_affinity_returns_input_scaled_by_one_over_one_plus_eps():
    # A = I: power keeps I, column sums are 1, T = I / (1 + eps) -> P_rw = P / (1 + eps).
    torch.manual_seed(0)
    probs = torch.rand(2, 4, 3, 5).softmax(dim=1)
    eye = torch.eye(15).expand(2, 15, 15)
    out = random_walk(probs, eye, radius=8, power=2, eps=0.1)
    torch.testing.assert_close(out, probs / 1.1)
    assert out.argmax(dim=1).equal(probs.argmax(dim=1))


def test_random_walk_normalizes_over_columns_after_window_and_power():
    torch.manual_seed(1)
    h, w, r, eps = 3, 4, 1, 0.1
    a = torch.rand(1, 12, 12)
    t = transition_matrix(a, (h, w), r, 2, eps)
    masked = (a * brute_force_window(h, w, r)) ** 2
    torch.testing.assert_close(t[0], masked[0] / (masked[0].sum(dim=0, keepdim=True) + eps))
    probs = torch.rand(1, 2, h, w)
    expected = (probs.view(1, 2, 12) @ t).view(1, 2, h, w)
    torch.testing.assert_close(random_walk(probs, a, r, 2, eps), expected)


def test_random_walk_computes_in_float32_from_bf16_inputs():
    probs = torch.rand(1, 3, 2, 2).to(torch.bfloat16)
    a = torch.rand(1, 4, 4).to(torch.bfloat16)
    assert random_walk(probs, a, 8, 2, 0.1).dtype == torch.float32


def test_propagate_cams_prepends_background_softmaxes_present_classes_and_walks():
    torch.manual_seed(2)
    cfg = AfaConfig(radius=2)
    cams = torch.rand(2, 3, 8, 10)  # at twice the grid size: resized inside
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    affinity = torch.rand(2, 20, 20)
    out = propagate_cams(cams, labels, affinity, 0.35, cfg.radius, cfg.rw_power, cfg.rw_eps, grid_size=(4, 5))
    assert out.shape == (2, 4, 4, 5)
    assert out[0, 2].eq(0).all() and out[1, 1].eq(0).all() and out[1, 3].eq(0).all()  # absent: exactly 0
    small = torch.nn.functional.interpolate(cams, size=(4, 5), mode="bilinear", align_corners=False)
    probs = cams_with_background(small, labels, [0.35])[:, 0]
    torch.testing.assert_close(out, random_walk(probs, affinity, cfg.radius, cfg.rw_power, cfg.rw_eps))


def test_propagate_cams_for_both_thresholds_shares_the_transition_matrix():
    torch.manual_seed(3)
    cfg = AfaConfig()
    walk = (cfg.radius, cfg.rw_power, cfg.rw_eps)
    cams = torch.rand(1, 2, 4, 4)
    labels = torch.ones(1, 2)
    affinity = torch.rand(1, 16, 16)
    both = propagate_cams(cams, labels, affinity, (0.55, 0.35), *walk)
    assert both.shape == (1, 2, 3, 4, 4)
    torch.testing.assert_close(both[:, 0], propagate_cams(cams, labels, affinity, 0.55, *walk))
    torch.testing.assert_close(both[:, 1], propagate_cams(cams, labels, affinity, 0.35, *walk))
