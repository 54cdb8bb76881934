"""``attnselect.prune``: token pruning inside an unmodified host's forward.

Every host family is checked against a reference that drops the same tokens by hand: it records the tokens entering
the first block and the keywords each block gets (rotary tables) from an unpruned run, then runs the blocks of an eager
copy (timm ``fused_attn=False``, HF ``attn_implementation="eager"``) one sample at a time, choosing the kept tokens
itself from that copy's attention (the class token's row, or the mean over rows, of the block before each cut),
gathering each sample's rotary rows by plain indexing. The pruned host's last block output must match it within 1e-5
and its kept positions must equal the reference's.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _helpers import SoftmaxRecorder as _Softmax
from _helpers import benchmark_module as _benchmark_module
from torch import nn

import attnselect as asel
from attnselect.pruning import _kept_count, default_layers, prune_flops

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

SMALL_TIMM = dict(embed_dim=64, depth=4, num_heads=4)
SMALL_HF = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _perturb(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    from attnselect.hooks import resolve_tower
    from attnselect.hooks.capture import find_blocks

    return find_blocks(resolve_tower(model).layers_root)


def _record_unpruned(model: nn.Module, run) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
    """The tokens entering block 0, the keywords of every block call, and the last block's output."""
    blocks = [b for b, _ in _blocks(model)]
    store: dict = {"kwargs": [None] * len(blocks)}

    def pre(i):
        def hook(module, args, kwargs):
            if i == 0:
                store["x0"] = args[0] if args else next(iter(kwargs.values()))
            store["kwargs"][i] = (tuple(args[1:]), dict(kwargs))

        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(lambda m, a, o: store.__setitem__("last", o)))
    with torch.no_grad():
        run(model)
    for h in handles:
        h.remove()
    last = store["last"][0] if isinstance(store["last"], tuple) else store["last"]
    return store["x0"], store["kwargs"], last


def _gathered(value, patches: torch.Tensor):
    """A rotary table (or HF (cos, sin)) over the patches, rows picked by plain indexing for one sample."""
    if isinstance(value, tuple):
        return tuple(_gathered(v, patches) for v in value)
    if value.dim() == 2:  # [N, D]
        return value[patches].unsqueeze(0).unsqueeze(0)
    if value.dim() == 3:  # [H, N, D] (mixed RoPE)
        return value[:, patches].unsqueeze(0)
    return value[:, :, patches]


def _spy_attention(attention: nn.Module) -> _Softmax:
    """Record the per-head probabilities the attention module computes (``nn.MultiheadAttention``: its weights)."""
    rec = _Softmax()
    forward = attention.forward
    if isinstance(attention, nn.MultiheadAttention):

        def spy(*a, **kw):
            out = forward(*a, **{**kw, "need_weights": True, "average_attn_weights": False})
            rec.out.append(out[1].float())
            return out
    else:

        def spy(*a, **kw):
            with rec:
                return forward(*a, **kw)

    attention.forward = spy
    return rec


def _reference(eager_blocks, x0, kwargs, layers, keep, prefix, has_cls, rope_key):
    """Drop tokens by hand, one sample at a time, through the eager copy's blocks."""
    outs, kept_all = [], []
    for b in range(x0.shape[0]):
        x = x0[b : b + 1]
        positions = torch.arange(x.shape[1])
        kept = []
        saliency = None
        for i, (block, attention) in enumerate(eager_blocks):
            if i in layers:
                droppable = x.shape[1] - prefix
                k = _kept_count(keep, droppable)
                top = saliency[prefix:].topk(k).indices.sort().values + prefix
                index = torch.cat([torch.arange(prefix), top])
                x, positions = x[:, index], positions[index]
                kept.append(positions)
            rest, call = kwargs[i]
            call = dict(call)
            if rope_key in call and call[rope_key] is not None and positions.shape[0] < x0.shape[1]:
                call[rope_key] = _gathered(call[rope_key], positions[prefix:] - prefix)
            rec = _spy_attention(attention)
            with torch.no_grad():
                y = block(x, *rest, **call)
            del attention.forward
            x = y[0] if isinstance(y, tuple) else y
            probs = rec.out[-1][0].mean(dim=0)  # [N, N], heads averaged
            saliency = probs[0] if has_cls else probs.mean(dim=0)
        outs.append(x)
        kept_all.append(kept)
    kept = [torch.stack([kept_all[b][j] for b in range(len(kept_all))]) for j in range(len(layers))]
    return torch.cat(outs), kept


