"""The reference ITSELF model: shapes, one-pass encoding, selection modes, losses, similarity, local weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from attnselect.models import ITSELF, ITSELFConfig, interpolate_pos_embed

SOS, EOS = 49406, 49407


def tiny_config(**kw) -> ITSELFConfig:
    base = dict(
        backbone=None,
        embed_dim=32,
        vision_cfg={"layers": 3, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
        text_cfg={"vocab_size": 49408, "width": 32, "heads": 2, "layers": 3, "mlp_ratio": 2.0},
        image_size=(32, 16),
        context_length=12,
        quick_gelu=False,
        num_classes=5,
        local_dim=48,
        adapter_hidden=24,
        ats_total_steps=10,
    )
    base.update(kw)
    return ITSELFConfig(**base)


def make_ids(lengths, context=12, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    ids[:, 0] = SOS
    for b, n in enumerate(lengths):
        ids[b, 1 : 1 + n] = torch.randint(1, 49000, (n,), generator=g)
        ids[b, 1 + n] = EOS
    return ids


@pytest.fixture(scope="module")
def model() -> ITSELF:
    torch.manual_seed(0)
    return ITSELF(tiny_config())


def test_shapes_and_one_backbone_pass(model):
    model.eval()
    images = torch.randn(3, 3, 32, 16)
    ids = make_ids([2, 5, 9])
    calls = {"visual": 0, "text": 0}
    h1 = model.clip.visual.register_forward_hook(lambda *a: calls.__setitem__("visual", calls["visual"] + 1))
    h2 = model.clip.transformer.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    try:
        with torch.no_grad():
            ig, il = model.encode_image(images)
            tg, tl = model.encode_text(ids)
    finally:
        h1.remove()
        h2.remove()
    assert calls == {"visual": 1, "text": 1}
    assert ig.shape == (3, 32) and il.shape == (3, 48)
    assert tg.shape == (3, 32) and tl.shape == (3, 48)
    # the global embeddings are the backbone's own pooled outputs (projected CLS / EOS token)
    with torch.no_grad():
        torch.testing.assert_close(ig, model.clip.encode_image(images))
        torch.testing.assert_close(tg, model.clip.encode_text(ids))
    assert torch.isfinite(il).all() and torch.isfinite(tl).all()


def test_text_selection_excludes_sos_eos_and_padding(model):
    model.eval()
    ids = make_ids([2, 5, 10])
    with torch.no_grad():
        model.encode_text(ids)
    out = model.last_banks["text"]
    eos = ids.argmax(dim=1)
    for b in range(3):
        kept = out.indices[b][out.mask[b]]
        assert 0 not in kept.tolist() and int(eos[b]) not in kept.tolist()
        assert bool((ids[b, kept] != 0).all())  # never padding
        n_words = int((ids[b] != 0).sum()) - 2
        assert int(out.mask[b].sum()) == min(n_words, out.k)


def test_reference_inference_uses_last_layer_attention_row(model):
    """Published inference: rank tokens by the last layer's CLS row only (no rollout), k = int(n * 0.4)."""
    model.eval()
    images = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        model.encode_image(images)
    out = model.last_banks["image"]
    cap = model._captures["image"]
    last = cap.maps[model.vision_layers - 1][:, 0, :].clone()  # [B, N] CLS row
    last[:, 0] = -1
    k = int(8 * 0.4)
    assert out.k == k
    expected = last.topk(k, dim=1).indices
    assert torch.equal(out.indices.sort(dim=1).values, expected.sort(dim=1).values)


def test_selection_k_reference_vs_consistent():
    """ViT-B sizes: 192 patches and 75 selectable text positions; ATS T = 1450 as published."""
    cfg = tiny_config(
        vision_cfg={"layers": 2, "width": 16, "head_width": 8, "patch_size": 2, "mlp_ratio": 1.0},
        text_cfg={"vocab_size": 49408, "width": 16, "heads": 2, "layers": 2, "mlp_ratio": 1.0},
        embed_dim=16,
        image_size=(48, 16),  # 24 x 8 patches + CLS = 193 tokens
        context_length=77,
        ats_total_steps=1450,
        local_dim=16,
        adapter_hidden=8,
    )
    images = torch.randn(2, 3, 48, 16)
    ids = make_ids([60, 74], context=77)
    for selection, eval_k in (("reference", (76, 30)), ("consistent", (96, 37))):
        torch.manual_seed(0)
        m = ITSELF(cfg, selection=selection)
        m.train()
        m.ats.step()  # t = 1
        with torch.no_grad():
            m.encode_image(images), m.encode_text(ids)
        assert (m.last_banks["image"].k, m.last_banks["text"].k) == (124, 48)
        m.ats.set_extra_state({"step": 1450})
        with torch.no_grad():
            m.encode_image(images), m.encode_text(ids)
        assert (m.last_banks["image"].k, m.last_banks["text"].k) == (96, 37)
        m.eval()
        with torch.no_grad():
            m.encode_image(images), m.encode_text(ids)
        assert (m.last_banks["image"].k, m.last_banks["text"].k) == eval_k
        assert (m.num_kept("image", 192), m.num_kept("text", 75)) == eval_k
        assert m.ats.current_step == 1450  # encoding never advances ATS


