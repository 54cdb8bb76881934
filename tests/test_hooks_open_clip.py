"""Captured maps vs nn.MultiheadAttention(need_weights=True) and a hand-written reference for open_clip."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")

from attnselect.hooks import capture_attention  # noqa: E402

TOL = 1e-5
VISION = dict(layers=3, width=64, head_width=16, patch_size=8, image_size=(32, 16), mlp_ratio=2.0)
TEXT = dict(context_length=12, vocab_size=49408, width=64, heads=4, layers=2, mlp_ratio=2.0)
IDS = torch.tensor(
    [
        [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0, 0, 0],
        [49406, 320, 49407, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
)


def _clip(**vision):
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=32, vision_cfg={**VISION, **vision}, text_cfg=TEXT).eval()


def _record_inputs(mhas):
    """Record (q, k, v, attn_mask) of each nn.MultiheadAttention call, to rerun it with need_weights=True."""
    seen, handles = {}, []
    for i, m in enumerate(mhas):

        def pre(mod, args, kwargs, i=i):
            seen[i] = (args, kwargs.get("attn_mask"))

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    return seen, handles


def _mha_reference(mha, args, mask):
    with torch.no_grad():
        _, w = mha(*args, need_weights=True, average_attn_weights=False, attn_mask=mask)
    return w  # [B,H,L,S]


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_mha_maps_match_need_weights(tower):
    model = _clip()
    root = model.visual.transformer if tower == "vision" else model.transformer
    mhas = [blk.attn for blk in root.resblocks]
    run = (
        (lambda: model.encode_image(torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(1))))
        if (tower == "vision")
        else (lambda: model.encode_text(IDS))
    )
    with torch.no_grad():
        plain = run()
    seen, handles = _record_inputs(mhas)
    cap = capture_attention(model, "all", head_fusion=None, tower=tower)
    with torch.no_grad():
        out = run()
    assert torch.equal(out, plain)
    for h in handles:
        h.remove()
    for i, mha in enumerate(mhas):
        ref = _mha_reference(mha, *seen[i])
        torch.testing.assert_close(cap.maps[i], ref, atol=TOL, rtol=0)
    if tower == "text":
        assert torch.equal(cap.maps[0].triu(1), torch.zeros_like(cap.maps[0]))
        assert cap.eos_index.tolist() == [6, 2] and cap.sos_index == 0
        assert cap.valid.sum(1).tolist() == [7, 3]
        # projected tokens (ln_final + text_projection on every position); the EOS one is encode_text's output
        torch.testing.assert_close(cap.tokens[torch.arange(2), cap.eos_index], out, atol=1e-6, rtol=0)
    else:
        assert (cap.grid, cap.num_prefix_tokens, cap.cls_index) == ((4, 2), 1, 0)
        assert cap.tokens.shape == (2, 9, 32)
        torch.testing.assert_close(cap.tokens[:, 0], out, atol=1e-6, rtol=0)
    cap.remove()

    cap = capture_attention(model, "late", tower=tower, query_rows="eos" if tower == "text" else "cls")
    with torch.no_grad():
        run()
    ref = _mha_reference(mhas[-1], *seen[len(mhas) - 1]).mean(1)
    rows = torch.tensor([[6], [2]]) if tower == "text" else torch.zeros(2, 1, dtype=torch.long)
    torch.testing.assert_close(cap.maps[len(mhas) - 1], ref.gather(1, rows.unsqueeze(-1).expand(-1, -1, ref.shape[-1])))
    cap.remove()


def test_mha_batch_first_false_with_causal_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4).eval()
    host = nn.ModuleList([mha])  # any module holding supported attention modules is a host
    x = torch.randn(7, 2, 32)  # (L, B, E)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    cap = capture_attention(host, 0, head_fusion=None)
    with torch.no_grad():
        mha(x, x, x, need_weights=False, attn_mask=causal)
        _, ref = mha(x, x, x, need_weights=True, average_attn_weights=False, attn_mask=causal)
    torch.testing.assert_close(cap.maps[0], ref, atol=TOL, rtol=0)
    cap.remove()


def test_mha_bool_mask_and_key_padding():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 6, 32)
    blocked = torch.rand(6, 6) > 0.7
    blocked.fill_diagonal_(False)
    kpm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    cap = capture_attention(nn.ModuleList([mha]), 0, head_fusion=None)
    with torch.no_grad():
        mha(x, x, x, key_padding_mask=kpm, need_weights=False, attn_mask=blocked)
        _, ref = mha(x, x, x, key_padding_mask=kpm, need_weights=True, average_attn_weights=False, attn_mask=blocked)
    torch.testing.assert_close(cap.maps[0], ref, atol=TOL, rtol=0)
    cap.remove()


def _attention_reference(attn, x, mask=None):
    """Eager open_clip Attention probabilities (its own non-SDPA branch calls bmm on 4-D tensors and fails)."""
    b, n, _ = x.shape
    q, k, _ = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = attn.ln_q(q.reshape(b, n, attn.num_heads, -1).transpose(1, 2))
    k = attn.ln_k(k.reshape(b, n, attn.num_heads, -1).transpose(1, 2))
    logits = (q * attn.scale) @ k.transpose(-1, -2)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(-1)


def test_custom_attention_qk_norm():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32, vision_cfg={**VISION, "qk_norm": True}, text_cfg={**TEXT, "qk_norm": True}
    ).eval()
    attns = [blk.attn for blk in model.visual.transformer.resblocks]
    assert type(attns[0]).__name__ == "Attention"
    inputs = {}
    hs = [a.register_forward_pre_hook(lambda m, a_, i=i: inputs.__setitem__(i, a_[0])) for i, a in enumerate(attns)]
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        plain = model.encode_image(x)
    cap = capture_attention(model, "all", head_fusion=None)
    with torch.no_grad():
        out = model.encode_image(x)
    assert torch.equal(out, plain)
    for h in hs:
        h.remove()
    for i, a in enumerate(attns):
        # the reference also rebuilds the module's real (SDPA) output from P: P @ V -> out_proj
        ref = _attention_reference(a, inputs[i])
        torch.testing.assert_close(cap.maps[i], ref, atol=TOL, rtol=0)
        b, n, _ = inputs[i].shape
        v = F.linear(inputs[i], a.in_proj_weight, a.in_proj_bias).chunk(3, -1)[2]
        v = v.reshape(b, n, a.num_heads, -1).transpose(1, 2)
        rebuilt = a.out_proj((cap.maps[i] @ v).transpose(1, 2).reshape(b, n, -1))
        with torch.no_grad():
            torch.testing.assert_close(rebuilt, a(inputs[i]), atol=1e-5, rtol=0)
    cap.remove()

    # text tower with qk-norm: causal float mask
    tattns = [blk.attn for blk in model.transformer.resblocks]
    seen = {}
    hs = [
        a.register_forward_pre_hook(
            lambda m, a_, k_, i=i: seen.__setitem__(i, (a_[0], k_.get("attn_mask"))), with_kwargs=True
        )
        for i, a in enumerate(tattns)
    ]
    cap = capture_attention(model, "all", head_fusion=None, tower="text")
    with torch.no_grad():
        model.encode_text(IDS)
    for h in hs:
        h.remove()
    for i, a in enumerate(tattns):
        torch.testing.assert_close(cap.maps[i], _attention_reference(a, *seen[i]), atol=TOL, rtol=0)
    cap.remove()


def test_custom_attention_bool_mask_true_blocks():
    torch.manual_seed(0)
    from open_clip.transformer import Attention

    attn = Attention(32, 4, qk_norm=True).eval()
    x = torch.randn(2, 5, 32)
    blocked = torch.zeros(5, 5, dtype=torch.bool)
    blocked[:, 3] = True
    cap = capture_attention(nn.ModuleList([attn]), 0, head_fusion=None)
    with torch.no_grad():
        attn(x, attn_mask=blocked)
    torch.testing.assert_close(cap.maps[0], _attention_reference(attn, x, blocked), atol=TOL, rtol=0)
    assert float(cap.maps[0][..., 3].abs().max()) == 0.0
    cap.remove()


@pytest.mark.slow
def test_full_size_vit_b16_384x128():
    """One full-size architecture: ViT-B/16 at the ITSELF input size (24 x 8 patches + CLS = 193 tokens)."""
    start = time.perf_counter()
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=(384, 128)).eval()
    cap = capture_attention(model, ("middle", "late"), head_fusion=None)
    x = torch.randn(1, 3, 384, 128)
    with torch.no_grad():
        feat = model.encode_image(x)
    assert cap.layers == (4, 11) and cap.num_layers == 12
    assert cap.maps[11].shape == (1, 12, 193, 193) and cap.grid == (24, 8)
    assert cap.tokens.shape == (1, 193, 512)
    torch.testing.assert_close(cap.tokens[:, 0], feat, atol=1e-5, rtol=0)
    torch.testing.assert_close(cap.maps[4].sum(-1), torch.ones(1, 12, 193), atol=1e-5, rtol=0)
    cap.remove()
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("pool_type", ["first", "last"])
def test_text_tower_pooling_first_or_last_marks_padding_not_the_summary_bound(pool_type):
    # bidirectional text tower with a padding mask: the summary is the first/last position and every non-pad
    # token is valid (not only the tokens up to the summary position)
    torch.manual_seed(0)
    text = {**TEXT, "layers": 1, "width": 32, "heads": 2, "no_causal_mask": True, "pool_type": pool_type, "pad_id": 0}
    # CustomTextCLIP: its TextTransformer masks padding keys (the inline tower of CLIP does not)
    model = open_clip.CustomTextCLIP(embed_dim=16, vision_cfg={**VISION, "layers": 1, "width": 32}, text_cfg=text)
    model.text.use_pad_mask = True  # a [B*heads, L, L] additive padding mask (not settable through the config)
    cap = capture_attention(model.eval(), -1, tower="text", head_fusion=None)
    with torch.no_grad():
        feats = model.encode_text(IDS)
    summary = torch.full((2,), 0 if pool_type == "first" else IDS.shape[1] - 1)
    assert torch.equal(cap.eos_index, summary)
    expected = (IDS != 0) | (torch.arange(IDS.shape[1]) == summary[:, None])
    assert torch.equal(cap.valid, expected)
    torch.testing.assert_close(cap.tokens[torch.arange(2), summary], feats, atol=1e-6, rtol=0)
    assert float(cap.maps[0][0, :, :, 7:].abs().max()) == 0.0  # padded keys get no attention
    cap.remove()