def _eager_timm(model):
    eager = copy.deepcopy(model)
    for m in eager.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return eager


def _eager_hf(model, cls, cfg):
    eager = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    return eager


def _timm(name, **kw):
    torch.manual_seed(0)
    model = _perturb(timm.create_model(name, pretrained=False, **SMALL_TIMM, **kw))
    return model, (lambda m: m(IMG)), _eager_timm(model), "rope"


def _hf(cls, cfg):
    torch.manual_seed(0)
    model = _perturb(cls._from_config(cfg, attn_implementation="sdpa"))
    return model, (lambda m: m(pixel_values=IMG)), _eager_hf(model, cls, cfg), "position_embeddings"


def _open_clip():
    torch.manual_seed(0)
    model = _perturb(open_clip.CLIP(
        embed_dim=32, vision_cfg=dict(layers=4, width=64, head_width=16, patch_size=8, image_size=32),
        text_cfg=dict(context_length=12, vocab_size=49408, width=64, heads=4, layers=2),
    ))  # fmt: skip
    return model, (lambda m: m.encode_image(IMG)), model, "rope"


HOSTS = {
    "timm_vit": lambda: _timm("vit_small_patch16_224", img_size=32, patch_size=8),
    "timm_vit_registers": lambda: _timm("vit_small_patch16_224", img_size=32, patch_size=8, reg_tokens=2),
    "timm_eva02": lambda: _timm("eva02_tiny_patch14_224", img_size=32, patch_size=8),
    "timm_rope_mixed": lambda: _timm("vit_small_patch16_rope_mixed_224", img_size=32, patch_size=8),
    "timm_dinov3": lambda: _timm("vit_small_patch16_dinov3", img_size=32, patch_size=8),
    "hf_vit": lambda: _hf(transformers.ViTModel, transformers.ViTConfig(**SMALL_HF, image_size=32, patch_size=8)),
    "hf_clip_vision": lambda: _hf(
        transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**SMALL_HF, image_size=32, patch_size=8)
    ),
    "hf_siglip": lambda: _hf(
        transformers.SiglipVisionModel, transformers.SiglipVisionConfig(**SMALL_HF, image_size=32, patch_size=8)
    ),
    "hf_dinov2": lambda: _hf(
        transformers.Dinov2Model, transformers.Dinov2Config(**SMALL_HF, image_size=32, patch_size=8)
    ),
    "hf_dinov3": lambda: _hf(
        transformers.DINOv3ViTModel,
        transformers.DINOv3ViTConfig(**SMALL_HF, image_size=32, patch_size=8, num_register_tokens=2),
    ),
    "open_clip": _open_clip,
}


