"""CAMs and pseudo labels (docs/method.md sec. 3): multi-scale + flip CAM, thresholds, PAR-refined labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dataclasses import replace

from wsss.config import Config
from wsss.engine.runtime import pseudo_label_params
from wsss.method.cam import (
    cam_scores,
    cams_with_background,
    combine_high_low,
    ignore_outside_box,
    multiscale_cam,
    refine_cams_to_label,
    refine_probs_to_label,
    scaled_par_kernel,
)

IGNORE = 255
K = 3
PARAMS = pseudo_label_params(Config())  # the paper's defaults as plain values
PAR = PARAMS.par
THRESHOLDS = (PARAMS.bg_high, PARAMS.bg_low)


def cam_to_label(cams, labels, bg_threshold):
    """The evaluation CAM label: the argmax of ``cam_scores``."""
    return cam_scores(cams, labels, bg_threshold).argmax(dim=1)


def conv_cam_fn(seed: int = 0, k: int = K):
    """A random 3x3 conv as the CAM network (translation-equivariant, no flip symmetry)."""
    weight = torch.randn(k, 3, 3, 3, generator=torch.Generator().manual_seed(seed))
    calls = []

    def cam_fn(images, with_affinity):
        calls.append((tuple(images.shape), with_affinity))
        cams = F.conv2d(images, weight, padding=1)
        b, _, h, w = images.shape
        aff = torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, h * w, h * w) if with_affinity else None
        return cams, aff

    return cam_fn, calls


def asymmetric_image(b=1, h=16, w=20):
    torch.manual_seed(0)
    img = torch.rand(b, 3, h, w)
    img[..., : w // 3] += 1.0  # a bright left third: the image is not its own mirror image
    return img


def test_flip_fused_cam_of_flipped_image_is_flipped_cam():
    cam_fn, _ = conv_cam_fn()
    img = asymmetric_image()
    labels = torch.ones(1, K)
    cams, _, _ = multiscale_cam(cam_fn, img, labels, scales=[1.0, 0.5, 1.5])
    cams_of_flipped, _, _ = multiscale_cam(cam_fn, img.flip(-1), labels, scales=[1.0, 0.5, 1.5])
    torch.testing.assert_close(cams_of_flipped, cams.flip(-1), atol=1e-5, rtol=0)


def test_multiscale_cam_runs_image_and_flip_in_one_call_and_asks_affinity_only_of_the_image_at_its_scale():
    cam_fn, calls = conv_cam_fn()
    img = asymmetric_image(b=2, h=16, w=20)
    cams, aff, _ = multiscale_cam(cam_fn, img, torch.ones(2, K), scales=[1.0, 0.5, 1.5], affinity_scale=1.5)
    # at the affinity scale the flip runs apart, without attention logits
    assert calls == [((4, 3, 16, 20), False), ((4, 3, 8, 10), False), ((2, 3, 24, 30), True), ((2, 3, 24, 30), False)]
    assert cams.shape == (2, K, 16, 20) and not cams.requires_grad
    assert aff.shape == (2, 24 * 30, 24 * 30)
    assert aff[0].eq(0).all() and aff[1].eq(1).all()
    split = multiscale_cam(cam_fn, img, torch.ones(2, K), scales=[1.0, 0.5, 1.5], affinity_scale=1.5).cams
    together = multiscale_cam(cam_fn, img, torch.ones(2, K), scales=[1.0, 0.5, 1.5], affinity_scale=None).cams
    torch.testing.assert_close(split, together)  # the same CAMs as one call of image and flip


def test_multiscale_cam_is_max_of_cam_and_unflipped_flip_cam_summed_over_scales():
    cam_fn, _ = conv_cam_fn()
    img = asymmetric_image(h=12, w=12)
    labels = torch.ones(1, K)
    expected = 0
    for s in (1.0, 0.5):
        x = img if s == 1.0 else F.interpolate(img, size=(6, 6), mode="bilinear", align_corners=False)
        c, _ = cam_fn(torch.cat([x, x.flip(-1)]), False)
        c = F.interpolate(c, size=(12, 12), mode="bilinear", align_corners=False)
        expected = expected + torch.maximum(c[:1], c[1:].flip(-1)).relu()
    expected = expected - expected.amin(dim=(2, 3), keepdim=True)
    expected = expected / (expected.amax(dim=(2, 3), keepdim=True) + 1e-5)
    cams, aff, _ = multiscale_cam(cam_fn, img, labels, scales=[1.0, 0.5])
    assert aff is None
    torch.testing.assert_close(cams, expected)


def test_multiscale_cam_normalizes_present_classes_to_max_one_and_zeroes_absent():
    cam_fn, _ = conv_cam_fn()
    img = asymmetric_image(b=2)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    cams, _, _ = multiscale_cam(cam_fn, img, labels, scales=[1.0, 0.5])
    peaks = cams.amax(dim=(2, 3))
    torch.testing.assert_close(peaks * labels, labels, atol=1e-4, rtol=0)
    assert cams[labels == 0].eq(0).all()
    assert cams.min() >= 0 and cams.dtype == torch.float32


def test_multiscale_cam_rejects_an_affinity_scale_it_does_not_run():
    cam_fn, _ = conv_cam_fn()
    with pytest.raises(ValueError, match="affinity_scale"):
        multiscale_cam(cam_fn, asymmetric_image(), torch.ones(1, K), scales=[1.0, 0.5], affinity_scale=1.5)


def test_cam_to_label_takes_the_best_present_class_above_the_threshold():
    cams = torch.zeros(1, 3, 1, 4)
    cams[0, :, 0, 0] = torch.tensor([0.9, 0.2, 0.1])  # class 1 wins
    cams[0, :, 0, 1] = torch.tensor([0.3, 0.95, 0.1])  # class 2 is absent -> class 1 (0.3) loses to bg
    cams[0, :, 0, 2] = torch.tensor([0.45, 0.0, 0.0])  # tie with the threshold -> background
    cams[0, :, 0, 3] = torch.tensor([0.5, 0.0, 0.7])  # class 3 wins
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    assert cam_to_label(cams, labels, 0.45).tolist() == [[[1, 0, 0, 3]]]


def test_ignore_outside_box_uses_half_open_boxes_per_image():
    label = torch.zeros(2, 4, 5, dtype=torch.long)
    box = torch.tensor([[1, 3, 0, 5], [0, 4, 2, 4]])
    out = ignore_outside_box(label, box, IGNORE)
    expected = torch.full((2, 4, 5), IGNORE)
    expected[0, 1:3, 0:5] = 0
    expected[1, 0:4, 2:4] = 0
    assert torch.equal(out, expected)


def test_cams_with_background_gives_absent_classes_exactly_zero_probability():
    torch.manual_seed(0)
    cams = torch.rand(2, 3, 4, 5)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    probs = cams_with_background(cams, labels, (0.55, 0.35))
    assert probs.shape == (2, 2, 4, 4, 5)
    torch.testing.assert_close(probs.sum(dim=2), torch.ones(2, 2, 4, 5))
    assert probs[0, :, 2].eq(0).all() and probs[1, :, 1:].eq(0).all()
    assert probs[1, :, 0].eq(1).all()  # no foreground label: everything is background
    present = torch.cat([torch.full((1, 4, 5), 0.55), cams[0, [0, 2]]]).softmax(dim=0)
    torch.testing.assert_close(probs[0, 0, [0, 1, 3]], present)


def test_combine_high_low_rule():
    high = torch.tensor([3, 0, 0, 2])
    low = torch.tensor([3, 1, 0, 0])
    assert combine_high_low(high, low, IGNORE).tolist() == [3, IGNORE, 0, 2]


def band_image(h, w, edges):
    """Vertical bands of distinct colours split at the given columns: PAR keeps band borders."""
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    images = torch.empty(1, 3, h, w)
    for i, (x0, x1) in enumerate(zip((0, *edges), (*edges, w))):
        images[0, :, :, x0:x1] = colours[i].view(3, 1, 1)
    return images


def crafted_cams(h=16, w=16):
    """Class 1 present with CAM 0.8 (above high), 0.45 (between), 0.2 (below low) in three bands."""
    cams = torch.zeros(1, 2, h, w)
    cams[0, 0, :, : w // 4] = 0.8
    cams[0, 0, :, w // 4 : w // 2] = 0.45
    cams[0, 0, :, w // 2 :] = 0.2
    cams[0, 1] = 0.9  # class 2 is absent: must never appear
    return band_image(h, w, (w // 4, w // 2)), cams, torch.tensor([[1.0, 0.0]])


def test_refine_cams_to_label_high_low_rule_on_crafted_cams():
    images, cams, labels = crafted_cams()
    label = refine_cams_to_label(images, cams, labels, THRESHOLDS, PAR, ignore_index=IGNORE)
    assert label.shape == (1, 16, 16) and label.dtype == torch.long
    assert label[0, :, :4].eq(1).all()  # foreground only above the high threshold
    assert label[0, :, 4:8].eq(IGNORE).all()  # between the thresholds: ignored
    assert label[0, :, 8:].eq(0).all()  # background only below the low threshold
    assert not label.eq(2).any()


def test_refine_cams_to_label_ignores_outside_the_valid_box():
    images, cams, labels = crafted_cams()
    box = torch.tensor([[2, 14, 0, 12]])
    label = refine_cams_to_label(images, cams, labels, THRESHOLDS, PAR, valid_box=box, ignore_index=IGNORE)
    assert label[0, :2].eq(IGNORE).all() and label[0, 14:].eq(IGNORE).all() and label[0, :, 12:].eq(IGNORE).all()
    assert label[0, 2:14, :4].eq(1).all() and label[0, 2:14, 8:12].eq(0).all()


def test_refine_cams_to_label_without_par_iterations_is_the_plain_threshold_rule():
    # With 0 PAR iterations and PAR at full resolution the rule reduces to argmax thresholds.
    torch.manual_seed(0)
    cams = torch.rand(2, 3, 8, 8)
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    par = replace(PAR, iterations=0, scale=1.0)
    label = refine_cams_to_label(torch.rand(2, 3, 8, 8), cams, labels, THRESHOLDS, par, ignore_index=IGNORE)
    high = cam_to_label(cams, labels, PARAMS.bg_high)
    low = cam_to_label(cams, labels, PARAMS.bg_low)
    assert torch.equal(label, combine_high_low(high, low, IGNORE))


def test_refine_probs_to_label_upsamples_grid_probabilities_and_applies_the_rule():
    # token-grid probabilities: class 1 on the left half for both thresholds, background on
    # the right half only at the low threshold (the high one has class 1 winning there).
    probs_high = torch.zeros(1, 3, 4, 4)
    probs_low = torch.zeros(1, 3, 4, 4)
    probs_high[0, 1, :, :2], probs_high[0, 0, :, :2] = 0.9, 0.1
    probs_high[0, 0, :, 2:], probs_high[0, 1, :, 2:] = 0.8, 0.2
    probs_low[0, 1, :, :2], probs_low[0, 0, :, :2] = 0.95, 0.05
    probs_low[0, 1, :, 2:], probs_low[0, 0, :, 2:] = 0.6, 0.4
    images = band_image(16, 16, (8,))
    box = torch.tensor([[0, 16, 0, 14]])
    label = refine_probs_to_label(images, probs_high, probs_low, PAR, valid_box=box, ignore_index=IGNORE)
    assert label.shape == (1, 16, 16)
    assert label[0, :, :8].eq(1).all()
    assert label[0, :, 8:14].eq(IGNORE).all()  # high says bg, low says fg -> ignored
    assert label[0, :, 14:].eq(IGNORE).all()  # outside the box


def test_a_shared_par_kernel_gives_the_labels_of_separate_calls():
    torch.manual_seed(0)
    images, cams = torch.rand(2, 3, 32, 24), torch.rand(2, K, 32, 24)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    probs = torch.rand(2, 2, K + 1, 6, 4).softmax(dim=2)
    par = PAR
    kernel = scaled_par_kernel(images, par)
    assert kernel.weights.shape == (2, 8 * len(par.dilations), 16, 12)  # at par.scale = 0.5
    assert kernel.dilations == par.dilations
    separate = refine_cams_to_label(images, cams, labels, THRESHOLDS, par, ignore_index=IGNORE)
    shared = refine_cams_to_label(images, cams, labels, THRESHOLDS, par, ignore_index=IGNORE, kernel=kernel)
    assert torch.equal(shared, separate) and shared.ne(IGNORE).any()
    separate = refine_probs_to_label(images, probs[:, 0], probs[:, 1], par, ignore_index=IGNORE)
    shared = refine_probs_to_label(images, probs[:, 0], probs[:, 1], par, ignore_index=IGNORE, kernel=kernel)
    assert torch.equal(shared, separate)


def test_afa_branch_labels_inside_the_valid_box_do_not_depend_on_the_padding():
    """As the official code, PAR of the AFA branch runs on each image's valid box only: whatever fills
    the padding of a padded crop (image and probabilities), the labels inside the box are those of
    the unpadded image, and the padding is ignored."""
    torch.manual_seed(0)
    h, w, c = 20, 26, K + 1
    image = torch.rand(1, 3, h, w)
    probs_high = torch.rand(1, c, h, w).softmax(dim=1)
    probs_low = torch.rand(1, c, h, w).softmax(dim=1)
    unpadded = refine_probs_to_label(image, probs_high, probs_low, PAR, ignore_index=IGNORE)
    assert unpadded.ne(IGNORE).any()
    y0, x0, size = 5, 3, (32, 32)
    box = torch.tensor([[y0, y0 + h, x0, x0 + w]])
    labels = []
    for fill in (0.0, 1.0, None):  # constant paddings and random garbage
        def pad(x: torch.Tensor) -> torch.Tensor:
            out = torch.rand(1, x.shape[1], *size) if fill is None else torch.full((1, x.shape[1], *size), fill)
            out[:, :, y0 : y0 + h, x0 : x0 + w] = x
            return out

        label = refine_probs_to_label(pad(image), pad(probs_high), pad(probs_low), PAR, valid_box=box,
                                      ignore_index=IGNORE)
        assert torch.equal(label[:, y0 : y0 + h, x0 : x0 + w], unpadded)
        assert label.eq(IGNORE).sum() >= size[0] * size[1] - h * w  # everything outside the box is ignored
        labels.append(label)
    assert torch.equal(labels[0], labels[1]) and torch.equal(labels[0], labels[2])


def test_afa_branch_par_resizes_the_probabilities_with_aligned_corners():
    """The official AFA branch's PAR resizes the probabilities with align_corners=True (everywhere else
    False): the labels are those of that computation, and differ from the align_corners=False one."""
    import torch.nn.functional as F

    from wsss.method.par import apply_par_kernel

    torch.manual_seed(1)
    image = torch.rand(1, 3, 20, 26)
    probs = torch.rand(1, 2 * (K + 1), 20, 26).softmax(dim=1)
    par = PAR
    label = refine_probs_to_label(image, probs[:, : K + 1], probs[:, K + 1 :], par, ignore_index=IGNORE)
    kernel = scaled_par_kernel(image, par)

    def by_hand(align_corners: bool) -> torch.Tensor:
        masks = F.interpolate(probs, size=kernel.size, mode="bilinear", align_corners=align_corners)
        refined = apply_par_kernel(masks, kernel, par.iterations)
        refined = F.interpolate(refined, size=(20, 26), mode="bilinear", align_corners=False)
        high, low = refined.view(2, K + 1, 20, 26).argmax(dim=1)
        return combine_high_low(high, low, IGNORE)[None]

    assert torch.equal(label, by_hand(True))
    assert not torch.equal(label, by_hand(False))