def test_training_forward_losses(model):
    model.train()
    step = model.ats.current_step
    images = torch.randn(4, 3, 32, 16)
    ids = make_ids([3, 4, 5, 6])
    pids = torch.tensor([0, 0, 3, 3])
    out = model(images, ids, pids)
    names = {"tal_global", "cid_global", "id_global", "tal_local", "cid_local", "id_local"}
    assert set(out) == names | {"loss"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], sum(out[n] for n in names))
    model.zero_grad()
    out["loss"].backward()
    assert model.image_bank.adapter.fc.weight.grad.abs().sum() > 0
    assert model.text_bank.adapter.mlp_in.weight.grad.abs().sum() > 0
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0
    assert model.clip.logit_scale.grad is None
    assert model.ats.current_step == step  # forward never advances ATS
    model.zero_grad()
    model.eval()


def test_similarity_fusion(model):
    g = torch.Generator().manual_seed(1)
    img = (torch.randn(5, 32, generator=g), torch.randn(5, 48, generator=g))
    txt = (torch.randn(3, 32, generator=g), torch.randn(3, 48, generator=g))
    sg = F.normalize(txt[0], dim=-1) @ F.normalize(img[0], dim=-1).t()
    sl = F.normalize(txt[1], dim=-1) @ F.normalize(img[1], dim=-1).t()
    torch.testing.assert_close(model.similarity(img, txt), 0.68 * sg + 0.32 * sl)
    torch.testing.assert_close(model.similarity(img, txt, lam=1.0), sg)
    torch.testing.assert_close(model.similarity(img, txt, lam=0.0), sl)
    with pytest.raises(ValueError, match="lam"):
        model.similarity(img, txt, lam=1.5)


def test_global_only_baseline():
    m = ITSELF(tiny_config(use_local=False))
    assert m.image_bank is None and m.local_cid is None
    m.train()
    out = m(torch.randn(2, 3, 32, 16), make_ids([3, 4]), torch.tensor([0, 1]))
    assert set(out) == {"tal_global", "cid_global", "id_global", "loss"}
    m.eval()
    with torch.no_grad():
        assert m.encode_image(torch.randn(2, 3, 32, 16))[1] is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"selection": "mixed"}, "selection"),
        ({"losses": ("tal", "id")}, "cid"),
        ({"pool": "mean"}, "pool"),
        ({"lam": 2.0}, "lam"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_bad_inputs(model):
    model.eval()
    with pytest.raises(ValueError, match="images"):
        model.encode_image(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(make_ids([2], context=10))


# ------------------------------------------------------------------------------------------ local pretrained weights
def test_interpolate_pos_embed_matches_bilinear():
    pos = torch.randn(1 + 16, 6)
    out = interpolate_pos_embed(pos, (6, 2))
    assert out.shape == (13, 6)
    assert torch.equal(out[0], pos[0])
    grid = pos[1:].reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 2), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(12, 6)
    torch.testing.assert_close(out[1:], ref)
    const = torch.ones(1 + 196, 3)
    torch.testing.assert_close(interpolate_pos_embed(const, (24, 8)), torch.ones(193, 3))
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1 + 12, 3), (4, 4))


@pytest.mark.parametrize("fmt", ["state_dict", "checkpoint", "safetensors"])
def test_pretrained_local_file_interpolates_grid(tmp_path, fmt):
    torch.manual_seed(3)
    src = ITSELF(tiny_config(image_size=(32, 32), context_length=16, use_local=False))  # 4 x 4 grid, 16 positions
    sd = src.clip.state_dict()
    sd.pop("attn_mask", None)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "clip.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "clip.pt"
        payload = sd if fmt == "state_dict" else {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
        torch.save(payload, path)
    dst = ITSELF(tiny_config(image_size=(48, 16), pretrained=str(path)))  # 6 x 2 grid, 12 positions
    expected = interpolate_pos_embed(sd["visual.positional_embedding"], (6, 2))
    torch.testing.assert_close(dst.clip.visual.positional_embedding.data, expected)
    torch.testing.assert_close(dst.clip.positional_embedding.data, sd["positional_embedding"][:12])
    assert torch.equal(dst.clip.visual.conv1.weight, sd["visual.conv1.weight"])
    assert torch.equal(dst.clip.token_embedding.weight, sd["token_embedding.weight"])


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="local file"):
        ITSELF(tiny_config(pretrained=str(tmp_path / "missing.pt")))
    bad = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="shapes"):
        ITSELF(tiny_config(pretrained=str(bad)))


