"""PAR (docs/method.md sec. 4): the kernel, the update rule, and agreement with the plain formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.config import ParConfig
from wsss.method.cam import refine_probs
from wsss.method.par import (
    apply_par_kernel,
    neighbour_distances,
    neighbour_offsets,
    par_kernel,
    position_kernel,
)

CFG = ParConfig()  # dilations 1..24, w1 0.3, w2 0.01, 10 iterations


def refine_with_par(images, masks, cfg):
    """PAR at the images' resolution through the production path (masks resized to the kernel's size)."""
    return refine_probs(masks, par_kernel(images, cfg.dilations, cfg.w1, cfg.w2), cfg.iterations)


def plain_par(images, masks, dilations, w1, w2, iterations):
    """The formula, written out: explicit neighbour gather by clamped coordinates."""
    b, _, h, w = images.shape
    ys = torch.arange(h).view(h, 1)
    xs = torch.arange(w).view(1, w)

    def neighbours(x):  # [B, C, H, W] -> [B, C, 48, H, W], replicate padding = clamping
        return torch.stack(
            [x[:, :, (ys + dy).clamp(0, h - 1), (xs + dx).clamp(0, w - 1)] for dy, dx in neighbour_offsets(dilations)],
            dim=2,
        )

    nb = neighbours(images)
    sigma = nb.std(dim=2, keepdim=True)
    k_rgb = (-((nb - images[:, :, None]).abs() / (sigma + 1e-8) / w1) ** 2).mean(dim=1)
    d = torch.tensor(neighbour_distances(dilations))
    k_pos = -(d / (d.std() + 1e-8) / w1) ** 2
    kernel = k_rgb.softmax(dim=1) + w2 * k_pos.softmax(dim=0).view(1, -1, 1, 1)
    for _ in range(iterations):
        masks = (neighbours(masks) * kernel[:, None]).sum(dim=2)
    return masks


def test_neighbours_are_8_per_dilation_with_axial_and_diagonal_distances():
    offsets = neighbour_offsets([1, 2, 4, 8, 12, 24])
    assert len(offsets) == 48 and len(set(offsets)) == 48 and (0, 0) not in offsets
    assert neighbour_offsets([2]) == [(-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2)]
    assert neighbour_distances([2]) == pytest.approx([2 * math.sqrt(2), 2, 2 * math.sqrt(2), 2, 2,
                                                      2 * math.sqrt(2), 2, 2 * math.sqrt(2)])


def test_par_matches_plain_formula_on_small_image_with_dilations_larger_than_image():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 20, 24)
    masks = torch.randn(1, 3, 20, 24).softmax(dim=1)
    expected = plain_par(images, masks, CFG.dilations, CFG.w1, CFG.w2, CFG.iterations)
    actual = refine_with_par(images, masks, CFG)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_par_kernel_rows_sum_to_one_plus_w2():
    torch.manual_seed(1)
    kernel = par_kernel(torch.rand(2, 3, 12, 9), CFG.dilations, CFG.w1, CFG.w2)
    assert kernel.weights.shape == (2, 48, 12, 9)
    torch.testing.assert_close(kernel.weights.sum(dim=1), torch.full((2, 12, 9), 1 + CFG.w2))


def test_position_kernel_is_a_w2_scaled_distribution_favouring_near_neighbours():
    pos = position_kernel(CFG.dilations, CFG.w1, CFG.w2)
    assert pos.sum().item() == pytest.approx(CFG.w2)
    assert pos[:8].min() > pos[-8:].max()  # dilation 1 outweighs dilation 24


def test_par_scales_a_constant_mask_by_one_plus_w2_per_iteration():
    # The reference update m <- sum_j kernel m_j is not renormalized: rows sum to 1 + w2.
    torch.manual_seed(2)
    images = torch.rand(1, 3, 16, 16)
    masks = torch.full((1, 2, 16, 16), 0.25)
    out = refine_with_par(images, masks, CFG)
    torch.testing.assert_close(out, masks * (1 + CFG.w2) ** CFG.iterations)


def test_par_preserves_per_pixel_sums_up_to_the_common_factor_and_keeps_probabilities_nonnegative():
    torch.manual_seed(3)
    images = torch.rand(2, 3, 18, 14)
    probs = torch.randn(2, 4, 18, 14).softmax(dim=1)
    out = refine_with_par(images, probs, CFG)
    torch.testing.assert_close(out.sum(dim=1), torch.full((2, 18, 14), (1 + CFG.w2) ** CFG.iterations))
    assert out.min() >= 0


def test_par_keeps_uniform_regions_and_respects_a_colour_edge():
    # Left half red, right half blue; the mask says class 0 on the left, class 1 on the
    # right except a wrong column next to the edge. PAR must keep the argmax of each side.
    images = torch.zeros(1, 3, 16, 16)
    images[:, 0, :, :8] = 1.0
    images[:, 2, :, 8:] = 1.0
    masks = torch.zeros(1, 2, 16, 16)
    masks[:, 0, :, :8] = 0.9
    masks[:, 1, :, :8] = 0.1
    masks[:, 0, :, 8:] = 0.2
    masks[:, 1, :, 8:] = 0.8
    out = refine_with_par(images, masks, CFG)
    assert (out.argmax(dim=1) == masks.argmax(dim=1)).all()


def test_one_kernel_serves_every_mask_set_of_an_image():
    torch.manual_seed(4)
    images = torch.rand(2, 3, 10, 12)
    a = torch.randn(2, 3, 10, 12).softmax(dim=1)
    b = torch.randn(2, 3, 10, 12).softmax(dim=1)
    kernel = par_kernel(images, CFG.dilations, CFG.w1, CFG.w2)
    both = apply_par_kernel(torch.cat([a, b], dim=1), kernel, CFG.iterations)
    torch.testing.assert_close(both[:, :3], apply_par_kernel(a, kernel, CFG.iterations))
    torch.testing.assert_close(both[:, 3:], apply_par_kernel(b, kernel, CFG.iterations))


def test_refine_with_par_resizes_masks_to_the_image_and_computes_in_float32():
    torch.manual_seed(5)
    images = torch.rand(1, 3, 12, 16).to(torch.bfloat16)
    masks = torch.randn(1, 2, 6, 8).softmax(dim=1).to(torch.bfloat16)
    out = refine_with_par(images, masks, CFG)
    assert out.shape == (1, 2, 12, 16) and out.dtype == torch.float32
    resized = F.interpolate(masks.float(), size=(12, 16), mode="bilinear", align_corners=False)
    expected = plain_par(images.float(), resized, CFG.dilations, CFG.w1, CFG.w2, CFG.iterations)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_a_par_kernel_carries_its_dilations_and_rejects_masks_of_another_size():
    kernel = par_kernel(torch.rand(1, 3, 8, 8), [1, 2], CFG.w1, CFG.w2)
    assert kernel.dilations == (1, 2) and kernel.weights.shape == (1, 16, 8, 8)
    with pytest.raises(ValueError, match="does not fit"):
        apply_par_kernel(torch.rand(1, 2, 8, 9), kernel, 1)
