"""ToCo's token contrast losses and uncertain-region mask (wsss.method.toco).

Their equality with the official code is checked by bench/toco_vs_official.py (it needs a checkout of
rulixiang/ToCo); here each is checked against its formula written out per image and per pair.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.method.toco import (
    class_token_contrast_loss,
    local_crops,
    patch_token_contrast_loss,
    sample_crop_corners,
    token_pair_labels,
    uncertain_region_mask,
)


def test_token_pair_labels_pair_every_token_and_ignore_the_diagonal_and_ignored_tokens():
    grid = torch.tensor([[[0, 1, 1], [255, 0, 2]]])
    labels = token_pair_labels(grid)
    flat = grid.reshape(-1).tolist()
    assert labels.shape == (1, 6, 6)
    for i in range(6):
        for j in range(6):
            if i == j or 255 in (flat[i], flat[j]):
                expected = 255
            else:
                expected = int(flat[i] == flat[j])
            assert labels[0, i, j].item() == expected, (i, j)


def test_patch_token_contrast_loss_follows_its_formula():
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 3, 4)
    grid = torch.randint(0, 3, (2, 3, 4))
    grid[0, 0, 0] = 255
    labels = token_pair_labels(grid)
    x = tokens.reshape(2, 5, 12)
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for n in range(2):
        for i in range(12):
            for j in range(12):
                cos = abs(F.cosine_similarity(x[n, :, i], x[n, :, j], dim=0).item())
                if labels[n, i, j] == 1:
                    pos_sum, n_pos = pos_sum + cos, n_pos + 1
                elif labels[n, i, j] == 0:
                    neg_sum, n_neg = neg_sum + cos, n_neg + 1
    expected = 0.5 * (1 - pos_sum / (n_pos + 1)) + 0.5 * neg_sum / (n_neg + 1)
    assert math.isclose(patch_token_contrast_loss(tokens, labels).item(), expected, rel_tol=1e-5)


def test_patch_token_contrast_loss_is_lowest_for_aligned_same_class_and_orthogonal_other_class_tokens():
    grid = torch.tensor([[[1, 1], [2, 2]]])
    labels = token_pair_labels(grid)
    good = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).reshape(1, 2, 2, 2)
    bad = torch.ones(1, 2, 2, 2)
    # 4 positive pairs (off the diagonal), 8 negative: good = 0.5 * (1 - 4 / 5), bad = 0.5 / 5 + 0.5 * 8 / 9
    assert math.isclose(patch_token_contrast_loss(good, labels).item(), 0.1, rel_tol=1e-6)
    assert math.isclose(patch_token_contrast_loss(bad, labels).item(), 0.1 + 4 / 9, rel_tol=1e-6)


def test_uncertain_region_mask_thresholds_the_max_cam_of_the_image_classes():
    cams = torch.tensor([[[[0.9, 0.2, 0.5]], [[0.1, 0.95, 0.1]]]])  # [1, 2, 1, 3]
    only_first = torch.tensor([[1.0, 0.0]])
    both = torch.tensor([[1.0, 1.0]])
    assert uncertain_region_mask(cams, only_first, high=0.7, low=0.25).tolist() == [[[2, 0, 1]]]
    assert uncertain_region_mask(cams, both, high=0.7, low=0.25).tolist() == [[[2, 2, 1]]]
    assert uncertain_region_mask(cams, only_first, high=0.7, low=0.25).dtype == torch.int16


def _ctc_per_image(student, teacher, flags, temperature):
    b, n_crops = flags.shape
    s = student.reshape(n_crops, b, -1)
    t = teacher.reshape(2, b, -1)
    total = 0.0
    for n in range(b):
        positives = [j for j in range(n_crops) if flags[n, j] == 1]
        loss = 0.0
        for v in range(2):
            a = [(t[v, n] @ s[j, n]).item() / temperature for j in range(n_crops)]
            negatives = sum(math.exp(a[j]) for j in range(n_crops) if flags[n, j] == 0) + 1e-4
            loss += sum(-math.log(math.exp(a[j]) / (math.exp(a[j]) + negatives)) for j in positives)
            loss += math.log(1 + negatives)
        total += loss / 2 / (len(positives) + 1e-4)
    return total / b


def test_class_token_contrast_loss_follows_its_formula():
    torch.manual_seed(1)
    student, teacher = torch.randn(6 * 3, 8), torch.randn(2 * 3, 8)
    flags = torch.ones(3, 6)
    flags[0, [2, 4]] = 0
    flags[2, 2:] = 0
    expected = _ctc_per_image(student.double(), teacher.double(), flags, 0.5)
    assert math.isclose(class_token_contrast_loss(student, teacher, flags, 0.5).item(), expected, rel_tol=1e-5)


def test_class_token_contrast_loss_stays_finite_where_exp_of_the_logits_overflows():
    student = torch.full((4 * 2, 16), 10.0)
    teacher = torch.full((2 * 2, 16), 10.0)
    flags = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    student.requires_grad_(True)
    loss = class_token_contrast_loss(student, teacher, flags, temperature=0.5)  # logits 3200: exp overflows
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # every crop is the same vector: each positive's term is log 2, the extra term log(1 + exp(3200)) = 3200
    expected = (2 * 3 * math.log(2) + 2 * 3200) / 2 / (3 + 1e-4)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_class_token_contrast_loss_pulls_positive_crops_towards_the_teacher():
    torch.manual_seed(2)
    teacher = F.normalize(torch.randn(2, 8), dim=-1)
    far = F.normalize(torch.randn(4, 8), dim=-1)
    near = teacher[:1].expand(4, 8)
    flags = torch.ones(1, 4)
    assert class_token_contrast_loss(near, teacher, flags, 0.5) < class_token_contrast_loss(far, teacher, flags, 0.5)


def test_sample_crop_corners_draws_distinct_crops_centred_off_the_certain_foreground():
    region = torch.full((2, 20, 20), 2, dtype=torch.int16)
    region[0, 4:10, 6:16] = 1
    region[0, 12:14, 3:8] = 0
    generator = torch.Generator().manual_seed(0)
    corners = sample_crop_corners(region, num_crops=5, size=6, generator=generator)
    assert corners.shape == (2, 5, 2)
    for y, x in corners[0].tolist():
        assert 0 <= y <= 14 and 0 <= x <= 14 and region[0, y + 3, x + 3] <= 1
    assert len({tuple(c) for c in corners[0].tolist()}) == 5
    # image 1 has no uncertain or background centre: any corner, still distinct
    assert len({tuple(c) for c in corners[1].tolist()}) == 5
    assert ((0 <= corners[1]) & (corners[1] <= 14)).all()
    again = sample_crop_corners(region, num_crops=5, size=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(corners, again)


def test_sample_crop_corners_rejects_crops_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        sample_crop_corners(torch.zeros(1, 10, 10, dtype=torch.int16), num_crops=2, size=12)


def test_local_crops_cut_the_images_at_the_corners_and_flag_mostly_certain_background_negative():
    torch.manual_seed(3)
    images = torch.randn(2, 3, 16, 16)
    region = torch.zeros(2, 16, 16, dtype=torch.int16)
    region[:, :, 8:] = 1
    corners = torch.tensor([[[0, 0], [2, 8], [5, 3]], [[8, 7], [1, 1], [4, 6]]])
    crops, flags = local_crops(images, region, corners, size=5)
    assert crops.shape == (3, 2, 3, 5, 5)
    for n in range(2):
        for k, (y, x) in enumerate(corners[n].tolist()):
            assert torch.equal(crops[k, n], images[n, :, y : y + 5, x : x + 5])
            share = region[n, y : y + 5, x : x + 5].float().mean().item()
            assert flags[n, k + 2].item() == float(share > 0.2), (n, k, share)
    assert flags[:, :2].eq(1).all()
    assert flags[0].tolist() == [1, 1, 0, 1, 0] and flags[1].tolist() == [1, 1, 1, 0, 1]


def test_token_label_thresholds_like_the_official_cam_to_label_with_its_background_score():
    from wsss.method.toco import token_label

    cams = torch.tensor([0.1, 0.3, 0.45, 0.6, 0.8])[None, None, None, :].repeat(1, 2, 1, 1)  # [1, 2, 1, 5]
    cams[0, 1] = 0.0
    labels = torch.tensor([[1.0, 1.0]])
    # high 0.7 above the background score 0.5: <= 0.25 background, up to 0.7 ignored, above: class 1
    assert token_label(cams, labels, 0.7, 0.25, None, (16, 80), bg=0.5)[0, 0].tolist() == [0, 255, 255, 255, 1]
    # high 0.35 below it: the background score wins between them (the official order of assignments)
    assert token_label(cams, labels, 0.35, 0.2, None, (16, 80), bg=0.5)[0, 0].tolist() == [0, 255, 0, 1, 1]
    assert token_label(cams, torch.tensor([[0.0, 1.0]]), 0.35, 0.2, None, (16, 80), bg=0.5)[0, 0].tolist() == [0] * 5


def test_token_label_box_modes_official_slices_the_grid_in_pixels_and_grid_scales_the_box():
    from wsss.method.toco import token_label

    cams = torch.ones(1, 1, 4, 4)
    labels = torch.ones(1, 1)
    box = torch.tensor([[0, 64, 0, 32]])  # a 64 x 64 crop whose right half is padding; 16-pixel tokens
    official = token_label(cams, labels, 0.7, 0.25, box, (64, 64), box_mode="official")
    grid = token_label(cams, labels, 0.7, 0.25, box, (64, 64), box_mode="grid")
    assert (official == 1).all()  # pixel columns 0..31 cover all 4 token columns
    assert (grid[0, :, :2] == 1).all() and (grid[0, :, 2:] == 255).all()
    with pytest.raises(ValueError, match="box_mode"):
        token_label(cams, labels, 0.7, 0.25, box, (64, 64), box_mode="pixels")
