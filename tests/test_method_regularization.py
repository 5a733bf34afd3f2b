"""Dense-energy regularisation (wsss.method.regularization) against a brute-force dense-matrix computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss.method.regularization import dense_energy_loss, half_window_offsets, reduced_size

pytestmark = pytest.mark.usefixtures("one_thread")

# Wide enough kernels that random images give weights far from 0 and 1, so every term matters.
SIGMA_RGB = 80.0
SIGMA_XY = 4.0


def brute_force_energy(images, logits, valid, sigma_rgb, sigma_xy, radius, downscale):
    """The energy written out in float64 with an explicit [HW, HW] kernel; radius None = no window.

    downscale: halve the resolution by 2x2 average pooling (what a bilinear 0.5 resize is), the ROI
    by 2x2 min pooling (a reduced pixel is valid when its four pixels are), sigma_xy by 2.
    """
    rgb = images.double() * 255.0
    probs = logits.double().softmax(dim=1)
    roi = valid.double().unsqueeze(1)
    if downscale:
        rgb, probs = F.avg_pool2d(rgb, 2), F.avg_pool2d(probs, 2)
        roi = -F.max_pool2d(-roi, 2)
        sigma_xy = sigma_xy / 2
    b, c, h, w = probs.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()  # [HW, 2]
    offset = pos[:, None] - pos[None]  # [HW, HW, 2]
    allowed = ~torch.eye(h * w, dtype=torch.bool)
    if radius is not None:
        allowed &= (offset.abs() <= radius).all(dim=-1)
    total = 0.0
    for i in range(b):
        colour = rgb[i].reshape(3, -1).T  # [HW, 3]
        colour_d2 = (colour[:, None] - colour[None]).square().sum(dim=-1)
        kernel = torch.exp(-offset.square().sum(dim=-1) / (2 * sigma_xy**2) - colour_d2 / (2 * sigma_rgb**2))
        m = roi[i].flatten()
        kernel = kernel * allowed * m[:, None] * m[None]
        seg = probs[i].reshape(c, -1)  # [C, HW]
        total = total + sum(seg[k] @ kernel @ (1 - seg[k]) for k in range(c))
    return total / b


def _inputs(b=2, c=3, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, h, w, generator=g)
    logits = 2.0 * torch.randn(b, c, h, w, generator=g)
    return images, logits


def _box_mask(b, h, w, top, bottom, left, right):
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    valid[:, top:bottom, left:right] = True
    return valid


def test_half_window_offsets_cover_the_window_once():
    radius = 3
    half = half_window_offsets(radius)
    full = half + [(-dy, -dx) for dy, dx in half]
    expected = {(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)} - {(0, 0)}
    assert len(half) == ((2 * radius + 1) ** 2 - 1) // 2
    assert len(set(full)) == len(full) and set(full) == expected


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_matches_brute_force_full_resolution(radius):
    images, logits = _inputs()
    valid = torch.rand(2, 12, 10, generator=torch.Generator().manual_seed(1)) > 0.2  # irregular ROI
    ours = dense_energy_loss(images, logits, valid, SIGMA_RGB, SIGMA_XY, 1.0, radius)
    ref = brute_force_energy(images, logits, valid, SIGMA_RGB, SIGMA_XY, radius, downscale=False)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    assert ref > 1.0  # not a trivial comparison
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("radius", [1, 2])
def test_matches_brute_force_at_half_scale(radius):
    images, logits = _inputs()
    valid = _box_mask(2, 12, 10, 1, 11, 0, 7)  # odd edges: the reduced ROI must drop the mixed 2x2 blocks
    ours = dense_energy_loss(images, logits, valid, SIGMA_RGB, SIGMA_XY, 0.5, radius)
    ref = brute_force_energy(images, logits, valid, SIGMA_RGB, SIGMA_XY, radius, downscale=True)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("scale, downscale", [(1.0, False), (0.5, True)])
def test_window_covering_the_image_is_the_unrestricted_dense_crf(scale, downscale):
    images, logits = _inputs()
    valid = torch.ones(2, 12, 10, dtype=torch.bool)
    h, w = reduced_size(12, 10, scale)
    ours = dense_energy_loss(images, logits, valid, SIGMA_RGB, SIGMA_XY, scale, max(h, w))
    dense = brute_force_energy(images, logits, valid, SIGMA_RGB, SIGMA_XY, None, downscale)
    torch.testing.assert_close(ours.double(), dense, rtol=1e-5, atol=0.0)
    windowed = dense_energy_loss(images, logits, valid, SIGMA_RGB, SIGMA_XY, scale, 1)
    assert windowed < 0.9 * ours  # the window does cut pairs off


@pytest.mark.parametrize("scale, downscale", [(1.0, False), (0.5, True)])
def test_gradient_matches_brute_force(scale, downscale):
    images, logits = _inputs()
    valid = _box_mask(2, 12, 10, 0, 10, 2, 10)
    ours_logits = logits.clone().requires_grad_(True)
    dense_energy_loss(images, ours_logits, valid, SIGMA_RGB, SIGMA_XY, scale, 2).backward()
    ref_logits = logits.double().requires_grad_(True)
    brute_force_energy(images, ref_logits, valid, SIGMA_RGB, SIGMA_XY, 2, downscale).backward()
    assert ref_logits.grad.abs().max() > 1e-2
    torch.testing.assert_close(ours_logits.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-6)


def test_gradient_with_logits_at_a_lower_resolution():
    """Logits resized bilinearly to the energy's resolution: gradcheck of the whole function in float64 terms."""
    images, _ = _inputs()
    logits = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    valid = torch.ones(2, 12, 10, dtype=torch.bool)
    loss = dense_energy_loss(images, logits, valid, SIGMA_RGB, SIGMA_XY, 0.5, 2)
    loss.backward()
    step = 1e-2
    numeric = torch.zeros_like(logits)
    with torch.no_grad():
        for idx in [(0, 0, 0, 0), (0, 1, 2, 3), (1, 2, 5, 4), (1, 0, 3, 1)]:
            plus, minus = logits.clone(), logits.clone()
            plus[idx] += step
            minus[idx] -= step
            numeric[idx] = (dense_energy_loss(images, plus, valid, SIGMA_RGB, SIGMA_XY, 0.5, 2)
                            - dense_energy_loss(images, minus, valid, SIGMA_RGB, SIGMA_XY, 0.5, 2)) / (2 * step)
            torch.testing.assert_close(logits.grad[idx], numeric[idx], rtol=2e-2, atol=1e-4)


