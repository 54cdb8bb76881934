"""Captured maps vs the host's own eager attention for HF transformers (tiny random models, no downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnselect.hooks import capture_attention  # noqa: E402

TOL = 1e-5
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


def _vision_cfgs():
    return {
        "clip": (transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**SMALL, image_size=32, patch_size=8)),
        "vit_32x16": (transformers.ViTModel, transformers.ViTConfig(**SMALL, image_size=(32, 16), patch_size=8)),
        "siglip": (
            transformers.SiglipVisionModel,
            transformers.SiglipVisionConfig(**SMALL, image_size=32, patch_size=8),
        ),
        "dinov2": (transformers.Dinov2Model, transformers.Dinov2Config(**SMALL, image_size=32, patch_size=8)),
        "dinov2_reg": (
            transformers.Dinov2WithRegistersModel,
            transformers.Dinov2WithRegistersConfig(**SMALL, image_size=32, patch_size=8, num_register_tokens=4),
        ),
    }


def _text_cfg():
    return transformers.CLIPTextConfig(
        **SMALL, vocab_size=100, max_position_embeddings=12, bos_token_id=98, eos_token_id=99, pad_token_id=0
    )


def _twins(cls, cfg):
    torch.manual_seed(0)
    fast = cls._from_config(cfg, attn_implementation="sdpa").eval()
    eager = cls._from_config(cfg, attn_implementation="eager").eval()
    eager.load_state_dict(fast.state_dict())
    return fast, eager


def _image(cfg, batch=2):
    size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
    return torch.randn(batch, 3, *size)


def _text_inputs():
    ids = torch.tensor([[98, 5, 6, 7, 99, 0, 0, 0], [98, 11, 12, 13, 14, 15, 16, 99]])
    mask = (torch.arange(8) < torch.tensor([[5], [8]])).long()
    return ids, mask


def _check_against(ref_layers, cap, layers):
    assert sorted(cap.maps) == list(layers)
    for i in layers:
        assert cap.maps[i].dtype == torch.float32
        torch.testing.assert_close(cap.maps[i], ref_layers[i], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["clip", "vit_32x16", "siglip", "dinov2", "dinov2_reg"])
def test_vision_maps_match_eager(family):
    cls, cfg = _vision_cfgs()[family]
    fast, eager = _twins(cls, cfg)
    x = _image(cfg)
    with torch.no_grad():
        ref = eager(pixel_values=x, output_attentions=True).attentions
        plain = fast(pixel_values=x).last_hidden_state
    assert len(ref) == 3

    cap = capture_attention(fast, "all", head_fusion=None)
    with torch.no_grad():
        out = fast(pixel_values=x).last_hidden_state
    assert torch.equal(out, plain)  # the host's output is bit-identical with the hooks
    _check_against(ref, cap, (0, 1, 2))
    cap.remove()

    cap = capture_attention(fast, ("early", "late"), head_fusion="max", query_rows=[0, 3])
    with torch.no_grad():
        fast(x)  # positional pixel_values
    for i in (0, 2):
        torch.testing.assert_close(cap.maps[i], ref[i].amax(1)[:, [0, 3]], atol=TOL, rtol=0)
    cap.remove()

    cap = capture_attention(fast, -1)
    with torch.no_grad():
        fast(pixel_values=x)
    torch.testing.assert_close(cap.maps[2], ref[2].mean(1), atol=TOL, rtol=0)
    n = ref[0].shape[-1]
    expected = {
        "clip": (1, 0, n),
        "vit_32x16": (1, 0, 9),
        "siglip": (0, None, 16),
        "dinov2": (1, 0, 17),
        "dinov2_reg": (5, 0, 21),
    }[family]
    assert (cap.num_prefix_tokens, cap.cls_index, n) == expected
    assert cap.grid[0] * cap.grid[1] + cap.num_prefix_tokens == n
    assert cap.num_layers == 3 and cap.tokens.shape[:2] == (2, n)
    if family != "clip":  # the last hidden state after the final norm
        torch.testing.assert_close(cap.tokens, plain, atol=0, rtol=0)
    cap.remove()


def test_siglip_has_no_cls():
    cls, cfg = _vision_cfgs()["siglip"]
    model = cls(cfg)
    with pytest.raises(ValueError, match="no class token"):
        capture_attention(model, 0, query_rows="cls")
    # the MAP pooling head (an nn.MultiheadAttention outside the block stack) is not a layer
    cap = capture_attention(model, "all")
    assert cap.num_layers == 3 and all("head" not in n for n in cap.layer_names.values())
    cap.remove()


@pytest.mark.parametrize("padding", [False, True])
def test_clip_text_causal_matches_eager(padding):
    fast, eager = _twins(transformers.CLIPTextModel, _text_cfg())
    ids, mask = _text_inputs()
    kwargs = {"attention_mask": mask} if padding else {}
    with torch.no_grad():
        ref = eager(input_ids=ids, output_attentions=True, **kwargs).attentions
        plain = fast(input_ids=ids, **kwargs)
    cap = capture_attention(fast, "all", head_fusion=None)
    with torch.no_grad():
        out = fast(input_ids=ids, **kwargs)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    _check_against(ref, cap, (0, 1, 2))
    assert torch.equal(cap.maps[0].triu(1), torch.zeros_like(cap.maps[0]))  # causal
    assert cap.eos_index.tolist() == [4, 7]
    expected_valid = torch.arange(8) <= torch.tensor([[4], [7]])
    assert torch.equal(cap.valid, expected_valid)
    assert cap.sos_index == 0 and cap.cls_index is None
    torch.testing.assert_close(cap.tokens[torch.arange(2), cap.eos_index], plain.pooler_output, atol=0, rtol=0)
    cap.remove()

    cap = capture_attention(fast, (1, 2), query_rows="eos")
    with torch.no_grad():
        fast(input_ids=ids, **kwargs)
    for i in (1, 2):
        torch.testing.assert_close(cap.maps[i], ref[i].mean(1)[torch.arange(2), [4, 7]].unsqueeze(1), atol=TOL, rtol=0)
    cap.remove()


def test_clip_model_towers_and_projected_tokens():
    vc = transformers.CLIPVisionConfig(**SMALL, image_size=32, patch_size=8)
    cfg = transformers.CLIPConfig(vision_config=vc.to_dict(), text_config=_text_cfg().to_dict(), projection_dim=16)
    fast, eager = _twins(transformers.CLIPModel, cfg)
    x = _image(vc)
    ids, mask = _text_inputs()
    with torch.no_grad():
        ref = eager(input_ids=ids, pixel_values=x, attention_mask=mask, output_attentions=True)
        img_feat = fast.get_image_features(pixel_values=x)
        txt_feat = fast.get_text_features(input_ids=ids, attention_mask=mask)
    img_feat = getattr(img_feat, "pooler_output", img_feat)
    txt_feat = getattr(txt_feat, "pooler_output", txt_feat)

    vis = capture_attention(fast, "all", head_fusion=None)  # vision is the default tower
    txt = capture_attention(fast, "all", head_fusion=None, tower="text")
    with torch.no_grad():
        fast(input_ids=ids, pixel_values=x, attention_mask=mask)
    _check_against(ref.vision_model_output.attentions, vis, (0, 1, 2))
    _check_against(ref.text_model_output.attentions, txt, (0, 1, 2))
    # projected tokens on every position (post_layernorm / final_layer_norm, then the projection)
    assert vis.tokens.shape == (2, 17, 16) and txt.tokens.shape == (2, 8, 16)
    torch.testing.assert_close(vis.tokens[:, 0], img_feat, atol=1e-6, rtol=0)
    torch.testing.assert_close(txt.tokens[torch.arange(2), txt.eos_index], txt_feat, atol=1e-6, rtol=0)

    # the feature entry points fire the capture too
    with torch.no_grad():
        fast.get_image_features(pixel_values=x[:1])
    assert vis.maps[0].shape[0] == 1 and vis.tokens.shape[0] == 1
    vis.remove()
    txt.remove()
    with pytest.raises(ValueError, match="tower"):
        capture_attention(fast, 0, tower="audio")


def test_single_tower_rejects_other_tower():
    cls, cfg = _vision_cfgs()["vit_32x16"]
    with pytest.raises(ValueError, match="vision"):
        capture_attention(cls(cfg), 0, tower="text")


def test_siglip_text_is_bidirectional():
    small = dict(SMALL, vocab_size=100, max_position_embeddings=8)
    vc = transformers.SiglipVisionConfig(**SMALL, image_size=32, patch_size=8)
    cfg = transformers.SiglipConfig(text_config=small, vision_config=vc.to_dict())
    fast, eager = _twins(transformers.SiglipModel, cfg)
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        ref = eager.text_model(input_ids=ids, output_attentions=True).attentions
    cap = capture_attention(fast, "all", head_fusion=None, tower="text")
    with torch.no_grad():
        plain = fast.text_model(input_ids=ids).last_hidden_state
    _check_against(ref, cap, (0, 1, 2))
    assert float(cap.maps[0].triu(1).sum()) > 0  # no causal mask
    assert cap.eos_index.tolist() == [7, 7] and cap.sos_index is None
    torch.testing.assert_close(cap.tokens, plain, atol=0, rtol=0)
    cap.remove()