@pytest.mark.parametrize("family", list(HOSTS))
@pytest.mark.parametrize("signal", ["cls", "mean"])
def test_each_family_matches_dropping_the_same_tokens_by_hand(family, signal):
    model, run, eager, rope_key = HOSTS[family]()
    x0, kwargs, _ = _record_unpruned(model, run)
    with torch.no_grad():
        bare = run(model)
    layers, keep = (1, 2), 0.5
    with asel.prune(model, keep=keep, layers=layers, signal=signal) as handle:
        pruned_x0, _, pruned_last = _record_unpruned(model, run)
        with torch.no_grad():
            pruned_out = run(model)
        kept = handle.kept
        prefix, has_cls = handle.num_prefix_tokens, handle._pruner.query is not None
    assert torch.equal(pruned_x0, x0)  # the cut happens after the first block's input
    assert type(pruned_out) is type(bare)
    if isinstance(bare, torch.Tensor):
        assert pruned_out.shape == bare.shape  # pooled outputs keep their shape
    eager_blocks = _blocks(eager)
    use_cls = signal == "cls" and has_cls
    ref_last, ref_kept = _reference(eager_blocks, x0, kwargs, layers, keep, prefix, use_cls, rope_key)
    for got, want in zip(kept, ref_kept):
        assert torch.equal(got, want)
    torch.testing.assert_close(pruned_last, ref_last, atol=1e-5, rtol=0)
    # every kept list: the prefix first, then patches in ascending order
    assert all((k[:, :prefix] == torch.arange(prefix)).all() for k in kept)
    assert all((k[:, prefix:].diff(dim=1) > 0).all() for k in kept)
    with torch.no_grad():  # removal restores the host bit for bit
        assert torch.equal(run(model), bare) if isinstance(bare, torch.Tensor) else True


def test_remove_restores_the_host_bit_identically_and_leaves_no_hook():
    model, run, _, _ = HOSTS["timm_eva02"]()
    with torch.no_grad():
        bare = run(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = asel.prune(model, keep=0.5)
    with torch.no_grad():
        assert not torch.equal(run(model), bare)
    handle.remove()
    handle.remove()  # idempotent
    with torch.no_grad():
        assert torch.equal(run(model), bare)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_rollout_signal_and_batch_size_one():
    model, _, eager, _ = HOSTS["timm_vit"]()
    x = IMG[:1]
    with asel.prune(model, keep=0.5, layers=(2,), signal="rollout") as handle, torch.no_grad():
        model(x)
    # the reference: the CLS row of (A1_hat @ A0_hat) from the eager copy's maps
    maps = []
    for _block, attention in _blocks(eager):
        forward = attention.forward
        rec = _Softmax()

        def spy(*a, _f=forward, _r=rec, **kw):
            with _r:
                return _f(*a, **kw)

        attention.forward = spy
        maps.append(rec)
    with torch.no_grad():
        eager(x)
    a0, a1 = (asel.functional.residual_normalize(r.out[-1].mean(dim=1)) for r in maps[:2])
    saliency = (a1 @ a0)[0, 0]
    k = _kept_count(0.5, 16)
    want = torch.cat([torch.tensor([0]), saliency[1:].topk(k).indices.sort().values + 1])
    assert torch.equal(handle.kept[0][0], want)


def test_merge_fuses_the_dropped_tokens_weighted_by_saliency():
    model, run, eager, _ = HOSTS["timm_vit"]()
    x0, _, _ = _record_unpruned(model, run)
    seen = {}
    block = _blocks(model)[1][0]
    with asel.prune(model, keep=0.25, layers=(1,), merge=True) as handle, torch.no_grad():
        # registered after the pruning hooks: sees what block 1 gets
        h = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        run(model)
    h.remove()
    kept = handle.kept[0]
    assert (kept[:, -1] == -1).all() and kept.shape[1] == 1 + 4 + 1
    # the fused token: the saliency-weighted mean of the dropped tokens entering block 1
    attention = _blocks(eager)[0][1]
    rec = _Softmax()
    forward = attention.forward

    def spy(*a, **kw):
        with rec:
            return forward(*a, **kw)

    attention.forward = spy
    with torch.no_grad():
        tokens = _blocks(eager)[0][0](x0)
    saliency = rec.out[-1].mean(dim=1)[:, 0]  # [B, N]
    dropped = torch.ones_like(saliency, dtype=torch.bool)
    dropped.scatter_(1, kept[:, :-1], False)
    w = saliency * dropped
    fused = (tokens * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(seen["x"][:, -1], fused, atol=1e-5, rtol=0)


def test_bad_input_names_the_argument():
    model, _, _, _ = HOSTS["timm_vit"]()
    for kwargs, error, match in [
        (dict(keep=0.0), ValueError, "keep"),
        (dict(keep=1.5), ValueError, "keep"),
        (dict(keep=[0.5], layers=(1, 2)), ValueError, "one per layer"),
        (dict(keep=0.5, layers=(0,)), ValueError, "out of range"),
        (dict(keep=0.5, layers=(4,)), ValueError, "out of range"),
        (dict(keep=0.5, layers=(2, 1)), ValueError, "ascending"),
        (dict(keep=0.5, layers=(1, 1)), ValueError, "ascending"),
        (dict(keep=0.5, flops=0.5), ValueError, "not both"),
        (dict(flops=0.01, layers=(1,)), ValueError, "flops"),
        (dict(signal="attention"), ValueError, "signal"),
        (dict(layers=3), TypeError, "layers"),
    ]:
        with pytest.raises(error, match=match):
            asel.prune(model, **kwargs)
    handle = asel.prune(model, keep=0.5)
    with pytest.raises(RuntimeError, match="already pruned"):
        asel.prune(model, keep=0.5)
    handle.remove()
    asel.prune(model, keep=0.5).remove()  # prunable again
    eva, _, _, _ = HOSTS["timm_eva02"]()
    with pytest.raises(ValueError, match="rotary"):
        asel.prune(eva, merge=True)


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: transformers.SwinModel(transformers.SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[2],
                                                                num_heads=[2], window_size=2)), "local windows"),
        (lambda: transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
            patch_size=8, use_relative_position_bias=True)), "relative position bias"),
        (lambda: transformers.MLCDVisionModel(transformers.MLCDVisionConfig(**SMALL_HF, image_size=32, patch_size=8)),
         "MLCD"),
    ],
)  # fmt: skip
def test_hosts_that_cannot_be_pruned_are_refused_naming_the_block(build, reason):
    model = build().eval()
    with pytest.raises(TypeError, match=reason) as info:
        asel.prune(model, keep=0.5, layers=(1,))
    assert "block" in str(info.value) or "windows" in str(info.value)


