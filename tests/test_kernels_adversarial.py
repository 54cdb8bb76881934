"""Adversarial checks of the Triton kernels against the functional reference.

Inputs chosen to break the kernels rather than to look like real data: token counts whose ``N*N`` sits just above or
below a power of two, maps made of massive ties, ratios at ``0``, ``1``, ``1/(N*N)`` and ``(N*N-1)/(N*N)``, rows that
are discarded whole, non-contiguous and broadcast inputs, query rows in every integer width, feature widths that are
not a multiple of the gather step, and the error queue driven through wrap-around. Both query-row chains of the
rollout are exercised (the ``query_chain`` and ``force_chain`` fixtures): one sample's layer in registers
(``N <= SMALL_N``), one program per sample through its workspace row, and the multi-pass kernels, and the row passes'
column-tiled branch (``ROW_TILE_MAX`` set to 16).

Every test compares with :mod:`attnselect.functional` (or hand-computed values). Tests marked ``xfail(strict=True)``
document a known defect; each states the input, what the reference gives and what the kernel gives.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import attnselect.kernels as K
from attnselect import functional as F

pytestmark = pytest.mark.kernels


@pytest.fixture
def cpu() -> str:
    """The CPU device, for the tests that document a defect (they are checked under the interpreter)."""
    if not K.kernels_enabled(torch.empty(0)):
        pytest.skip(f"Triton path off for cpu: {K.explain(torch.empty(0))}")
    return "cpu"


def _rollout_module():
    return importlib.import_module("attnselect.kernels.rollout")  # the module, not the package's entry point


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dyadic(shape: tuple[int, ...], seed: int, top: int = 5) -> torch.Tensor:
    """Multiples of 1/8 in ``[1/8, top/8]``: strictly positive, massive ties, sums of a few heads exact in fp32."""
    return (torch.randint(1, top + 1, shape, generator=_gen(seed)).float()) / 8


def _assert_rollout_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    # tight enough that one entry dropped or kept wrongly (a value >= 1/8 of a row sum <= N) shows
    assert out.shape == ref.shape and out.dtype == ref.dtype == torch.float32
    assert torch.equal(out == 0, ref == 0)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-8)


def _every_query_row(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One map repeated once per row, and every row as the query: ``v[q] = (A_d[q] + e_q) / s_q`` spans ``A_d``."""
    n = a.shape[-1]
    return a.expand(n, *a.shape[1:]).contiguous(), torch.arange(n, device=a.device)


