"""The reference ops against hand-written oracles, invariants and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnselect import functional as F
from attnselect.kernels.rollout import discard_count


def softmax_maps(b: int, n: int, h: int | None = None, *, seed: int = 0, causal: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (b, n, n) if h is None else (b, h, n, n)
    logits = torch.randn(shape, generator=g) * 2
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def loop_discard(attn: torch.Tensor, ratio: float, protect: str) -> torch.Tensor:
    """Per-sample loop with a stable ascending sort: the lowest flat index goes first among ties."""
    out = attn.clone()
    b, n, _ = attn.shape
    count = int(attn[0].numel() * ratio)  # the published code: int(flat.size(-1) * discard_ratio)
    for i in range(b):
        flat = out[i].reshape(-1)
        order = sorted(range(n * n), key=lambda j: (flat[j].item(), j))[:count]
        for j in order:
            if protect == "entry0" and j == 0:
                continue
            flat[j] = 0
    return out


@pytest.mark.parametrize(("n", "ratio", "count"), [(10, 0.47, 47), (50, 0.29, 725), (193, 0.25, 9312)])
def test_discard_count_is_the_published_arithmetic(n, ratio, count):
    # int(N*N * ratio), one rounding; (ratio * N) * N rounds twice and gives 46 and 724 for the first two
    attn = torch.rand(1, n, n, dtype=torch.float64) + 1.0
    out = F.discard_lowest(attn, ratio, protect="none")
    assert int((out == 0).sum()) == count
    assert discard_count(ratio, n) == count  # the kernels' count


def naive_rollout(maps, ratios, fusion="mean", protect="entry0"):
    b, n = maps[0].shape[0], maps[0].shape[-1]
    result = torch.eye(n, dtype=torch.float64).expand(b, n, n)
    for a, r in zip(maps, ratios):
        if a.dim() == 4:
            a = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[fusion]
        a = loop_discard(a.double(), r, protect)
        a = (a + torch.eye(n, dtype=torch.float64)) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result


# ---------------------------------------------------------------------------------------------------- fuse / discard
@pytest.mark.parametrize("mode", ["mean", "max", "min"])
def test_fuse_heads_matches_torch(mode):
    a = softmax_maps(2, 9, 4)
    expected = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[mode]
    torch.testing.assert_close(F.fuse_heads(a, mode), expected)
    three = a[:, 0]
    assert F.fuse_heads(three, mode) is three


@pytest.mark.parametrize("n", [1, 2, 5, 17])
@pytest.mark.parametrize("protect", ["entry0", "none"])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_discard_matches_loop(n, protect, ratio):
    a = softmax_maps(3, n, seed=n)
    torch.testing.assert_close(F.discard_lowest(a, ratio, protect), loop_discard(a, ratio, protect))


def test_discard_ties_lower_flat_index_first():
    a = torch.tensor([[[0.5, 0.125], [0.125, 0.125]]])  # three tied smallest values; floor(0.25 * 4) = 1 to drop
    out = F.discard_lowest(a, 0.25, protect="none")
    assert out.tolist() == [[[0.5, 0.0], [0.125, 0.125]]]
    out = F.discard_lowest(a, 0.5, protect="none")
    assert out.tolist() == [[[0.5, 0.0], [0.0, 0.125]]]


def test_discard_entry0_protection():
    a = torch.tensor([[[0.0, 0.5], [0.25, 0.75]]])  # entry (0,0) is the smallest
    assert F.discard_lowest(a, 0.25, protect="entry0").tolist() == a.tolist()  # the only candidate is protected
    assert F.discard_lowest(a, 0.5, protect="entry0").tolist() == [[[0.0, 0.5], [0.0, 0.75]]]
    a2 = torch.tensor([[[0.125, 0.5], [0.25, 0.75]]])
    assert F.discard_lowest(a2, 0.25, protect="none").tolist() == [[[0.0, 0.5], [0.25, 0.75]]]
    assert F.discard_lowest(a2, 0.25, protect="entry0").tolist() == a2.tolist()


def test_discard_does_not_modify_input():
    a = softmax_maps(2, 7)
    before = a.clone()
    F.discard_lowest(a, 0.5)
    F.residual_normalize(a)
    F.rollout([a, a], discard_ratio=0.5)
    assert torch.equal(a, before)


def test_residual_normalize_rows():
    a = softmax_maps(2, 6)
    out = F.residual_normalize(a)
    expected = (a + torch.eye(6)) / 2
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 6))


# ---------------------------------------------------------------------------------------------------- rollout
@pytest.mark.parametrize("n", [1, 2, 17, 77, 193])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_query_chain_equals_full_product_row(n, layers):
    maps = [softmax_maps(3, n, 2, seed=10 * layers + i) for i in range(layers)]
    full = F.rollout(maps, discard_ratio=0.25)
    query = torch.tensor([0, n // 2, n - 1])
    rows = F.rollout(maps, discard_ratio=0.25, query=query)
    torch.testing.assert_close(rows, full[torch.arange(3), query], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.rollout(maps, query=n - 1), full[:, n - 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("protect", ["entry0", "none"])
def test_query_chain_with_ties_straddling_the_threshold(protect):
    """Integer-valued maps: many entries equal the discard threshold, so the lower-flat-index rule decides."""
    g = torch.Generator().manual_seed(7)
    maps = [torch.randint(0, 3, (3, 9, 9), generator=g).float() for _ in range(2)]
    query = torch.tensor([0, 4, 8])
    full = F.rollout(maps, discard_ratio=[0.3, 0.45], protect=protect)
    torch.testing.assert_close(full.double(), naive_rollout(maps, [0.3, 0.45], protect=protect), rtol=1e-5, atol=1e-6)
    rows = F.rollout(maps, discard_ratio=[0.3, 0.45], protect=protect, query=query)
    torch.testing.assert_close(rows, full[torch.arange(3), query], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_matches_naive(fusion):
    maps = [softmax_maps(2, 11, 3, seed=s) for s in range(3)]
    ratios = [0.25, 0.1, 0.4]
    out = F.rollout(maps, discard_ratio=ratios, head_fusion=fusion)
    torch.testing.assert_close(out.double(), naive_rollout(maps, ratios, fusion), rtol=1e-5, atol=1e-6)


def test_rollout_rows_stochastic_and_nonnegative():
    maps = [softmax_maps(2, 50, 4, seed=s) for s in range(2)]
    out = F.rollout(maps)
    assert out.dtype == torch.float32
    assert bool((out >= 0).all())
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 50))


def test_rollout_ratio_zero_is_plain_residual_rollout():
    maps = [softmax_maps(2, 13, seed=s) for s in range(2)]
    eye = torch.eye(13)
    a1, a2 = ((m + eye) / 2 for m in maps)
    a1, a2 = a1 / a1.sum(-1, keepdim=True), a2 / a2.sum(-1, keepdim=True)
    torch.testing.assert_close(F.rollout(maps, discard_ratio=0.0), a2 @ a1)


def test_rollout_ratio_one_switches_layer_off():
    """ratio 1 zeroes everything but entry (0,0), so the layer becomes the identity, as in the published code."""
    maps = [softmax_maps(2, 9, seed=s) for s in range(2)]
    only_second = F.rollout([maps[1]], discard_ratio=0.2)
    torch.testing.assert_close(F.rollout(maps, discard_ratio=[1.0, 0.2]), only_second)
    torch.testing.assert_close(F.rollout(maps, discard_ratio=1.0), torch.eye(9).expand(2, 9, 9))
    torch.testing.assert_close(F.rollout(maps, discard_ratio=1.0, protect="none"), torch.eye(9).expand(2, 9, 9))


def test_rollout_protect_changes_result():
    a = 0.5 + 0.5 * torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(3))
    a[0, 0, 0] = 0.3  # the smallest entry, so among the discarded ones
    a = a / a.sum(-1, keepdim=True)
    keep = F.rollout([a], discard_ratio=0.25, protect="entry0")
    drop = F.rollout([a], discard_ratio=0.25, protect="none")
    assert not torch.allclose(keep, drop, atol=1e-3)
    assert keep[0, 0, 0] > drop[0, 0, 0] + 1e-2


def test_rollout_causal_text_maps_stay_lower_triangular():
    maps = [softmax_maps(2, 77, 8, seed=s, causal=True) for s in range(2)]
    out = F.rollout(maps)
    assert float(out.triu(1).abs().max()) == 0.0
    eos = torch.tensor([10, 76])
    rows = F.rollout(maps, query=eos)
    assert float(rows[0, 11:].abs().max()) == 0.0
    torch.testing.assert_close(rows, out[torch.arange(2), eos], rtol=1e-5, atol=1e-6)


def test_rollout_stacked_tensor_input():
    maps = [softmax_maps(2, 7, 3, seed=s) for s in range(2)]
    torch.testing.assert_close(F.rollout(torch.stack(maps)), F.rollout(maps))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rollout_low_precision_inputs(dtype):
    """fp16/bf16 maps: fp32 accumulation; the error is that of rounding the inputs (stated tolerance 2e-2 relative)."""
    maps = [softmax_maps(2, 77, 4, seed=s) for s in range(2)]
    ref = F.rollout(maps, discard_ratio=0.0, query=0)
    low = F.rollout([m.to(dtype) for m in maps], discard_ratio=0.0, query=0)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-3)


def test_rollout_no_grad_unless_required():
    maps = [softmax_maps(1, 5, seed=s) for s in range(2)]
    assert not F.rollout(maps).requires_grad
    leaf = maps[0].clone().requires_grad_(True)
    out = F.rollout([leaf, maps[1]], discard_ratio=0.0, query=0)
    out.sum().backward()
    assert leaf.grad is not None


def test_layer_statistic():
    maps = [softmax_maps(2, 6, 2, seed=s) for s in range(3)]
    fused = torch.stack([m.mean(1) for m in maps])  # [L,B,N,N]
    rows = fused[:, torch.arange(2), torch.tensor([0, 3])]  # [L,B,N]
    torch.testing.assert_close(F.layer_statistic(maps, "mean", torch.tensor([0, 3])), rows.mean(0))
    torch.testing.assert_close(F.layer_statistic(maps, "std", torch.tensor([0, 3])), rows.std(0, unbiased=False))


# ---------------------------------------------------------------------------------------------------- select / gather
def test_select_topk_ties_and_order():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5]])
    idx, mask = F.select_topk(scores, 4)
    assert idx.tolist() == [[1, 2, 4, 3]]
    assert mask.all()


def test_select_topk_valid_and_short_rows():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.3], [0.2, 0.4, 0.6, 0.1]])
    valid = torch.tensor([[False, True, False, True], [True, True, True, True]])
    idx, mask = F.select_topk(scores, 3, valid=valid)
    assert idx.tolist() == [[3, 1, 1], [2, 1, 0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 40),
    data=st.data(),
)
def test_select_topk_properties(b, n, data):
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    scores = torch.randint(0, 5, (b, n), generator=g).float()  # many ties
    valid = torch.rand(b, n, generator=g) < 0.7
    valid[:, data.draw(st.integers(0, n - 1))] = True
    idx, mask = F.select_topk(scores, k, valid=valid)
    assert idx.shape == (b, k) and mask.shape == (b, k) and idx.dtype == torch.int64
    for i in range(b):
        cnt = int(valid[i].sum())
        assert int(mask[i].sum()) == min(k, cnt)
        kept = idx[i][mask[i]].tolist()
        assert len(set(kept)) == len(kept)
        assert all(valid[i, j] for j in idx[i].tolist())
        expected = sorted((j for j in range(n) if valid[i, j]), key=lambda j: (-scores[i, j].item(), j))[:k]
        assert kept == expected


def test_gather_tokens_and_grad():
    tokens = torch.randn(2, 6, 4, requires_grad=True)
    idx = torch.tensor([[5, 0], [1, 1]])
    out = F.gather_tokens(tokens, idx)
    torch.testing.assert_close(out[0, 0], tokens[0, 5])
    torch.testing.assert_close(out[1, 1], tokens[1, 1])
    out.sum().backward()
    assert tokens.grad[1, 1].eq(2).all() and tokens.grad[0, 3].eq(0).all()


def test_masked_max_pool_ignores_padding():
    tokens = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    out = F.masked_max_pool(tokens, mask)
    torch.testing.assert_close(out[0], tokens[0, :2].amax(0))
    poisoned = tokens.clone()
    poisoned[0, 2:] = 1e6
    torch.testing.assert_close(F.masked_max_pool(poisoned, mask), out)


# ---------------------------------------------------------------------------------------------------- attention_probs
def test_attention_probs_matches_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1)
    torch.testing.assert_close(F.attention_probs(q, k, scale=0.5, head_fusion=None), ref)
    torch.testing.assert_close(F.attention_probs(q, k, scale=0.5), ref.mean(1))
    causal = F.attention_probs(q, k, scale=0.5, causal=True, head_fusion=None)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    torch.testing.assert_close(causal, torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(mask, -torch.inf), -1))
    rows = F.attention_probs(q, k, scale=0.5, causal=True, query_rows=torch.tensor([[6, 2], [0, 3]]))
    full = causal.mean(1)
    torch.testing.assert_close(rows[0], full[0, [6, 2]])
    torch.testing.assert_close(rows[1], full[1, [0, 3]])
    bias = torch.zeros(2, 1, 1, 7)
    bias[0, ..., 5:] = float("-inf")
    padded = F.attention_probs(q, k, scale=0.5, bias=bias)
    assert float(padded[0, :, 5:].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("call", "exc", "name"),
    [
        (lambda: F.rollout([torch.rand(2, 5)]), ValueError, "attentions[0]"),
        (lambda: F.rollout([torch.rand(2, 5, 5), torch.rand(2, 6, 6)]), ValueError, "attentions[1]"),
        (lambda: F.rollout([torch.rand(2, 5, 5), torch.rand(3, 5, 5)]), ValueError, "attentions[1]"),
        (lambda: F.rollout([torch.rand(2, 5, 5)], discard_ratio=1.5), ValueError, "discard_ratio"),
        (lambda: F.rollout([torch.rand(2, 5, 5)], discard_ratio=[0.1, 0.2]), ValueError, "discard_ratio"),
        (lambda: F.rollout([torch.rand(2, 5, 5)], discard_ratio=-0.1), ValueError, "discard_ratio"),
        (lambda: F.rollout([torch.full((2, 5, 5), float("nan"))]), ValueError, "NaN"),
        (lambda: F.rollout([torch.full((2, 5, 5), float("inf"))]), ValueError, "inf"),
        (lambda: F.rollout([torch.rand(2, 5, 5)], head_fusion="median"), ValueError, "head_fusion"),
        (lambda: F.rollout([torch.rand(2, 5, 5)], protect="cls"), ValueError, "protect"),
        (lambda: F.rollout([torch.rand(2, 5, 5)], query=5), ValueError, "query"),
        (lambda: F.rollout([torch.rand(2, 5, 5)], query=torch.tensor([0.0, 1.0])), TypeError, "query"),
        (lambda: F.rollout([torch.randint(0, 2, (2, 5, 5))]), TypeError, "attentions[0]"),
        (lambda: F.rollout([]), ValueError, "attentions"),
        (lambda: F.fuse_heads(torch.rand(2, 3, 5, 5), "sum"), ValueError, "mode"),
        (lambda: F.discard_lowest(torch.rand(2, 5, 5), 2.0), ValueError, "ratio"),
        (lambda: F.select_topk(torch.rand(2, 5), 0), ValueError, "k"),
        (lambda: F.select_topk(torch.rand(2, 5), 6), ValueError, "k"),
        (lambda: F.select_topk(torch.rand(2, 5), 2.5), TypeError, "k"),
        (lambda: F.select_topk(torch.rand(5), 2), ValueError, "scores"),
        (lambda: F.select_topk(torch.tensor([[float("nan"), 1.0]]), 1), ValueError, "NaN"),
        (lambda: F.select_topk(torch.rand(2, 5), 2, valid=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "valid"),
        (lambda: F.select_topk(torch.rand(2, 5), 2, valid=torch.ones(2, 5)), TypeError, "valid"),
        (lambda: F.select_topk(torch.rand(2, 5), 2, valid=torch.ones(2, 4, dtype=torch.bool)), ValueError, "valid"),
        (lambda: F.gather_tokens(torch.rand(2, 5, 3), torch.rand(2, 2)), TypeError, "indices"),
        (lambda: F.gather_tokens(torch.rand(2, 5, 3), torch.tensor([[0, 5], [1, 1]])), ValueError, "indices"),
        (lambda: F.gather_tokens(torch.rand(2, 5), torch.tensor([[0, 1], [1, 1]])), ValueError, "tokens"),
        (lambda: F.gather_tokens(torch.rand(2, 5, 3), torch.tensor([[0, 1]])), ValueError, "indices"),
        (lambda: F.masked_max_pool(torch.rand(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)), ValueError, "mask"),
    ],
)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc) as info:
        call()
    assert name in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gather_device_mismatch():
    with pytest.raises(ValueError, match="indices"):
        F.gather_tokens(torch.rand(2, 5, 3, device="cuda"), torch.zeros(2, 2, dtype=torch.long))


def test_gather_device_mismatch_meta():
    with pytest.raises(ValueError, match="indices"):
        F.gather_tokens(torch.rand(2, 5, 3), torch.zeros(2, 2, dtype=torch.long, device="meta"))


def test_attention_probs_rejects_bool_bias_and_keeps_nan():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="bias"):
        F.attention_probs(q, k, scale=0.35, bias=torch.zeros(1, 1, 4, 4, dtype=torch.bool))
    bad = q.clone()
    bad[0, 0, 1] = float("nan")
    out = F.attention_probs(bad, k, scale=0.35, head_fusion=None)
    assert bool(torch.isnan(out[0, 0, 1]).all())  # NaN inputs are not silently turned into zeros
    blocked = torch.zeros(1, 1, 4, 4)
    blocked[..., 2, :] = float("-inf")  # query row 2 may attend to nothing
    out = F.attention_probs(q, k, scale=0.35, bias=blocked)
    assert float(out[0, 2].abs().max()) == 0.0 and bool(torch.isfinite(out).all())


def test_residual_normalize_rejects_negative_and_nan():
    with pytest.raises(ValueError, match="attn"):
        F.residual_normalize(torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]]))
    with pytest.raises(ValueError, match="attn"):
        F.residual_normalize(torch.full((1, 2, 2), float("nan")))


def test_masked_max_pool_keeps_minus_inf():
    out = F.masked_max_pool(torch.tensor([[[float("-inf")], [5.0]]]), torch.tensor([[True, False]]))
    assert out.item() == float("-inf")


# ---------------------------------------------------------------------------------------------------- gradients / fp64
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("query", [None, 1])
def test_rollout_gradients_for_every_fusion(fusion, query):
    """Gradients reach per-head maps whatever the fusion (max/min keep their outputs for backward)."""
    maps = [softmax_maps(1, 5, 2, seed=s).double().requires_grad_(True) for s in range(2)]

    def chain(*a):
        return F.rollout(list(a), discard_ratio=0.25, head_fusion=fusion, query=query)

    assert torch.autograd.gradcheck(chain, tuple(maps), eps=1e-6, atol=1e-5)


def test_float64_inputs_keep_float64():
    """fp64 maps are computed in fp64: they match a float64 oracle, and values closer than fp32 can tell stay apart."""
    maps = [softmax_maps(2, 7, 3, seed=s).double() for s in range(2)]
    out = F.rollout(maps, discard_ratio=0.25)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive_rollout(maps, [0.25, 0.25]), rtol=1e-12, atol=1e-12)
    assert F.fuse_heads(maps[0]).dtype == torch.float64
    torch.testing.assert_close(F.fuse_heads(maps[0]), maps[0].mean(1), rtol=1e-15, atol=1e-15)
    assert F.layer_statistic(maps, "mean", 0).dtype == torch.float64
    # 0.5 + 1e-12 is above 0.5 in fp64 but equal to it in fp32: the smaller value (flat index 1) must go, not index 0
    a = torch.tensor([[[0.5 + 1e-12, 0.5], [0.9, 0.8]]], dtype=torch.float64)
    expected = torch.tensor([[[0.5 + 1e-12, 0.0], [0.9, 0.8]]], dtype=torch.float64)
    assert torch.equal(F.discard_lowest(a, 0.25, protect="none"), expected)


def test_numpy_scalars_are_accepted():
    """Ratios, k and query rows read from numpy (configs, index arrays) work like Python numbers."""
    maps = [softmax_maps(2, 6, seed=s) for s in range(2)]
    torch.testing.assert_close(
        F.rollout(maps, discard_ratio=np.float32(0.25), query=np.int64(2)), F.rollout(maps, discard_ratio=0.25, query=2)
    )
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    assert F.select_topk(scores, np.int64(2))[0].tolist() == [[1, 2], [0, 2]]


def test_masked_max_pool_rejects_bool_tokens():
    with pytest.raises(TypeError, match="tokens"):
        F.masked_max_pool(torch.ones(1, 2, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_normalize_low_precision_is_one_rounding_from_fp32(dtype):
    """fp16/bf16 maps are normalised in fp32 and rounded once: rows sum to 1 within the output's rounding."""
    a = softmax_maps(2, 193, seed=3).to(dtype)
    out = F.residual_normalize(a)
    assert out.dtype == dtype
    exact = F.residual_normalize(a.float())
    info = torch.finfo(dtype)  # half an ulp relative; fp16 subnormals (below tiny) have coarser absolute steps
    torch.testing.assert_close(out.float(), exact, rtol=info.eps / 2, atol=info.tiny)


