"""Every current ViT family: rotary hosts, variable resolution (NaFlex), CLS-free queries, several consumers per tower,
refusals that name the real reason, and hooks that survive copies, saves, partial forwards and threads.

For each family a small randomly initialised model (weights perturbed so that zero-initialised biases and norms
matter) is captured on its fused path and compared with the host's own eager softmax: timm hosts through an unfused
copy (``fused_attn=False``, the softmax recorded), HF hosts through an ``attn_implementation="eager"`` twin with
``output_attentions=True``. The host's output must be bit-identical with and without the hooks, and
``bank.attach(model)`` must select what the same bank selects from the eager maps.
"""

from __future__ import annotations

import copy
import io
import logging
import socket
import threading
from functools import partial

import pytest
import torch
from _helpers import SoftmaxRecorder as _Softmax
from torch import nn
from torch.overrides import TorchFunctionMode

import attnselect as asel
from attnselect.hooks import capture_attention

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

TOL = 1e-5
SMALL_TIMM = dict(embed_dim=64, depth=2, num_heads=4)
SMALL_HF = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("k_bias"):  # EvaAttention's zero key bias: read, not assumed
                b.add_(torch.randn(b.shape, generator=g) * 0.2)
    return model.eval()


def _record_softmax(module: nn.Module, store: dict, key) -> None:
    forward = module.forward

    def wrapped(*args, **kwargs):
        rec = _Softmax()
        with rec:
            out = forward(*args, **kwargs)
        store[key] = rec.out[-1]
        return out

    module.forward = wrapped


def _timm_eager(model: nn.Module, run, blocks: str = "blocks", pool: str | None = None) -> tuple[dict, torch.Tensor]:
    """Per-head maps of every block (and the pool probe's) from an unfused copy: the host's own eager softmax."""
    eager = copy.deepcopy(model)
    for m in eager.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    maps: dict = {}
    root = eager
    for part in blocks.split("."):
        root = getattr(root, part)
    for i, block in enumerate(root):
        _record_softmax(block.attn, maps, i)
    if pool is not None:
        module = eager
        for part in pool.split("."):
            module = getattr(module, part)
        _record_softmax(module, maps, "probe")
    with torch.no_grad():
        run(eager)
    probe = maps.pop("probe", None)
    return maps, probe


# ----------------------------------------------------------------------------------------------------- the hosts
def _naflex_batch(sizes, max_len, patch=16):
    from timm.data.naflex_dataset import NaFlexCollator
    from timm.data.naflex_transforms import patchify_image

    g = torch.Generator().manual_seed(0)
    items = []
    for h, w in sizes:
        patches, coord, valid = patchify_image(torch.randn(3, h, w, generator=g), (patch, patch))
        items.append(({"patches": patches, "patch_coord": coord, "patch_valid": valid}, 0))
    batch, _ = NaFlexCollator(max_seq_len=max_len)(items)
    batch.pop("seq_len")
    return batch


def _register_tiny_timm() -> None:
    """Small timm variants of the open_clip EVA02 and PE-Core trunks (open_clip passes no size arguments)."""
    from timm.layers import LayerNorm
    from timm.models import register_model
    from timm.models.eva import _create_eva

    if "attnselect_tiny_eva02_clip" in timm.list_models():
        return

    @register_model
    def attnselect_tiny_eva02_clip(pretrained=False, **kwargs):
        args = dict(img_size=64, patch_size=16, **SMALL_TIMM, qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
                    scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4))  # fmt: skip
        return _create_eva("eva02_base_patch16_clip_224", pretrained=pretrained, **dict(args, **kwargs))

    @register_model
    def attnselect_tiny_pe_core(pretrained=False, **kwargs):
        args = dict(img_size=64, patch_size=16, **SMALL_TIMM, global_pool="map", attn_type="rope",
                    use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                    rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=4,
                    norm_layer=partial(LayerNorm, eps=1e-5))  # fmt: skip
        return _create_eva("vit_pe_core_tiny_patch16_384", pretrained=pretrained, **dict(args, **kwargs))


def _open_clip_tower(name: str, trunk: str, pool: str):
    _register_tiny_timm()
    vision = dict(image_size=64, timm_model_name=trunk, timm_model_pretrained=False, timm_pool=pool, timm_proj=None)
    text = dict(context_length=16, vocab_size=49408, width=64, heads=4, layers=2)
    torch.manual_seed(0)
    return _perturb(open_clip.create_model(name, pretrained=None, embed_dim=32, vision_cfg=vision, text_cfg=text))