def test_flops_target_and_default_schedule():
    # one ViT-B/16 block on n tokens: 4 n D^2 projections, 2 n^2 D attention, 2 n D M MLP multiply-adds, x2 FLOPs
    d, m = 768, 3072
    one = 2 * (4 * 197 * d * d + 2 * 197 * 197 * d + 2 * 197 * d * m)
    pruned, full = prune_flops(197, 1, 12, d, m, (3, 6, 9), (0.7, 0.7, 0.7))
    assert full == 12 * one
    counts = [197] * 3 + [1 + 137] * 3 + [1 + 96] * 3 + [1 + 67] * 3  # floor(0.7 n + 0.5) at each cut
    assert pruned == sum(2 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m) for n in counts)
    assert default_layers(12) == (3, 6, 9)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=224, patch_size=16, embed_dim=96, depth=12,
                                                           num_heads=2).eval()  # fmt: skip
    handle = asel.prune(vit, flops=0.6)
    got, want = handle.flops(197)
    assert handle.layers == (3, 6, 9) and math.isclose(got / want, 0.6, abs_tol=0.02)
    handle.remove()
    handle = asel.prune(vit)  # the documented default schedule
    assert handle.layers == (3, 6, 9) and handle.keep == (asel.pruning.DEFAULT_KEEP,) * 3
    handle.remove()


