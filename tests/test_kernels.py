"""Triton kernels against the functional reference, and the gate that chooses between them.

Tests marked ``kernels`` run the Triton code: on CPU through the interpreter (``TRITON_INTERPRET=1``, set for that
pytest invocation), on CUDA compiled, whenever a GPU is present. Unmarked tests check the gate and the lean import
and run without Triton being used.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnselect.kernels as K
from attnselect import functional as F


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _softmax_maps(b: int, h: int, n: int, layers: int = 2, seed: int = 0, causal: bool = False) -> list[torch.Tensor]:
    g = _gen(seed)
    out = []
    for _ in range(layers):
        logits = torch.randn(b, h, n, n, generator=g) * 2
        if causal:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.softmax(logits, dim=-1))
    return out


def _dyadic_maps(b: int, h: int, n: int, layers: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Maps of small multiples of 1/8: many exact ties, and a mean over 4 heads is exact in fp32."""
    g = _gen(seed)
    return [torch.randint(0, 6, (b, h, n, n), generator=g).float() / 8 for _ in range(layers)]


def _assert_lowp_close(out: torch.Tensor, ref_lowp: torch.Tensor, ref32: torch.Tensor, atol: float) -> None:
    """Kernel error vs the fp32 reference at most twice PyTorch's own error at that precision, plus ``atol``."""
    err_kernel = (out - ref32).abs().max().item()
    err_torch = (ref_lowp - ref32).abs().max().item()
    assert err_kernel <= 2 * err_torch + atol, (err_kernel, err_torch)