# ------------------------------------------------------------------------------------------ published behaviour
def published_rollout(maps: dict[int, torch.Tensor], layers=(4, 11), discard=0.25) -> torch.Tensor:
    """MARS as the published code computes it: global discard of the smallest entries except flat index 0."""
    batch, n, _ = next(iter(maps.values())).shape
    result = torch.eye(n).expand(batch, n, n)
    for layer in layers:
        flat = maps[layer].reshape(batch, -1).clone()
        idx = flat.topk(int(n * n * discard), dim=-1, largest=False).indices
        for b in range(batch):
            keep = idx[b][idx[b] != 0]
            flat[b, keep] = 0
        a = (flat.view(batch, n, n) + torch.eye(n)) / 2
        result = torch.bmm(a / a.sum(dim=-1, keepdim=True), result)
    return result


def test_training_selection_matches_published_mars_and_ats():
    """12 layers: training ranks tokens by the rollout of layers 4 and 11 (CLS row / EOS row) with the ATS k."""
    torch.manual_seed(0)
    cfg = tiny_config(
        vision_cfg={"layers": 12, "width": 16, "head_width": 8, "patch_size": 8, "mlp_ratio": 1.0},
        text_cfg={"vocab_size": 49408, "width": 16, "heads": 2, "layers": 12, "mlp_ratio": 1.0},
        embed_dim=16,
        local_dim=16,
        adapter_hidden=8,
    )
    m = ITSELF(cfg)
    m.train()
    m.ats.step()
    ids = make_ids([2, 4, 6, 9])
    with torch.no_grad():
        m.encode_image(torch.randn(4, 3, 32, 16))
        m.encode_text(ids)
    for tower, n_sel in (("image", 8), ("text", 10)):
        out, cap = m.last_banks[tower], m._captures[tower]
        assert sorted(cap.maps) == [4, 11]
        rollout = published_rollout(cap.maps)
        if tower == "image":
            rows = rollout[:, 0].clone()
            rows[:, 0] = -1
        else:
            eos = ids.argmax(dim=1)
            rows = rollout[torch.arange(4), eos].clone()
            rows[torch.arange(4), eos] = -1
            rows[:, 0] = -1
            rows = rows * (ids != 0)
        torch.testing.assert_close(out.saliency, rollout[:, 0] if tower == "image" else rollout[torch.arange(4), eos])
        k = int(n_sel * 0.65)  # ATS at t = 1
        assert out.k == k
        for b in range(4):
            n_valid = n_sel if tower == "image" else int((ids[b] != 0).sum()) - 2
            expected = rows[b].topk(k).indices[: min(n_valid, k)]
            assert sorted(out.indices[b][out.mask[b]].tolist()) == sorted(expected.tolist())


def test_similarity_is_fp32_under_autocast(model):
    """Fused scores are ranked at full precision even when called inside an autocast region."""
    g = torch.Generator().manual_seed(2)
    img = (torch.randn(6, 32, generator=g), torch.randn(6, 48, generator=g))
    txt = (torch.randn(4, 32, generator=g), torch.randn(4, 48, generator=g))
    expected = model.similarity(img, txt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.similarity(img, txt)
        got_global = model.similarity(img[0], txt[0])
    assert got.dtype == torch.float32 and got_global.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_caption_without_words_and_bad_pids(model):
    model.eval()
    ids = make_ids([0, 3])  # sample 0 is [SOS, EOS]
    with pytest.raises(ValueError, match=r"caption\(s\) \[0\] have no word token"):
        model.encode_text(ids)
    model.train()
    with pytest.raises(TypeError, match="pids must hold integer"):
        model(torch.randn(2, 3, 32, 16), make_ids([2, 3]), torch.tensor([0.0, 1.0]))
    model.eval()


def test_config_rejects_non_positive_tau():
    with pytest.raises(ValueError, match="tau"):
        tiny_config(tau=0.0)