def test_pruning_composes_with_attach():
    model, run, _, _ = HOSTS["timm_vit"]()
    bank = asel.AttentiveBank(rollout=asel.MultiLayerRollout(layers=(0, 3)), ratio=0.5)
    with asel.prune(model, keep=0.5, layers=(1, 2)) as handle, bank.attach(model) as attached, torch.no_grad():
        run(model)
    final = handle.kept[-1]
    out = bank.last
    assert out.saliency.shape == (2, 17)  # over the host's input sequence (0 at pruned tokens)
    for b in range(2):  # the kept tokens are survivors, named by their positions in the input sequence
        assert set(out.indices[b].tolist()) <= set(final[b, 1:].tolist())
    # the same selection by hand: maps restricted to the survivors, the bank run on them
    cap = attached.capture
    maps = {}
    for layer, m in cap.maps.items():
        current = handle.positions_at(layer)
        current = torch.arange(17).expand(2, 17) if current is None else current
        where = torch.stack([torch.tensor([current[b].tolist().index(p) for p in final[b].tolist()]) for b in range(2)])
        maps[layer] = torch.stack([m[b][where[b]][:, where[b]] for b in range(2)])
    direct = bank(cap.tokens, maps, query=0, exclude=[0], num_layers=cap.num_layers)
    assert torch.equal(out.indices, final.gather(1, direct.indices))


def test_pruned_host_compiles():
    model, run, _, _ = HOSTS["timm_vit"]()
    with asel.prune(model, keep=0.5, layers=(1, 2)) as handle:
        with torch.no_grad():
            eager_out = run(model)
            eager_kept = [k.clone() for k in handle.kept]
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            out = compiled(IMG)
        torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=0)
        assert all(torch.equal(a, b) for a, b in zip(handle.kept, eager_kept))
    torch._dynamo.reset()


def test_pruning_saves_the_flops_it_reports():
    vit = timm.models.vision_transformer.VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=8,
                                                           num_heads=4).eval()  # fmt: skip
    seen = []
    with asel.prune(vit, keep=0.5, layers=(2, 4, 6)) as handle, torch.no_grad():
        # registered after the pruning hooks: each sees the tokens its block really gets
        hooks = [blk.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for blk in vit.blocks]
        vit(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert seen == [65, 65, 33, 33, 17, 17, 9, 9]
    pruned, full = handle.flops(65)
    assert pruned < 0.5 * full


# ------------------------------------------------------------------------------------------ the ToMe-style baseline
def test_tome_baseline_follows_the_paper():
    baselines = _benchmark_module("baselines")
    # bipartite matching: A = even positions, B = odd; each A token's best B match; the r strongest edges merge; the
    # class token (position 0) never does
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    unmerged, merged, dst = baselines.bipartite_soft_matching(metric, r=1)
    assert merged.tolist() == [[1]] and dst.tolist() == [[1]]  # A1 (position 2) merges into B1 (position 3)
    assert unmerged[0].tolist() == [0, 2]  # in order: the class token stays first
    x = torch.arange(12.0).view(1, 6, 2)
    size = torch.ones(1, 6, 1)
    merged_x, merged_size = baselines.merge_weighted(x, size, unmerged, merged, dst)
    assert merged_x.shape == (1, 5, 2) and merged_size.sum() == 6  # sizes add
    torch.testing.assert_close((merged_x * merged_size).sum(1), x.sum(1))  # size-weighted averages
    # with nothing to merge the baseline is the host itself; with merges, the token counts of the pruning schedule
    model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4,
                                                             num_heads=2).eval()  # fmt: skip
    with torch.no_grad():
        assert torch.equal(baselines.tome_vit_forward(model, IMG, {}), model(IMG))
    bench = _benchmark_module("bench_prune")
    remove = bench.tome_schedule(17, 1, 4, (1, 2), (0.5, 0.5))
    assert remove == {0: 8, 1: 4}
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        baselines.tome_vit_forward(model, IMG, remove)
    for h in hooks:
        h.remove()
    # the blocks are called through their parts (norm1, attn, mlp) here, so count through the MLP inputs instead
    counts = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        baselines.tome_vit_forward(model, IMG, remove)
    for h in hooks:
        h.remove()
    assert counts == [9, 5, 5, 5]  # 17 -> 9 after block 0 -> 5 after block 1, as prune's cuts at blocks 1 and 2