# --------------------------------------------------------------------------------------------------------------------
# rollout
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.kernels
@pytest.mark.parametrize(
    ("b", "h", "n", "per_sample_query"),
    [(1, 12, 1, False), (3, 4, 2, True), (3, 3, 50, True), (1, 2, 77, False), (1, 2, 128, True), (1, 2, 197, True)],
)
def test_rollout_matches_reference(
    device: str, query_chain: str, b: int, h: int, n: int, per_sample_query: bool
) -> None:
    maps = [m.to(device) for m in _softmax_maps(b, h, n, seed=n)]
    query = torch.randint(0, n, (b,), generator=_gen(1)).to(device) if per_sample_query else 0
    ref_full = F.rollout(maps, discard_ratio=0.25)
    out_full = K.rollout(maps, discard_ratio=0.25)
    torch.testing.assert_close(out_full, ref_full, rtol=1e-5, atol=1e-6)
    ref_q = F.rollout(maps, discard_ratio=[0.25, 0.4], query=query)
    out_q = K.rollout(maps, discard_ratio=[0.25, 0.4], query=query)
    assert out_q.shape == (b, n) and out_q.dtype == torch.float32
    torch.testing.assert_close(out_q, ref_q, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("protect", ["entry0", "none"])
@pytest.mark.parametrize("n", [7, 33])
def test_rollout_discards_the_same_entries(device: str, ratio: float, protect: str, n: int) -> None:
    # one [B,N,N] layer with many ties: R = (A_d + I) / s, so R's zeros are exactly the discarded entries
    a = (_dyadic_maps(3, 1, n, layers=1, seed=n)[0][:, 0] + 0.125).to(device)  # strictly positive
    a[:, 0, 0] = 0.125  # entry (0, 0) among the smallest: protect decides its fate
    ref = F.rollout([a], discard_ratio=ratio, protect=protect)
    out = K.rollout([a], discard_ratio=ratio, protect=protect)
    assert torch.equal(out == 0, ref == 0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.kernels
def test_rollout_published_discard_count_and_numpy_query(device: str) -> None:
    # int(N*N * 0.47) = 47 at N = 10, where (0.47 * N) * N rounds to 46: kernel and reference zero the same entries
    a = _softmax_maps(2, 1, 10, layers=1, seed=5)[0][:, 0].to(device)
    ref = F.rollout([a], discard_ratio=0.47, protect="none")
    out = K.rollout([a], discard_ratio=0.47, protect="none")
    assert int((F.discard_lowest(a, 0.47, protect="none") == 0).sum()) == 2 * 47
    assert torch.equal(out == 0, ref == 0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    row = K.rollout([a], discard_ratio=0.47, query=np.int64(3))  # a numpy integer is a row index like an int
    torch.testing.assert_close(row, K.rollout([a], discard_ratio=0.47, query=3), rtol=0, atol=0)


@pytest.mark.kernels
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("protect", ["entry0", "none"])
def test_rollout_query_row_discards_the_same_entries(device: str, query_chain: str, ratio: float, protect: str) -> None:
    # one layer with many ties, every row a query once: v = (A_d[q] + e_q) / s_q is zero exactly where the discard hit
    n = 11
    a = (_dyadic_maps(1, 1, n, layers=1, seed=3)[0][:, 0] + 0.125).expand(n, n, n).contiguous().to(device)
    a[:, 0, 0] = 0.125  # entry (0, 0) among the smallest: protect decides its fate
    query = torch.arange(n, device=device)
    ref = F.rollout([a], discard_ratio=ratio, protect=protect, query=query)
    out = K.rollout([a], discard_ratio=ratio, protect=protect, query=query)
    assert torch.equal(out == 0, ref == 0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.kernels
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_rollout_head_fusion_with_ties(device: str, query_chain: str, head_fusion: str) -> None:
    maps = [m.to(device) for m in _dyadic_maps(3, 4, 19, layers=2)]
    query = torch.tensor([0, 18, 7], device=device)
    for q in (None, query):
        ref = F.rollout(maps, discard_ratio=[0.3, 0.5], head_fusion=head_fusion, query=q)
        out = K.rollout(maps, discard_ratio=[0.3, 0.5], head_fusion=head_fusion, query=q)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rollout_low_precision_inputs(device: str, query_chain: str, dtype: torch.dtype) -> None:
    maps32 = [m.to(device) for m in _softmax_maps(2, 3, 50, seed=5, causal=True)]
    maps = [m.to(dtype) for m in maps32]
    query = torch.tensor([49, 20], device=device)  # text-like: causal maps, per-sample EOS rows
    for q in (None, query):
        ref32 = F.rollout(maps32, query=q)
        ref_lowp = F.rollout(maps, query=q)
        out = K.rollout(maps, query=q)
        torch.testing.assert_close(out, ref_lowp, rtol=1e-5, atol=1e-6)  # same fp32 math on the same values
        _assert_lowp_close(out, ref_lowp, ref32, atol=1e-6)


@pytest.mark.kernels
def test_rollout_stacked_and_bad_input(device: str) -> None:
    maps = torch.stack(_softmax_maps(2, 2, 9)).to(device)  # [L,B,H,N,N]
    torch.testing.assert_close(K.rollout(maps, query=3), F.rollout(maps, query=3), rtol=1e-5, atol=1e-6)
    bad = maps.clone()
    bad[0, 1, 0, 2, 2] = -1.0
    # CPU raises in the call; CUDA reports device-side findings at the next op call or at check_errors()
    with pytest.raises(ValueError, match="non-negative"):
        K.rollout(bad)
        K.check_errors()
    with pytest.raises(ValueError, match="non-negative"):  # the query-row chain checks every entry as well
        K.rollout(bad, query=1)
        K.check_errors()
    with pytest.raises(ValueError, match="query"):
        K.rollout(maps, query=torch.tensor([0, 9], device=device))
        K.check_errors()
    with pytest.raises(ValueError, match="must lie in"):  # wraps to row 3 in 32 bits: still out of range
        K.rollout(maps, query=torch.tensor([0, 2**32 + 3], device=device))
        K.check_errors()
    with pytest.raises(ValueError, match="discard_ratio"):
        K.rollout(maps, discard_ratio=[0.1])
    K.check_errors()  # nothing left over


@pytest.mark.kernels
@pytest.mark.parametrize(("sigmas", "chunk"), [(-10.0, 4096), (50.0, 256), (5.0, 64)])
def test_rollout_select_fallbacks(
    device: str, monkeypatch: pytest.MonkeyPatch, force_chain, sigmas: float, chunk: int
) -> None:
    # a pivot bracket that misses the target, a candidate list that overflows, candidates spread over several chunks
    import importlib

    mod = importlib.import_module("attnselect.kernels.rollout")
    force_chain("multipass")  # the multi-pass select, whose fallbacks these are
    monkeypatch.setattr(mod, "BRACKET_SIGMAS", sigmas)
    monkeypatch.setattr(mod, "SELECT_CHUNK", chunk)
    maps = [m.to(device) for m in _softmax_maps(2, 3, 50, seed=7)]  # N*N = 2500 > 2048 samples: the pivot path
    maps[1][:, :, 10:20] = maps[1][:, :, 30:40]  # ties across rows
    for q in (None, torch.tensor([3, 49], device=device)):
        ref = F.rollout(maps, discard_ratio=[0.3, 0.6], query=q)
        out = K.rollout(maps, discard_ratio=[0.3, 0.6], query=q)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels
def test_rollout_rows_wider_than_one_tile(device: str, monkeypatch: pytest.MonkeyPatch, force_chain) -> None:
    # rows wider than the column tile (N > 1024 in real use) loop over column tiles in every row pass
    import importlib

    mod = importlib.import_module("attnselect.kernels.rollout")
    force_chain("multipass")
    monkeypatch.setattr(mod, "ROW_TILE_MAX", 16)
    maps = [m.to(device) for m in _softmax_maps(2, 3, 50, seed=11)]
    for q in (None, torch.tensor([0, 37], device=device)):
        ref = F.rollout(maps, discard_ratio=[0.3, 0.6], query=q)
        out = K.rollout(maps, discard_ratio=[0.3, 0.6], query=q)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels
def test_rollout_does_not_modify_inputs(device: str) -> None:
    maps = [m.to(device) for m in _softmax_maps(2, 1, 12)]
    maps = [m[:, 0] for m in maps]  # [B,N,N] fp32: the kernel reads the caller's memory directly
    before = [m.clone() for m in maps]
    K.rollout(maps, discard_ratio=0.5)
    K.rollout(maps, discard_ratio=0.5, query=1)
    assert all(torch.equal(a, c) for a, c in zip(maps, before))


@pytest.mark.kernels
def test_rollout_large_n_on_gpu() -> None:
    if not torch.cuda.is_available() or not K.kernels_enabled(torch.empty(0, device="cuda")):
        pytest.skip("N = 1025 is only affordable compiled on a GPU")
    maps = [m.cuda() for m in _softmax_maps(2, 4, 1025, seed=3)]
    torch.testing.assert_close(K.rollout(maps), F.rollout(maps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(K.rollout(maps, query=0), F.rollout(maps, query=0), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# top-k + gather
# --------------------------------------------------------------------------------------------------------------------
def _reference_topk_gather(scores, k, tokens, valid=None):
    indices, mask = F.select_topk(scores, k, valid=valid)
    return indices, mask, F.gather_tokens(tokens, indices)


@pytest.mark.kernels
@pytest.mark.parametrize(
    ("b", "n", "d", "k", "with_valid"),
    [
        (1, 1, 384, 1, False),
        (3, 50, 512, 20, False),
        (3, 50, 512, 20, True),
        (2, 193, 384, 96, True),
        (3, 77, 512, 37, True),
    ],
)
def test_topk_gather_matches_reference(device: str, b: int, n: int, d: int, k: int, with_valid: bool) -> None:
    g = _gen(n)
    scores = (torch.randint(0, 7, (b, n), generator=g).float() / 7).to(device)  # plenty of ties
    tokens = torch.randn(b, n, d, generator=g).to(device)
    valid = None
    if with_valid:
        valid = torch.rand(b, n, generator=g) > 0.6
        valid[:, min(3, n - 1)] = True
        if b > 1:
            valid[1] = False
            valid[1, : min(n, 2)] = True  # fewer valid tokens than k: tail repeats the last valid index
        valid = valid.to(device)
    out = K.select_topk_gather(scores, k, tokens, valid=valid)
    ref = _reference_topk_gather(scores, k, tokens, valid)
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert torch.equal(o, r)
    # the backward writes every token row once: selected rows, tail sums, zeros
    grad_out = torch.randn(b, k, d, generator=g).to(device)
    t1, t2 = tokens.clone().requires_grad_(), tokens.clone().requires_grad_()
    K.select_topk_gather(scores, k, t1, valid=valid)[2].backward(grad_out)
    _reference_topk_gather(scores, k, t2, valid)[2].backward(grad_out)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-5, atol=1e-5)  # tail sums: any order


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_topk_gather_dtypes(device: str, dtype: torch.dtype) -> None:
    g = _gen(2)
    scores = torch.randn(3, 77, generator=g).to(device, dtype)
    scores[0, 10] = scores[0, 40] = scores[0].max()  # tie at the top
    scores[1, 5] = -0.0
    scores[1, 6] = 0.0  # -0.0 and +0.0 compare equal: the lower index first
    tokens = torch.randn(3, 77, 384, generator=g).to(device, dtype)
    out = K.select_topk_gather(scores, 30, tokens)
    ref = _reference_topk_gather(scores, 30, tokens)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


@pytest.mark.kernels
def test_topk_gather_gradcheck(device: str) -> None:
    g = _gen(3)
    scores = torch.randn(2, 6, generator=g).to(device)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0]], dtype=torch.bool, device=device)
    tokens = torch.randn(2, 6, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def fn(t: torch.Tensor) -> torch.Tensor:
        return K.select_topk_gather(scores, 5, t, valid=valid)[2]

    assert torch.autograd.gradcheck(fn, (tokens,), eps=1e-6, atol=1e-8, fast_mode=True)
    # the tail of sample 1 repeats its last valid token: its gradient accumulates
    fn(tokens).sum().backward()
    ref_tokens = tokens.detach().clone().requires_grad_()
    _reference_topk_gather(scores, 5, ref_tokens, valid)[2].sum().backward()
    assert torch.equal(tokens.grad, ref_tokens.grad)
    last = int(K.select_topk_gather(scores, 5, tokens.detach(), valid=valid)[0][1, 1])  # sample 1: 2 valid tokens
    assert tokens.grad[1, last].sum().item() == pytest.approx(4 * 3)


@pytest.mark.kernels
def test_topk_gather_bad_input(device: str) -> None:
    scores = torch.randn(2, 9, device=device)
    tokens = torch.randn(2, 9, 4, device=device)
    with pytest.raises(ValueError, match="k must be"):
        K.select_topk_gather(scores, 10, tokens)
    with pytest.raises(ValueError, match="tokens"):
        K.select_topk_gather(scores, 3, tokens[:, :8])
    nan_scores = scores.clone()
    nan_scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        K.select_topk_gather(nan_scores, 3, tokens)
        K.check_errors()
    valid = torch.ones(2, 9, dtype=torch.bool, device=device)
    valid[0] = False
    with pytest.raises(ValueError, match="valid"):
        K.select_topk_gather(scores, 3, tokens, valid=valid)
        K.check_errors()
    with pytest.raises(ValueError, match="valid"):  # the autograd path checks as well
        K.select_topk_gather(scores, 3, tokens.requires_grad_(), valid=valid)
        K.check_errors()
    K.check_errors()


# --------------------------------------------------------------------------------------------------------------------
# fused capture
# --------------------------------------------------------------------------------------------------------------------
def _qk(b: int, h: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


@pytest.mark.kernels
@pytest.mark.parametrize(("b", "h", "n", "d"), [(1, 2, 1, 32), (3, 3, 50, 64), (2, 2, 77, 64), (1, 2, 197, 64)])
@pytest.mark.parametrize("head_fusion", ["mean", None])
def test_capture_matches_reference(device: str, b: int, h: int, n: int, d: int, head_fusion: str | None) -> None:
    q, k = (t.to(device) for t in _qk(b, h, n, d, seed=n))
    out = K.attention_probs(q, k, scale=d**-0.5, head_fusion=head_fusion)
    ref = F.attention_probs(q, k, scale=d**-0.5, head_fusion=head_fusion)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels
@pytest.mark.parametrize("head_fusion", ["mean", None])
def test_capture_two_phase_kernel(device: str, monkeypatch: pytest.MonkeyPatch, head_fusion: str | None) -> None:
    # key ranges too wide for one tile take the two-phase kernel: force it at a small size
    import importlib

    monkeypatch.setattr(importlib.import_module("attnselect.kernels.capture"), "ONEPASS_MAX_TILE", 0)
    q, k = (t.to(device) for t in _qk(2, 3, 70, 32, seed=9))
    rows = torch.tensor([[0, 69], [5, 6]], device=device)
    for kw in ({}, dict(causal=True, query_rows=rows)):
        out = K.attention_probs(q, k, scale=0.2, head_fusion=head_fusion, **kw)
        ref = F.attention_probs(q, k, scale=0.2, head_fusion=head_fusion, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="query_rows"):
        K.attention_probs(q, k, scale=0.2, query_rows=torch.tensor([0, 70], device=device))
        K.check_errors()


@pytest.mark.kernels
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_capture_causal_bias_and_rows(device: str, head_fusion: str) -> None:
    b, h, n, d = 3, 2, 77, 64
    q, k = (t.to(device) for t in _qk(b, h, n, d, seed=1))
    scale = d**-0.5
    # text tower: causal + key padding (-inf, and an HF-style finite minimum), per-sample EOS rows
    lengths = torch.tensor([77, 20, 5])
    pad = torch.arange(n)[None, :] >= lengths[:, None]
    bias_inf = torch.zeros(b, 1, 1, n).masked_fill(pad[:, None, None, :], float("-inf")).to(device)
    bias_min = torch.zeros(b, 1, n, n).masked_fill(pad[:, None, None, :], torch.finfo(torch.float32).min).to(device)
    rows = (lengths - 1).view(b, 1).to(device)
    cases = [
        dict(causal=True),
        dict(bias=bias_inf),
        dict(bias=bias_min, causal=True),
        dict(bias=bias_inf, causal=True, query_rows=rows),
        dict(query_rows=torch.tensor([0, 76, 3], device=device)),
    ]
    for kw in cases:
        out = K.attention_probs(q, k, scale=scale, head_fusion=head_fusion, **kw)
        ref = F.attention_probs(q, k, scale=scale, head_fusion=head_fusion, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # a fully blocked row gives zeros, as in the reference
    blocked = torch.zeros(b, 1, n, n, device=device)
    blocked[:, :, 4, :] = float("-inf")
    out = K.attention_probs(q, k, scale=scale, bias=blocked)
    assert torch.equal(out[:, 4], torch.zeros_like(out[:, 4]))
    with pytest.raises(ValueError, match="query_rows"):
        K.attention_probs(q, k, scale=scale, query_rows=torch.tensor([-1], device=device))
        K.check_errors()
    # int64 rows are read as they are: a row that only wraps into range in 32 bits is still out of range
    with pytest.raises(ValueError, match="must lie in"):
        K.attention_probs(q, k, scale=scale, query_rows=torch.tensor([[2**32 + 3]] * b, device=device))
        K.check_errors()
    rows32 = torch.tensor([5, 0], device=device, dtype=torch.int32)  # int32 rows take the same path
    torch.testing.assert_close(
        K.attention_probs(q, k, scale=scale, query_rows=rows32),
        F.attention_probs(q, k, scale=scale, query_rows=rows32.long()),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.kernels
@pytest.mark.parametrize("two_phase", [False, True])
def test_capture_batch_on_either_grid_axis(device: str, monkeypatch: pytest.MonkeyPatch, two_phase: bool) -> None:
    # row blocks run on the fast grid axis; a batch beyond CUDA's y limit puts the batch there instead
    import importlib

    mod = importlib.import_module("attnselect.kernels.capture")
    if two_phase:
        monkeypatch.setattr(mod, "ONEPASS_MAX_TILE", 0)
    q, k = (t.to(device) for t in _qk(3, 2, 40, 32, seed=9))
    rows = torch.tensor([[0, 39], [5, 6], [39, 1]], device=device)
    expected = [F.attention_probs(q, k, scale=0.2, causal=True, query_rows=qr) for qr in (None, rows)]
    for limit in (65535, 1):
        monkeypatch.setattr(mod, "_MAX_GRID_Y", limit)
        for qr, ref in zip((None, rows), expected):
            out = K.attention_probs(q, k, scale=0.2, causal=True, query_rows=qr)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_capture_low_precision(device: str, dtype: torch.dtype) -> None:
    q32, k32 = (t.to(device) for t in _qk(2, 3, 50, 80, seed=4))  # head dim 80: padded to 128 in the kernel
    q, k = q32.to(dtype), k32.to(dtype)
    scale = 80**-0.5
    ref32 = F.attention_probs(q32, k32, scale=scale, causal=True)
    ref_lowp = F.attention_probs(q, k, scale=scale, causal=True)
    out = K.attention_probs(q, k, scale=scale, causal=True)
    _assert_lowp_close(out, ref_lowp, ref32, atol=1e-5)
    torch.testing.assert_close(out, ref_lowp, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# the gate (no Triton needed)
# --------------------------------------------------------------------------------------------------------------------
def test_gate_switch_forces_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNSELECT_KERNELS", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.empty(0)
    assert not K.kernels_enabled(x)
    assert "ATTNSELECT_KERNELS=0 forces the PyTorch reference" in K.explain(x)
    assert K.explain(x).startswith("PyTorch reference")

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Triton path was taken")

    import importlib

    for mod, name in (
        ("rollout", "rollout_forward"),
        ("topk_gather", "topk_gather_forward"),
        ("capture", "attention_probs_forward"),
    ):
        monkeypatch.setattr(importlib.import_module(f"attnselect.kernels.{mod}"), name, boom)
    maps = _softmax_maps(2, 2, 9)
    assert torch.equal(K.rollout(maps, query=0), F.rollout(maps, query=0))
    scores, tokens = torch.randn(2, 9), torch.randn(2, 9, 4)
    ref = _reference_topk_gather(scores, 4, tokens)
    assert all(torch.equal(o, r) for o, r in zip(K.select_topk_gather(scores, 4, tokens), ref))
    q, k = _qk(1, 2, 9, 16)
    assert torch.equal(K.attention_probs(q, k, scale=0.25), F.attention_probs(q, k, scale=0.25))


def test_gate_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTNSELECT_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.empty(0)
    assert not K.kernels_enabled(x)
    assert "without TRITON_INTERPRET=1" in K.explain(x)
    text = K.explain()
    assert "cpu tensors: PyTorch reference" in text and "cuda tensors:" in text
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.kernels_enabled(x) == K.triton_available()
    with pytest.raises(TypeError, match="tensor"):
        K.kernels_enabled([1, 2])  # type: ignore[arg-type]


def test_gate_reference_path_has_reference_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNSELECT_KERNELS", "0")
    with pytest.raises(ValueError, match="k must be"):
        K.select_topk_gather(torch.randn(2, 5), 6, torch.randn(2, 5, 3))
    with pytest.raises(ValueError):
        K.rollout([torch.rand(2, 3, 4)])  # not square


def test_import_is_lean() -> None:
    code = (
        "import sys, torch, attnselect, attnselect.kernels as K; "
        "K.explain(torch.empty(0)); "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


def test_entry_point_survives_kernel_module_import() -> None:
    # importing kernels/rollout.py must not shadow the rollout entry point of the package
    import attnselect.kernels.rollout  # noqa: F401

    assert callable(K.rollout) and K.rollout.__module__ == "attnselect.kernels"
    assert sys.modules["attnselect.kernels.rollout"].__name__ == "attnselect.kernels.rollout"


# --------------------------------------------------------------------------------------------------------------------
# the remaining awkward sizes, every kernel
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.kernels
@pytest.mark.parametrize(("b", "n", "d"), [(3, 2, 384), (1, 193, 512), (1, 257, 384)])
def test_every_kernel_at_awkward_sizes(device: str, b: int, n: int, d: int) -> None:
    g = _gen(n + 1)
    maps = [m.to(device) for m in _softmax_maps(b, 2, n, seed=n)]
    rows = torch.randint(0, n, (b,), generator=g).to(device)
    torch.testing.assert_close(K.rollout(maps, query=rows), F.rollout(maps, query=rows), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(K.rollout(maps), F.rollout(maps), rtol=1e-5, atol=1e-6)
    q, k = (torch.randn(b, 2, n, 64, generator=g).to(device) for _ in range(2))
    for causal in (False, True):
        out = K.attention_probs(q, k, scale=0.125, causal=causal)
        torch.testing.assert_close(out, F.attention_probs(q, k, scale=0.125, causal=causal), rtol=1e-5, atol=1e-6)
    scores = (torch.randint(0, 5, (b, n), generator=g).float() / 5).to(device)  # ties
    tokens = torch.randn(b, n, d, generator=g).to(device)
    valid = (torch.rand(b, n, generator=g) > 0.3).to(device)
    valid[:, 0] = True
    out = K.select_topk_gather(scores, max(1, n // 2), tokens, valid=valid)
    ref = _reference_topk_gather(scores, max(1, n // 2), tokens, valid)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


from _helpers import benchmark_module as _benchmark_module  # noqa: E402


@pytest.mark.kernels
def test_rollout_benchmark_runs_every_chain(device: str) -> None:
    # bench_rollout.py times the chains the gate does not pick beside the one it does: each must be the rollout
    import importlib

    bench = _benchmark_module("bench_rollout")
    mod = importlib.import_module("attnselect.kernels.rollout")
    maps = [m.to(device) for m in _softmax_maps(3, 2, 29, seed=5)]
    ref = F.rollout(maps, discard_ratio=0.25, query=0)
    for chain in ("per_sample", "multipass"):
        torch.testing.assert_close(bench._forced(mod, chain, maps), ref, rtol=1e-5, atol=1e-6)
    before = {k: getattr(mod, k) for k in ("SMALL_N", "SAMPLE_N_MAX", "SAMPLE_MIN_BATCH")}
    bench._forced(mod, "multipass", maps)
    assert {k: getattr(mod, k) for k in before} == before  # the knobs are put back
    assert bench._other_chains(mod, 3, 29, device) == ["multipass", "per_sample"]  # N <= SMALL_N: registers taken
    assert bench._other_chains(mod, 3, mod.SAMPLE_N_MAX + 1, device) == []  # only the multi-pass chain runs there


@pytest.mark.kernels
def test_profile_script_splits_every_provider(tmp_path) -> None:
    # benchmarks/profile_kernels.py on the CPU: every case gets its wall and host time (device time needs CUDA)

    if not K.kernels_enabled(torch.empty(0)):
        pytest.skip("runs the Triton path on CPU tensors (TRITON_INTERPRET=1)")
    prof = _benchmark_module("profile_kernels")
    csv_path = tmp_path / "profile.csv"
    parts = prof.main(["--device", "cpu", "--quick", "--calls", "1", "--csv", str(csv_path), "--no-plot"])
    cases = {(p.op, p.provider) for p in parts}
    assert cases == {
        ("rollout", "triton_query (registers)"),
        ("rollout", "triton_query_per_sample"),
        ("rollout", "triton_query_multipass"),
        ("rollout", "triton_full"),
        ("topk_gather", "triton_fwd"),
        ("topk_gather", "triton_fwdbwd"),
        ("topk_gather", "torch_topk_gather_fwdbwd"),
        ("capture", "triton"),
        ("capture", "triton_query_row"),
        ("capture", "host_sdpa"),
    }
    for case in cases:
        got = {p.part: p.us_per_call for p in parts if (p.op, p.provider) == case}
        assert set(got) == {"wall", "host"} and all(v > 0 for v in got.values()), (case, got)
    rows = csv_path.read_text().splitlines()
    assert rows[0].split(",") == list(prof.COLUMNS) and len(rows) == 1 + len(parts)
    assert prof.plot(parts, tmp_path / "profile.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        prof.main(["--device", "cpu", "--ops", "rollout,nonsense"])
    # the device split, from profiler events as a CUDA run records them: device events summed by name, per call
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name: str, start: int, end: int, device_type: DeviceType) -> FunctionEvent:
        return FunctionEvent(id=start, name=name, thread=0, start_us=start, end_us=end, device_type=device_type)

    events = [
        event("_fuse_kernel", 0, 30, DeviceType.CUDA),
        event("_fuse_kernel", 100, 150, DeviceType.CUDA),
        event("Memset (Device)", 40, 42, DeviceType.CUDA),
        event("aten::empty", 0, 500, DeviceType.CPU),  # host work: not device time
    ]
    assert prof.kernel_times(events, calls=2) == {"_fuse_kernel": 40.0, "Memset (Device)": 1.0}


@pytest.mark.kernels
def test_capture_benchmark_row_block_alternative(device: str) -> None:
    # bench_capture.py times the one-pass kernel with each row block beside the default: each must be the capture too
    import importlib

    bench = _benchmark_module("bench_capture")
    mod = importlib.import_module("attnselect.kernels.capture")
    g = _gen(3)
    q, k = (torch.randn(2, 3, 100, 64, generator=g).to(device) for _ in range(2))  # 128-wide key tile
    before = dict(mod.ONEPASS_CONFIG)
    for config in bench.ROW_BLOCKS[128]:
        for causal in (False, True):
            out = bench._with_config(
                mod, 128, config, lambda c=causal: K.attention_probs(q, k, scale=0.125, causal=c)
            )
            expected = F.attention_probs(q, k, scale=0.125, causal=causal)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert mod.ONEPASS_CONFIG == before  # put back


def test_benchmark_check_ends_the_run_on_a_mismatch(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # the benchmark scripts time a provider that disagrees with the reference, then exit with an error naming it

    harness = _benchmark_module("harness")
    monkeypatch.setattr(harness, "MISMATCHES", [])
    assert harness.check("triton_query", 3e-7, 1e-4)
    harness.exit_on_mismatch()  # nothing wrong: returns
    assert not harness.check("triton_full", 0.5, 1e-4)
    assert "MISMATCH" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"triton_full \(5.00e-01\)"):
        harness.exit_on_mismatch()
