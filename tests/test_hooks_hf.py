"""Captured maps vs the host's own eager attention for HF transformers (tiny random models, no downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnselect import AttentiveBank  # noqa: E402
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


def _perturb_relative_bias(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position" in name:
                p.normal_()  # the tables start at zero, which would hide a missing bias


@pytest.mark.parametrize("shared", [False, True])
def test_data2vec_vision_relative_position_bias(shared):
    # query/key self-attention that adds a relative position bias inside the module (per layer or shared)
    key = "use_shared_relative_position_bias" if shared else "use_relative_position_bias"
    cfg = transformers.Data2VecVisionConfig(
        **{**SMALL, "num_hidden_layers": 2}, image_size=16, patch_size=8, **{key: True}
    )
    fast, eager = _twins(transformers.Data2VecVisionModel, cfg)
    _perturb_relative_bias(eager)
    fast.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = eager(pixel_values=x, output_attentions=True).attentions
        plain = fast(pixel_values=x).last_hidden_state
    cap = capture_attention(fast, "all", head_fusion=None)
    with torch.no_grad():
        assert torch.equal(fast(pixel_values=x).last_hidden_state, plain)
    _check_against(ref, cap, (0, 1))
    cap.remove()


def test_swin_window_attention_is_rejected_at_capture():
    cfg = transformers.SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[2], num_heads=[2], window_size=2)
    with pytest.raises(TypeError, match="local windows"):
        capture_attention(transformers.SwinModel(cfg), -1)


def test_wrapped_vision_model_and_distillation_token_layout():
    torch.manual_seed(0)
    owl = transformers.OwlViTVisionModel(transformers.OwlViTVisionConfig(**SMALL, image_size=16, patch_size=8))
    cap = capture_attention(owl.eval(), -1)
    assert (cap.cls_index, cap.num_prefix_tokens) == (0, 1)  # CLS lives in owl.vision_model.embeddings
    cap.remove()
    deit = transformers.DeiTModel(transformers.DeiTConfig(**SMALL, image_size=16, patch_size=8)).eval()
    cap = capture_attention(deit, -1)
    with torch.no_grad():
        deit(pixel_values=torch.randn(1, 3, 16, 16))
    assert (cap.cls_index, cap.num_prefix_tokens, cap.maps[2].shape) == (0, 2, (1, 6, 6))  # [CLS, DIST, 4 patches]
    cap.remove()


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _first_token_host(kind):
    """A tiny host whose text tower summarises with the first token, and its pad id."""
    text = dict(**TINY, vocab_size=100, max_position_embeddings=24)
    vision = dict(**TINY, image_size=16, patch_size=8)
    if kind == "bert":
        return transformers.BertModel, transformers.BertConfig(**text), 0
    if kind == "chinese_clip":
        cfg = transformers.ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        return transformers.ChineseCLIPModel, cfg, 0
    cfg = transformers.AltCLIPConfig(text_config=dict(text, project_dim=16), vision_config=vision, projection_dim=16)
    return transformers.AltCLIPModel, cfg, 1


def _first_token_ids(pad):
    # [CLS] words [SEP] pad...; the largest id (97) sits in the middle so that an argmax rule would pick it
    ids = torch.tensor([[90, 5, 97, 7, 91, pad, pad, pad], [90, 11, 12, 13, 14, 97, 16, 91]])
    return ids, (ids != pad).long()


@pytest.mark.parametrize("kind", ["bert", "chinese_clip", "altclip"])
def test_first_token_text_towers_match_the_host_pooling(kind):
    cls, cfg, pad = _first_token_host(kind)
    fast, eager = _twins(cls, cfg)
    ids, mask = _first_token_ids(pad)
    tower = "text" if kind != "bert" else None
    text_fast = fast if kind == "bert" else fast.text_model
    text_eager = eager if kind == "bert" else eager.text_model
    with torch.no_grad():
        ref = text_eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        hf_out = text_fast(input_ids=ids, attention_mask=mask)
        pooled = None if kind == "bert" else fast.get_text_features(input_ids=ids, attention_mask=mask)
    cap = capture_attention(fast, "all", head_fusion=None, tower=tower)
    with torch.no_grad():
        text_fast(input_ids=ids, attention_mask=mask)
    _check_against(ref, cap, (0, 1))
    assert cap.eos_index.tolist() == [0, 0] and cap.sos_index == 0
    assert torch.equal(cap.valid, mask.bool())  # every non-padding token, [CLS] and [SEP] included
    summary = cap.tokens[torch.arange(2), cap.eos_index]
    if kind == "bert":  # BertPooler: tanh(dense(hidden[:, 0]))
        torch.testing.assert_close(fast.pooler.activation(fast.pooler.dense(summary)), hf_out.pooler_output)
    else:  # the projected first token is the host's text feature
        torch.testing.assert_close(summary, getattr(pooled, "pooler_output", pooled), atol=1e-6, rtol=0)

    # without an attention mask the pad id marks the padding; query_rows="eos" is the first row
    cap.remove()
    cap = capture_attention(fast, -1, query_rows="eos", tower=tower)
    with torch.no_grad():
        text_fast(input_ids=ids)
        ref = text_eager(input_ids=ids, output_attentions=True).attentions
    assert torch.equal(cap.valid, ids != pad)
    torch.testing.assert_close(cap.maps[1], ref[1].mean(1)[:, :1], atol=TOL, rtol=0)
    cap.remove()


def test_yolos_detection_tokens_are_suffix_tokens():
    cfg = transformers.YolosConfig(**TINY, image_size=[16, 32], patch_size=8, num_detection_tokens=3)
    fast, eager = _twins(transformers.YolosModel, cfg)
    x = torch.randn(2, 3, 16, 32)
    with torch.no_grad():
        ref = eager(pixel_values=x, output_attentions=True).attentions
    cap = capture_attention(fast, "all", head_fusion=None)
    with torch.no_grad():
        fast(pixel_values=x)
    _check_against(ref, cap, (0, 1))
    n = ref[0].shape[-1]
    assert (cap.num_prefix_tokens, cap.num_suffix_tokens, cap.cls_index, cap.grid) == (1, 3, 0, (2, 4))
    assert n == cap.num_prefix_tokens + cap.grid[0] * cap.grid[1] + cap.num_suffix_tokens == 12
    cap.remove()


def _groupvit_config():
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        depths=[1, 1],
        num_hidden_layers=2,
        num_group_tokens=[4, 0],
        num_output_groups=[4, 2],
        image_size=16,
        patch_size=8,
    )
    text = dict(**TINY, vocab_size=100, max_position_embeddings=8, bos_token_id=98, eos_token_id=99)
    return transformers.GroupViTConfig(
        text_config=text, vision_config=vision, projection_dim=16, projection_intermediate_dim=16
    )


def test_groupvit_vision_is_rejected_and_text_is_supported():
    torch.manual_seed(0)
    cfg = _groupvit_config()
    model = transformers.GroupViTModel._from_config(cfg, attn_implementation="eager").eval()
    with pytest.raises(TypeError, match=r"GroupViTVisionTransformer.*stage"):
        capture_attention(model, "all")
    vision = transformers.GroupViTVisionModel(cfg.vision_config)
    with pytest.raises(TypeError, match=r"GroupViTVisionModel.*stage"):
        capture_attention(vision, -1)
    with pytest.raises(TypeError, match="GroupViT"):  # attach refuses it when attaching, before any forward
        AttentiveBank().attach(vision)

    ids = torch.tensor([[98, 5, 6, 7, 99, 0, 0, 0], [98, 11, 12, 13, 14, 15, 16, 99]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = model.text_model(input_ids=ids, attention_mask=mask, output_attentions=True)
    cap = capture_attention(model, "all", head_fusion=None, tower="text")
    with torch.no_grad():
        model.get_text_features(input_ids=ids, attention_mask=mask)  # its projection head holds a BatchNorm1d
    _check_against(ref.attentions, cap, (0, 1))
    assert cap.eos_index.tolist() == [4, 7]
    # tokens are not projected: the BatchNorm1d of the head normalises pooled vectors, not token sets
    torch.testing.assert_close(cap.tokens, ref.last_hidden_state, atol=0, rtol=0)
    cap.remove()