IMG64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
IMG56 = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))

#: family -> (timm model name, overrides, input, pool module path or None, default query)
TIMM_HOSTS = {
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56), IMG56, None, "cls"),
    "vit_pe_core": (
        "vit_pe_core_tiny_patch16_384", dict(img_size=64, attn_pool_num_heads=4), IMG64, "attn_pool", "cls"
    ),
    "vit_rope_axial": ("vit_small_patch16_rope_224", dict(img_size=64), IMG64, None, "cls"),
    "vit_rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=64), IMG64, None, "cls"),
    "vit_rope_reg_no_cls": ("vit_betwixt_patch16_rope_reg4_gap_256", dict(img_size=64), IMG64, None, "mean"),
    "vit_dinov3": ("vit_small_patch16_dinov3", dict(img_size=64), IMG64, None, "cls"),
    "naflexvit_rope_map": (
        "naflexvit_base_patch16_map",
        dict(rope_type="axial", class_token=False, reg_tokens=2),
        "naflex",
        "attn_pool",
        "probe",
    ),
    "naflexvit_mixed_cls": (
        "naflexvit_base_patch16_gap",
        dict(rope_type="mixed", class_token=True, reg_tokens=2),
        "naflex",
        None,
        "cls",
    ),
    "vit_map_no_cls": (
        "vit_small_patch16_224",
        dict(img_size=32, class_token=False, global_pool="map"),
        torch.randn(2, 3, 32, 32),
        "attn_pool",
        "probe",
    ),
}


def _timm_host(family: str):
    name, kw, x, pool, query = TIMM_HOSTS[family]
    torch.manual_seed(0)
    model = _perturb(timm.create_model(name, pretrained=False, **SMALL_TIMM, **kw))
    if isinstance(x, str):
        x = _naflex_batch([(64, 96), (48, 32), (80, 80)], 28)  # grids 4x6, 3x2, 5x5 padded to 28 patches
    return model, (lambda m: m(x)), pool, query


# --------------------------------------------------------------------------------------------------- the checks
def _no_hooks(model: nn.Module) -> bool:
    return all(
        not getattr(m, d) for m in model.modules() for d in ("_forward_hooks", "_forward_pre_hooks")
    )


def _eager_selection(bank, cap, eager_maps: dict, eager_probe, query):
    """What ``bank`` selects from the eager maps, given the capture's tokens and layout (what attach passes)."""
    n_tok = cap.tokens.shape[1]
    fused = {i: m.mean(dim=1) for i, m in eager_maps.items()}
    exclude = list(range(cap.num_prefix_tokens))
    kwargs = {}
    if query == "cls":
        query = 0
    if query == "probe":
        probe = eager_probe.mean(dim=1).mean(dim=1)  # heads, latents
        kwargs["probe"] = torch.cat([probe.new_zeros(probe.shape[0], n_tok - probe.shape[1]), probe], dim=1)
    if cap.valid is not None:
        kwargs["padding"] = cap.valid
    return bank(cap.tokens, fused, query=query, exclude=exclude or torch.empty(0, dtype=torch.long),
                num_layers=cap.num_layers, **kwargs)  # fmt: skip


@pytest.mark.parametrize("family", list(TIMM_HOSTS))
def test_timm_family_matches_eager_attention_and_selection(family):
    model, run, pool, query = _timm_host(family)
    with torch.no_grad():
        bare = run(model)
    eager, eager_probe = _timm_eager(model, run, pool=pool)
    with capture_attention(model, "all", head_fusion=None, probe=pool is not None) as cap, torch.no_grad():
        out = run(model)
    assert torch.equal(out, bare)  # the host's fused path is untouched
    assert sorted(cap.maps) == sorted(eager)
    for i, ref in eager.items():
        torch.testing.assert_close(cap.maps[i], ref, atol=TOL, rtol=0)
    if pool is not None:
        torch.testing.assert_close(cap.probe, eager_probe.mean(dim=1).mean(dim=1), atol=TOL, rtol=0)
    assert _no_hooks(model)
    with torch.no_grad():
        assert torch.equal(run(model), bare)  # bit-identical after removal
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 1)), ratio=0.5)
    with bank.attach(model) as handle, torch.no_grad():
        run(model)
    assert handle.query == query  # the family's default: no query= needed
    expected = _eager_selection(bank, handle.capture, eager, eager_probe, query)
    assert torch.equal(bank.last.indices, expected.indices) and torch.equal(bank.last.mask, expected.mask)
    assert _no_hooks(model)


