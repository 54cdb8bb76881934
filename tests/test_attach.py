"""AttentiveBank.attach: the bank runs on every forward of an unmodified host tower."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

import attnselect as asel
from attnselect.hooks import AttachHandle, capture_attention, detach_bank

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
IDS = torch.tensor(
    [
        [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0, 0, 0],
        [49406, 320, 49407, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
)


def _vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=(32, 16), patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=0).eval()


def _clip():
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=3, width=64, head_width=16, patch_size=8, image_size=(32, 16), mlp_ratio=2.0),
        text_cfg=dict(context_length=12, vocab_size=49408, width=64, heads=4, layers=3, mlp_ratio=2.0),
    ).eval()


def _no_hooks(model):
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs for m in model.modules()
    )


def test_attach_timm_matches_a_direct_bank_call():
    vit, bank = _vit(), asel.AttentiveBank(ratio=0.4)
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        plain = vit(x)
    handle = bank.attach(vit)
    assert isinstance(handle, AttachHandle) and handle.capture.layers == (2, 5)  # ("middle", "late") of 6
    with torch.no_grad():
        out = vit(x)
    assert torch.equal(out, plain)
    last = bank.last
    assert last.k == int(0.4 * 8) and last.indices.shape == (2, 3)
    assert not (last.indices == 0).any()  # the CLS query is never kept
    handle.remove()
    assert _no_hooks(vit)

    # the same BankOutput by hand: capture, then call the bank
    cap = capture_attention(vit, ("middle", "late"))
    with torch.no_grad():
        vit(x)
        ref = bank(cap.tokens, cap.maps, query=0, num_layers=cap.num_layers)
    cap.remove()
    assert torch.equal(last.indices, ref.indices)
    torch.testing.assert_close(last.embedding, ref.embedding, atol=0, rtol=0)


def test_attach_with_capture_layers_reads_named_rollout_layers_at_the_host_depth():
    # depth 6: ("early", "middle") = layers 0 and 2; capturing 0..2 looks like a whole 3-layer host, where "middle"
    # would be layer 1, so the handle passes the host depth
    vit, bank = _vit(), asel.AttentiveBank(asel.MultiLayerRollout(("early", "middle")), ratio=0.4)
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad(), bank.attach(vit, layers=[0, 1, 2]) as handle:
        vit(x)
        assert handle.capture.layers == (0, 1, 2)
        ref = bank(handle.capture.tokens, {i: handle.capture.maps[i] for i in (0, 2)}, query=0)
    assert torch.equal(bank.last.indices, ref.indices)
    torch.testing.assert_close(bank.last.embedding, ref.embedding, atol=0, rtol=0)


def test_attach_open_clip_both_towers():
    model = _clip()
    image_bank, text_bank = asel.AttentiveBank(ratio=0.5), asel.AttentiveBank(ratio=0.5)
    with image_bank.attach(model, tower="vision"), text_bank.attach(model, tower="text") as th:
        with torch.no_grad():
            model.encode_image(torch.randn(2, 3, 32, 16))
            model.encode_text(IDS)
        assert th.capture.eos_index.tolist() == [6, 2]
    assert _no_hooks(model)
    img, txt = image_bank.last, text_bank.last
    assert img.k == 4 and not (img.indices == 0).any()
    assert txt.k == int(0.5 * (12 - 2))  # SOS and EOS are not selectable
    for b, eos in enumerate([6, 2]):
        kept = txt.indices[b][txt.mask[b]]
        assert not ((kept == 0) | (kept == eos)).any()
        assert (kept < eos).all()  # padding after EOS is never kept
    assert txt.mask[1].sum() == 1 and txt.mask[0].all()  # sample 1 has a single selectable word
    assert txt.embedding.shape == (2, 32)


def test_attach_hf_clip_model_feature_entry_points():
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    cfg = transformers.CLIPConfig(
        vision_config=dict(**small, image_size=32, patch_size=8),
        text_config=dict(**small, vocab_size=100, max_position_embeddings=8, bos_token_id=98, eos_token_id=99),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    ids = torch.tensor([[98, 5, 6, 7, 99, 0, 0, 0], [98, 11, 12, 13, 14, 15, 16, 99]])
    mask = (ids != 0).long()
    vb, tb = asel.AttentiveBank(ratio=0.5), asel.AttentiveBank(ratio=0.5)
    vb.attach(model)
    tb.attach(model, tower="text")
    with torch.no_grad():
        model.get_image_features(pixel_values=torch.randn(2, 3, 32, 32))
        model.get_text_features(input_ids=ids, attention_mask=mask)
    assert vb.last.tokens.shape == (2, 8, 16)  # projected tokens, k = 16 // 2
    assert tb.last.k == 3 and (tb.last.indices[0][tb.last.mask[0]] < 4).all()
    vb.detach()
    tb.detach()
    assert _no_hooks(model)


def test_attach_twice_raises_and_detach_removes_everything():
    vit, bank = _vit(), asel.AttentiveBank()
    bank.attach(vit)
    with pytest.raises(RuntimeError, match="already"):
        bank.attach(vit)
    second = asel.AttentiveBank()
    second.attach(vit)  # another bank may share the tower
    second.detach()
    other = _vit()
    bank.attach(other)  # one bank may serve several hosts
    detach_bank(bank)
    assert _no_hooks(vit) and _no_hooks(other)
    bank.attach(vit).remove()  # attachable again after removal
    assert _no_hooks(vit)


def test_attach_without_cls_defaults_to_the_probe_and_keeps_a_position_query_selectable():
    cfg = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    model = transformers.SiglipVisionModel(cfg).eval()
    bank = asel.AttentiveBank(ratio=0.5)
    with bank.attach(model) as handle, torch.no_grad():  # SigLIP has no class token: its MAP probe is the query
        model(torch.randn(2, 3, 32, 32))
    assert handle.query == "probe" and bank.last.k == 8  # nothing excluded: 16 patches
    with pytest.raises(ValueError, match="class token"):
        bank.attach(model, query="cls")
    with bank.attach(model, query=5, layers=[1, 2]), torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert bank.last.k == 8  # position 5 is patch 5: it stays selectable


def test_attach_trains_through_the_tokens_and_single_call_under_checkpointing():
    vit, bank = _vit(), asel.AttentiveBank(ratio=0.5)
    vit.train()
    vit.set_grad_checkpointing(True)
    seen = []
    handle = bank.attach(vit)
    handle.capture.add_callback(lambda cap: seen.append(cap.maps[5]))
    vit(torch.randn(2, 3, 32, 16))
    bank.last.embedding.sum().backward()
    assert len(seen) == 1 and handle.capture.maps[5] is seen[0]
    assert vit.blocks[5].mlp.fc2.weight.grad is not None  # gradients reach the host through the kept tokens
    handle.remove()


@pytest.mark.parametrize("name", ["attach_timm", "attach_open_clip", "attach_hf"])
def test_examples_run(name, capsys):
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "kept token indices" in out and "k =" in out


def test_attach_never_keeps_register_tokens():
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=(32, 16), patch_size=8, embed_dim=32, depth=3, num_heads=2, reg_tokens=4, num_classes=0
    ).eval()
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(1, 2)), ratio=0.5)
    with bank.attach(vit), torch.no_grad():
        vit(torch.randn(3, 3, 32, 16))
    out = bank.last
    assert out.k == 4  # 8 patches selectable (13 tokens minus CLS and 4 registers), ratio 0.5
    assert bool((out.indices >= 5).all())


def test_attach_never_keeps_a_register_token_without_cls():
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=0,
        class_token=False,
        reg_tokens=1,
        global_pool="avg",
    ).eval()
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(1, 2)), ratio=1.0)
    with bank.attach(vit, query=5), torch.no_grad():
        vit(torch.randn(2, 3, 32, 32))
    assert not bool((bank.last.indices[bank.last.mask] == 0).any())


def test_attach_first_token_text_tower_queries_the_first_token():
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cfg = transformers.ChineseCLIPConfig(
        text_config=dict(**small, vocab_size=100, max_position_embeddings=16),
        vision_config=dict(**small, image_size=16, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.ChineseCLIPModel(cfg).eval()
    ids = torch.tensor([[90, 5, 97, 7, 91, 0, 0, 0], [90, 11, 12, 13, 14, 97, 16, 91]])  # argmax would pick 97
    mask = ids != 0
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 1)), ratio=0.5)
    with bank.attach(model, tower="text"), torch.no_grad():
        model.get_text_features(input_ids=ids, attention_mask=mask.long())
    last = bank.last
    cap = capture_attention(model, (0, 1), tower="text")
    with torch.no_grad():
        model.get_text_features(input_ids=ids, attention_mask=mask.long())
        ref = bank(cap.tokens, cap.maps, query=0, valid=mask, exclude=[0], num_layers=cap.num_layers)
    cap.remove()
    assert last.k == int(0.5 * 7)  # every token but the [CLS] query is selectable
    assert torch.equal(last.indices, ref.indices)
    torch.testing.assert_close(last.embedding, ref.embedding, atol=0, rtol=0)
    for b in range(2):
        kept = last.indices[b][last.mask[b]]
        assert not (kept == 0).any() and mask[b, kept].all()  # neither the query nor padding is kept


def test_attach_never_keeps_yolos_detection_tokens():
    cfg = transformers.YolosConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=[16, 32],
        patch_size=8,
        num_detection_tokens=3,
    )
    torch.manual_seed(0)
    model = transformers.YolosModel(cfg).eval()
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 1)), ratio=1.0)
    with bank.attach(model), torch.no_grad():
        model(torch.randn(2, 3, 16, 32))  # [CLS, 8 patches, 3 detection tokens]
    out = bank.last
    assert out.k == 8  # only the 8 patches count
    kept = out.indices[out.mask]
    assert bool(((kept >= 1) & (kept <= 8)).all())
