"""Specification of the backbones (wsss/models/mit.py, backbones.py, weights.py)."""

from __future__ import annotations

import re

import pytest
import torch

from wsss.config import ModelConfig
from wsss.errors import ConfigError, WsssError
from wsss.models.attn_factors import AttnFactors
from wsss.models.backbones import create_backbone
from wsss.models.mit import MixVisionTransformer, conv_stage, create_mit

VIT = "timm:vit_tiny_patch16_224"
PVT = "timm:pvt_v2_b0"


def _backbone(name: str, attn_blocks: int = 2, **cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg.setdefault("pretrained", "none")
    return create_backbone(ModelConfig(backbone=name, drop_path_rate=0.0, **cfg), attn_blocks).eval()


def _capture_attention_inputs(attn_modules) -> list[torch.Tensor]:
    """Forward pre-hooks storing the (normalized) tokens each attention module receives."""
    seen: list[torch.Tensor] = []
    for module in attn_modules:
        module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    return seen


# --------------------------------------------------------------------------- #
# attention logits


def test_mit_attention_logits_are_raw_qk_of_the_last_stage4_blocks():
    net = _backbone("mit_tiny")
    blocks = list(net.block4)
    inputs = _capture_attention_inputs([b.attn for b in blocks])
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        features, logits = net(x, with_attn=True)
    h4, w4 = features[3].shape[-2:]
    n, heads = h4 * w4, blocks[0].attn.num_heads
    assert logits.shape == (2, 2 * heads, n, n)
    for i, (block, tokens) in enumerate(zip(blocks, inputs)):
        dim = tokens.shape[-1]
        q = block.attn.q(tokens).reshape(2, n, heads, -1).transpose(1, 2)
        k = block.attn.kv(tokens)[..., :dim].reshape(2, n, heads, -1).transpose(1, 2)
        torch.testing.assert_close(logits[:, i * heads:(i + 1) * heads], q @ k.transpose(-2, -1))


def test_vit_attention_logits_are_raw_qk_over_patch_tokens_without_class_token():
    net = _backbone(VIT)
    vit = net.model
    blocks = list(vit.blocks[-2:])
    inputs = _capture_attention_inputs([b.attn for b in blocks])
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        _, logits = net(x, with_attn=True)
    heads, n = blocks[0].attn.num_heads, 4 * 6
    assert vit.num_prefix_tokens == 1
    assert logits.shape == (1, 2 * heads, n, n)
    for i, (block, tokens) in enumerate(zip(blocks, inputs)):
        assert tokens.shape[1] == n + 1  # the class token goes in ...
        q, k, _ = block.attn.qkv(tokens).reshape(1, n + 1, 3, heads, -1).permute(2, 0, 3, 1, 4)
        expected = (q @ k.transpose(-2, -1))[:, :, 1:, 1:]  # ... and is cut from the logits
        torch.testing.assert_close(logits[:, i * heads:(i + 1) * heads], expected)


@pytest.mark.parametrize("name", ["mit_tiny", VIT, PVT])
def test_with_attn_gives_the_same_features_as_fused_attention(name):
    net = _backbone(name)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        fused, none = net(x, with_attn=False)
        explicit, logits = net(x, with_attn=True)
    assert none is None and logits is not None
    for a, b in zip(fused, explicit):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["mit_tiny", VIT, PVT])
def test_factored_attention_multiplies_out_to_the_logits_with_the_same_features(name):
    net = _backbone(name)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        features, logits = net(x, with_attn=True)
        factored_features, factors = net(x, with_attn=True, factored=True)
    assert isinstance(factors, AttnFactors)
    assert factors.q.shape == factors.k.shape and factors.q.shape[:3] == logits.shape[:3]
    torch.testing.assert_close(factors.logits(), logits, atol=1e-5, rtol=1e-4)
    for a, b in zip(features, factored_features):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_attention_logits_carry_gradient_to_query_and_key():
    net = _backbone("mit_tiny").train()
    _, logits = net(torch.randn(1, 3, 64, 64), with_attn=True)
    logits.sum().backward()
    assert net.block4[-1].attn.q.weight.grad.abs().sum() > 0
    assert net.block4[-1].attn.kv.weight.grad.abs().sum() > 0


