"""Behaviour shared by every adapter: exact removal, errors, checkpointing, autocast, compile, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attnselect.hooks import adapter_for, capture_attention

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
)


def _vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=(32, 16), patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=0)
    return VisionTransformer(**{**cfg, **kw}).eval()


def _hook_counts(model):
    return {name: tuple(len(getattr(m, d)) for d in HOOK_DICTS) for name, m in model.named_modules()}


def _tiny_clip():
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=3, width=64, head_width=16, patch_size=8, image_size=(32, 16), mlp_ratio=2.0),
        text_cfg=dict(context_length=12, vocab_size=49408, width=64, heads=4, layers=2, mlp_ratio=2.0),
    ).eval()


def _hf_vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=8
    )
    return transformers.ViTModel(cfg).eval()


IDS = torch.tensor([[49406, 320, 1125, 49407, 0, 0, 0, 0, 0, 0, 0, 0]] * 2)


@pytest.mark.parametrize("host", ["timm", "open_clip_vision", "open_clip_text", "hf_vit"])
def test_remove_restores_the_model_exactly(host):
    if host == "timm":
        model, run, tower = _vit(), (lambda m: m(torch.ones(2, 3, 32, 16))), None
    elif host == "hf_vit":
        model, run, tower = _hf_vit(), (lambda m: m(torch.ones(2, 3, 16, 16)).last_hidden_state), None
    else:
        model = _tiny_clip()
        tower = host.split("_")[-1]
        run = (
            (lambda m: m.encode_image(torch.ones(2, 3, 32, 16)))
            if tower == "vision"
            else (lambda m: m.encode_text(IDS))
        )
    before_hooks = _hook_counts(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = run(model)
    with capture_attention(model, "all", head_fusion=None, tower=tower) as cap:
        assert _hook_counts(model) != before_hooks
        with torch.no_grad():
            assert torch.equal(run(model), ref)
        assert len(cap.maps) == cap.num_layers
    # the latest forward's results stay readable after removal (figures drawn after the block); clear() drops them
    assert not cap.active and len(cap.maps) == cap.num_layers and cap.tokens is not None
    cap.clear()
    assert cap.maps == {} and cap.tokens is None
    assert _hook_counts(model) == before_hooks
    assert all(sum(c) == 0 for c in _hook_counts(model).values())
    after = model.state_dict()
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], before_state[k]) for k in after)
    with torch.no_grad():
        assert torch.equal(run(model), ref)
    cap.remove()  # idempotent


def test_only_chosen_layers_are_stored_and_cleared_per_forward():
    model = _vit()
    cap = capture_attention(model, [1])
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 16))
        first = cap.maps[1]
        model(torch.randn(2, 3, 32, 16))
    assert list(cap.maps) == [1]
    assert first.shape[0] == 3 and cap.maps[1].shape[0] == 2  # a new forward replaced the map
    assert cap.tokens.shape[0] == 2
    cap.remove()


def test_unsupported_model_names_module_types():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.LayerNorm(8))
    with pytest.raises(TypeError, match=r"LayerNorm.*Linear.*ReLU"):
        capture_attention(model, 0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(TypeError, match="convolutional network"):
        capture_attention(cnn, 0)


def test_rotary_timm_attention_is_captured():
    # EvaAttention and AttentionRope rotate q and k with the rope the block passes (tests/test_hosts_universal.py
    # checks every rotary family against its eager softmax)
    eva = timm.models.eva.Eva(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, use_rot_pos_emb=True)
    with capture_attention(eva.eval(), "late") as cap, torch.no_grad():
        eva(torch.randn(1, 3, 32, 32))
    assert cap.maps[1].shape == (1, 17, 17)


def test_tome_patched_attention_is_rejected():
    from timm.layers import Attention

    class ToMeAttention(Attention):  # what ToMe's apply_patch swaps in through __class__
        def forward(self, x, size=None):
            return super().forward(x), x.mean(1)

    model = _vit()
    for blk in model.blocks:
        blk.attn.__class__ = ToMeAttention
    with pytest.raises(TypeError, match="ToMeAttention"):
        capture_attention(model, "late")
    with pytest.raises(TypeError, match="ToMe"):
        adapter_for(model.blocks[0].attn)


def test_bad_arguments():
    model = _vit()
    with pytest.raises(ValueError, match="head_fusion"):
        capture_attention(model, 0, head_fusion="sum")
    with pytest.raises(ValueError, match="out of range"):
        capture_attention(model, 4)
    with pytest.raises(ValueError, match="query_rows"):
        capture_attention(model, 0, query_rows="middle")
    with pytest.raises(ValueError, match="eos"):
        capture_attention(model, 0, query_rows="eos")
    with pytest.raises(ValueError, match="tower"):
        capture_attention(model, 0, tower="text")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        capture_attention("vit", 0)
    assert _hook_counts(model) == _hook_counts(_vit())  # failed constructions leave no hooks


def test_gradient_checkpointing_does_not_double_count():
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(cfg).train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    calls = []
    model.encoder.layers[1].self_attn.register_forward_hook(lambda *a: calls.append(1))
    cap = capture_attention(model, "all", head_fusion=None)
    ends = []
    cap.add_callback(lambda c: ends.append(len(c.maps)))
    x = torch.randn(2, 3, 16, 16)
    out = model(pixel_values=x).last_hidden_state
    stored = dict(cap.maps)
    out.sum().backward()
    assert len(calls) == 2  # the layer ran again during backward
    assert ends == [2]  # one end-of-forward
    assert all(cap.maps[i] is stored[i] for i in stored)  # the recomputation stored nothing
    model.eval()
    with torch.no_grad():
        model(pixel_values=x)
    for i in stored:  # the stored maps are those of the forward (the recomputation did not overwrite them)
        torch.testing.assert_close(stored[i], cap.maps[i], atol=1e-6, rtol=0)
    cap.remove()


def test_train_mode_maps_are_pre_dropout():
    model = _vit(attn_drop_rate=0.5).train()
    cap = capture_attention(model, 0, head_fusion=None)
    model(torch.randn(2, 3, 32, 16))
    torch.testing.assert_close(cap.maps[0].sum(-1), torch.ones(2, 4, 9), atol=1e-5, rtol=0)
    cap.remove()


def test_autocast_and_bf16_hosts_give_fp32_maps():
    model = _vit()
    x = torch.randn(2, 3, 32, 16)
    cap = capture_attention(model, "all")
    with torch.no_grad():
        model(x)
    ref = dict(cap.maps)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    for i, m in cap.maps.items():
        assert m.dtype == torch.float32
        torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(m, ref[i], atol=3e-2, rtol=0)
    cap.remove()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    cap = capture_attention(bf16, "late")
    with torch.no_grad():
        bf16(x.bfloat16())
    assert cap.maps[3].dtype == torch.float32
    torch.testing.assert_close(cap.maps[3], ref[3], atol=5e-2, rtol=0)
    cap.remove()


def test_detach_false_keeps_the_graph():
    model = _vit()
    cap = capture_attention(model, 0, detach=False)
    model(torch.randn(2, 3, 32, 16))
    assert cap.maps[0].requires_grad
    cap.maps[0][:, 0].max(-1).values.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    cap.remove()
    cap = capture_attention(model, 0)
    model(torch.randn(2, 3, 32, 16))
    assert not cap.maps[0].requires_grad
    assert cap.tokens.requires_grad  # tokens stay attached: the bank trains through them
    cap.remove()


@pytest.mark.slow
def test_torch_compile_with_hooks_registered_first():
    model = _vit()
    x = torch.randn(2, 3, 32, 16)
    cap = capture_attention(model, ("middle", "late"))  # hooks in place before the first compiled call
    with torch.no_grad():
        eager_out = model(x)
    eager_maps = {i: m.clone() for i, m in cap.maps.items()}
    cap.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out, eager_out, atol=1e-6, rtol=0)
    assert sorted(cap.maps) == [1, 3]
    for i in (1, 3):
        torch.testing.assert_close(cap.maps[i], eager_maps[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(cap.tokens, model.forward_features(x).detach(), atol=1e-6, rtol=0)
    cap.remove()
    torch._dynamo.reset()


def test_hf_legacy_query_key_layout():
    class ViTSelfAttention(nn.Module):  # the transformers 4.x layout: query/key/value Linear layers
        __module__ = "transformers.models.vit.modeling_vit"

        def __init__(self):
            super().__init__()
            self.num_attention_heads, self.attention_head_size = 4, 8
            self.query, self.key, self.value = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, hidden_states, head_mask=None, output_attentions=False):
            b, n, _ = hidden_states.shape
            q = self.query(hidden_states).view(b, n, 4, 8).transpose(1, 2)
            k = self.key(hidden_states).view(b, n, 4, 8).transpose(1, 2)
            v = self.value(hidden_states).view(b, n, 4, 8).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
            return (probs @ v).transpose(1, 2).reshape(b, n, 32), probs

    torch.manual_seed(0)
    host = nn.ModuleList([ViTSelfAttention(), ViTSelfAttention()])
    x = torch.randn(2, 5, 32)
    cap = capture_attention(host, "late", head_fusion=None)
    with torch.no_grad():
        _, ref = host[1](x, None, False)
    torch.testing.assert_close(cap.maps[1], ref, atol=1e-5, rtol=0)
    cap.remove()


def test_query_rows_callable_and_negative_index():
    model = _vit()
    x = torch.randn(2, 3, 32, 16)
    full = capture_attention(model, 2)
    picked = capture_attention(model, 2, query_rows=lambda cap: torch.tensor([[cap.cls_index], [-1]]))
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(picked.maps[2][:, 0], torch.stack([full.maps[2][0, 0], full.maps[2][1, -1]]))
    full.remove()
    picked.remove()


@pytest.mark.parametrize("layers", [None, 1.5, object()])
def test_bad_layers_type_names_the_argument(layers):
    with pytest.raises(TypeError, match="layers"):
        capture_attention(_vit(depth=2), layers)
