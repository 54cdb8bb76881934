"""Fused attention rollout (MARS) in Triton.

Algorithm, per layer, for every sample at once (grids span the batch, no Python loop over samples):

1. ``_fuse_kernel`` (grid ``B x tiles``): head fusion (mean/max/min) of ``[B,H,N,N]`` maps in any float dtype into an
   fp32 workspace ``W [B,N*N]``, flagging negative or non-finite values per sample.
2. ``_select_kernel`` (grid ``B``): exact per-sample selection of the ``count = floor(ratio*N*N)``-th smallest entry.
   Values are mapped to order-preserving integer keys (the float bit pattern, sign-adjusted, with ``-0.0`` folded
   into ``+0.0``) and a 4-pass radix select (8 bits per pass, ``tl.histogram``) finds the threshold key ``T`` and how
   many entries equal to ``T`` still need dropping. Only if that is fewer than all of them (a tie at the threshold)
   does one extra pass find the flat index ``cut`` of the last tie to drop, so ties go lower flat index first.
   An entry is dropped iff ``key < T or (key == T and flat <= cut)``, never flat index 0 under ``protect="entry0"``.
3. Full product: ``_discard_rowsum_kernel`` zeroes the dropped entries of ``W`` in place and writes the row sums
   ``s = rowsum(A_d) + 1``; the chain step ``R <- (A_d @ R + R) / s`` is one cuBLAS ``baddbmm`` plus a division
   (the identity start is never multiplied: the first layer gives ``R = (A_d + I) / s``).
   Query-row chain: ``_query_row_kernel`` turns row ``q_b`` of the last layer into ``v = (A_d[q] + e_q) / s_q``;
   for each earlier layer ``_discard_rowsum_kernel`` (read only) gives ``s`` and ``_vecmat_kernel`` computes
   ``v <- (v / s) A_d + v / s`` with the discard applied on the fly, so ``A_d`` is never written.

Passes over a ``[B,N,N]`` fp32 map per layer: 1 write (fusion), 4 reads (select; 5 with a threshold tie),
then 1 read + 1 write (full product) or 2 reads (query chain). Accumulation is fp32 throughout.

Limits: N up to 2**15 (keys, flat indices and the workspace use int64 offsets; tested to N = 1025). The select
kernel runs one program per sample, so a batch of one uses a single SM for that step. Inputs must be finite and
non-negative, as the reference requires (checked in-kernel, raised after the launch).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["FUSION_CODES", "rollout_forward"]

FUSION_CODES = {"mean": 0, "max": 1, "min": 2}

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the gate never calls in here without Triton
    triton = None
    tl = None


_HIST_MASK = triton is not None and "mask" in inspect.signature(tl.histogram).parameters


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton rollout kernels need the `triton` package (pip install attnselect[triton])")


if triton is not None:

    @triton.jit
    def _order_key(w):
        # order-preserving int64 key in [0, 2**32) of an fp32 value; -0.0 folds into +0.0 so the two tie
        w = w + 0.0
        bits = w.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return key.to(tl.int64) + 2147483648

    @triton.jit
    def _dropped(key, flat, thr, cut, PROTECT: tl.constexpr):
        drop = (key < thr) | ((key == thr) & (flat <= cut))
        if PROTECT:
            drop = drop & (flat != 0)
        return drop

    @triton.jit
    def _fuse_kernel(
        X,
        W,
        BAD,
        H,
        NN,
        stride_b,
        stride_h,
        FUSION: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < NN
        src = X + b.to(tl.int64) * stride_b + offs
        if FUSION == 0:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
        elif FUSION == 1:
            acc = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        else:
            acc = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        for h in range(H):
            v = tl.load(src + h * stride_h, mask=m, other=0.0).to(tl.float32)
            if FUSION == 0:
                acc += v
            elif FUSION == 1:
                acc = tl.maximum(acc, v)
            else:
                acc = tl.minimum(acc, v)
        if FUSION == 0:
            acc = acc / H
        tl.store(W + b.to(tl.int64) * NN + offs, acc, mask=m)
        bad = m & ((acc < 0) | (acc != acc) | (tl.abs(acc) == float("inf")))
        tl.atomic_max(BAD + b, tl.max(bad.to(tl.int32), axis=0))

    @triton.jit
    def _select_kernel(W, THR, CUT, NN, count, BLOCK: tl.constexpr, HIST_MASK: tl.constexpr):
        b = tl.program_id(0)
        base = W + b.to(tl.int64) * NN
        offs = tl.arange(0, BLOCK)
        bins = tl.arange(0, 256)
        prefix = tl.zeros([1], dtype=tl.int64)
        rem = tl.full([1], count, dtype=tl.int32)
        eq_count = tl.zeros([1], dtype=tl.int32)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros([256], dtype=tl.int32)
            for start in range(0, NN, BLOCK):
                idx = start + offs
                m = idx < NN
                key = _order_key(tl.load(base + idx, mask=m, other=0.0))
                if p > 0:
                    m = m & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                digit = ((key >> shift) & 255).to(tl.int32)
                if HIST_MASK:
                    hist += tl.histogram(digit, 256, mask=m)
                else:  # Triton < 3.3 has no masked histogram
                    hist += tl.sum(((digit[:, None] == bins[None, :]) & m[:, None]).to(tl.int32), axis=0)
            cum = tl.cumsum(hist, 0)
            d = tl.sum((cum[None, :] < rem[:, None]).to(tl.int32), axis=1)  # first bin whose cumsum reaches rem
            before = tl.sum(tl.where(bins[None, :] < d[:, None], hist[None, :], 0), axis=1)
            eq_count = tl.sum(tl.where(bins[None, :] == d[:, None], hist[None, :], 0), axis=1)
            rem = rem - before
            prefix = prefix | (d.to(tl.int64) << shift)
        # `rem` of the `eq_count` entries equal to the threshold are dropped, lowest flat index first
        cut = tl.full([1], 2147483647, dtype=tl.int64)
        need = tl.sum(rem, axis=0)
        if need < tl.sum(eq_count, axis=0):
            seen = tl.zeros([1], dtype=tl.int32)
            last = tl.full([1], -1, dtype=tl.int64)
            for start in range(0, NN, BLOCK):
                idx = start + offs
                m = idx < NN
                key = _order_key(tl.load(base + idx, mask=m, other=0.0))
                eq = m & (key == prefix)
                running = tl.cumsum(eq.to(tl.int32), 0)[None, :] + seen[:, None]
                hit = eq[None, :] & (running <= rem[:, None])
                last = tl.maximum(last, tl.max(tl.where(hit, idx[None, :].to(tl.int64), -1), axis=1))
                seen += tl.sum(eq.to(tl.int32), axis=0)
            cut = last
        one = tl.arange(0, 1)
        tl.store(THR + b + one, prefix)
        tl.store(CUT + b + one, cut)

    @triton.jit
    def _discard_rowsum_kernel(
        W,
        S,
        THR,
        CUT,
        N,
        WRITE: tl.constexpr,
        PROTECT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        b = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rm = rows < N
        thr = tl.load(THR + b)
        cut = tl.load(CUT + b)
        base = W + b.to(tl.int64) * N * N
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, N, BLOCK_N):
            c = c0 + cols
            m = rm[:, None] & (c < N)[None, :]
            flat = rows[:, None].to(tl.int64) * N + c[None, :]
            w = tl.load(base + flat, mask=m, other=0.0)
            a = tl.where(_dropped(_order_key(w), flat, thr, cut, PROTECT), 0.0, w)
            if WRITE:
                tl.store(base + flat, a, mask=m)
            acc += tl.sum(a, axis=1)
        tl.store(S + b.to(tl.int64) * N + rows, acc + 1.0, mask=rm)

    @triton.jit
    def _query_row_kernel(W, Q, V, THR, CUT, N, PROTECT: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        q = tl.load(Q + b)
        thr = tl.load(THR + b)
        cut = tl.load(CUT + b)
        base = W + b.to(tl.int64) * N * N
        cols = tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, N, BLOCK_N):
            c = c0 + cols
            flat = q * N + c
            w = tl.load(base + flat, mask=c < N, other=0.0)
            acc += tl.where(_dropped(_order_key(w), flat, thr, cut, PROTECT), 0.0, w)
        s = tl.sum(acc, axis=0) + 1.0
        for c0 in range(0, N, BLOCK_N):
            c = c0 + cols
            flat = q * N + c
            w = tl.load(base + flat, mask=c < N, other=0.0)
            a = tl.where(_dropped(_order_key(w), flat, thr, cut, PROTECT), 0.0, w)
            a = a / s + tl.where(c == q, 1.0 / s, 0.0)
            tl.store(V + b.to(tl.int64) * N + c, a, mask=c < N)

    @triton.jit
    def _vecmat_kernel(
        W,
        S,
        V_IN,
        V_OUT,
        THR,
        CUT,
        N,
        PROTECT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < N
        thr = tl.load(THR + b)
        cut = tl.load(CUT + b)
        base = W + b.to(tl.int64) * N * N
        vrow = b.to(tl.int64) * N
        rows0 = tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, N, BLOCK_M):
            r = r0 + rows0
            rm = r < N
            wv = tl.load(V_IN + vrow + r, mask=rm, other=0.0) / tl.load(S + vrow + r, mask=rm, other=1.0)
            flat = r[:, None].to(tl.int64) * N + cols[None, :]
            m = rm[:, None] & cm[None, :]
            w = tl.load(base + flat, mask=m, other=0.0)
            a = tl.where(_dropped(_order_key(w), flat, thr, cut, PROTECT), 0.0, w)
            acc += tl.sum(wv[:, None] * a, axis=0)
        own = tl.load(V_IN + vrow + cols, mask=cm, other=0.0) / tl.load(S + vrow + cols, mask=cm, other=1.0)
        tl.store(V_OUT + vrow + cols, acc + own, mask=cm)


def discard_count(ratio: float, n: int) -> int:
    """Number of entries the discard zeroes, with the reference's exact float arithmetic."""
    return math.floor(ratio * n * n)


