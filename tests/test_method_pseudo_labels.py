"""The one pseudo-label pipeline (wsss.method.pseudo_labels) equals the steps put together by hand, bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss.config import Config
from wsss.engine.runtime import pseudo_label_params
from wsss.method.affinity import propagate_cams
from wsss.method.cam import (
    cam_scores, cams_with_background, multiscale_cam, refine_cams_to_label, refine_probs, refine_probs_to_label,
    scaled_par_kernel,
)
from wsss.method.pseudo_labels import cam_maps, cam_probabilities, present_classes, pseudo_labels, to_class_ids

K = 4
PARAMS = pseudo_label_params(Config())


def conv_cam_fn(seed: int = 0):
    """A random conv as the CAM path (stride 4) with a random symmetric affinity over its tokens."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(K, 3, 4, 4, generator=g)

    def cam_fn(images, with_affinity):
        cams = F.conv2d(images, weight, stride=4)
        if not with_affinity:
            return cams, None
        tokens = cams.flatten(2).transpose(1, 2)  # [B, N, K]
        return cams, torch.sigmoid(tokens @ tokens.transpose(1, 2) / K)

    return cam_fn


def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 48, 40, generator=g)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    box = torch.tensor([[0, 48, 0, 32], [0, 48, 0, 40]])
    images01 = (images * 0.2 + 0.5).clamp(0, 1)
    return images, images01, labels, box


def test_training_labels_equal_the_steps_by_hand():
    images, images01, labels, box = inputs()
    maps = cam_maps(conv_cam_fn(), images, labels, PARAMS, affinity_scale=1.5)
    out = pseudo_labels(images01, maps, PARAMS, box)

    cams, affinity, grid = multiscale_cam(conv_cam_fn(), images, labels, PARAMS.scales, PARAMS.flip, 1.5)
    assert grid == (18, 15) and torch.equal(cams, maps.cams)  # the 1.5 pass: int(48 * 1.5) / 4, int(40 * 1.5) / 4
    kernel = scaled_par_kernel(images01, PARAMS.par)
    thresholds = (PARAMS.bg_high, PARAMS.bg_low)
    label = refine_cams_to_label(images01, cams, labels, thresholds, PARAMS.par, box, 255, kernel)
    probs = propagate_cams(cams, labels, affinity, thresholds, PARAMS.radius, PARAMS.rw_power, PARAMS.rw_eps, grid)
    afa = refine_probs_to_label(images01, probs[:, 0], probs[:, 1], PARAMS.par, box, 255, kernel)
    assert torch.equal(out.label, label) and torch.equal(out.afa_label, afa)
    assert (out.label[0, :, 32:] == 255).all() and (out.afa_label[0, :, 32:] == 255).all()  # outside the box


def test_present_classes_give_the_labels_of_all_classes_in_full_class_ids():
    images, images01, labels, box = inputs()
    full = pseudo_labels(images01, cam_maps(conv_cam_fn(), images, labels, PARAMS, 1.5), PARAMS, box)
    index = present_classes(labels)
    assert index.tolist() == [[0, 2], [3, 0]]
    maps = cam_maps(conv_cam_fn(), images, labels, PARAMS, 1.5, class_index=index)
    assert maps.cams.shape[1] == 2 and maps.labels.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    compact = pseudo_labels(images01, maps, PARAMS, box)
    assert torch.equal(compact.label, full.label) and torch.equal(compact.afa_label, full.afa_label)


def test_to_class_ids_maps_compact_channels_back_and_keeps_ignore():
    label = torch.tensor([[[0, 1, 2, 255]]])
    assert to_class_ids(label, torch.tensor([[2, 5]]), 255).tolist() == [[[0, 3, 6, 255]]]
    assert to_class_ids(label, None, 255) is label


def test_evaluation_probabilities_equal_the_steps_by_hand():
    images, images01, labels, _ = inputs()
    image, image01, label = images[:1], images01[:1], labels[:1]
    maps = cam_maps(conv_cam_fn(), image, label, PARAMS, affinity_scale=1.0)
    out = cam_probabilities(image01, maps, PARAMS, ("cam", "par", "afa", "rw"), (30, 25))
    assert all(p.shape == (1, K + 1, 30, 25) for p in out.values())

    def normalize(p):
        p = F.interpolate(p, size=(30, 25), mode="bilinear", align_corners=False)
        return p / p.sum(dim=1, keepdim=True).clamp_min(1e-8)

    kernel = scaled_par_kernel(image01, PARAMS.par)
    walk = lambda bg: propagate_cams(maps.cams, label, maps.affinity, bg, PARAMS.radius, PARAMS.rw_power,  # noqa: E731
                                     PARAMS.rw_eps, maps.grid)
    par_in = cams_with_background(F.interpolate(maps.cams, size=kernel.size, mode="bilinear"), label,
                                  [PARAMS.bg_eval])[:, 0]
    assert torch.equal(out["cam"], normalize(cam_scores(maps.cams, label, PARAMS.bg_eval)))
    assert torch.equal(out["par"], normalize(refine_probs(par_in, kernel, PARAMS.par.iterations)))
    assert torch.equal(out["afa"], normalize(refine_probs(walk(PARAMS.bg_eval), kernel, PARAMS.par.iterations)))
    assert torch.equal(out["rw"], normalize(walk(PARAMS.rw_bg_eval)))
    assert (out["par"][:, 2] == 0).all() and (out["par"][:, 4] == 0).all()  # absent classes


def test_post_processing_stays_float32_under_autocast():
    images, images01, labels, box = inputs()
    maps = cam_maps(conv_cam_fn(), images, labels, PARAMS, 1.5)
    reference = pseudo_labels(images01, maps, PARAMS, box)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pseudo_labels(images01, maps, PARAMS, box)
        probs = cam_probabilities(images01[:1], maps._replace(cams=maps.cams[:1], labels=maps.labels[:1],
                                                               affinity=maps.affinity[:1]), PARAMS, ("afa",), (8, 8))
    assert torch.equal(under.label, reference.label) and torch.equal(under.afa_label, reference.afa_label)
    assert probs["afa"].dtype == torch.float32