def test_naflex_padding_metadata_and_selection():
    model, run, _, _ = _timm_host("naflexvit_rope_map")
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 1)), ratio=0.5)
    with bank.attach(model) as handle, torch.no_grad():
        run(model)
    cap = handle.capture
    assert cap.grid is None and cap.grids.tolist() == [[4, 6], [3, 2], [5, 5]]  # each sample's own grid
    assert cap.valid.sum(dim=1).tolist() == [2 + 24, 2 + 6, 2 + 25]
    out = bank.last
    assert out.k == 12  # 50 % of the most real patches any sample has (25)
    for b, real in enumerate((24, 6, 25)):
        kept = out.indices[b][out.mask[b]]
        assert len(kept) == min(12, real)
        assert ((kept >= 2) & (kept < 2 + real)).all()  # never a register token, never padding
        assert (out.saliency[b, 2 + real :] == 0).all()  # padding takes no part in the rollout


@pytest.mark.parametrize("tower", ["EVA02-B-16", "PE-Core-B-16"])
def test_open_clip_timm_towers(tower):
    eva = tower.startswith("EVA")
    trunk, pool = ("attnselect_tiny_eva02_clip", "token") if eva else ("attnselect_tiny_pe_core", "map")
    model = _open_clip_tower(tower, trunk, pool)

    def run(m):
        return m.encode_image(IMG64)

    with torch.no_grad():
        bare = run(model)
    eager, eager_probe = _timm_eager(
        model, run, blocks="visual.trunk.blocks", pool="visual.trunk.attn_pool" if pool == "map" else None
    )
    with capture_attention(model, "all", head_fusion=None) as cap, torch.no_grad():
        out = run(model)
    assert torch.equal(out, bare) and cap.family == "open_clip" and cap.cls_index == 0
    for i, ref in eager.items():
        torch.testing.assert_close(cap.maps[i], ref, atol=TOL, rtol=0)
    if pool == "token":  # the projected class token is what encode_image returns
        torch.testing.assert_close(cap.tokens[:, 0], out, atol=1e-5, rtol=0)
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 1)), ratio=0.5)
    with bank.attach(model) as handle, torch.no_grad():
        run(model)
    expected = _eager_selection(bank, handle.capture, eager, eager_probe, "cls")
    assert torch.equal(bank.last.indices, expected.indices)
    assert _no_hooks(model)
    with torch.no_grad():
        assert torch.equal(run(model), bare)


# ------------------------------------------------------------------------------------------------------ HF hosts
def _hf_twins(cls, cfg):
    torch.manual_seed(0)
    host = _perturb(cls._from_config(cfg, attn_implementation="sdpa"))
    eager = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    eager.load_state_dict(host.state_dict())
    return host, eager


def _siglip2_inputs(shapes, length=12, patch=4):
    shapes = torch.tensor(shapes)
    valid = torch.arange(length)[None] < shapes.prod(-1)[:, None]
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(len(shapes), length, 3 * patch * patch, generator=g) * valid[..., None]
    return dict(pixel_values=pixels, pixel_attention_mask=valid.long(), spatial_shapes=shapes)