def test_constant_segmentation_has_no_energy():
    images, _ = _inputs()
    logits = torch.zeros(2, 3, 12, 10)
    logits[:, 1] = 40.0  # one class everywhere, softmax 1 to float32 precision
    valid = torch.ones(2, 12, 10, dtype=torch.bool)
    loss = dense_energy_loss(images, logits, valid, 15.0, 100.0, 1.0, 3)
    assert abs(loss.item()) < 1e-4
    uniform = dense_energy_loss(images, torch.zeros(2, 3, 12, 10), valid, 15.0, 100.0, 1.0, 3)
    assert uniform > 1.0  # a maximally uncertain one does have energy


def test_cutting_a_uniform_region_costs_more_than_following_a_colour_edge():
    h, w = 16, 16
    images = torch.zeros(1, 3, h, w)
    images[:, 0, :, : w // 2] = 0.9  # red left half
    images[:, 2, :, w // 2 :] = 0.9  # blue right half
    images += 0.02 * torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3))
    valid = torch.ones(1, h, w, dtype=torch.bool)
    follows, cuts = torch.zeros(1, 2, h, w), torch.zeros(1, 2, h, w)
    follows[:, 0, :, : w // 2] = 20.0  # class 0 left of the colour edge
    follows[:, 1, :, w // 2 :] = 20.0
    cuts[:, 0, : h // 2] = 20.0  # class 0 on the top half: the boundary crosses both uniform halves
    cuts[:, 1, h // 2 :] = 20.0
    e_follows = dense_energy_loss(images, follows, valid, 15.0, 100.0, 0.5, 5)
    e_cuts = dense_energy_loss(images, cuts, valid, 15.0, 100.0, 0.5, 5)
    assert e_cuts > 1.0
    assert e_follows < 1e-3 * e_cuts


def test_padding_outside_the_valid_mask_does_not_matter():
    b, h, w = 2, 16, 14
    g = torch.Generator().manual_seed(4)
    images = torch.rand(b, 3, h, w, generator=g)
    logits = torch.randn(b, 4, h, w, generator=g)
    for top, bottom, left, right in [(2, 12, 0, 10), (1, 15, 3, 14)]:  # 2x2-aligned, then not
        valid = _box_mask(b, h, w, top, bottom, left, right)
        other_images = torch.where(valid[:, None], images, torch.rand(b, 3, h, w, generator=g))
        other_logits = torch.where(valid[:, None], logits, 5.0 * torch.randn(b, 4, h, w, generator=g))
        for scale in (1.0, 0.5):
            loss = dense_energy_loss(images, logits, valid, 15.0, 100.0, scale, 3)
            padded = dense_energy_loss(other_images, other_logits, valid, 15.0, 100.0, scale, 3)
            torch.testing.assert_close(padded, loss, rtol=1e-6, atol=1e-6)
            assert loss > 0.1
        if (top, bottom, left, right) == (2, 12, 0, 10):  # aligned: the same as the crop alone
            crop = (slice(None), slice(None), slice(top, bottom), slice(left, right))
            alone = dense_energy_loss(images[crop], logits[crop], valid[:, top:bottom, left:right],
                                      15.0, 100.0, 0.5, 3)
            torch.testing.assert_close(alone, dense_energy_loss(images, logits, valid, 15.0, 100.0, 0.5, 3))


def test_bfloat16_autocast_inputs():
    images, logits = _inputs()
    valid = torch.ones(2, 12, 10, dtype=torch.bool)
    images_bf, logits_bf = images.bfloat16(), logits.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dense_energy_loss(images_bf, logits_bf, valid, SIGMA_RGB, SIGMA_XY, 0.5, 2)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits_bf.grad is not None and logits_bf.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits_bf.grad.float()).all()
    reference = dense_energy_loss(images_bf.float(), logits_bf.detach().float(), valid, SIGMA_RGB, SIGMA_XY, 0.5, 2)
    torch.testing.assert_close(loss, reference)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"valid_mask": torch.ones(2, 12, 9, dtype=torch.bool)}, "valid_mask"),
        ({"images": torch.rand(2, 1, 12, 10)}, "images"),
        ({"seg_logits": torch.randn(3, 3, 12, 10)}, "seg_logits"),
        ({"radius": 0}, "radius"),
        ({"scale": 0.0}, "scale"),
        ({"sigma_rgb": -1.0}, "sigma_rgb"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    images, logits = _inputs()
    args = {"images": images, "seg_logits": logits, "valid_mask": torch.ones(2, 12, 10, dtype=torch.bool),
            "sigma_rgb": 15.0, "sigma_xy": 100.0, "scale": 0.5, "radius": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        dense_energy_loss(**args)