def test_more_attn_blocks_than_the_last_stage_has_is_a_config_error():
    with pytest.raises(ConfigError, match="afa.attn_blocks=3"):
        _backbone("mit_b0", attn_blocks=3)


# --------------------------------------------------------------------------- #
# geometry


def test_default_strides_put_stage4_at_one_sixteenth():
    net = _backbone("mit_b0")
    with torch.no_grad():
        features, logits = net(torch.randn(1, 3, 128, 96), with_attn=True)
    assert [f.shape[-2:] for f in features] == [(32, 24), (16, 12), (8, 6), (8, 6)]
    assert [f.shape[1] for f in features] == [32, 64, 160, 256] == net.out_channels
    assert net.feature_strides == [4, 8, 16, 16]
    assert logits.shape == (1, 16, 48, 48) and net.attn_maps == 16


def test_segformer_strides_put_stage4_at_one_thirty_second():
    net = _backbone("mit_tiny", strides=[4, 2, 2, 2])
    with torch.no_grad():
        features, _ = net(torch.randn(1, 3, 128, 128))
    assert features[3].shape[-2:] == (4, 4)


def _assert_same_geometry(plain: torch.nn.Module, other: torch.nn.Module) -> None:
    """``other`` gives the feature maps and attention logits of ``plain``'s shapes, at the demo's strides."""
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        (f_plain, l_plain), (f_other, l_other) = plain(x, with_attn=True), other(x, with_attn=True)
    assert [f.shape for f in f_other] == [f.shape for f in f_plain] and l_other.shape == l_plain.shape
    assert other.feature_strides == plain.feature_strides == [4, 8, 16, 16]


def test_conv_stem_replaces_only_the_first_patch_embedding_and_keeps_the_geometry():
    plain, stem = _backbone("mit_tiny"), _backbone("mit_tiny", conv_stem=16)
    _assert_same_geometry(plain, stem)
    new_keys = set(stem.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) - set(stem.state_dict()) == {"patch_embed1.proj.weight", "patch_embed1.proj.bias"}
    assert new_keys and all(k.startswith("patch_embed1.proj.") for k in new_keys)
    convs = [m for m in stem.patch_embed1.proj.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(3, 16, 2), (16, 16, 1), (16, 32, 2)]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in stem.patch_embed1.proj.modules())


