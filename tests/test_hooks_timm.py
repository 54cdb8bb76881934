"""Captured maps vs timm's AttentionExtract on an unfused deep copy (tiny random VisionTransformers)."""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.utils import AttentionExtract  # noqa: E402

from attnselect.hooks import capture_attention  # noqa: E402

TOL = 1e-5


def _vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=(32, 16), patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=0)
    return VisionTransformer(**{**cfg, **kw}).eval()


def _reference(model, x):
    slow = copy.deepcopy(model)
    for blk in slow.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad():
        maps = AttentionExtract(slow, method="fx")(x)
    return [maps[f"blocks.{i}.attn.softmax"] for i in range(len(slow.blocks))]


@pytest.mark.parametrize(
    "kw,prefix,n",
    [({}, 1, 9), ({"reg_tokens": 4, "qk_norm": True}, 5, 13), ({"class_token": False, "global_pool": "avg"}, 0, 8)],
    ids=["plain", "registers_qknorm", "no_cls"],
)
def test_timm_maps_match_attention_extract(kw, prefix, n):
    model = _vit(**kw)
    assert model.blocks[0].attn.fused_attn  # the host keeps its SDPA path
    x = torch.randn(2, 3, 32, 16)
    ref = _reference(model, x)
    with torch.no_grad():
        plain = model(x)
        feats = model.forward_features(x)
    cap = capture_attention(model, "all", head_fusion=None)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, plain)
    for i in range(4):
        torch.testing.assert_close(cap.maps[i], ref[i], atol=TOL, rtol=0)
    assert (cap.num_prefix_tokens, cap.grid, cap.num_layers) == (prefix, (4, 2), 4)
    assert cap.cls_index == (0 if prefix else None)
    assert cap.maps[0].shape[-1] == n
    torch.testing.assert_close(cap.tokens, feats, atol=0, rtol=0)  # after the final norm
    cap.remove()

    cap = capture_attention(model, ("middle", "late"), head_fusion="min", query_rows=torch.tensor([[0, 2], [1, 3]]))
    with torch.no_grad():
        model.forward_features(x)  # the capture also follows forward_features
    assert cap.layers == (1, 3)
    for i in (1, 3):
        expected = torch.stack([ref[i].amin(1)[0, [0, 2]], ref[i].amin(1)[1, [1, 3]]])
        torch.testing.assert_close(cap.maps[i], expected, atol=TOL, rtol=0)
    cap.remove()


def test_timm_attention_mask_sdpa_semantics():
    model = _vit()
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, 64)
    allowed = torch.ones(9, 9, dtype=torch.bool)
    allowed[:, 5] = False  # bool True = attend
    cap = capture_attention(model, 0, head_fusion=None)
    slow = copy.deepcopy(attn)
    slow.fused_attn = False
    with torch.no_grad():
        attn(x, attn_mask=allowed)
        fused_causal = attn(x, is_causal=True)
    got_mask = cap.maps[0]
    cap.clear()
    with torch.no_grad():
        attn(x, is_causal=True)
    got_causal = cap.maps[0]
    # reference by hand, SDPA semantics (True = attend; is_causal blocks keys after the query)
    b, n, _ = x.shape
    qkv = slow.qkv(x).reshape(b, n, 3, 4, 16).permute(2, 0, 3, 1, 4)
    logits = (qkv[0] * slow.scale) @ qkv[1].transpose(-1, -2)
    ref_mask = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    ref_causal = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    torch.testing.assert_close(got_mask, ref_mask, atol=TOL, rtol=0)
    torch.testing.assert_close(got_causal, ref_causal, atol=TOL, rtol=0)
    assert float(got_mask[..., 5].max()) == 0.0
    with torch.no_grad():
        assert torch.equal(fused_causal, attn(x, is_causal=True))
    cap.remove()


def test_model_specific_timm_attention_is_rejected_at_capture():
    # timm.models.beit.Attention is not timm.layers.Attention: it adds a relative position bias inside the module
    from timm.models.beit import Beit

    torch.manual_seed(0)
    model = Beit(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()
    with pytest.raises(TypeError, match=r"timm\.models\.beit\.Attention"):
        capture_attention(model, -1)
    # the stack is still found, so the error names the layer and the unsupported type rather than "no attention"
    with pytest.raises(TypeError, match="layer 1"):
        capture_attention(model, -1)


def test_distilled_and_no_embed_class_layouts():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    deit = VisionTransformerDistilled(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    x = torch.randn(1, 3, 16, 16)  # batch of one
    cap = capture_attention(deit.eval(), "all", head_fusion=None)
    with torch.no_grad():
        deit.forward_features(x)
    assert (cap.num_prefix_tokens, cap.cls_index, cap.maps[0].shape) == (2, 0, (1, 2, 6, 6))
    cap.remove()