def test_prune_benchmark_runs(tmp_path):
    bench = _benchmark_module("bench_prune")
    csv_path = tmp_path / "prune.csv"
    bench.main(["--quick", "--reps", "1", "--device", "cpu", "--csv", str(csv_path)])
    text = csv_path.read_text()
    assert "unpruned" in text and "prune_k0.7" in text and "tome_k0.6" in text
    assert (tmp_path / "prune.png").is_file()


def test_viz_draws_the_pruning_stages():
    from attnselect import viz

    model, run, _, _ = HOSTS["timm_vit"]()
    with asel.prune(model, keep=0.5, layers=(1, 2), merge=True) as handle, torch.no_grad():
        run(model)
    fig = viz.plot_pruning_stages(IMG[0], handle.kept, grid=(4, 4), num_prefix_tokens=handle.num_prefix_tokens,
                                  layers=handle.layers)  # fmt: skip
    real = [int((k[0] >= 1).sum()) for k in handle.kept]  # patches drawn: not the CLS, not a fused token (-1)
    assert real[0] == 8 and real[1] in (4, 5)  # block 2 keeps 5 of 8 patches + the fused token
    assert [ax.get_title() for ax in fig.axes] == [f"block {b}: {n} of 16 patches" for b, n in zip((1, 2), real)]


def _similar_reference(eager, x0, layers, keep, prefix):
    """merge='similar' by hand, one sample at a time, on the eager copy: each dropped token averaged into its most
    similar kept patch token (cosine of the states), weighted by sizes; log(size) on the logits of later blocks."""
    outs, kept_all = [], []
    for b in range(x0.shape[0]):
        x, size = x0[b : b + 1], torch.ones(x0.shape[1])
        positions = torch.arange(x.shape[1])
        saliency, kept = None, []
        for i, (block, attention) in enumerate(_blocks(eager)):
            if i in layers:
                n = x.shape[1]
                k = _kept_count(keep, n - prefix)
                top = saliency[prefix:].topk(k).indices.sort().values + prefix
                index = torch.cat([torch.arange(prefix), top])
                xs = x[0]
                metric = torch.nn.functional.normalize(xs, dim=-1)
                new_x, new_size = xs[index] * size[index, None], size[index].clone()
                for j in range(n):
                    if j in index:
                        continue
                    sims = metric[j] @ metric[index].T
                    sims[:prefix] = -math.inf
                    t = int(sims.argmax())
                    new_x[t] += xs[j] * size[j]
                    new_size[t] += size[j]
                x, size = (new_x / new_size[:, None]).unsqueeze(0), new_size
                positions = positions[index]
                kept.append(positions)
            rec = _spy_attention(attention)
            mask = None if size.eq(1).all() else size.log().view(1, 1, 1, -1)
            with torch.no_grad():
                x = block(x, attn_mask=mask) if mask is not None else block(x)
            del attention.forward
            saliency = rec.out[-1][0].mean(dim=0)[0]
        outs.append(x)
        kept_all.append(kept)
    return torch.cat(outs), [torch.stack([kept_all[b][j] for b in range(len(kept_all))]) for j in range(len(layers))]


def test_similar_merge_matches_the_hand_reference_and_conserves_sizes():
    model, run, eager, _ = HOSTS["timm_vit"]()
    x0, _, _ = _record_unpruned(model, run)
    layers, keep = (1, 2), 0.5
    with asel.prune(model, keep=keep, layers=layers, merge="similar") as handle:
        _, _, last = _record_unpruned(model, run)
        kept, size = handle.kept, handle._pruner.last.size
    ref_last, ref_kept = _similar_reference(eager, x0, layers, keep, 1)
    assert all(torch.equal(a, b) for a, b in zip(kept, ref_kept))
    torch.testing.assert_close(last, ref_last, atol=1e-5, rtol=0)
    assert size.squeeze(-1).sum(dim=1).tolist() == [17.0, 17.0]  # every original token is counted once
    assert (size[:, 0] == 1).all()  # the class token receives nothing