@pytest.mark.parametrize("name, cfg, message", [
    ("mit_tiny", {"pretrained": "weights.pth"}, "model.pretrained='weights.pth' would not fit"),
    (VIT, {}, "is for a MiT backbone trained from scratch"),
    ("mit_tiny", {"strides": [2, 2, 2, 2]}, "model.strides[0] = 4"),
])
def test_conv_stem_is_for_mit_from_scratch_at_stride_4_only(name, cfg, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _backbone(name, conv_stem=16, **cfg)


def test_mit_b1_has_the_published_shape():
    net = create_mit("mit_b1")
    spec = net.spec
    assert (spec.embed_dims, spec.depths, spec.num_heads, spec.sr_ratios) == (
        (64, 128, 320, 512), (2, 2, 2, 2), (1, 2, 5, 8), (8, 4, 2, 1))
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(13.15e6, rel=0.01)


def test_timm_pvt_v2_at_a_non_224_size_gives_four_stages_and_nxn_attention():
    net = _backbone(PVT)
    with torch.no_grad():
        features, logits = net(torch.randn(2, 3, 96, 160), with_attn=True)
    assert [f.shape[-2:] for f in features] == [(24, 40), (12, 20), (6, 10), (6, 10)]
    assert [f.shape[1] for f in features] == net.out_channels == [32, 64, 160, 256]
    assert logits.shape == (2, 2 * 8, 60, 60)


@pytest.mark.parametrize("size, grid", [((96, 160), (6, 10)), ((100, 150), (7, 10))])
def test_timm_vit_at_a_non_224_size_gives_four_maps_at_the_patch_stride(size, grid):
    net = _backbone(VIT)
    with torch.no_grad():
        features, logits = net(torch.randn(1, 3, *size), with_attn=True)
    assert len(features) == 4 and all(f.shape == (1, 192, *grid) for f in features)
    n = grid[0] * grid[1]
    assert logits.shape == (1, net.attn_maps, n, n) and net.attn_maps == 2 * 3
    assert net.feature_indices == [2, 5, 8, 11]


def test_timm_distilled_deit_drops_both_prefix_tokens():
    net = _backbone("timm:deit_tiny_distilled_patch16_224", attn_blocks=1)
    with torch.no_grad():
        _, logits = net(torch.randn(1, 3, 64, 64), with_attn=True)
    assert logits.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("name, message", [
    ("mit_b9", "expected mit_b0.*timm:<name>"),
    ("resnet50", "expected mit_b0.*timm:<name>"),
    ("timm:resnet50", "not supported"),
    ("timm:vit_smal_patch16_224", "unknown timm model.*vit_small_patch16_224"),
])
def test_unknown_backbone_names_list_the_accepted_forms(name, message):
    with pytest.raises(ConfigError, match=message):
        create_backbone(ModelConfig(backbone=name), 2)


# --------------------------------------------------------------------------- #
# weights


def _segformer_b0():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.SegformerConfig(strides=[4, 2, 2, 1])  # the defaults are MiT-B0
    return transformers.SegformerModel(config).eval()


# transformers 5 names -> the transformers 4 names of the hub's nvidia/mit-b* files
_LEGACY_RENAMES = [
    (r"stages\.(\d)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
    (r"stages\.(\d)\.blocks\.", r"encoder.block.\1."),
    (r"stages\.(\d)\.layer_norm", r"encoder.layer_norm.\1"),
    (r"attention\.q_proj", "attention.self.query"),
    (r"attention\.k_proj", "attention.self.key"),
    (r"attention\.v_proj", "attention.self.value"),
    (r"attention\.sequence_reduction\.sequence_reduction", "attention.self.sr"),
    (r"attention\.sequence_reduction\.layer_norm", "attention.self.layer_norm"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "mlp.dense1"),
    (r"mlp\.fc2", "mlp.dense2"),
    (r"layernorm_before", "layer_norm_1"),
    (r"layernorm_after", "layer_norm_2"),
]


def _legacy_hf_names(state: dict) -> dict:
    import re

    out = {}
    for key, value in state.items():
        for pattern, repl in _LEGACY_RENAMES:
            key = re.sub(pattern, repl, key)
        out["segformer." + key] = value
    out["classifier.weight"] = torch.zeros(1000, 256)  # an image-classification checkpoint
    out["classifier.bias"] = torch.zeros(1000)
    return out


@pytest.mark.slow  # imports transformers and builds a SegFormer-B0: about 2 s
def test_official_and_hugging_face_files_reproduce_transformers_hidden_states(tmp_path):
    from safetensors.torch import save_file

    hf = _segformer_b0()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, tmp_path / "transformers5.safetensors")
    torch.save(_legacy_hf_names(state), tmp_path / "pytorch_model.bin")
    # the official naming, with the ImageNet classifier that a mit_b*.pth file holds
    loaded = create_backbone(ModelConfig(backbone="mit_b0", pretrained=str(tmp_path / "pytorch_model.bin")), 2)
    official = dict(loaded.state_dict(), **{"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})
    torch.save(official, tmp_path / "mit_b0.pth")

    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True).hidden_states
        for name in ["transformers5.safetensors", "pytorch_model.bin", "mit_b0.pth"]:
            net = create_backbone(ModelConfig(backbone="mit_b0", pretrained=str(tmp_path / name)), 2).eval()
            features, _ = net(x, with_attn=True)
            for ours, theirs in zip(features, expected, strict=True):
                # the official block LayerNorm eps is 1e-6, transformers' 1e-5: equal up to that
                torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_file_that_does_not_fit_lists_missing_unexpected_and_mismatched_keys(tmp_path):
    state = create_mit("mit_tiny").state_dict()
    del state["block1.0.attn.q.weight"]
    state["block1.0.attn.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(WsssError) as info:
        create_backbone(ModelConfig(backbone="mit_b0", pretrained=str(tmp_path / "wrong.pth")), 2)
    message = str(info.value)
    assert "wrong.pth" in message and "MixVisionTransformer" in message
    assert "missing keys" in message and "block1.0.attn.q.weight" in message
    assert "unexpected keys (1): block1.0.attn.extra" in message
    assert "block3.0.attn.q.weight (128, 128) vs (160, 160)" in message  # a shape mismatch


def test_a_missing_weight_file_is_named(tmp_path):
    with pytest.raises(WsssError, match="nothere.pth' does not exist"):
        create_backbone(ModelConfig(backbone="mit_tiny", pretrained=str(tmp_path / "nothere.pth")), 2)


def test_hub_download_offline_gives_a_clear_error(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, **_):
        raise LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(WsssError, match="nvidia/mit-b1.*set model.pretrained to its path, or model.pretrained=none"):
        create_backbone(ModelConfig(backbone="mit_b1", pretrained="hub"), 2)


def test_hub_download_falls_back_to_the_pytorch_bin(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import errors

    hf = _segformer_b0()
    torch.save(_legacy_hf_names(hf.state_dict()), tmp_path / "pytorch_model.bin")
    remote_missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)

    class NotInRepository(remote_missing):  # the hub's "no such file in this repository"
        def __init__(self) -> None:
            Exception.__init__(self, "404")

    asked = []

    def download(repo_id, filename, **_):
        asked.append((repo_id, filename))
        if filename == "model.safetensors":
            raise NotInRepository()
        return str(tmp_path / filename)

    monkeypatch.setattr(hub, "hf_hub_download", download)
    net = create_backbone(ModelConfig(backbone="mit_b0", pretrained="hub"), 2)
    assert asked == [("nvidia/mit-b0", "model.safetensors"), ("nvidia/mit-b0", "pytorch_model.bin")]
    torch.testing.assert_close(net.patch_embed1.proj.weight, hf.stages[0].patch_embeddings.proj.weight)


def test_mit_tiny_has_no_published_weights():
    with pytest.raises(WsssError, match="no published weights for 'mit_tiny'"):
        create_backbone(ModelConfig(backbone="mit_tiny", pretrained="hub"), 2)


def test_timm_file_with_classifier_loads_into_the_headless_backbone(tmp_path):
    import timm

    torch.manual_seed(2)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000).eval()
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    net = _backbone(VIT, pretrained=str(tmp_path / "vit.pth"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features, _ = net(x, with_attn=True)
        expected = reference.forward_intermediates(x, indices=[2, 5, 8, 11], norm=True, intermediates_only=True)
    for ours, theirs in zip(features, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_backbone_is_a_mix_vision_transformer_for_mit_names():
    assert isinstance(_backbone("mit_tiny"), MixVisionTransformer)


def test_mit_under_cpu_bf16_autocast_stays_close_to_fp32():
    net = _backbone("mit_tiny")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fp32, _ = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, logits = net(x, with_attn=True)
    assert logits.dtype == torch.bfloat16
    for a, b in zip(fp32, bf16):
        torch.testing.assert_close(b.float(), a, atol=0.1, rtol=0.05)


def test_conv_stages_turn_the_first_stages_into_cnn_blocks_and_keep_stage_4_attention():
    plain, hybrid = _backbone("mit_tiny"), _backbone("mit_tiny", conv_stages=3)
    _assert_same_geometry(plain, hybrid)
    assert [len(getattr(hybrid, f"block{i}")) for i in range(1, 5)] == [0, 0, 0, 2]  # stage 4 keeps its blocks
    assert all(len(getattr(plain, f"block{i}")) > 0 for i in range(1, 5))
    stage1 = hybrid.patch_embed1.proj
    convs = [m for m in stage1.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(3, 32, 1), (32, 32, 1), (32, 32, 1),
                                                                            (32, 32, 1)]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in stage1.modules()) == 2  # stride 4: two halvings
    flat = conv_stage(8, 16, 1)  # a stage at stride 1: two convs, no pooling
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in flat.modules())
    assert flat(torch.randn(1, 8, 12, 10)).shape == (1, 16, 12, 10)
    one = _backbone("mit_tiny", conv_stages=1)
    assert [len(getattr(one, f"block{i}")) for i in range(1, 5)] == [0, 1, 1, 2]


@pytest.mark.parametrize("cfg, message", [
    ({"conv_stages": 4}, "expected 0 to 3"),
    ({"conv_stages": 2, "conv_stem": 16}, "set one of them to 0"),
    ({"conv_stages": 1, "strides": [3, 2, 2, 1]}, "strides 1, 2 or 4"),
    ({"conv_stages": 3, "pretrained": "weights.pth"}, "model.pretrained='weights.pth' would not fit"),
])
def test_conv_stages_are_checked(cfg, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _backbone("mit_tiny", **cfg)
