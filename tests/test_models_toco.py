"""The ToCo network (wsss.models.toco): its ViT pass, the one backbone pass for both global views, the teacher,
the optimizer groups, and the configuration errors. Its equality with the official network is checked by
bench/toco_vs_official.py (it needs a checkout of rulixiang/ToCo)."""

from __future__ import annotations

import pytest
import torch

from wsss.config import load_config
from wsss.errors import ConfigError
from wsss.models.network import build_network


def toco_config(*extras: str):
    """The ToCo demo recipe (ViT-Tiny/16, random init) with a 2-block ViT for speed: aux layer = block 0."""
    return load_config("demo-toco", ["model.pretrained=none", "data.crop_size=64", "toco.local_crop_size=32",
                                     "toco.aux_layer=0", *extras])


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    network = build_network(toco_config(), num_classes=3)
    network.backbone.model.blocks = network.backbone.model.blocks[:2]  # keep the test fast: 2 blocks
    network.backbone.aux_index = 0
    return network.eval()


def test_vit_pass_gives_the_class_token_the_normed_tokens_and_the_aux_blocks_tokens(net):
    vit = net.backbone
    m = vit.model
    x = torch.randn(2, 3, 224, 224)  # the native grid: no resampling of the position embedding
    cls, tokens, aux = vit(x)
    seen = {}
    handle = m.blocks[0].register_forward_hook(lambda _m, _i, out: seen.setdefault("aux", out))
    reference = m.forward_features(x)  # timm's own pass
    handle.remove()
    assert cls.shape == (2, 192) and tokens.shape == (2, 192, 14, 14) and aux.shape == (2, 192, 14, 14)
    torch.testing.assert_close(cls, reference[:, 0])
    torch.testing.assert_close(tokens, reference[:, 1:].transpose(1, 2).reshape(2, 192, 14, 14))
    torch.testing.assert_close(aux, seen["aux"][:, 1:].transpose(1, 2).reshape(2, 192, 14, 14))


def test_vit_pass_resamples_the_position_embedding_to_the_input_grid_and_never_trains_it(net):
    vit = net.backbone
    pos = vit._position_embedding(4, 6)
    assert pos.shape == (1, 1 + 24, 192)
    torch.testing.assert_close(pos[:, :1], vit.model.pos_embed[:, :1])  # the class token's entry is kept
    torch.testing.assert_close(vit._position_embedding(14, 14), vit.model.pos_embed)  # same grid: unchanged
    assert vit(torch.randn(1, 3, 64, 96))[1].shape == (1, 192, 4, 6)
    assert not vit.model.pos_embed.requires_grad


def test_one_backbone_pass_for_both_global_views_equals_separate_passes(net):
    torch.manual_seed(1)
    view1, view2, local = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(6, 3, 32, 32)
    out = net(view1, global_view2=view2, local_views=local)
    assert out.proj_student.shape == (10, 256) and out.proj_teacher.shape == (4, 256)
    cls = [net.backbone(v)[0] for v in (view1, view2, local)]
    torch.testing.assert_close(out.proj_student, net.project(torch.cat(cls)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.proj_teacher, net.teach(torch.cat(cls[:2])), rtol=1e-5, atol=1e-5)
    alone = net(view1)
    torch.testing.assert_close(out.cls_logits, alone.cls_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_cls_logits, alone.aux_cls_logits, rtol=1e-5, atol=1e-5)
    assert out.seg_logits.shape == (2, 3, 4, 4) and out.aux_cams.shape == (2, 2, 4, 4)
    assert alone.proj_student is None and alone.proj_teacher is None


def test_the_teacher_gets_no_gradient_and_follows_the_student_by_ema(net):
    torch.manual_seed(2)
    net.zero_grad()
    out = net(torch.randn(2, 3, 64, 64), global_view2=torch.randn(2, 3, 64, 64),
              local_views=torch.randn(4, 3, 32, 32))
    assert not out.proj_teacher.requires_grad
    (out.proj_student.sum() + out.cls_logits.sum()).backward()
    assert all(p.grad is None for p in net.proj_head_t.parameters())
    assert all(p.grad is not None for p in net.proj_head.parameters())
    student = net.proj_head.mlp[0].weight
    teacher = net.proj_head_t.mlp[0].weight
    with torch.no_grad():
        before = teacher.clone()
        student.add_(1.0)
    net.update_teacher(0.9)
    torch.testing.assert_close(teacher, 0.9 * before + 0.1 * student)
    with torch.no_grad():
        student.sub_(1.0)
        teacher.copy_(before)


def test_param_groups_cover_every_trainable_parameter_once_and_leave_out_the_teacher():
    cfg = toco_config()
    network = build_network(cfg, num_classes=3)
    groups = {g["name"]: g for g in network.param_groups(cfg.train)}
    seen = [id(p) for g in groups.values() for p in g["params"]]
    trainable = [id(p) for p in network.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    teacher = {id(p) for p in network.proj_head_t.parameters()}
    assert teacher.isdisjoint(seen) and id(network.backbone.model.pos_embed) not in seen
    heads = {id(p) for m in (network.classifier, network.aux_classifier, network.proj_head) for p in m.parameters()}
    assert {id(p) for p in groups["cam_afa_heads"]["params"]} == heads
    assert {id(p) for p in groups["seg_head"]["params"]} == {id(p) for p in network.seg_head.parameters()}
    assert groups["cam_afa_heads"]["lr"] == pytest.approx(cfg.train.lr * cfg.train.head_lr_mult)
    assert groups["backbone_norm"]["lr"] == pytest.approx(cfg.train.lr)  # ToCo trains its LayerNorms


@pytest.mark.parametrize("overrides, message", [
    (["model.backbone=mit_tiny"], "needs a plain ViT"),
    (["model.seg_head=segformer"], "largefov"),
    (["model.conv_stem=32"], "conv_stem"),
    (["toco.aux_layer=12"], "aux_layer=12"),
])
def test_toco_configuration_errors_name_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_network(toco_config(*overrides), num_classes=3)


def test_largefov_is_tocos_head_only():
    with pytest.raises(ConfigError, match="largefov"):
        build_network(load_config("demo", ["model.seg_head=largefov"]), num_classes=3)