# --------------------------------------------------------------------------------------------------------------------
# rollout, the three query-row chains: in registers (N <= SMALL_N), one program per sample, multi-pass
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "h", "head_fusion", "dtype"),
    [
        (1, 3, "mean", torch.float32),
        (2, 1, "max", torch.float16),
        (45, 2, "min", torch.bfloat16),  # N*N = 2025: just below 2048
        (46, 3, "mean", torch.float32),  # N*N = 2116: just above 2048
        (64, 1, "mean", torch.float16),  # N*N = 4096 exactly
        (90, 4, "max", torch.float32),  # 8100: just below 8192
        (91, 2, "mean", torch.bfloat16),  # 8281: just above 8192
        (127, 2, "min", torch.float32),
        (128, 1, "mean", torch.float32),  # the largest chain held in registers
    ],
)
def test_query_chain_exact_at_awkward_sizes(
    device: str, query_chain: str, n: int, h: int, head_fusion: str, dtype: torch.dtype
) -> None:
    # the earlier layer is read back through every row: the last layer is all ones with nothing discarded, so every
    # row of the earlier layer carries weight and each of its discarded entries shows in the result
    nn = n * n
    first = _dyadic((2, h, n, n), seed=n).to(device, dtype)
    last = torch.ones(2, 1, n, n, device=device, dtype=dtype)
    query = torch.tensor([n - 1, n // 3], device=device)
    for ratio, protect in (((nn - 1) / nn, "none"), (0.5, "entry0")):
        kw = {"discard_ratio": [ratio, 0.0], "head_fusion": head_fusion, "protect": protect, "query": query}
        _assert_rollout_equal(K.rollout([first, last], **kw), F.rollout([first, last], **kw))
    # the last layer itself (its query rows only), after an earlier layer of ones that discards everything
    kw = {"discard_ratio": [1.0, 1 / nn], "head_fusion": head_fusion, "protect": "none", "query": query}
    _assert_rollout_equal(K.rollout([last, first], **kw), F.rollout([last, first], **kw))


@pytest.mark.parametrize(
    ("chain", "kind"),
    [
        ("registers", "all_equal"),
        ("registers", "mostly_zero"),
        ("registers", "dyadic"),
        ("registers", "one_distinct"),
        ("per-sample", "all_equal"),
        ("per-sample", "mostly_zero"),
        ("per-sample", "dyadic"),
        ("per-sample", "one_distinct"),
        ("multipass", "all_equal"),
        ("multipass", "mostly_zero"),
    ],
)
def test_query_rows_every_discard_with_massive_ties(device: str, force_chain, chain: str, kind: str) -> None:
    force_chain(chain)
    n = 6
    g = _gen(7)
    if kind == "all_equal":
        a = torch.full((1, n, n), 0.25)
    elif kind == "mostly_zero":
        a = (torch.rand(1, n, n, generator=g) < 0.2).float() * 0.5
    elif kind == "dyadic":
        a = torch.randint(0, 3, (1, n, n), generator=g).float() / 4
    else:  # one entry above a sea of ties, in the middle of the flat order
        a = torch.full((1, n, n), 0.125)
        a[0, 3, 4] = 1.0
    maps, query = _every_query_row(a.to(device))
    nn = n * n
    for ratio, protect in ((1 / nn, "none"), (0.5, "entry0"), ((nn - 1) / nn, "none"), (1.0, "entry0")):
        kw = {"discard_ratio": ratio, "protect": protect, "query": query}
        _assert_rollout_equal(K.rollout([maps], **kw), F.rollout([maps], **kw))


def test_query_rows_ties_break_by_lower_flat_index(device: str, query_chain: str) -> None:
    # hand-computed: a 3x3 map of equal values, 4 entries to drop: flat 0..3 go, i.e. row 0 and entry (1, 0)
    a = torch.full((1, 3, 3), 0.5, device=device)
    maps, query = _every_query_row(a)
    out = K.rollout([maps], discard_ratio=4 / 9, protect="none", query=query)
    kept = torch.tensor([[0, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.float32, device=device) * 0.5
    expected = (kept + torch.eye(3, device=device)) / (kept.sum(-1, keepdim=True) + 1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    # protect="entry0": flat 0 stays, flats 1..3 go (one entry fewer)
    out = K.rollout([maps], discard_ratio=4 / 9, protect="entry0", query=query)
    kept[0, 0] = 0.5
    expected = (kept + torch.eye(3, device=device)) / (kept.sum(-1, keepdim=True) + 1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def test_whole_row_discarded(device: str, query_chain: str) -> None:
    # row 2 holds the 5 smallest values of a 5x5 map: ratio 5/25 zeroes exactly that row, whose query result is e_2
    n = 5
    a = _dyadic((1, n, n), seed=5) + 1.0
    a[0, 2] = torch.tensor([0.5, 0.25, 0.125, 0.375, 0.0625])
    maps, query = _every_query_row(a.to(device))
    out = K.rollout([maps], discard_ratio=5 / 25, protect="none", query=query)
    _assert_rollout_equal(out, F.rollout([maps], discard_ratio=5 / 25, protect="none", query=query))
    assert torch.equal(out[2], torch.eye(n, device=device)[2])


@pytest.mark.parametrize(
    ("layout", "head_fusion"),
    [("transposed", "mean"), ("sliced", "max"), ("expanded_batch", "min"), ("expanded_heads", "mean"), ("bnn", "max")],
)
def test_query_chain_non_contiguous_inputs(device: str, query_chain: str, layout: str, head_fusion: str) -> None:
    b, h, n = 3, 2, 20
    base = [torch.softmax(torch.randn(b, h, n, n, generator=_gen(i)) * 3, -1).to(device) for i in range(2)]
    if layout == "transposed":  # strides (.., 1, n) in the last two dims
        maps = [m.transpose(-1, -2).contiguous().transpose(-1, -2) for m in base]
    elif layout == "sliced":  # every other sample and head of a bigger buffer, rows padded
        maps = []
        for m in base:
            big = torch.zeros(2 * b, 2 * h, n, n + 3, device=device)
            big[::2, ::2, :, 1 : n + 1] = m
            maps.append(big[::2, ::2, :, 1 : n + 1])
    elif layout == "expanded_batch":  # stride 0 over the batch
        maps = [m[:1].expand(b, h, n, n) for m in base]
    elif layout == "expanded_heads":  # stride 0 over heads
        maps = [m[:, :1].expand(b, 4, n, n) for m in base]
    else:  # [B,N,N] views of head 1
        maps = [m[:, 1] for m in base]
    assert not any(m.is_contiguous() for m in maps)
    kw = {"discard_ratio": [0.55, 0.9], "head_fusion": head_fusion, "query": torch.tensor([19, 0, 7], device=device)}
    _assert_rollout_equal(K.rollout(maps, **kw), F.rollout([m.contiguous() for m in maps], **kw))


def test_query_rows_in_any_integer_width(device: str, query_chain: str) -> None:
    maps = [torch.softmax(torch.randn(3, 2, 9, 9, generator=_gen(0)), -1).to(device)]  # the last layer reads them
    ref = F.rollout(maps, query=torch.tensor([8, 0, 4], device=device))
    for rows in (
        torch.tensor([8, 0, 4], dtype=torch.int32),
        torch.tensor([8, 0, 4], dtype=torch.uint8),
        torch.tensor([8, 5, 0, 5, 4])[::2],  # non-contiguous
    ):
        _assert_rollout_equal(K.rollout(maps, query=rows.to(device)), ref)
    shared = torch.tensor([4], device=device).expand(3)  # stride 0
    _assert_rollout_equal(K.rollout(maps, query=shared), F.rollout(maps, query=4))
    _assert_rollout_equal(K.rollout(maps, query=-1), F.rollout(maps, query=8))  # a negative int counts from the end


def test_query_rows_out_of_range_raise(device: str, query_chain: str) -> None:
    maps = [torch.softmax(torch.randn(3, 2, 9, 9, generator=_gen(0)), -1).to(device)]
    for rows in (
        torch.tensor([0, 9, 1]),
        torch.tensor([-1, 0, 0], dtype=torch.int32),
        torch.tensor([0, 0, 2**32 + 3]),  # wraps to row 3 in 32 bits
        torch.tensor([0, 2**31, 0]),  # wraps to -2**31 in 32 bits
        torch.tensor([0, 0, -(2**32) + 1]),  # wraps to row 1 in 32 bits
    ):
        query = rows.to(device)
        with pytest.raises(ValueError, match="query"):
            F.rollout(maps, query=query)
        with pytest.raises(ValueError, match="query"):
            K.rollout(maps, query=query)
            K.check_errors()
    K.check_errors()


@pytest.mark.parametrize(
    ("value", "head", "head_fusion"),
    [(float("nan"), 0, "mean"), (float("inf"), 1, "min"), (float("-inf"), 1, "mean"), (-(2.0**-20), 1, "min")],
)
def test_bad_maps_raise_like_the_reference(
    device: str, query_chain: str, value: float, head: int, head_fusion: str
) -> None:
    maps = [torch.softmax(torch.randn(2, 2, 6, 6, generator=_gen(i)), -1).to(device) for i in range(2)]
    maps[0][1, head, 4, 1] = value  # the earlier layer: the chain must check it although only its rows are read
    query = torch.tensor([0, 5], device=device)
    with pytest.raises(ValueError, match=r"finite|non-negative"):
        F.rollout(maps, head_fusion=head_fusion, query=query)
    with pytest.raises(ValueError, match=r"finite|non-negative"):
        K.rollout(maps, head_fusion=head_fusion, query=query)
        K.check_errors()
    K.check_errors()


def test_bad_arguments_raise_the_reference_error_kinds(device: str) -> None:
    maps = [torch.softmax(torch.randn(2, 2, 5, 5, generator=_gen(i)), -1).to(device) for i in range(2)]
    cases = [
        ({"discard_ratio": 1.5}, ValueError, "discard_ratio"),
        ({"discard_ratio": [0.1, -0.1]}, ValueError, "discard_ratio"),
        ({"discard_ratio": True}, TypeError, "discard_ratio"),
        ({"discard_ratio": "0.3"}, TypeError, "discard_ratio"),
        ({"head_fusion": "median"}, ValueError, "head_fusion"),
        ({"protect": "entry1"}, ValueError, "protect"),
        ({"query": 5}, ValueError, "query"),
        ({"query": True}, TypeError, "query"),
        ({"query": 1.0}, TypeError, "query"),
        ({"query": torch.tensor([0.0, 1.0])}, TypeError, "query"),
        ({"query": torch.tensor([True, False])}, TypeError, "query"),
        ({"query": torch.tensor([0, 1, 2])}, ValueError, "query"),
    ]
    for kwargs, kind, name in cases:
        for fn in (F.rollout, K.rollout):
            with pytest.raises(kind, match=name):
                fn(maps, **kwargs)
    with pytest.raises(TypeError, match="attentions"):
        K.rollout([m.long() for m in maps])
    K.check_errors()


# --------------------------------------------------------------------------------------------------------------------
# rollout, multi-pass path: int32 thresholds, "drop everything", the column-tiled row passes
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [7, 46])  # 46: N*N > 2048, the pivots come from a sample of the map
def test_multipass_thresholds_at_the_extremes(device: str, force_chain, n: int) -> None:
    force_chain("multipass")
    a = _dyadic((2, n, n), seed=n).to(device)  # strictly positive: R = (A_d + I) / s is zero exactly where dropped
    a[:, 0, 0] = 0.125  # entry 0 among the smallest
    nn = n * n
    for ratio, protect in ((1 / nn, "none"), ((nn - 1) / nn, "entry0"), ((nn - 1) / nn, "none")):
        kw = {"discard_ratio": ratio, "protect": protect}
        _assert_rollout_equal(K.rollout([a], **kw), F.rollout([a], **kw))
    query = torch.tensor([0, n - 1], device=device)
    kw = {"discard_ratio": [(nn - 1) / nn, 1.0], "protect": "none", "query": query}
    _assert_rollout_equal(K.rollout([a, a], **kw), F.rollout([a, a], **kw))
    # ratio 1: everything but (under protect) entry 0 goes; hand-computed
    for protect in ("entry0", "none"):
        out = K.rollout([a], discard_ratio=1.0, protect=protect)
        expected = torch.eye(n, device=device).expand(2, n, n).clone()  # (0 + I) / 1; row 0: (a00 + 1) / (a00 + 1)
        assert torch.equal(out, expected)
        kw = {"discard_ratio": [1.0, 1.0], "protect": protect, "query": query}
        _assert_rollout_equal(K.rollout([a, a], **kw), F.rollout([a, a], **kw))


@pytest.mark.parametrize("chain", ["query", "full"])
def test_column_tiled_row_passes(device: str, monkeypatch: pytest.MonkeyPatch, force_chain, chain: str) -> None:
    mod = _rollout_module()
    force_chain("multipass")
    monkeypatch.setattr(mod, "ROW_TILE_MAX", 16)  # N = 37 spans three column tiles, the last one partial
    n = 37
    maps = [_dyadic((2, 2, n, n), seed=i).to(device) for i in range(3)]
    query = torch.tensor([36, 16], device=device) if chain == "query" else None
    for ratios, protect in (([0.0, 0.5, 1.0], "entry0"), ([1 / (n * n), (n * n - 1) / (n * n), 0.3], "none")):
        kw = {"discard_ratio": ratios, "protect": protect, "query": query, "head_fusion": "max"}
        _assert_rollout_equal(K.rollout(maps, **kw), F.rollout(maps, **kw))


def test_mean_fusion_of_near_equal_values(device: str) -> None:
    # 12 heads whose sums are 64 consecutive fp32 values (exact in any order), laid out in descending flat order:
    # the discard then depends on the last bit of sum / 12. Where the kernel's quotient differs from the reference's
    # (a division that is not correctly rounded, or the reference's mean taken as sum * (1/12)), two quotients merge
    # or split and the tie-break by flat index drops a different entry.
    n, h = 8, 12
    nn = n * n
    sums = 1.0 + (torch.arange(nn, dtype=torch.float64) + 1000) * 2.0**-23  # consecutive fp32 values in [1, 2)
    heads = torch.full((h, nn), 1 / 16, dtype=torch.float64)
    heads[0] = sums - (h - 1) / 16
    a = heads.float().flip(-1).view(1, h, n, n).to(device)
    assert torch.equal(a.double().sum(1).flatten(), sums.flip(0).to(device))
    counts = range(1, nn) if device == "cuda" else (1, 9, 21, 32, 50, 63)
    for count in counts:
        kw = {"discard_ratio": count / nn, "protect": "none"}
        _assert_rollout_equal(K.rollout([a], **kw), F.rollout([a], **kw))
    maps, query = _every_query_row(a)
    if device == "cuda":  # the chain held in registers as well
        for count in counts:
            kw = {"discard_ratio": count / nn, "protect": "none", "query": query}
            _assert_rollout_equal(K.rollout([maps], **kw), F.rollout([maps], **kw))


# --------------------------------------------------------------------------------------------------------------------
# rollout: head fusion edge cases, query-row dtypes on the host path
# --------------------------------------------------------------------------------------------------------------------
def test_mean_fusion_of_32_heads_discards_like_the_reference(cpu: str) -> None:
    h = 32
    g = _gen(0)
    found = False
    for _ in range(2000):
        heads = torch.rand(h, generator=g)
        seq = heads[0].clone()
        for v in heads[1:]:
            seq = seq + v
        seq = seq / h  # a value every summation order computes exactly as well: h * seq, then / h
        x = torch.ones(1, h, 2, 2)
        x[0, :, 1, 0] = heads  # entry B, flat 2
        x[0, :, 0, 1] = 0.0
        x[0, 0, 0, 1] = seq * h  # entry A, flat 1: its mean is exactly `seq` in any order
        ref_b = x.mean(1)[0, 1, 0]
        if ref_b < seq:  # torch.mean would rank B below A; a head-by-head sum ties them
            found = True
            break
    assert found
    # one entry of four goes; torch.mean's order would drop B, the reference's defined order drops A
    ref = F.rollout([x], discard_ratio=0.25, protect="none")
    # in the defined order (heads added one by one, then / H) A and B tie: the lower flat index, A, goes
    assert ref[0, 0, 1] == 0 and ref[0, 1, 0] > 0
    _assert_rollout_equal(K.rollout([x], discard_ratio=0.25, protect="none"), ref)
    maps, query = _every_query_row(x)
    kw = {"discard_ratio": 0.25, "protect": "none", "query": query}
    _assert_rollout_equal(K.rollout([maps], **kw), F.rollout([maps], **kw))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's grid limits apply on a GPU only")
def test_fuse_tiles_on_the_first_grid_axis(device: str, monkeypatch: pytest.MonkeyPatch, force_chain) -> None:
    # more fusion tiles than the second grid axis takes (N > 8192 on CUDA) go on the first axis
    force_chain("multipass")
    monkeypatch.setattr(_rollout_module(), "_MAX_GRID_Y", 2)  # N = 50: 3 tiles of 1024
    maps = [torch.softmax(torch.randn(2, 2, 50, 50, generator=_gen(i)), -1).to(device) for i in range(2)]
    for q in (None, torch.tensor([0, 49], device=device)):
        torch.testing.assert_close(K.rollout(maps, query=q), F.rollout(maps, query=q), rtol=1e-5, atol=1e-6)


def test_fuse_grid_beyond_the_y_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available() or not K.kernels_enabled(torch.empty(0, device="cuda")):
        pytest.skip("needs the Triton path on a CUDA device")
    monkeypatch.setattr(_rollout_module(), "FUSE_BLOCK", 1)  # N = 257: 66049 tiles, as N = 8193 has at 1024
    maps = [torch.softmax(torch.randn(1, 2, 257, 257, generator=_gen(i)), -1).cuda() for i in range(2)]
    torch.testing.assert_close(K.rollout(maps), F.rollout(maps), rtol=1e-5, atol=1e-6)


def test_max_fusion_hidden_minus_inf_in_any_head(device: str, query_chain: str) -> None:
    # the maximum over heads hides a -inf (the reference checks the fused map only): whichever head holds it, the
    # kernels must decide as the reference does (first head included)
    maps = [torch.softmax(torch.randn(2, 2, 5, 5, generator=_gen(i)), -1).to(device) for i in range(2)]
    later = [m.clone() for m in maps]
    later[0][0, 1, 1, 2] = float("-inf")
    first = [m.clone() for m in maps]
    first[0][0, 0, 1, 2] = float("-inf")
    query = torch.tensor([1, 4], device=device)
    for bad in (later, first):  # the same map up to which head holds the -inf: the same outcome
        try:
            ref = F.rollout(bad, head_fusion="max", query=query)
        except ValueError:
            with pytest.raises(ValueError):
                K.rollout(bad, head_fusion="max", query=query)
                K.check_errors()
            continue
        _assert_rollout_equal(K.rollout(bad, head_fusion="max", query=query), ref)


def test_int32_query_rows_reach_the_kernels_uncast(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/kernels.md (host cost): int32/int64 query rows are read as they are, not cast per call
    mod = _rollout_module()
    seen = []
    real = mod.rollout_forward

    def spy(maps, ratios, head_fusion, protect, rows, **kwargs):
        seen.append(rows)
        return real(maps, ratios, head_fusion, protect, rows, **kwargs)

    monkeypatch.setattr(mod, "rollout_forward", spy)
    maps = [torch.softmax(torch.randn(2, 2, 9, 9, generator=_gen(i)), -1).to(device) for i in range(2)]
    query = torch.tensor([3, 8], dtype=torch.int32, device=device)
    _assert_rollout_equal(K.rollout(maps, query=query), F.rollout(maps, query=query))
    (rows,) = seen
    assert rows.dtype == torch.int32 and rows.data_ptr() == query.data_ptr()


# --------------------------------------------------------------------------------------------------------------------
# top-k + gather
# --------------------------------------------------------------------------------------------------------------------
def _reference_topk_gather(scores, k, tokens, valid=None):
    indices, mask = F.select_topk(scores, k, valid=valid)
    return indices, mask, F.gather_tokens(tokens, indices)


def _assert_topk_equal(out, ref) -> None:
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert torch.equal(o, r)


@pytest.mark.parametrize(
    ("n", "k", "d", "dtype", "score_dtype"),
    [
        (1, 1, 1, torch.float64, torch.float32),
        (16, 16, 3, torch.float64, torch.float16),  # k = N = BLOCK_N: one program takes the whole order
        (17, 16, 100, torch.float32, torch.bfloat16),
        (63, 63, 129, torch.float16, torch.float32),
        (65, 64, 257, torch.bfloat16, torch.float16),
        (65, 65, 33, torch.float64, torch.float32),  # k just above a multiple of 64: a second program, one position
        (200, 129, 65, torch.float32, torch.bfloat16),  # BLOCK_N = 256, three programs per sample
    ],
)
def test_topk_gather_block_edges(
    device: str, n: int, k: int, d: int, dtype: torch.dtype, score_dtype: torch.dtype
) -> None:
    g = _gen(n + k)
    scores = torch.randint(0, 7, (2, n), generator=g).float() / 4  # ties everywhere
    scores[0, n // 2] = -0.0
    scores[0, n - 1] = 0.0  # -0.0 ties with +0.0: the lower index first
    valid = torch.rand(2, n, generator=g) < 0.5
    valid[0, 0] = True
    valid[1] = False
    valid[1, n - 1] = True  # one valid token: the tail repeats it
    tokens = torch.randn(2, n, d, generator=g, dtype=torch.float64).to(dtype)
    scores, valid, tokens = scores.to(device, score_dtype), valid.to(device), tokens.to(device)
    _assert_topk_equal(
        K.select_topk_gather(scores, k, tokens, valid=valid), _reference_topk_gather(scores, k, tokens, valid)
    )
    if n <= 128:
        _assert_topk_equal(K.select_topk_gather(scores, k, tokens), _reference_topk_gather(scores, k, tokens))


def test_topk_gather_non_contiguous_inputs(device: str) -> None:
    g = _gen(1)
    b, n, d, k = 3, 40, 24, 17
    scores = (torch.randint(0, 5, (n, b), generator=g).float() / 4).to(device).t()  # stride (1, b)
    tokens = torch.randn(b, d, n, generator=g).to(device).transpose(1, 2)  # [B,N,D] with stride 1 over N
    valid = (torch.rand(n, b, generator=g) < 0.6).to(device).t()
    valid[:, 3] = True
    assert not (scores.is_contiguous() or tokens.is_contiguous() or valid.is_contiguous())
    _assert_topk_equal(
        K.select_topk_gather(scores, k, tokens, valid=valid), _reference_topk_gather(scores, k, tokens, valid)
    )
    # broadcast over the batch (stride 0), and sliced rows (stride(0) > N)
    s0 = scores[:1].expand(b, n)
    t0 = tokens[:1].expand(b, n, d)
    v0 = valid[:1].expand(b, n)
    _assert_topk_equal(K.select_topk_gather(s0, k, t0, valid=v0), _reference_topk_gather(s0, k, t0, v0))
    wide = torch.randn(b, n + 5, generator=g).to(device)[:, 2 : n + 2]
    wide_t = torch.randn(b, n, d + 7, generator=g).to(device)[..., 3 : d + 3]
    _assert_topk_equal(K.select_topk_gather(wide, k, wide_t), _reference_topk_gather(wide, k, wide_t))


@pytest.mark.parametrize("use", ["all", "first_position", "one_channel", "only_tail"])
def test_topk_gather_backward_when_part_of_the_output_is_used(device: str, use: str) -> None:
    g = _gen(5)
    b, n, d, k = 3, 21, 5, 9
    scores = (torch.randint(0, 4, (b, n), generator=g).float() / 4).to(device)
    valid = (torch.rand(b, n, generator=g) < 0.5).to(device)
    valid[:, 7] = True
    valid[1] = False
    valid[1, 2] = valid[1, 11] = True  # 2 valid tokens, k = 9: a 7-long tail repeats token 11 or 2
    tokens = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(device)
    weight = torch.randn(b, k, d, generator=g, dtype=torch.float64).to(device)

    def loss(out: torch.Tensor) -> torch.Tensor:
        if use == "all":
            return (out * weight).sum()
        if use == "first_position":
            return (out[:, 0] * weight[:, 0]).sum()
        if use == "one_channel":
            return out[..., 2].pow(2).sum()
        return out[1, 5:].sum()

    grads = []
    for select in (
        lambda t: K.select_topk_gather(scores, k, t, valid=valid)[2],
        lambda t: _reference_topk_gather(scores, k, t, valid)[2],
    ):
        t = tokens.clone().requires_grad_()
        loss(select(t)).backward()
        grads.append(t.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_topk_gather_autograd_modes(device: str) -> None:
    g = _gen(6)
    scores = torch.rand(2, 12, generator=g).to(device).requires_grad_()
    tokens = torch.randn(2, 12, 4, generator=g).to(device).requires_grad_()
    with torch.no_grad():
        indices, mask, out = K.select_topk_gather(scores, 5, tokens)
    assert not out.requires_grad and out.grad_fn is None
    _assert_topk_equal((indices, mask, out), _reference_topk_gather(scores, 5, tokens.detach()))
    # scores never get a gradient (the selection is not differentiable); indices and mask carry none
    indices, mask, out = K.select_topk_gather(scores, 5, tokens)
    assert out.requires_grad and not indices.requires_grad and not mask.requires_grad
    (out * 2).sum().backward()
    assert scores.grad is None
    ref_t = tokens.detach().clone().requires_grad_()
    (_reference_topk_gather(scores, 5, ref_t)[2] * 2).sum().backward()
    assert torch.equal(tokens.grad, ref_t.grad)
    # scores alone requiring grad: the output needs none, as with the reference
    out = K.select_topk_gather(scores, 5, tokens.detach())[2]
    assert not out.requires_grad
    with torch.inference_mode():
        _assert_topk_equal(K.select_topk_gather(scores, 5, tokens), _reference_topk_gather(scores, 5, tokens))


def test_topk_gather_error_codes_name_the_samples(device: str) -> None:
    scores = torch.rand(4, 10).to(device)
    tokens = torch.randn(4, 10, 3).to(device)
    nan = scores.clone()
    nan[1, 9] = nan[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN \(sample\(s\) \[1, 3\]\)"):
        K.select_topk_gather(nan, 2, tokens)
        K.check_errors()
    valid = torch.ones(4, 10, dtype=torch.bool, device=device)
    valid[2] = False
    valid[3] = False
    with pytest.raises(ValueError, match=r"valid has no True entry in sample\(s\) \[2, 3\]"):
        K.select_topk_gather(scores, 2, tokens, valid=valid)
        K.check_errors()
    with pytest.raises(ValueError, match="NaN"):  # with autograd, an error leaves through the side channel
        K.select_topk_gather(nan, 2, tokens.clone().requires_grad_())
        K.check_errors()
    K.check_errors()
    # the summary slot behind the per-sample codes is not a sample of its own
    assert K._topk_message(1, torch.tensor([0, 1, 0, 1], dtype=torch.int32)) == "scores contains NaN (sample(s) [1])"
    msg = K._topk_message(2, torch.tensor([2, 0, 2, 2], dtype=torch.int32))
    assert msg is not None and "sample(s) [0, 2]:" in msg


def test_topk_gather_zero_width_tokens(device: str) -> None:
    # D = 0 still selects: the indices and mask are written (not left as allocated) and NaN scores are reported
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.7], [0.3, 0.3, 0.8, 0.0, 0.1]], device=device)
    tokens = torch.randn(2, 5, 0, device=device)
    indices, mask, out = K.select_topk_gather(scores, 3, tokens)
    assert out.shape == (2, 3, 0)
    assert torch.equal(indices, torch.tensor([[1, 4, 2], [2, 0, 1]], device=device))  # hand-computed
    assert torch.equal(mask, torch.ones(2, 3, dtype=torch.bool, device=device))
    valid = torch.tensor([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    _assert_topk_equal(
        K.select_topk_gather(scores, 3, tokens, valid=valid), _reference_topk_gather(scores, 3, tokens, valid)
    )
    nan = scores.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        K.select_topk_gather(nan, 3, tokens)
        K.check_errors()
    K.check_errors()


def test_topk_gather_double_backward_is_right_or_refused(device: str) -> None:
    # the backward is a launch autograd does not see: a create_graph gradient must not silently be a constant
    g = _gen(8)
    scores = torch.rand(2, 6, generator=g).to(device)
    tokens = torch.randn(2, 6, 3, generator=g, dtype=torch.float64).to(device)

    def second_order(select) -> torch.Tensor:
        t = tokens.clone().requires_grad_()
        out = select(t)
        (grad,) = torch.autograd.grad((out**2).sum(), t, create_graph=True)  # 2 * out at the selected rows
        ((grad**2).sum() + t.sum()).backward()  # d/dt: 1 + 8 t at the selected rows
        return t.grad

    ref = second_order(lambda t: _reference_topk_gather(scores, 3, t)[2])
    try:
        got = second_order(lambda t: K.select_topk_gather(scores, 3, t)[2])
    except RuntimeError:
        return  # a clear refusal is acceptable
    torch.testing.assert_close(got, ref)


# --------------------------------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------------------------------
def _qk(b: int, h: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


@pytest.mark.parametrize("kernel", ["onepass", "two_phase", "batch_on_x"])
def test_capture_query_rows_in_every_form(device: str, monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    mod = importlib.import_module("attnselect.kernels.capture")
    if kernel == "two_phase":
        monkeypatch.setattr(mod, "ONEPASS_MAX_TILE", 0)
    if kernel == "batch_on_x":
        monkeypatch.setattr(mod, "_MAX_GRID_Y", 2)  # B = 3 exceeds it: the fallback grid order
    b, h, n, d = 3, 2, 21, 16
    q, k = (t.to(device) for t in _qk(b, h, n, d, seed=3))
    shared = torch.tensor([20, 0, 7, 7, 13])
    per_sample = torch.tensor([[20, 0, 1, 2, 3], [5, 5, 5, 5, 5], [0, 19, 20, 1, 4]])
    forms = [
        shared,
        shared.int(),
        shared.short(),
        shared.to(torch.uint8),
        shared.to(torch.int8),
        torch.tensor([20, 9, 0, 9, 7, 9, 7, 9, 13])[::2],  # non-contiguous [R]
        per_sample,
        per_sample.int(),
        per_sample.t().contiguous().t(),  # non-contiguous [B,R]
        shared.unsqueeze(0).expand(b, -1),  # [B,R] with stride 0 over the batch
        per_sample[:, 2:3],  # one row per sample
    ]
    for i, rows in enumerate(forms):
        kw = {"scale": d**-0.5, "head_fusion": (None, "mean", "max")[i % 3], "causal": True}
        out = K.attention_probs(q, k, query_rows=rows.to(device), **kw)
        ref = F.attention_probs(q, k, query_rows=rows.long().to(device), **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_capture_bad_query_rows(device: str) -> None:
    q, k = (t.to(device) for t in _qk(2, 2, 9, 16, seed=4))
    for rows, kind in (
        (torch.tensor([0.0, 1.0]), TypeError),
        (torch.tensor([True, False]), TypeError),
        (torch.tensor([0, 1], dtype=torch.float16), TypeError),
        (torch.tensor(3), ValueError),  # neither [R] nor [B,R]
        (torch.zeros(3, 2, dtype=torch.long), ValueError),  # [B,R] with the wrong B
        (torch.zeros(2, 1, 1, dtype=torch.long), ValueError),
    ):
        for fn in (F.attention_probs, K.attention_probs):
            with pytest.raises(kind, match="query_rows"):
                fn(q, k, scale=0.25, query_rows=rows.to(device))
    for rows in (
        torch.tensor([9]),
        torch.tensor([-1]),
        torch.tensor([2**32 + 1]),  # wraps to row 1 in 32 bits
        torch.tensor([255], dtype=torch.uint8),
        torch.tensor([-1], dtype=torch.int8),
        torch.tensor([[0], [9]], dtype=torch.int32),
    ):
        with pytest.raises(ValueError, match="query_rows"):
            F.attention_probs(q, k, scale=0.25, query_rows=rows.to(device))
        with pytest.raises(ValueError, match="query_rows"):
            K.attention_probs(q, k, scale=0.25, query_rows=rows.to(device))
            K.check_errors()
    K.check_errors()


# --------------------------------------------------------------------------------------------------------------------
# the error queue (a plain host ring whose slots the test writes, in the order a device would)
# --------------------------------------------------------------------------------------------------------------------
def _describe(code: int, detail: torch.Tensor) -> str | None:
    if code == 8:  # a code this op does not report
        return None
    return f"error {code} of call {int(detail)}" if code else None


def _push(queue, code: int, call: int) -> None:
    queue.push(torch.tensor([code], dtype=torch.int32), torch.tensor(call), _describe)


def _drain(queue) -> list[str]:
    messages = []
    while queue.pending:
        msg = queue.pop_ready(wait=False)
        if msg is None:
            break
        messages.append(msg)
    return messages


def test_error_queue_keeps_every_error_through_wraparound() -> None:
    queue = K._ErrorQueue(torch.full((4,), -1, dtype=torch.int32), device=None)
    codes = [0, 1, 0, 8, 2, 0, 0, 4, 0, 0, 0, 1, 2, 0]
    raised, seen = [], []
    for call, code in enumerate(codes):
        try:
            _push(queue, code, call)
        except ValueError as err:  # half the ring in flight: the push raises what is written
            raised.append(str(err))
        if call % 3 == 2:
            seen += _drain(queue)
        assert len(queue.pending) <= 2  # never more than half the ring in flight: no slot reused before it is read
    seen += _drain(queue)
    expected = [f"error {c} of call {i}" for i, c in enumerate(codes) if c and c != 8]
    assert sorted(raised + seen, key=lambda m: int(m.split()[-1])) == expected
    assert not queue.pending


def test_error_queue_unwritten_slot_holds_back_later_errors() -> None:
    queue = K._ErrorQueue(torch.full((8,), -1, dtype=torch.int32), device=None)
    _push(queue, 0, 0)
    _push(queue, 0, 1)
    queue.view[queue.pending[-1][0]] = -1  # call 1 not written yet
    _push(queue, 2, 2)
    assert queue.pop_ready(wait=False) is None and len(queue.pending) == 2
    queue.view[queue.pending[0][0]] = 8  # call 1 lands with a code its op does not report
    assert queue.pop_ready(wait=False) == "error 2 of call 2"
    assert not queue.pending


def test_raise_ready_and_report(monkeypatch: pytest.MonkeyPatch) -> None:
    first = K._ErrorQueue(torch.full((8,), -1, dtype=torch.int32), device=None)
    second = K._ErrorQueue(torch.full((8,), -1, dtype=torch.int32), device=None)
    monkeypatch.setattr(K, "_queues", {0: first, 1: second})
    _push(first, 0, 0)
    _push(second, 3, 1)
    _push(second, 5, 2)
    with pytest.raises(ValueError, match="error 3 of call 1"):
        K._raise_ready(wait=False)
    with pytest.raises(ValueError, match="error 5 of call 2"):
        K.check_errors()
    K.check_errors()
    assert not first.pending and not second.pending
    # CPU summaries raise in the call and queue nothing
    with pytest.raises(ValueError, match="error 6 of call 7"):
        K._report(torch.tensor([6], dtype=torch.int32), torch.tensor(7), _describe)
    K._report(torch.tensor([0], dtype=torch.int32), torch.tensor(8), _describe)
    assert set(K._queues) == {0, 1} and not first.pending and not second.pending


@pytest.mark.parametrize("count", [1000, 4096, 4097, 4500, 4899])
def test_per_sample_tie_pass_across_flat_tiles(device: str, force_chain, count: int) -> None:
    # one program per sample finds the flat index of the last dropped tie with a pass over flat tiles of
    # SAMPLE_BLOCK = 4096 entries: with every entry equal (N = 70: 4900 entries, two tiles) that index is count - 1,
    # in the first tile, at the boundary or in the second
    force_chain("per-sample")
    n = 70
    nn = n * n
    first = torch.full((3, 1, n, n), 0.25, device=device)
    last = torch.ones(3, 1, n, n, device=device)  # nothing discarded: every row of the first layer carries weight
    query = torch.tensor([0, 35, 69], device=device)
    for protect in ("entry0", "none"):
        kw = {"discard_ratio": [count / nn, 0.0], "protect": protect, "query": query}
        _assert_rollout_equal(K.rollout([first, last], **kw), F.rollout([first, last], **kw))


def test_capture_head_offsets_past_int32(device: str) -> None:
    # keys whose head stride puts head 2 at 2**31 elements: a 32-bit head offset would wrap and read other memory
    if device != "cpu":
        pytest.skip("checked on the CPU: on a GPU the layout would take 8 GiB of device memory")
    n, d, h, stride_h = 5, 16, 3, 2**30
    base = 2**31  # the keys' offset in their storage: a wrapped read of head 2 lands at element 0, still ours
    try:  # 8 GiB of address space, a few pages of it touched
        store = torch.empty(base + 2 * stride_h + n * d, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("cannot reserve 8 GiB of address space here")
    heads = torch.randn(h, n, d, generator=_gen(9)).half()
    for i in range(h):
        store[base + i * stride_h : base + i * stride_h + n * d] = heads[i].flatten()
    store[: n * d] = 0.0  # what a wrapped offset of head 2 would read instead
    k = store.as_strided((1, h, n, d), (0, stride_h, d, 1), base)
    q = torch.randn(1, h, n, d, generator=_gen(10)).half()
    assert torch.equal(k[0], heads)
    for fusion in ("mean", None):
        out = K.attention_probs(q, k, scale=0.25, head_fusion=fusion)
        ref = F.attention_probs(q, k, scale=0.25, head_fusion=fusion)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
