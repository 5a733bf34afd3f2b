"""Specification of the assembled network (wsss/models/network.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsss.config import load_config
from wsss.errors import ConfigError
from wsss.models.network import AFANetwork, build_network, resolve_attn_norm

C = 6  # classes incl. background


def _network(*overrides: str) -> AFANetwork:
    torch.manual_seed(0)
    return build_network(load_config("demo", list(overrides)), C)


def test_forward_gives_every_output_with_its_shape():
    net = _network()
    out = net(torch.randn(2, 3, 96, 64))
    assert out.cls_logits.shape == (2, C - 1)
    assert out.cams.shape == (2, C - 1, 6, 4)
    assert out.seg_logits.shape == (2, C, 24, 16)
    assert out.seg_aux == []
    assert out.affinity.shape == (2, 24, 24)
    assert len(out.features) == 4


def test_forward_skips_what_is_not_asked():
    out = _network()(torch.randn(1, 3, 64, 64), with_seg=False, with_affinity=False)
    assert out.seg_logits is None and out.affinity is None and out.cls_logits.shape == (1, C - 1)


class _Refuse(nn.Module):
    def forward(self, *args):
        raise AssertionError("cam_forward must not run the seg head")


def test_cam_forward_runs_backbone_and_classifier_only_with_attention_only_when_asked():
    net = _network().eval()
    net.seg_head = _Refuse()
    asked = []
    backbone_forward = net.backbone.forward

    def spy(x, with_attn=False, factored=False):
        asked.append((with_attn, factored))
        return backbone_forward(x, with_attn, factored)

    net.backbone.forward = spy
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cams, affinity = net.cam_forward(images, with_affinity=False)
        cams_aff, affinity_aff = net.cam_forward(images, with_affinity=True)
        reference = net(images, with_seg=False, with_affinity=True)
    # the CAM passes ask for the attention as q / k factors; the training pass for the logits
    assert asked == [(False, True), (True, True), (True, False)]
    assert affinity is None and affinity_aff.shape == (2, 16, 16)
    torch.testing.assert_close(cams, reference.cams)
    torch.testing.assert_close(cams_aff, reference.cams, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(affinity_aff, reference.affinity)


def test_affinity_loss_trains_the_last_blocks_query_and_key():
    net = _network()
    net(torch.randn(1, 3, 64, 64), with_seg=False).affinity.mean().backward()
    attn = net.backbone.block4[-1].attn
    assert attn.q.weight.grad.abs().sum() > 0 and attn.kv.weight.grad.abs().sum() > 0
    assert net.classifier.classifier.weight.grad is None  # only the affinity path was used


@pytest.mark.parametrize("freeze", [True, False])
def test_param_groups_cover_every_trainable_parameter_once_with_their_lr(freeze):
    cfg = load_config("demo", [f"train.freeze_backbone_norm={freeze}", "train.lr=1e-4", "train.head_lr_mult=10"])
    net = build_network(cfg, C)
    groups = net.param_groups(cfg.train)
    assert [g["name"] for g in groups] == [
        "backbone", "backbone_norm", "cam_afa_heads", "seg_head", "seg_head_no_decay"]
    assert groups[-1]["params"] == []  # the SegFormer head decays everything
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters() if p.requires_grad}
    by_name = {g["name"]: g for g in groups}
    norm_mult = 0.0 if freeze else 1.0
    for name, mult in [("backbone", 1.0), ("backbone_norm", norm_mult), ("cam_afa_heads", 10.0), ("seg_head", 10.0)]:
        assert by_name[name]["lr_mult"] == mult
        assert by_name[name]["lr"] == pytest.approx(1e-4 * mult)
        assert by_name[name]["weight_decay"] == cfg.train.weight_decay
    norm_types = (nn.LayerNorm, nn.BatchNorm2d)  # BatchNorm: the demo's conv stem (model.conv_stem)
    norms = {id(p) for m in net.backbone.modules() if isinstance(m, norm_types) for p in m.parameters()}
    stem_norms = {id(p) for m in net.backbone.patch_embed1.proj.modules() if isinstance(m, nn.BatchNorm2d)
                  for p in m.parameters()}
    assert stem_norms and stem_norms < norms
    assert {id(p) for p in by_name["backbone_norm"]["params"]} == norms
    heads = {id(p) for p in [*net.classifier.parameters(), *net.affinity_head.parameters()]}
    assert {id(p) for p in by_name["cam_afa_heads"]["params"]} == heads


def test_frozen_norms_do_not_move_under_adamw():
    cfg = load_config("demo")
    net = build_network(cfg, C)
    optimizer = torch.optim.AdamW(net.param_groups(cfg.train), betas=tuple(cfg.train.betas))
    norm = net.backbone.norm4.weight.detach().clone()
    q = net.backbone.block4[-1].attn.q.weight.detach().clone()
    out = net(torch.randn(2, 3, 64, 64))
    (out.cls_logits.sum() + out.seg_logits.mean() + out.affinity.mean()).backward()
    optimizer.step()
    assert torch.equal(net.backbone.norm4.weight, norm)
    assert not torch.equal(net.backbone.block4[-1].attn.q.weight, q)


def test_mask_decoder_seg_head_returns_deep_supervision():
    net = _network("model.seg_head=mask_decoder", "model.mask_decoder.num_layers=2",
                   "model.mask_decoder.num_queries=8", "model.mask_decoder.hidden_dim=32",
                   "model.mask_decoder.ffn_dim=64")
    out = net(torch.randn(1, 3, 64, 64), with_affinity=False)
    assert out.seg_logits.shape == (1, C, 16, 16)
    assert len(out.seg_aux) == 2 and all(a.shape == out.seg_logits.shape for a in out.seg_aux)


def test_mask_decoder_has_its_own_lr_and_undecayed_embeddings_and_soft_scales():
    net = _network("model.seg_head=mask_decoder", "model.mask_decoder.cross_attention=soft",
                   "model.mask_decoder.num_layers=2", "model.mask_decoder.num_queries=8",
                   "model.mask_decoder.hidden_dim=32", "model.mask_decoder.ffn_dim=64",
                   "model.mask_decoder.num_heads=2", "model.mask_decoder.soft_mask_scales=[8.0,4.0]",
                   "model.mask_decoder.lr_mult=2.0")
    train = load_config("demo", ["train.lr=1e-4", "train.head_lr_mult=10"]).train
    groups = {g["name"]: g for g in net.param_groups(train)}
    assert groups["seg_head"]["lr"] == groups["seg_head_no_decay"]["lr"] == pytest.approx(2e-4)
    assert groups["cam_afa_heads"]["lr"] == pytest.approx(1e-3)
    head = net.seg_head
    expected = {id(head.query_feat.weight), id(head.query_pos.weight), id(head.level_embed.weight),
                *(id(layer.soft_mask_scales) for layer in head.layers)}
    assert {id(p) for p in groups["seg_head_no_decay"]["params"]} == expected
    assert groups["seg_head_no_decay"]["weight_decay"] == 0.0
    assert groups["seg_head"]["weight_decay"] > 0 and not expected & {id(p) for p in groups["seg_head"]["params"]}


def test_a_timm_vit_network_end_to_end():
    net = _network("model.backbone=timm:vit_tiny_patch16_224", "model.conv_stem=0")
    out = net(torch.randn(1, 3, 64, 96))
    assert out.cams.shape == (1, C - 1, 4, 6)
    assert out.affinity.shape == (1, 24, 24)
    assert out.seg_logits.shape == (1, C, 16, 24)  # the feature pyramid takes the seg head to stride 4
    assert net.attn_norm == net.affinity_head.attn_norm == "standardize"  # afa.attn_norm "auto", timm


def test_seg_pyramid_auto_upsamples_a_plain_vit_for_the_seg_head_only_and_leaves_mit_as_published():
    vit = _network("model.backbone=timm:vit_tiny_patch16_224", "model.conv_stem=0")
    features = vit.backbone(torch.randn(1, 3, 64, 96))[0]
    maps = vit.seg_pyramid(features)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (4, 6)]
    assert [m.shape[1] for m in maps] == [192 // 4, 192 // 2, 192, 192] == vit.seg_pyramid.out_channels
    assert maps[2] is features[2] and maps[3] is features[3]
    groups = {g["name"]: {id(p) for p in g["params"]} for g in vit.param_groups(load_config("demo").train)}
    assert {id(p) for p in vit.seg_pyramid.parameters()} <= groups["seg_head"]  # new layers: the head's lr
    plain = _network("model.backbone=timm:vit_tiny_patch16_224", "model.conv_stem=0", "model.seg_pyramid=none")
    assert plain.seg_pyramid is None and plain(torch.randn(1, 3, 64, 96)).seg_logits.shape == (1, C, 4, 6)
    mit = _network()
    assert mit.seg_pyramid is None and not any("pyramid" in k for k in mit.state_dict())


def test_seg_pyramid_vit_on_a_hierarchical_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match=r"seg_pyramid='vit' needs .* strides \[4, 8, 16, 16\]"):
        _network("model.seg_pyramid=vit")


def test_fewer_than_two_classes_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_network(load_config("demo"), 1)


def test_segformer_dropout_comes_from_the_config():
    assert _network("model.seg_dropout=0.25").seg_head.dropout.p == 0.25


@pytest.mark.parametrize(("backbone", "attn_norm", "resolved"), [
    ("mit_b1", "auto", "none"), ("mit_tiny", "auto", "none"), (" mit_b0 ", "auto", "none"),
    ("timm:vit_small_patch16_224", "auto", "standardize"), ("timm:pvt_v2_b1", "auto", "standardize"),
    ("mit_b1", "standardize", "standardize"), ("timm:vit_small_patch16_224", "none", "none"),
])
def test_attn_norm_auto_is_raw_for_mit_and_standardized_for_timm_and_explicit_values_win(
    backbone, attn_norm, resolved
):
    assert resolve_attn_norm(backbone, attn_norm) == resolved


def test_attn_norm_rejects_unknown_values_and_auto_on_an_unknown_backbone():
    with pytest.raises(ConfigError, match="afa.attn_norm"):
        resolve_attn_norm("mit_b1", "layernorm")
    with pytest.raises(ConfigError, match="afa.attn_norm"):
        resolve_attn_norm("resnet50", "auto")


def test_the_network_records_the_resolved_attn_norm_and_its_head_uses_it():
    assert load_config("demo").afa.attn_norm == "auto"
    net = _network()
    assert net.attn_norm == net.affinity_head.attn_norm == "none"  # mit_tiny: the published head
    assert _network("afa.attn_norm=standardize").affinity_head.attn_norm == "standardize"
