"""predict_seg / predict_cam_probs with a stub network of the AFANetwork interface."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.config import AfaConfig, CamConfig, Config
from wsss.engine.inference import predict_cam_probs, predict_seg
from wsss.method.cam import cam_scores, multiscale_cam


def cam_to_label(cams, labels, bg_threshold):
    return cam_scores(cams, labels, bg_threshold).argmax(dim=1)

C = 3  # background + 2 classes
K = C - 1


class StubNet(nn.Module):
    """The AFANetwork interface on fixed 1x1 convolutions.

    seg logits: 1x1 conv of the 4x average-pooled image (stride 4, like the seg head);
    CAMs: the red / green channel of the 8x pooled image; affinity: exp(-|f_i - f_j|^2) of the pooled pixels.
    Records the batch size of every call.
    """

    def __init__(self, asymmetric: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.seg = nn.Conv2d(3, C, 1)
        self.cls = nn.Conv2d(3, K, 1)
        with torch.no_grad():  # class k's CAM = colour channel k - 1: red -> class 1, green -> class 2
            self.cls.weight.copy_(torch.eye(K, 3)[:, :, None, None])
            self.cls.bias.zero_()
        self.asymmetric = asymmetric  # a left-to-right ramp on class 0: not flip-equivariant
        self.calls: list[tuple[str, int]] = []

    def _ramp(self, x: torch.Tensor) -> torch.Tensor:
        if not self.asymmetric:
            return x
        ramp = torch.linspace(-1, 1, x.shape[-1], device=x.device)
        return torch.cat([x[:, :1] + ramp, x[:, 1:]], dim=1)  # on one class only: softmax sees it

    def forward(self, images, with_seg=True, with_affinity=False):
        self.calls.append(("forward", images.shape[0]))
        seg = self._ramp(self.seg(F.avg_pool2d(images, 4, ceil_mode=True))) if with_seg else None
        cams, affinity = self.cam_forward(images, with_affinity)
        return SimpleNamespace(seg_logits=seg, cams=cams, affinity=affinity, cls_logits=cams.amax((-2, -1)))

    def cam_forward(self, images, with_affinity=False):
        self.calls.append(("cam", images.shape[0]))
        feats = F.avg_pool2d(images, 8, ceil_mode=True)
        cams = self.cls(feats)
        affinity = None
        if with_affinity:
            f = feats.flatten(2).transpose(1, 2)  # [B, N, 3]
            affinity = torch.exp(-torch.cdist(f, f) ** 2)
        return cams, affinity


def two_region_image(h: int = 32, w: int = 48) -> torch.Tensor:
    image = torch.zeros(1, 3, h, w)
    image[:, 0, :, : w // 2] = 2.0  # left: red-ish -> class 1 CAM
    image[:, 1, :, w // 2:] = 2.0  # right: green-ish
    return image


def test_predict_seg_returns_probabilities_at_the_requested_size():
    probs = predict_seg(StubNet(), two_region_image(), [1.0], flip=False, out_size=(50, 70))
    assert probs.shape == (C, 50, 70)
    torch.testing.assert_close(probs.sum(0), torch.ones(50, 70))


def test_predict_seg_flip_average_is_flip_consistent():
    net = StubNet(asymmetric=True)
    image = torch.randn(1, 3, 32, 48)
    probs = predict_seg(net, image, [1.0, 0.5], flip=True, out_size=(32, 48))
    probs_of_flipped = predict_seg(net, image.flip(-1), [1.0, 0.5], flip=True, out_size=(32, 48))
    torch.testing.assert_close(probs, probs_of_flipped.flip(-1), atol=1e-5, rtol=1e-5)
    # without the flip average the asymmetric network is not flip-consistent
    plain = predict_seg(net, image, [1.0], flip=False)
    plain_of_flipped = predict_seg(net, image.flip(-1), [1.0], flip=False)
    assert not torch.allclose(plain, plain_of_flipped.flip(-1), atol=1e-3)


def test_predict_seg_flip_average_changes_nothing_for_a_flip_equivariant_network():
    image = torch.randn(1, 3, 32, 48)
    with_flip = predict_seg(StubNet(), image, [1.0], flip=True)
    without = predict_seg(StubNet(), image, [1.0], flip=False)
    torch.testing.assert_close(with_flip, without, atol=1e-5, rtol=1e-5)


def test_predict_seg_runs_image_and_flip_in_one_forward_per_scale():
    net = StubNet()
    predict_seg(net, torch.randn(1, 3, 32, 48), [1.0, 0.5, 0.75], flip=True)
    forwards = [n for kind, n in net.calls if kind == "forward"]
    assert forwards == [2, 2, 2]


def test_predict_seg_takes_the_max_over_scales_on_the_first_scale_grid():
    net = StubNet(asymmetric=True)
    image = torch.randn(1, 3, 32, 48)
    probs = predict_seg(net, image, [1.0, 0.5], flip=False, out_size=(32, 48))
    with torch.no_grad():
        full = net(image).seg_logits
        half = net(F.interpolate(image, size=(16, 24), mode="bilinear", align_corners=False)).seg_logits
        best = torch.maximum(full, F.interpolate(half, size=full.shape[-2:], mode="bilinear", align_corners=False))
        expected = F.interpolate(best, size=(32, 48), mode="bilinear", align_corners=False).softmax(1)[0]
    torch.testing.assert_close(probs, expected)


def test_predict_seg_rejects_a_batch():
    with pytest.raises(ValueError, match="one image"):
        predict_seg(StubNet(), torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("msc", [False, True])
def test_cam_probs_argmax_is_the_thresholded_cam_label(msc):
    net, image = StubNet(), two_region_image()
    label = torch.tensor([1.0, 1.0])
    cam_cfg = CamConfig()
    probs = predict_cam_probs(net, image, label, Config(cam=cam_cfg), "cam", msc=msc)
    scales = cam_cfg.scales if msc else [1.0]
    cams, _, _ = multiscale_cam(net.cam_forward, image, label[None], scales, flip=msc)
    expected = cam_to_label(cams, label[None], cam_cfg.bg_threshold_eval)[0]
    assert torch.equal(probs.argmax(0), expected)
    torch.testing.assert_close(probs.sum(0), torch.ones(image.shape[-2:]))


@pytest.mark.parametrize("method", ["cam", "par", "afa"])
def test_cam_probs_give_absent_classes_zero_probability(method):
    net, image = StubNet(), two_region_image()
    label = torch.tensor([1.0, 0.0])  # class 2 absent
    probs = predict_cam_probs(net, image, label, Config(), method, msc=True, out_size=(40, 60))
    assert probs.shape == (C, 40, 60)
    assert probs[2].abs().max() == 0
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 60))
    assert torch.isfinite(probs).all()


def test_afa_probs_use_the_affinity_of_the_affinity_scale_pass():
    net = StubNet()
    cam_cfg, afa_cfg = CamConfig(scales=[1.0, 0.5, 1.5]), AfaConfig(affinity_scale=1.5)
    predict_cam_probs(net, two_region_image(), torch.tensor([1.0, 1.0]), Config(cam=cam_cfg, afa=afa_cfg), "afa")
    # CAM path only: image + flip batched at scales 1 and 0.5; at the affinity scale the flip runs apart
    assert net.calls == [("cam", 2), ("cam", 2), ("cam", 1), ("cam", 1)]


def test_par_and_afa_follow_the_two_regions():
    net, image = StubNet(), two_region_image(32, 48)
    label = torch.tensor([1.0, 1.0])
    cams, _, _ = multiscale_cam(net.cam_forward, image, label[None], [1.0], flip=False)
    cam_label = cam_to_label(cams, label[None], CamConfig().bg_threshold_eval)[0]
    assert (cam_label[:, :20] == 1).all() and (cam_label[:, -20:] == 2).all()
    for method in ("par", "afa"):
        pred = predict_cam_probs(net, image, label, Config(), method).argmax(0)
        assert (pred == cam_label).float().mean() > 0.8, method


def test_unknown_cam_method_is_a_clear_error():
    with pytest.raises(Exception, match="must be one of cam, par, afa"):
        predict_cam_probs(StubNet(), two_region_image(), torch.ones(K), Config(), "irn")