HF_HOSTS = {
    "dinov3": (lambda: (transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig(**SMALL_HF, patch_size=8,
               image_size=32, num_register_tokens=4)), dict(pixel_values=torch.randn(2, 3, 32, 48)), "cls"),
    "siglip2_fixed": (lambda: (transformers.Siglip2VisionModel, transformers.Siglip2VisionConfig(**SMALL_HF,
                      patch_size=4, num_patches=16)), _siglip2_inputs([[3, 4], [3, 4]]), "probe"),
    "siglip2_naflex": (lambda: (transformers.Siglip2VisionModel, transformers.Siglip2VisionConfig(**SMALL_HF,
                       patch_size=4, num_patches=16)), _siglip2_inputs([[3, 4], [2, 3], [5, 2]]), "probe"),
    "aimv2": (lambda: (transformers.Aimv2VisionModel, transformers.Aimv2VisionConfig(**SMALL_HF, patch_size=8,
              image_size=32, use_head=True)), dict(pixel_values=torch.randn(2, 3, 32, 32)), "probe"),
    "mlcd": (lambda: (transformers.MLCDVisionModel, transformers.MLCDVisionConfig(**SMALL_HF, patch_size=8,
             image_size=32)), dict(pixel_values=torch.randn(2, 3, 32, 32)), "cls"),
    "siglip": (lambda: (transformers.SiglipVisionModel, transformers.SiglipVisionConfig(**SMALL_HF, patch_size=8,
               image_size=32)), dict(pixel_values=torch.randn(2, 3, 32, 32)), "probe"),
}  # fmt: skip


def _hf_eager_probe(host, eager, inputs):
    """The eager twin's pooling probe attention ``[B,H,1,N]``: SigLIP's MHA weights, AIMv2's explicit softmax."""
    store: dict = {}
    head = eager.head
    if hasattr(head, "attention"):  # nn.MultiheadAttention: its own averaged weights
        def hook(mod, args, kwargs, out):
            store["probe"] = out[1].unsqueeze(1)  # [B,1,N] averaged over heads -> [B,1,1,N]

        handle = head.attention.register_forward_hook(hook, with_kwargs=True)
        with torch.no_grad():
            eager(**inputs)
        handle.remove()
        return store["probe"]

    class _Sdpa(TorchFunctionMode):  # AIMv2's head calls SDPA: its probabilities from the exact q and k it gets
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                q, k = args[0], args[1]
                store["probe"] = ((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
            return func(*args, **kwargs)

    forward = head.forward
    with torch.no_grad(), _Sdpa():
        forward(eager(**inputs, output_hidden_states=True).last_hidden_state)
    return store["probe"]


@pytest.mark.parametrize("family", list(HF_HOSTS))
def test_hf_family_matches_eager_attention_and_selection(family):
    build, inputs, query = HF_HOSTS[family]
    host, eager = _hf_twins(*build())
    with torch.no_grad():
        bare = host(**inputs).last_hidden_state
    with capture_attention(host, "all", head_fusion=None, probe=query == "probe") as cap, torch.no_grad():
        out = host(**inputs).last_hidden_state
        ref = eager(**inputs, output_attentions=True).attentions
    assert torch.equal(out, bare)
    for i, r in enumerate(ref):
        torch.testing.assert_close(cap.maps[i], r.float(), atol=TOL, rtol=0)
    eager_probe = _hf_eager_probe(host, eager, inputs) if query == "probe" else None
    if eager_probe is not None:
        torch.testing.assert_close(cap.probe, eager_probe.mean(dim=1).mean(dim=1), atol=TOL, rtol=0)
    assert _no_hooks(host)
    with torch.no_grad():
        assert torch.equal(host(**inputs).last_hidden_state, bare)
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 1)), ratio=0.5)
    with bank.attach(host) as handle, torch.no_grad():
        host(**inputs)
    assert handle.query == query
    eager_maps = {i: r.float() for i, r in enumerate(ref)}
    expected = _eager_selection(bank, handle.capture, eager_maps, eager_probe, query)
    assert torch.equal(bank.last.indices, expected.indices) and torch.equal(bank.last.mask, expected.mask)


def test_dinov3_layout_and_siglip2_grids():
    build, inputs, _ = HF_HOSTS["dinov3"]
    host, _ = _hf_twins(*build())
    with capture_attention(host, -1) as cap, torch.no_grad():
        host(**inputs)
    # the model itself, not its encoder (its base_model): CLS + 4 registers, the grid of a 32 x 48 image
    assert (cap.cls_index, cap.num_prefix_tokens, cap.grid) == (0, 5, (4, 6))
    build, inputs, _ = HF_HOSTS["siglip2_naflex"]
    host, _ = _hf_twins(*build())
    with capture_attention(host, -1) as cap, torch.no_grad():
        host(**inputs)
    assert cap.grid is None and cap.grids.tolist() == [[3, 4], [2, 3], [5, 2]]
    assert cap.valid.sum(dim=1).tolist() == [12, 6, 10]