def _check_inputs(maps: Sequence[Tensor], ratios: Sequence[float], head_fusion: str, protect: str) -> None:
    if len(maps) == 0:
        raise ValueError("attentions must hold at least one layer")
    if len(ratios) != len(maps):
        raise ValueError(f"got {len(ratios)} discard ratios for {len(maps)} layers")
    if head_fusion not in FUSION_CODES:
        raise ValueError(f"head_fusion must be one of {tuple(FUSION_CODES)}, got {head_fusion!r}")
    if protect not in ("entry0", "none"):
        raise ValueError(f"protect must be 'entry0' or 'none', got {protect!r}")
    b, n = maps[0].shape[0], maps[0].shape[-1]
    for i, a in enumerate(maps):
        if a.dim() not in (3, 4) or a.shape[-1] != a.shape[-2] or a.shape[0] != b or a.shape[-1] != n:
            raise ValueError(
                f"attentions[{i}] must have shape [B,H,N,N] or [B,N,N] with B = {b}, N = {n}, got {tuple(a.shape)}"
            )
        if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"attentions[{i}] must be fp32, fp16 or bf16 for the Triton path, got {a.dtype}")
        if a.device != maps[0].device:
            raise ValueError(f"attentions[{i}] is on {a.device} but attentions[0] is on {maps[0].device}")