# ---------------------------------------------------------------------------------------------------- edge cases
def test_discard_all_but_one_entry():
    """count = N * N - 1 keeps exactly the largest entry (plus entry (0, 0) under protect="entry0")."""
    a = torch.tensor([[[0.1, 0.4], [0.2, 0.3]]])  # floor(0.75 * 4) = 3 entries go
    assert F.discard_lowest(a, 0.75, protect="none").tolist() == [[[0.0, pytest.approx(0.4)], [0.0, 0.0]]]
    kept = F.discard_lowest(a, 0.75, protect="entry0")
    assert kept.tolist() == [[[pytest.approx(0.1), pytest.approx(0.4)], [0.0, 0.0]]]


def test_query_chain_pairs_each_layer_with_its_own_ratio():
    """Three layers with distinct ratios: the row chain (last layer first) must use ratio l for layer l."""
    maps = [softmax_maps(2, 9, 2, seed=40 + i) for i in range(3)]
    ratios = [0.1, 0.6, 0.3]
    full = F.rollout(maps, discard_ratio=ratios)
    torch.testing.assert_close(full.double(), naive_rollout(maps, ratios), rtol=1e-5, atol=1e-6)
    query = torch.tensor([2, 7])
    rows = F.rollout(maps, discard_ratio=ratios, query=query)
    torch.testing.assert_close(rows, full[torch.arange(2), query], rtol=1e-5, atol=1e-6)


def test_negative_int_query_is_the_row_from_the_end():
    """query=-n is row 0 (entry (0, 0) stays protected) and query=-1 is row n - 1, for rollout and layer_statistic."""
    n = 6
    maps = [softmax_maps(2, n, seed=50 + i) for i in range(2)]
    for m in maps:
        m[:, 0, 0] = 1e-6  # the smallest entry of every map: discarded unless protected
    for q, row in ((-n, 0), (-1, n - 1)):
        torch.testing.assert_close(
            F.rollout(maps, discard_ratio=0.5, query=q), F.rollout(maps, discard_ratio=0.5)[:, row]
        )
        torch.testing.assert_close(F.layer_statistic(maps, "mean", q), F.layer_statistic(maps, "mean", row))