def test_aimv2_text_tower_is_text():
    cfg = transformers.Aimv2TextConfig(**SMALL_HF, vocab_size=100, eos_token_id=99)
    model = transformers.Aimv2TextModel(cfg).eval()
    ids = torch.tensor([[5, 6, 99, 0], [5, 99, 0, 0]])
    with capture_attention(model, -1) as cap, torch.no_grad():
        model(input_ids=ids)
    assert cap.tower == "text" and cap.eos_index.tolist() == [2, 1]


# --------------------------------------------------------------------------------------------- CLS-free queries
def test_position_query_on_a_tower_without_cls_keeps_the_patch_and_says_so(caplog):
    model, run, _, _ = _timm_host("vit_rope_reg_no_cls")
    bank = asel.AttentiveBank(ratio=0.9)
    with caplog.at_level(logging.WARNING, logger="attnselect"):
        with bank.attach(model, query=4) as handle, torch.no_grad():
            run(model)
    assert "no class token" in caplog.text and "stays selectable" in caplog.text
    assert handle.capture.num_prefix_tokens == 4
    assert (bank.last.indices == 4).any(dim=1).all()  # patch 0 (position 4) is not excluded
    assert not (bank.last.indices < 4).any()  # the registers are


def test_query_modes_mean_and_probe_on_the_rollout():
    g = torch.Generator().manual_seed(0)
    maps = [torch.softmax(torch.randn(2, 3, 7, 7, generator=g), -1) for _ in range(2)]
    mars = asel.MultiLayerRollout(layers=(0, 1))
    full = mars(maps)
    torch.testing.assert_close(mars(maps, query="mean"), full.mean(dim=1))
    probe = torch.softmax(torch.randn(2, 7, generator=g), -1)
    torch.testing.assert_close(mars(maps, query="probe", probe=probe), torch.einsum("bq,bqn->bn", probe, full))
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    padded = mars(maps, query="mean", valid=valid)
    sub = mars([m[1:, :, :5, :5] for m in maps], query="mean")
    torch.testing.assert_close(padded[1, :5], sub[0])
    assert (padded[1, 5:] == 0).all()
    with pytest.raises(ValueError, match="probe"):
        mars(maps, query="probe")
    with pytest.raises(ValueError, match="query"):
        mars(maps, query="middle")
    with pytest.raises(ValueError, match="padding position"):
        mars(maps, query=6, valid=valid)


# ------------------------------------------------------------------------------------------ several consumers
def _tiny_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0)
    return VisionTransformer(**{**cfg, **kw}).eval()


def test_several_banks_and_a_capture_share_one_tower():
    vit = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        bare = vit(x)
    a = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(1, 3)), ratio=0.5)
    b = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 2), discard_ratio=0.5, head_fusion="max"),
                           ratio=0.25)  # fmt: skip
    ha, hb = a.attach(vit), b.attach(vit)
    cap = capture_attention(vit, [2], head_fusion=None)
    layer_hooks = [len(blk.attn._forward_hooks) for blk in vit.blocks]
    assert layer_hooks == [1, 1, 1, 1]  # the union of the layers, hooked once
    with torch.no_grad():
        assert torch.equal(vit(x), bare)
    # each consumer gets its own maps, equal to what it gets alone
    alone = {}
    for name, bank in (("a", a), ("b", b)):
        solo = copy.deepcopy(vit)
        twin = copy.deepcopy(bank)
        with twin.attach(solo), torch.no_grad():
            solo(x)
        alone[name] = twin.last
    assert torch.equal(a.last.indices, alone["a"].indices) and torch.equal(b.last.indices, alone["b"].indices)
    assert sorted(cap.maps) == [2] and cap.maps[2].dim() == 4
    hb.remove()  # detaching one consumer leaves the others working
    assert [len(blk.attn._forward_hooks) for blk in vit.blocks] == [0, 1, 1, 1]
    a.last = None
    with torch.no_grad():
        vit(x)
    assert a.last is not None and torch.equal(a.last.indices, alone["a"].indices)
    with pytest.raises(RuntimeError, match="already attached"):
        a.attach(vit)
    ha.remove()
    cap.remove()
    assert _no_hooks(vit)