def rollout_forward(
    maps: Sequence[Tensor],
    ratios: Sequence[float],
    head_fusion: str = "mean",
    protect: str = "entry0",
    rows: Tensor | None = None,
) -> Tensor:
    """Launch the fused rollout.

    Args:
        maps: per-layer maps in forward order, each ``[B,H,N,N]`` or ``[B,N,N]`` (fp32/fp16/bf16, one device).
        ratios: one discard ratio in ``[0, 1]`` per layer.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"``.
        protect: ``"entry0"`` or ``"none"``.
        rows: None for the full product, or a LongTensor ``[B]`` of per-sample query rows.

    Returns:
        ``[B,N,N]`` fp32 rollout, or ``[B,N]`` query rows of it.
    """
    _check_inputs(maps, ratios, head_fusion, protect)
    _require_triton()
    b, n = maps[0].shape[0], maps[0].shape[-1]
    nn_ = n * n
    device = maps[0].device
    if rows is not None:
        if rows.shape != (b,):
            raise ValueError(f"rows must have shape [B] = [{b}], got {tuple(rows.shape)}")
        rows = rows.to(device=device, dtype=torch.int64).contiguous()
    work = torch.empty(b, nn_, device=device, dtype=torch.float32)
    sums = torch.empty(b, n, device=device, dtype=torch.float32)
    thr = torch.empty(b, device=device, dtype=torch.int64)
    cut = torch.empty(b, device=device, dtype=torch.int64)
    bad = torch.zeros(b, device=device, dtype=torch.int32)
    fusion = FUSION_CODES[head_fusion]
    prot = protect == "entry0"
    block = 1024
    block_sel = 2048 if nn_ >= 2048 else max(16, triton.next_power_of_2(nn_))
    bm = 16
    bn = min(128, max(16, triton.next_power_of_2(n)))

    def prepare(attn: Tensor, ratio: float) -> None:
        x = attn if attn.dim() == 4 else attn.unsqueeze(1)
        if x.stride(-1) != 1 or x.stride(-2) != n:
            x = x.contiguous()
        heads = x.shape[1]
        _fuse_kernel[(b, triton.cdiv(nn_, block))](
            x, work, bad, heads, nn_, x.stride(0), x.stride(1), FUSION=fusion if heads > 1 else 0, BLOCK=block
        )
        count = discard_count(ratio, n)
        if count == 0:  # nothing dropped: keys are >= 0 > thr
            thr.fill_(-1)
            cut.fill_(-1)
        elif count >= nn_:  # everything dropped (but a protected entry 0)
            thr.fill_(1 << 33)
            cut.fill_(-1)
        else:
            _select_kernel[(b,)](
                work, thr, cut, nn_, count, BLOCK=block_sel if _HIST_MASK else 256, HIST_MASK=_HIST_MASK, num_warps=8
            )

    order = list(zip(maps, ratios))
    if rows is None:
        result = None
        for attn, ratio in order:
            prepare(attn, ratio)
            _discard_rowsum_kernel[(b, triton.cdiv(n, bm))](
                work, sums, thr, cut, n, WRITE=True, PROTECT=prot, BLOCK_M=bm, BLOCK_N=bn
            )
            a = work.view(b, n, n)
            if result is None:
                result = a + torch.eye(n, device=device, dtype=torch.float32)
            else:
                result = torch.baddbmm(result, a, result)
            result = result / sums.unsqueeze(-1)
    else:
        result = torch.empty(b, n, device=device, dtype=torch.float32)
        spare = torch.empty_like(result)
        for i, (attn, ratio) in enumerate(reversed(order)):
            prepare(attn, ratio)
            if i == 0:
                _query_row_kernel[(b,)](
                    work, rows, result, thr, cut, n, PROTECT=prot, BLOCK_N=min(1024, max(16, bn * 4))
                )
                continue
            _discard_rowsum_kernel[(b, triton.cdiv(n, bm))](
                work, sums, thr, cut, n, WRITE=False, PROTECT=prot, BLOCK_M=bm, BLOCK_N=bn
            )
            _vecmat_kernel[(b, triton.cdiv(n, bn))](
                work, sums, result, spare, thr, cut, n, PROTECT=prot, BLOCK_M=32, BLOCK_N=bn
            )
            result, spare = spare, result
    if bool(bad.any()):
        raise ValueError("attention maps must be finite and non-negative (softmax probabilities)")
    return result