# ------------------------------------------------------------------------------------------------- refusals
REFUSALS = {
    "swin": (lambda: transformers.SwinModel(transformers.SwinConfig(image_size=16, patch_size=4, embed_dim=16,
             depths=[2], num_heads=[2], window_size=2)), "local windows"),
    "swinv2": (lambda: transformers.Swinv2Model(transformers.Swinv2Config(image_size=16, patch_size=4, embed_dim=16,
               depths=[2], num_heads=[2], window_size=2)), "local windows"),
    "hiera": (lambda: transformers.HieraModel(transformers.HieraConfig(embed_dim=8, image_size=[64, 64],
              patch_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3], depths=[1, 1], num_heads=[1, 1],
              query_stride=[2, 2], masked_unit_size=[8, 8], num_query_pool=1)), "mask units"),
    "sam": (lambda: transformers.SamVisionModel(transformers.SamVisionConfig(hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, image_size=32, patch_size=8, output_channels=8, window_size=2,
            global_attn_indexes=[1], mlp_dim=32)), "SAM / ViTDet"),
    "timm_swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
                  depths=(1, 1), num_heads=(1, 1), img_size=56), "local windows"),
    "groupvit": (lambda: transformers.GroupViTVisionModel(transformers.GroupViTVisionConfig(hidden_size=16,
                 intermediate_size=32, depths=[1, 1], num_group_tokens=[4, 0], num_output_groups=[4, 4],
                 num_attention_heads=2, image_size=16, patch_size=8)), "GroupViT"),
    "resnet_hf": (lambda: transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                  depths=[1, 1])), "convolutional network"),
    "resnet_timm": (lambda: timm.create_model("resnet18", pretrained=False), "convolutional network"),
}  # fmt: skip


@pytest.mark.parametrize("family", list(REFUSALS))
def test_windowed_hierarchical_and_convolutional_towers_are_refused_for_the_right_reason(family):
    build, reason = REFUSALS[family]
    model = build().eval()
    with pytest.raises(TypeError) as info:
        capture_attention(model, -1)
    message = str(info.value)
    assert reason in message and "Supported" in message
    assert "query=" not in message
    if family.startswith("resnet"):
        assert "GroupViT" not in message
    with pytest.raises(TypeError):
        asel.AttentiveBank().attach(model)
    assert _no_hooks(model)


def test_unknown_rotary_attention_is_refused():
    class RotaryAttention(nn.Module):  # a rotary module of a library attnselect does not know
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="rotary position embeddings"):
        capture_attention(nn.ModuleList([RotaryAttention(), RotaryAttention()]), 0)


# --------------------------------------------------------------------------------- what users do to models
def test_copies_of_an_attached_host_run_without_hooks():
    vit = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        bare = vit(x)
    bank = asel.AttentiveBank(ratio=0.5)
    handle = bank.attach(vit)
    copies = {"deepcopy": copy.deepcopy(vit), "ema": torch.optim.swa_utils.AveragedModel(vit)}
    buffer = io.BytesIO()
    torch.save(vit, buffer)  # pickles: the copy's hooks are inert
    buffer.seek(0)
    copies["torch.load"] = torch.load(buffer, weights_only=False)
    bank.last = None
    for name, host in copies.items():
        with torch.no_grad():
            assert torch.equal(host(x), bare), name
        assert bank.last is None  # the copy's forward does not feed the original's bank
    handle.remove()
    for host in copies.values():  # still fine after the original's hooks are gone
        with torch.no_grad():
            assert torch.equal(host(x), bare)
    attached_again = asel.AttentiveBank(ratio=0.5)
    with attached_again.attach(copies["deepcopy"]), torch.no_grad():
        copies["deepcopy"](x)
    assert attached_again.last is not None
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(handle.capture)


def test_nested_tensor_fast_path_gives_correct_maps():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2).eval()
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    padding[1, 5:] = True
    cap = capture_attention(enc, "all")
    with torch.no_grad():  # eval + no grad + a padding mask: the nested-tensor fast path
        fast_out = enc(x, src_key_padding_mask=padding)
    fast = {i: m.clone() for i, m in cap.maps.items()}
    enc.train()  # the regular path (dropout is 0), as the reference
    enc(x, src_key_padding_mask=padding)
    enc.eval()
    real = ~padding
    assert cap.valid is not None and torch.equal(cap.valid, real)
    for i in fast:
        assert fast[i].shape == (3, 6, 6)
        for b in range(3):
            rows = real[b]
            torch.testing.assert_close(fast[i][b][rows][:, rows], cap.maps[i][b][rows][:, rows], atol=1e-6, rtol=0)
            assert (fast[i][b][~rows] == 0).all() and (fast[i][b][:, ~rows] == 0).all()
    cap.remove()
    with torch.no_grad():
        assert torch.equal(enc(x, src_key_padding_mask=padding), fast_out)


def test_partial_forward_never_leaves_a_stale_selection():
    vit = _tiny_vit()
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 1)), ratio=0.5)
    with bank.attach(vit) as handle, torch.no_grad():
        vit(torch.randn(2, 3, 32, 32))
        assert bank.last is not None
        vit.forward_intermediates(torch.randn(2, 3, 32, 32), indices=[1], stop_early=True, intermediates_only=True)
        assert bank.last is None  # the tower never reached its end: no selection, not the previous batch's
        assert handle.capture.tokens is None and not handle.capture.finished


def test_two_threads_through_one_attached_host_raise_a_clear_error():
    vit = _tiny_vit()
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 1, 2, 3)), ratio=0.5)
    handle = bank.attach(vit)
    barrier = threading.Barrier(2, timeout=20)
    # both forwards have started (the start hook is on the patch embedding) before either runs a block
    def wait(module, args):
        barrier.wait()

    hold = vit.blocks[0].register_forward_pre_hook(wait)
    errors: list[BaseException] = []

    def run():
        try:
            with torch.no_grad():
                vit(torch.randn(2, 3, 32, 32))
        except BaseException as err:  # collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    hold.remove()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "another thread" in str(errors[0]) and "copy" in str(errors[0])
    with torch.no_grad():  # one thread at a time works
        vit(torch.randn(2, 3, 32, 32))
    assert bank.last is not None
    handle.remove()


def test_metadata_read_after_the_with_block_stays_valid():
    from attnselect import viz

    vit = _tiny_vit(img_size=(32, 16))
    bank = asel.AttentiveBank(ratio=0.4)
    images = torch.randn(2, 3, 32, 16)
    with bank.attach(vit) as handle, torch.no_grad():
        vit(images)
    out, cap = bank.last, handle.capture
    assert cap.grid == (4, 2) and cap.num_prefix_tokens == 1 and cap.tokens is not None
    fig = viz.plot_saliency(images[0], out.saliency, grid=cap.grid, num_prefix_tokens=cap.num_prefix_tokens)
    assert fig is not None


# ------------------------------------------------------------------------------------------------ no download
@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_hub_towers_are_refused_without_a_connection(no_network, tmp_path):
    from attnselect.cli import main as cli_main
    from attnselect.models import ITSELFConfig, build_clip

    with pytest.raises(ValueError, match="never downloads"):
        build_clip(ITSELFConfig(backbone="xlm-roberta-base-ViT-B-32"))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    code = cli_main(["inspect", "open_clip:xlm-roberta-base-ViT-B-32", str(image), "--out", str(tmp_path / "o.png")])
    assert code != 0
    assert no_network == []  # not one connection attempt
    # a bundled-config model builds with no connection at all
    build_clip(ITSELFConfig(backbone=None, embed_dim=16, image_size=(32, 16), context_length=8, num_classes=2,
                            vision_cfg={"layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
                            text_cfg={"vocab_size": 100, "width": 16, "heads": 2, "layers": 1}))  # fmt: skip
    assert no_network == []


def test_open_clip_hf_text_tower_names_what_to_capture():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)  # fmt: skip
    from open_clip.hf_model import HFTextEncoder

    text = HFTextEncoder("bert-base-uncased", output_dim=16, config=cfg, pooler_type="cls_pooler", proj_type="linear")
    vision = dict(layers=1, width=16, head_width=8, patch_size=8, image_size=16)
    model = open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=vision, text_cfg=dict(context_length=8, vocab_size=64))
    model.text = text
    with pytest.raises(TypeError, match=r"model\.text\.transformer"):
        capture_attention(model, -1, tower="text")
    with capture_attention(text.transformer, -1) as cap, torch.no_grad():  # the wrapped model itself works
        text.transformer(input_ids=torch.tensor([[1, 5, 7, 2]]))
    assert cap.maps[0].shape == (1, 4, 4)
