"""Fused attention rollout (MARS) in Triton.

Per layer, for every sample at once (grids span the batch, no Python loop over samples). Values are compared through
an order-preserving int32 key (the fp32 bit pattern of a non-negative value, ``-0.0`` folded into ``+0.0``), and an
entry's rank is that of the pair ``(key, flat index)``: the ``count = floor(ratio*N*N)`` smallest pairs are exactly the
entries the reference drops (ties at the threshold go lower flat index first). With ``P* = (T, cut)`` the
``count``-th smallest pair, an entry is dropped iff ``key < T or (key == T and flat <= cut)``, never flat index 0
under ``protect="entry0"``.

1. ``_pivot_kernel`` (grid ``B``): fuses the heads at a spread sample of 2048 positions (64 runs of 32 contiguous
   entries, read straight from the ``[B,H,N,N]`` maps) and picks two pivot keys ``lo <= hi`` whose sample ranks bracket
   the target rank by 5 standard deviations either side (the whole map is the sample when ``N*N <= 2048``: the pivots
   are then exact).
2. ``_fuse_kernel`` (grid ``B x tiles``), the one pass over the maps (evict-first cache hint; the workspace is stored
   evict-last for the passes after it): head fusion (mean/max/min, fp32 accumulation) into an fp32 workspace
   ``W [B,N*N]``; per tile it counts the entries with ``key < lo`` (one atomic per tile) and
   appends the pairs with ``lo <= key <= hi`` to a per-sample candidate list (a ``tl.cumsum`` compaction and one
   atomic per tile). It also flags negative and non-finite values.
3. ``_select_kernel`` (grid ``B``): if the target rank falls inside the bracket (``below < count <= below + cands``)
   and the list did not overflow, a radix select (8 bits per pass, ``tl.histogram``, stopping as soon as one pair is
   left) over the few candidates' 64-bit pairs ``key << 32 | flat`` gives ``P*``. Otherwise (an unlucky sample, heavy
   ties, adversarial data) the same select runs over the sample's whole workspace: slower, never wrong. With
   ``query`` rows, the last layer's select also writes ``v = (A_d[q] + e_q) / s_q`` directly.
4. Full product: ``_discard_rowsum_kernel`` zeroes the dropped entries of ``W`` in place and writes the row sums
   ``s = rowsum(A_d) + 1``; the chain step ``R <- (A_d @ R + R) / s`` is one cuBLAS ``baddbmm`` plus a division.
   Query-row chain: for each earlier layer ``_rowblock_kernel`` (grid ``B x row blocks``) computes the row sums of
   its rows and their share ``sum_r (v_r / s_r) A_d[r, :]`` with the discard applied on the fly, and
   ``_reduce_kernel`` adds the shares in a fixed order (deterministic, no float atomics) plus ``v / s``.

Short sequences (query-row chain, ``N <= SMALL_N = 128``: the CLIP text tower's 77 tokens): ``_small_query_kernel``
does a whole layer of one sample in one program, one launch per layer and three small allocations per call instead of
the eight launches above. It fuses the heads into a flat register tile of ``N*N`` values (the checks), finds
``P* = (T, cut)`` with two radix selects in registers (the key of rank ``count - 1``, then the flat index of the
remaining rank among the entries equal to ``T``), and re-reads the sample's maps (L2, if still there) by rows for the
row sums and the chain step ``v <- (v / s) @ A_d + v / s`` (the last layer: ``v = (A_d[q] + e_q) / s_q`` from row
``q`` only).

Longer query-row chains over a large batch (``SMALL_N < N <= SAMPLE_N_MAX = 256`` and at least one sample per SM:
ITSELF's image tower, ``B = 256, N = 193``): ``_sample_query_kernel`` again does a whole layer of one sample in one
program, one launch per layer, but through the sample's row of the fp32 workspace instead of registers. It reads the
maps once (streamed with an evict-first cache hint), writes the fused map to ``W[b]`` (kept with evict-last) and the
histogram of the keys' top byte, then finds ``P*`` by radix select over ``W[b]`` (three more passes of 8 bits, read
back from L2 while the workspace rows of the samples in flight fit there: ``2 x SMs x N*N x 4`` bytes, 39 MB at
``N = 193`` on an H100) and a pass for the flat index among ties only when the threshold's key is shared and not
dropped whole, and ends with the row pass of the chain step. No pivots, no candidate list, no cross-program
reduction; the batch must fill the GPU by itself (smaller batches take the multi-pass kernels, whose grids span
``B x tiles``).

Memory traffic per layer: the maps once; the fp32 workspace written once and read once by the multi-pass kernels
(plus a few per cent for the candidates), written once and read four times (from L2 where it fits) by the per-sample
kernel; everything else is per-sample scalars. Accumulation is fp32 throughout.

Limits: N up to 2**15 (flat indices fit in 32 bits). Inputs must be finite and non-negative, as the reference
requires: the kernels flag bad values and bad query rows in a small device buffer that the caller checks (see
:mod:`attnselect.kernels`).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["FLAG_BAD_MAPS", "FLAG_BAD_QUERY", "FUSION_CODES", "MAX_TOKENS", "query_chain", "rollout_forward"]

FUSION_CODES = {"mean": 0, "max": 1, "min": 2}
MAX_TOKENS = 2**15  # flat indices N*N fit in 32 bits
FLAG_BAD_MAPS = 1
FLAG_BAD_QUERY = 2

# tuning knobs (module constants so a benchmark can sweep them)
FUSE_BLOCK = 1024
FUSE_WARPS = 4
SAMPLE_RUNS = 64
SAMPLE_RUN = 32
SELECT_CHUNK = 4096
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis
ROW_TILE_MAX = 1024  # widest column tile of the row passes; wider rows loop over column tiles
BRACKET_SIGMAS = 5.0
SMALL_N = 128  # query-row chains up to this N hold a sample's layer in registers: one launch per layer
SMALL_WARPS = 16
SMALL_ROWS = 16
SAMPLE_N_MAX = 256  # longer query-row chains with at least SAMPLE_MIN_BATCH samples take one program per sample
#: smallest batch for the per-sample chain; None: never on a GPU, 1 on a CPU (the interpreter). Measured on an H200
#: (benchmarks/results/profile.csv, 856b728): at ITSELF's image shape (B = 256, N = 193, two layers, fp16) the
#: per-sample kernel takes 888 us of device time against the multi-pass chain's 477 us (0.99 vs 0.64 ms a call)
SAMPLE_MIN_BATCH: int | None = None
SAMPLE_BLOCK = 4096  # the per-sample kernel's flat tile: 16 values a thread on 8 warps (128 registers, 2 blocks/SM)
SAMPLE_WARPS = 8

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
    def _key(w):
        # order-preserving int32 key of an fp32 value >= 0; -0.0 folds into +0.0, negatives (flagged) clamp to 0
        return tl.maximum((w + 0.0).to(tl.int32, bitcast=True), 0)

    @triton.jit
    def _hist256(digit, m, HIST_MASK: tl.constexpr):
        if HIST_MASK:
            return tl.histogram(digit, 256, mask=m)
        else:  # Triton < 3.3 has no masked histogram
            bins = tl.arange(0, 256)
            return tl.sum(((digit[:, None] == bins[None, :]) & m[:, None]).to(tl.int32), axis=0)

    @triton.jit
    def _dropped(key, flat, thr, cut, PROTECT: tl.constexpr):
        drop = (key < thr) | ((key == thr) & (flat <= cut))
        if PROTECT:
            drop = drop & (flat != 0)
        return drop

    @triton.jit
    def _query_row(Q, b, N, FLAG):
        # sample b's query row: flagged when outside [0, N) (checked in the loaded width), then clamped into it
        q = tl.load(Q + b)
        if (q < 0) | (q >= N):
            tl.atomic_or(FLAG, 2)
        return tl.minimum(tl.maximum(q, 0), N - 1).to(tl.int32)

    @triton.jit
    def _last_layer_step(a, flat, q, cols, cm, thr, cut, PROTECT: tl.constexpr):
        # row q of the last layer (entries `a` at flat indices `flat`, columns `cols`): v = (A_d[q] + e_q) / s_q
        a = tl.where(_dropped(_key(a), flat, thr, cut, PROTECT) | (cm == 0), 0.0, a)
        s_q = tl.sum(a, axis=0) + 1.0
        return a / s_q + tl.where(cols == q, 1.0 / s_q, 0.0)

    @triton.jit
    def _rows_share(a, flat, m, rows, cols, V_ROW, N, thr, cut, PROTECT: tl.constexpr):
        # a block of rows of an earlier layer (entries `a`): their share sum_r (v_r / s_r) (A_d + I)[r, :] of the
        # chain step, v read from the sample's row V_ROW; the identity adds v_r / s_r itself on the diagonal
        a = tl.where(_dropped(_key(a), flat, thr, cut, PROTECT) | (m == 0), 0.0, a)
        w = tl.load(V_ROW + rows, mask=rows < N, other=0.0) / (tl.sum(a, axis=1) + 1.0)
        return tl.sum(w[:, None] * (a + tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)), axis=0)

    @triton.jit
    def _load_heads(src, m, STREAM: tl.constexpr):
        if STREAM:
            v = tl.load(src, mask=m, other=0.0, eviction_policy="evict_first")
        else:
            v = tl.load(src, mask=m, other=0.0)
        return v.to(tl.float32)

    @triton.jit
    def _fused(src, m, stride_h, H, FUSION: tl.constexpr, STREAM: tl.constexpr):
        # the same arithmetic wherever a fused value is needed: heads in order, fp32, mean = sum / H. A run-time loop
        # over heads (not unrolled: an unrolled one holds every head's tile in registers and spills). STREAM: the maps
        # are streamed once and a workspace should stay, so the loads carry the "evict_first" hint. Every caller
        # passes both constexprs: a default value of a nested function's constexpr is not one in every Triton.
        acc = _load_heads(src, m, STREAM)
        if FUSION == 2:  # a minimum can hide an inf of any head, as in the reference
            bad = (acc != acc) | (tl.abs(acc) == float("inf"))
        else:  # mean and max carry a NaN or an inf of any head into `acc` (or max hides it, as the reference does)
            bad = acc != acc
        for _h in range(1, H):
            src += stride_h  # a pointer step, not h * stride_h: that product is 32-bit and wraps past 2**31
            v = _load_heads(src, m, STREAM)
            if FUSION == 0:
                acc += v
            elif FUSION == 1:
                acc = tl.maximum(acc, v, propagate_nan=tl.PropagateNan.ALL)
            else:
                acc = tl.minimum(acc, v, propagate_nan=tl.PropagateNan.ALL)
                bad = bad | (v != v) | (tl.abs(v) == float("inf"))  # a minimum can hide an inf, as in the reference
        if FUSION == 0:  # correctly rounded, as the reference (a plain `/` is an approximate division on the GPU)
            acc = tl.math.div_rn(acc, tl.zeros_like(acc) + H)
        bad = bad | (acc < 0) | (acc != acc) | (tl.abs(acc) == float("inf"))
        return acc, bad & m

    @triton.jit
    def _tile_rank_key(keys, valid, rank, HIST_MASK: tl.constexpr):
        # key of 0-based `rank` among the valid int32 keys (>= 0) of a register tile: 4 radix passes of 8 bits
        prefix = tl.program_id(0) * 0
        rem = prefix + rank + 1
        bins = tl.arange(0, 256)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            if p == 0:
                match = valid
            else:
                match = valid & ((keys >> (shift + 8)) == (prefix >> (shift + 8)))
            hist = _hist256((keys >> shift) & 255, match, HIST_MASK)
            cum = tl.cumsum(hist, 0)
            d = tl.sum((cum < rem).to(tl.int32), axis=0)
            rem = rem - tl.sum(tl.where(bins < d, hist, 0), axis=0)
            prefix = prefix | (d << shift)
        return prefix

    @triton.jit
    def _pivot_kernel(
        X,
        PIV,
        NN,
        stride_b,
        stride_h,
        rank_lo,
        rank_hi,
        H,
        FUSION: tl.constexpr,
        RUNS: tl.constexpr,
        RUN: tl.constexpr,
        WHOLE: tl.constexpr,
        HIST_MASK: tl.constexpr,
    ):
        b = tl.program_id(0)
        i = tl.arange(0, RUNS * RUN)
        if WHOLE:  # the sample is the whole map
            pos = i.to(tl.int64)
        else:
            run = i // RUN
            pos = (run.to(tl.int64) * NN) // RUNS + (i % RUN)
        m = pos < NN
        w, _ = _fused(X + b.to(tl.int64) * stride_b + pos, m, stride_h, H, FUSION, False)
        keys = _key(w)
        lo = tl.program_id(0) * 0
        hi = lo + 2147483647
        if rank_lo >= 0:
            lo = _tile_rank_key(keys, m, rank_lo, HIST_MASK)
        if rank_hi >= 0:
            hi = _tile_rank_key(keys, m, rank_hi, HIST_MASK)
        tl.store(PIV + 2 * b, lo)
        tl.store(PIV + 2 * b + 1, hi)

    @triton.jit
    def _fuse_kernel(
        X,
        W,
        PIV,
        BELOW,
        CNT,
        CAND,
        FLAG,
        NN,
        CAP,
        stride_b,
        stride_h,
        H,
        FUSION: tl.constexpr,
        SELECT: tl.constexpr,
        BLOCK: tl.constexpr,
        TILES_FIRST: tl.constexpr,
    ):
        if TILES_FIRST:  # more tiles than CUDA's second grid axis takes (N > 8192): the tiles go on the first
            b = tl.program_id(1)
            tile = tl.program_id(0)
        else:
            b = tl.program_id(0)
            tile = tl.program_id(1)
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        m = offs < NN
        # the maps are streamed once (evict-first); the workspace is read again by the select and row passes
        acc, bad = _fused(X + b.to(tl.int64) * stride_b + offs, m, stride_h, H, FUSION, True)
        tl.store(W + b.to(tl.int64) * NN + offs, acc, mask=m, eviction_policy="evict_last")
        any_bad = tl.max(bad.to(tl.int32), axis=0)
        if any_bad > 0:
            tl.atomic_or(FLAG, 1)
        if SELECT:
            lo = tl.load(PIV + 2 * b)
            hi = tl.load(PIV + 2 * b + 1)
            key = _key(acc)
            n_below = tl.sum((m & (key < lo)).to(tl.int32), axis=0)
            if n_below > 0:
                tl.atomic_add(BELOW + b, n_below, sem="relaxed")
            cand = m & (key >= lo) & (key <= hi)
            n_cand = tl.sum(cand.to(tl.int32), axis=0)
            if n_cand > 0:
                start = tl.atomic_add(CNT + b, n_cand, sem="relaxed")
                pos = start + tl.cumsum(cand.to(tl.int32), 0) - 1
                packed = (key.to(tl.int64) << 32) | offs.to(tl.int64)
                tl.store(CAND + b.to(tl.int64) * CAP + pos, packed, mask=cand & (pos < CAP))

    @triton.jit
    def _select_kernel(
        W,
        PIV,
        BELOW,
        CNT,
        CAND,
        THR,
        CUT,
        Q,
        V,
        FLAG,
        N,
        NN,
        CAP,
        count,
        SELECT: tl.constexpr,
        QUERY_ROW: tl.constexpr,
        PROTECT: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HIST_MASK: tl.constexpr,
    ):
        b = tl.program_id(0)
        zero = tl.program_id(0) * 0
        if SELECT:
            base_w = W + b.to(tl.int64) * NN
            base_c = CAND + b.to(tl.int64) * CAP
            below = tl.load(BELOW + b)
            total = tl.load(CNT + b)
            rank = count - below
            from_map = (rank < 1) | (rank > total) | (total > CAP)  # outside the bracket or overflow
            lo = tl.load(PIV + 2 * b)
            diff = lo ^ tl.load(PIV + 2 * b + 1)
            nbits = zero
            while (diff >> nbits) > 0:
                nbits += 1
            # bits >= hi_bit of every pair in the source are known (`prefix`)
            hi_bit = tl.where(from_map, zero + 63, nbits + 32)
            prefix = tl.where(from_map, 0, ((lo >> nbits) << nbits).to(tl.int64) << 32)
            rem = tl.where(from_map, zero + count, rank)
            n_src = tl.where(from_map, NN, total)
            cnt = n_src
            offs = tl.arange(0, CHUNK)
            bins = tl.arange(0, 256)
            while (hi_bit > 0) & (cnt > 1):
                width = tl.minimum(hi_bit, 8)
                shift = hi_bit - width
                hist = tl.zeros([256], dtype=tl.int32)
                for start in range(0, n_src, CHUNK):
                    idx = start + offs
                    mw = (idx < NN) & from_map
                    kw = _key(tl.load(base_w + idx, mask=mw, other=0.0))
                    mc = (idx < total) & (from_map == 0)
                    packed = tl.where(from_map, (kw.to(tl.int64) << 32) | idx, tl.load(base_c + idx, mask=mc, other=0))
                    match = (mw | mc) & ((packed >> hi_bit) == (prefix >> hi_bit))
                    digit = ((packed >> shift) & ((1 << width) - 1)).to(tl.int32)
                    hist += _hist256(digit, match, HIST_MASK)
                cum = tl.cumsum(hist, 0)
                d = tl.sum((cum < rem).to(tl.int32), axis=0)
                rem = rem - tl.sum(tl.where(bins < d, hist, 0), axis=0)
                cnt = tl.sum(tl.where(bins == d, hist, 0), axis=0)
                prefix = prefix | (d.to(tl.int64) << shift)
                hi_bit = shift
            pstar = prefix
            if hi_bit > 0:  # one pair left before the last bits were read: fetch it
                best = tl.full([CHUNK], -1, dtype=tl.int64)
                for start in range(0, n_src, CHUNK):
                    idx = start + offs
                    mw = (idx < NN) & from_map
                    kw = _key(tl.load(base_w + idx, mask=mw, other=0.0))
                    mc = (idx < total) & (from_map == 0)
                    packed = tl.where(from_map, (kw.to(tl.int64) << 32) | idx, tl.load(base_c + idx, mask=mc, other=0))
                    match = (mw | mc) & ((packed >> hi_bit) == (prefix >> hi_bit))
                    best = tl.maximum(best, tl.where(match, packed, -1))
                pstar = tl.max(best, axis=0)
            thr = (pstar >> 32).to(tl.int32)  # a key (< 2**31) and a flat index (< 2**30): 32-bit compares later
            cut = (pstar & 4294967295).to(tl.int32)
        else:  # count = 0 keeps everything (no key is < -1); count >= N*N drops everything (but a protected entry 0):
            # every key of a finite value is below 2**31 - 1, and a NaN pattern equal to it is dropped through `cut`
            thr = tl.where(count <= 0, zero - 1, zero + 2147483647)
            cut = tl.where(count <= 0, zero - 1, zero + 2147483647)
        tl.store(THR + b, thr)
        tl.store(CUT + b, cut)
        if QUERY_ROW:
            q = _query_row(Q, b, N, FLAG)
            row = W + b.to(tl.int64) * NN + q * N
            cols = tl.arange(0, BLOCK_N)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for c0 in range(0, N, BLOCK_N):
                c = c0 + cols
                w = tl.load(row + c, mask=c < N, other=0.0)
                acc += tl.where(_dropped(_key(w), q * N + c, thr, cut, PROTECT), 0.0, w)
            s = tl.sum(acc, axis=0) + 1.0
            for c0 in range(0, N, BLOCK_N):
                c = c0 + cols
                w = tl.load(row + c, mask=c < N, other=0.0)
                a = tl.where(_dropped(_key(w), q * N + c, thr, cut, PROTECT), 0.0, w)
                a = a / s + tl.where(c == q, 1.0 / s, 0.0)
                tl.store(V + b.to(tl.int64) * N + c, a, mask=c < N)

    @triton.jit
    def _discard_rowsum_kernel(
        W,
        S,
        THR,
        CUT,
        N,
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
            flat = rows[:, None] * N + c[None, :]
            w = tl.load(base + flat, mask=m, other=0.0)
            a = tl.where(_dropped(_key(w), flat, thr, cut, PROTECT), 0.0, w)
            tl.store(base + flat, a, mask=m)
            acc += tl.sum(a, axis=1)
        tl.store(S + b.to(tl.int64) * N + rows, acc + 1.0, mask=rm)

    @triton.jit
    def _rowblock_kernel(
        W,
        S,
        V_IN,
        PART,
        THR,
        CUT,
        N,
        PROTECT: tl.constexpr,
        ONE_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # rows [r0, r0 + BLOCK_M) of one sample: their sums s_r, then their share sum_r (v_r / s_r) A_d[r, :]
        b = tl.program_id(0)
        rb = tl.program_id(1)
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rm = rows < N
        thr = tl.load(THR + b)
        cut = tl.load(CUT + b)
        base = W + b.to(tl.int64) * N * N
        vrow = b.to(tl.int64) * N
        part = PART + (b.to(tl.int64) * tl.num_programs(1) + rb) * N
        if ONE_BLOCK:  # the rows fit one tile (N <= BLOCK_N): read it once for both the sums and the share
            m = rm[:, None] & (cols < N)[None, :]
            flat = rows[:, None] * N + cols[None, :]
            w = tl.load(base + flat, mask=m, other=0.0)
            a = tl.where(_dropped(_key(w), flat, thr, cut, PROTECT), 0.0, w)
            s = tl.sum(a, axis=1) + 1.0
            tl.store(S + vrow + rows, s, mask=rm)
            wv = tl.load(V_IN + vrow + rows, mask=rm, other=0.0) / s
            tl.store(part + cols, tl.sum(wv[:, None] * a, axis=0), mask=cols < N)
        else:
            acc = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c0 in range(0, N, BLOCK_N):
                c = c0 + cols
                m = rm[:, None] & (c < N)[None, :]
                flat = rows[:, None] * N + c[None, :]
                w = tl.load(base + flat, mask=m, other=0.0)
                acc += tl.sum(tl.where(_dropped(_key(w), flat, thr, cut, PROTECT), 0.0, w), axis=1)
            s = acc + 1.0
            tl.store(S + vrow + rows, s, mask=rm)
            wv = tl.load(V_IN + vrow + rows, mask=rm, other=0.0) / s
            for c0 in range(0, N, BLOCK_N):
                c = c0 + cols
                m = rm[:, None] & (c < N)[None, :]
                flat = rows[:, None] * N + c[None, :]
                w = tl.load(base + flat, mask=m, other=0.0)
                a = tl.where(_dropped(_key(w), flat, thr, cut, PROTECT), 0.0, w)
                tl.store(part + c, tl.sum(wv[:, None] * a, axis=0), mask=c < N)

    @triton.jit
    def _reduce_kernel(PART, S, V_IN, V_OUT, N, NUM_RB, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cm = c < N
        vrow = b.to(tl.int64) * N
        r0 = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
        for rb in range(0, NUM_RB, BLOCK_R):
            r = rb + r0
            src = PART + (b.to(tl.int64) * NUM_RB + r[:, None]) * N + c[None, :]
            acc += tl.load(src, mask=(r < NUM_RB)[:, None] & cm[None, :], other=0.0)
        acc = tl.sum(acc, axis=0)
        own = tl.load(V_IN + vrow + c, mask=cm, other=0.0) / tl.load(S + vrow + c, mask=cm, other=1.0)
        tl.store(V_OUT + vrow + c, acc + own, mask=cm)


if triton is not None:

    @triton.jit
    def _small_query_kernel(
        X,
        V_IN,
        V_OUT,
        Q,
        FLAG,
        N,
        NN,
        count,
        stride_b,
        stride_h,
        H,
        FUSION: tl.constexpr,
        LAST: tl.constexpr,
        SELECT: tl.constexpr,
        PROTECT: tl.constexpr,
        BLOCK_NN: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
        HIST_MASK: tl.constexpr,
    ):
        # one sample's layer in one program (N*N <= BLOCK_NN): one step of the query-row chain,
        # v <- (v / s) @ A_d + v / s, or for the last layer v <- (A_d[q] + e_q) / s_q
        b = tl.program_id(0).to(tl.int64)
        src = X + b * stride_b
        # 1. the fused map as one flat register tile: the checks and P* = (thr, cut), the count-th smallest pair
        i = tl.arange(0, BLOCK_NN)
        mi = i < NN
        flat_w, bad = _fused(src + i, mi, stride_h, H, FUSION, False)
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            tl.atomic_or(FLAG, 1)
        if SELECT:
            key1 = _key(flat_w)
            thr = _tile_rank_key(key1, mi, count - 1, HIST_MASK)
            rem = count - tl.sum((mi & (key1 < thr)).to(tl.int32), axis=0)
            cut = _tile_rank_key(i, mi & (key1 == thr), rem - 1, HIST_MASK)  # the rem-th tie in flat order
        else:  # count = 0 keeps everything (no key is < 0); count >= N*N drops everything (but a protected entry 0)
            thr = tl.program_id(0) * 0 + tl.where(count > 0, 2147483647, 0)
            cut = tl.program_id(0) * 0 - 1
        # 2. the discarded map by rows (the sample's maps are read again, from L2 if still there): row sums, chain step
        cols = tl.arange(0, BLOCK)
        cm = cols < N
        vrow = b * N
        if LAST:
            q = _query_row(Q, b, N, FLAG)
            flat = q * N + cols
            a, _ = _fused(src + flat, cm, stride_h, H, FUSION, False)
            v = _last_layer_step(a, flat, q, cols, cm, thr, cut, PROTECT)
        else:
            v = tl.zeros([BLOCK], dtype=tl.float32)
            rr = tl.arange(0, ROWS)
            for r0 in range(0, N, ROWS):
                rows = r0 + rr
                m = (rows < N)[:, None] & cm[None, :]
                flat = rows[:, None] * N + cols[None, :]
                a, _ = _fused(src + flat, m, stride_h, H, FUSION, False)
                v += _rows_share(a, flat, m, rows, cols, V_IN + vrow, N, thr, cut, PROTECT)
        tl.store(V_OUT + vrow + cols, v, mask=cm)

    @triton.jit
    def _sample_query_kernel(
        X,
        W,
        V_IN,
        V_OUT,
        Q,
        FLAG,
        N,
        NN,
        count,
        stride_b,
        stride_h,
        H,
        FUSION: tl.constexpr,
        LAST: tl.constexpr,
        SELECT: tl.constexpr,
        PROTECT: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ROWS: tl.constexpr,
        HIST_MASK: tl.constexpr,
    ):
        # one sample's layer in one program, through the sample's own fp32 workspace row W[b] (read back from L2):
        # one step of the query-row chain, v <- (v / s) @ A_d + v / s, or for the last layer v <- (A_d[q] + e_q) / s_q
        b = tl.program_id(0).to(tl.int64)
        src = X + b * stride_b
        wb = W + b * NN
        i = tl.arange(0, BLOCK)
        bins = tl.arange(0, 256)
        # 1. the maps, once: fused heads into W[b], the input checks, and the histogram of the keys' top byte
        hist = tl.zeros([256], dtype=tl.int32)
        any_bad = tl.program_id(0) * 0
        for t0 in range(0, NN, BLOCK):
            idx = t0 + i
            m = idx < NN
            acc, bad = _fused(src + idx, m, stride_h, H, FUSION, True)
            tl.store(wb + idx, acc, mask=m, eviction_policy="evict_last")
            any_bad = tl.maximum(any_bad, tl.max(bad.to(tl.int32), axis=0))
            if SELECT:
                hist += _hist256(_key(acc) >> 24, m, HIST_MASK)
        if any_bad > 0:
            tl.atomic_or(FLAG, 1)
        tl.debug_barrier()  # W[b] is read back below by other threads of this program
        # 2. P* = (thr, cut), the count-th smallest pair (key, flat index): the key by radix select, 8 bits a pass
        # (the top byte's histogram is already there), then the flat index among the entries equal to it
        if SELECT:
            rem = tl.program_id(0) * 0 + count  # 1-based rank within the bucket being narrowed
            prefix = tl.program_id(0) * 0
            for p in tl.static_range(4):
                shift = 24 - 8 * p
                if p > 0:
                    hist = tl.zeros([256], dtype=tl.int32)
                    for t0 in range(0, NN, BLOCK):
                        idx = t0 + i
                        m = idx < NN
                        key = _key(tl.load(wb + idx, mask=m, other=0.0, eviction_policy="evict_last"))
                        match = m & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                        hist += _hist256((key >> shift) & 255, match, HIST_MASK)
                cum = tl.cumsum(hist, 0)
                d = tl.sum((cum < rem).to(tl.int32), axis=0)
                rem = rem - tl.sum(tl.where(bins < d, hist, 0), axis=0)
                ties = tl.sum(tl.where(bins == d, hist, 0), axis=0)
                prefix = prefix | (d << shift)
            thr = prefix
            cut = tl.program_id(0) * 0 + 2147483647  # every entry equal to thr is dropped when rem == ties
            if rem < ties:  # the rem-th of them in flat order is the last one dropped
                seen = tl.program_id(0) * 0
                t0 = tl.program_id(0) * 0
                while t0 < NN:
                    idx = t0 + i
                    m = idx < NN
                    tie = m & (_key(tl.load(wb + idx, mask=m, other=0.0)) == thr)
                    upto = seen + tl.cumsum(tie.to(tl.int32), 0)
                    hit = tl.max(tl.where(tie & (upto == rem), idx, -1), axis=0)
                    if hit >= 0:
                        cut = hit
                        t0 = NN
                    seen += tl.sum(tie.to(tl.int32), axis=0)
                    t0 += BLOCK
        else:  # count = 0 keeps everything (no key is < 0); count >= N*N drops everything (but a protected entry 0)
            thr = tl.program_id(0) * 0 + tl.where(count > 0, 2147483647, 0)
            cut = tl.program_id(0) * 0 - 1
        # 3. the discarded map by rows, from W[b]: row sums and the chain step
        cols = tl.arange(0, BLOCK_N)
        cm = cols < N
        vrow = b * N
        if LAST:
            q = _query_row(Q, b, N, FLAG)
            flat = q * N + cols
            v = _last_layer_step(tl.load(wb + flat, mask=cm, other=0.0), flat, q, cols, cm, thr, cut, PROTECT)
        else:
            v = tl.zeros([BLOCK_N], dtype=tl.float32)
            rr = tl.arange(0, ROWS)
            for r0 in range(0, N, ROWS):
                rows = r0 + rr
                m = (rows < N)[:, None] & cm[None, :]
                flat = rows[:, None] * N + cols[None, :]
                a = tl.load(wb + flat, mask=m, other=0.0, eviction_policy="evict_first")
                v += _rows_share(a, flat, m, rows, cols, V_IN + vrow, N, thr, cut, PROTECT)
        tl.store(V_OUT + vrow + cols, v, mask=cm)


def discard_count(ratio: float, n: int) -> int:
    """Number of entries the discard zeroes, with the reference's exact float arithmetic."""
    return math.floor(n * n * ratio)


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
    if n > MAX_TOKENS:
        raise ValueError(f"the Triton rollout handles N <= {MAX_TOKENS} tokens, got N = {n}")
    for i, a in enumerate(maps):
        if a.dim() not in (3, 4) or a.shape[-1] != a.shape[-2] or a.shape[0] != b or a.shape[-1] != n:
            raise ValueError(
                f"attentions[{i}] must have shape [B,H,N,N] or [B,N,N] with B = {b}, N = {n}, got {tuple(a.shape)}"
            )
        if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"attentions[{i}] must be fp32, fp16 or bf16 for the Triton path, got {a.dtype}")
        if a.device != maps[0].device:
            raise ValueError(f"attentions[{i}] is on {a.device} but attentions[0] is on {maps[0].device}")


def _pivot_ranks(count: int, nn_: int, samples: int) -> tuple[int, int, bool]:
    """0-based sample ranks of the pivots (-1: none on that side) and whether the sample is the whole map."""
    if nn_ <= samples:
        return count - 1, count - 1, True
    q = count / nn_
    centre = q * samples
    spread = BRACKET_SIGMAS * math.sqrt(samples * q * (1.0 - q)) + 2.0
    lo = math.floor(centre - spread)
    hi = math.ceil(centre + spread)
    return (lo if lo >= 0 else -1), (hi if hi < samples else -1), False


def rollout_forward(
    maps: Sequence[Tensor],
    ratios: Sequence[float],
    head_fusion: str = "mean",
    protect: str = "entry0",
    rows: Tensor | None = None,
    *,
    checked: bool = False,
) -> tuple[Tensor, Tensor]:
    """Launch the fused rollout.

    Args:
        maps: per-layer maps in forward order, each ``[B,H,N,N]`` or ``[B,N,N]`` (fp32/fp16/bf16, one device).
        ratios: one discard ratio in ``[0, 1]`` per layer.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"``.
        protect: ``"entry0"`` or ``"none"``.
        rows: None for the full product, or a LongTensor ``[B]`` of per-sample query rows.
        checked: the caller has validated the maps, ratios and choices (the gate's hot path); skip doing it again.

    Returns:
        ``(result, flags)``: the ``[B,N,N]`` fp32 rollout (or its ``[B,N]`` query rows) and an int32 ``[1]`` device
        tensor whose bits say what was wrong with the input (:data:`FLAG_BAD_MAPS`: negative or non-finite maps;
        :data:`FLAG_BAD_QUERY`: a query row outside ``[0, N)``; the result is then meaningless). Reading it is left to
        the caller, so the launch needs no device synchronisation.
    """
    if not checked:
        _check_inputs(maps, ratios, head_fusion, protect)
    _require_triton()
    b, n = maps[0].shape[0], maps[0].shape[-1]
    nn_ = n * n
    device = maps[0].device
    layers = len(maps)
    if rows is not None:
        if rows.shape != (b,):
            raise ValueError(f"rows must have shape [B] = [{b}], got {tuple(rows.shape)}")
        if rows.device != device or rows.dtype not in (torch.int32, torch.int64) or rows.stride(0) != 1:
            rows = rows.to(device=device, dtype=torch.int64).contiguous()
    fusion = FUSION_CODES[head_fusion]
    prot = protect == "entry0"
    order = list(zip(maps, ratios))
    chain = None if rows is None else query_chain(b, n, device)
    if chain == "registers":
        return _small_query_chain(order, n, fusion, prot, rows)
    if chain == "per-sample":
        return _sample_query_chain(order, n, fusion, prot, rows)
    samples = SAMPLE_RUNS * SAMPLE_RUN
    cap = min(nn_, max(SELECT_CHUNK, nn_ // 8))
    work = torch.empty(b, nn_, device=device, dtype=torch.float32)
    cand = torch.empty(b, cap, device=device, dtype=torch.int64)
    counters = torch.zeros(layers * 2 * b + 1, device=device, dtype=torch.int32)  # below, cands per layer; flags
    flags = counters[-1:]
    piv = torch.empty(b, 2, device=device, dtype=torch.int32)
    sums = torch.empty(b, n, device=device, dtype=torch.float32)
    thr = torch.empty(b, device=device, dtype=torch.int32)
    cut = torch.empty(b, device=device, dtype=torch.int32)
    block_n = min(ROW_TILE_MAX, max(16, triton.next_power_of_2(n)))
    rows_arg = rows if rows is not None else thr

    def prepare(layer: int, attn: Tensor, ratio: float, query_row: bool, out: Tensor | None) -> None:
        x = attn if attn.dim() == 4 else attn.unsqueeze(1)
        if x.stride(-1) != 1 or x.stride(-2) != n:
            x = x.contiguous()
        heads = x.shape[1]
        fus = fusion if heads > 1 else 0
        count = discard_count(ratio, n)
        select = 0 < count < nn_
        below = counters[layer * 2 * b : layer * 2 * b + b]
        cnt = counters[layer * 2 * b + b : layer * 2 * b + 2 * b]
        if select:
            rank_lo, rank_hi, whole = _pivot_ranks(count, nn_, samples)
            _pivot_kernel[(b,)](
                x, piv, nn_, x.stride(0), x.stride(1), rank_lo, rank_hi,
                H=heads, FUSION=fus, RUNS=SAMPLE_RUNS, RUN=SAMPLE_RUN, WHOLE=whole, HIST_MASK=_HIST_MASK,
                num_warps=8,
            )  # fmt: skip
        tiles = triton.cdiv(nn_, FUSE_BLOCK)
        _fuse_kernel[(tiles, b) if tiles > _MAX_GRID_Y else (b, tiles)](
            x, work, piv, below, cnt, cand, flags, nn_, cap, x.stride(0), x.stride(1),
            H=heads, FUSION=fus, SELECT=select, BLOCK=FUSE_BLOCK, TILES_FIRST=tiles > _MAX_GRID_Y, num_warps=FUSE_WARPS,
        )  # fmt: skip
        _select_kernel[(b,)](
            work, piv, below, cnt, cand, thr, cut, rows_arg, out if out is not None else work, flags,
            n, nn_, cap, count if select else (0 if count <= 0 else 1),
            SELECT=select, QUERY_ROW=query_row, PROTECT=prot, CHUNK=SELECT_CHUNK, BLOCK_N=block_n,
            HIST_MASK=_HIST_MASK, num_warps=8,
        )  # fmt: skip

    if rows is None:
        result = None
        bm = 16 if block_n <= 256 else 4
        for layer, (attn, ratio) in enumerate(order):
            prepare(layer, attn, ratio, False, None)
            _discard_rowsum_kernel[(b, triton.cdiv(n, bm))](
                work, sums, thr, cut, n, PROTECT=prot, BLOCK_M=bm, BLOCK_N=block_n
            )
            a = work.view(b, n, n)
            if result is None:
                result = a + torch.eye(n, device=device, dtype=torch.float32)
            else:
                result = torch.baddbmm(result, a, result)
            result = result / sums.unsqueeze(-1)
        return result, flags
    result = torch.empty(b, n, device=device, dtype=torch.float32)
    spare = torch.empty_like(result)
    bm = max(1, min(32, 8192 // block_n))
    num_rb = triton.cdiv(n, bm)
    part = torch.empty(b, num_rb, n, device=device, dtype=torch.float32) if layers > 1 else None
    red_block = min(128, max(16, triton.next_power_of_2(n)))
    red_rows = min(32, triton.next_power_of_2(num_rb))
    for i, (attn, ratio) in enumerate(reversed(order)):
        layer = layers - 1 - i
        if i == 0:
            prepare(layer, attn, ratio, True, result)
            continue
        prepare(layer, attn, ratio, False, None)
        _rowblock_kernel[(b, num_rb)](
            work,
            sums,
            result,
            part,
            thr,
            cut,
            n,
            PROTECT=prot,
            ONE_BLOCK=n <= block_n,
            BLOCK_M=bm,
            BLOCK_N=block_n,
            num_warps=8 if n <= block_n else 4,  # the one-read tile stays in registers: 32 values per thread
        )
        _reduce_kernel[(b, triton.cdiv(n, red_block))](
            part, sums, result, spare, n, num_rb, BLOCK_R=red_rows, BLOCK=red_block
        )
        result, spare = spare, result
    return result, flags


def _small_query_chain(
    order: Sequence[tuple[Tensor, float]], n: int, fusion: int, prot: bool, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """The query-row chain for ``N <= SMALL_N``: one launch per layer, each sample's layer held in registers."""
    b = rows.shape[0]
    device = rows.device
    result = torch.empty(b, n, device=device, dtype=torch.float32)
    spare = torch.empty(b, n, device=device, dtype=torch.float32)
    flags = torch.zeros(1, device=device, dtype=torch.int32)
    block = max(16, triton.next_power_of_2(n))
    block_nn = max(16, triton.next_power_of_2(n * n))
    warps = max(1, min(SMALL_WARPS, block_nn // 512))  # about 16 fp32 values of the flat tile per thread
    for i, (attn, ratio) in enumerate(reversed(order)):
        x = attn if attn.dim() == 4 else attn.unsqueeze(1)
        if x.stride(-1) != 1 or x.stride(-2) != n:
            x = x.contiguous()
        count = discard_count(ratio, n)
        _small_query_kernel[(b,)](
            x, result, spare, rows, flags, n, n * n, count if 0 < count < n * n else (0 if count <= 0 else 1),
            x.stride(0), x.stride(1), x.shape[1],
            FUSION=fusion if x.shape[1] > 1 else 0, LAST=i == 0, SELECT=0 < count < n * n, PROTECT=prot,
            BLOCK_NN=block_nn, BLOCK=block, ROWS=SMALL_ROWS, HIST_MASK=_HIST_MASK, num_warps=warps,
        )  # fmt: skip
        result, spare = spare, result
    return result, flags


def query_chain(batch: int, n: int, device: torch.device) -> str:
    """Which query-row chain :func:`rollout_forward` runs for ``batch`` samples of ``N = n`` tokens on ``device``.

    ``"registers"`` (``N <= SMALL_N``: a sample's layer in one program's registers), ``"per-sample"``
    (``N <= SAMPLE_N_MAX`` and at least :func:`_sample_min_batch` samples: one program per sample through its workspace
    row) or ``"multipass"`` (pivots, fusion, select and row-block kernels, each spread over the whole batch).
    """
    if n <= SMALL_N:
        return "registers"
    if n <= SAMPLE_N_MAX and batch >= _sample_min_batch(device):
        return "per-sample"
    return "multipass"


def _sample_min_batch(device: torch.device) -> int:
    """Smallest batch that takes the per-sample chain: :data:`SAMPLE_MIN_BATCH`; by default 1 on a CPU (the
    interpreter) and never on a GPU (or the offline compile's ``meta`` tensors), where the multi-pass chain measured
    faster (:data:`SAMPLE_MIN_BATCH`)."""
    if SAMPLE_MIN_BATCH is not None:
        return SAMPLE_MIN_BATCH
    return 1 if device.type == "cpu" else sys.maxsize


def _sample_query_chain(
    order: Sequence[tuple[Tensor, float]], n: int, fusion: int, prot: bool, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """The query-row chain for ``SMALL_N < N <= SAMPLE_N_MAX`` and large batches: one launch per layer, one program
    per sample, the fused map in an fp32 workspace row that the same program reads back (from L2)."""
    b = rows.shape[0]
    nn_ = n * n
    device = rows.device
    work = torch.empty(b, nn_, device=device, dtype=torch.float32)
    result = torch.empty(b, n, device=device, dtype=torch.float32)
    spare = torch.empty(b, n, device=device, dtype=torch.float32)
    flags = torch.zeros(1, device=device, dtype=torch.int32)
    block_n = max(16, triton.next_power_of_2(n))
    rows_per_step = max(1, min(32, SAMPLE_BLOCK // block_n))
    for i, (attn, ratio) in enumerate(reversed(order)):
        x = attn if attn.dim() == 4 else attn.unsqueeze(1)
        if x.stride(-1) != 1 or x.stride(-2) != n:
            x = x.contiguous()
        count = discard_count(ratio, n)
        _sample_query_kernel[(b,)](
            x, work, result, spare, rows, flags, n, nn_, count if 0 < count < nn_ else (0 if count <= 0 else 1),
            x.stride(0), x.stride(1), x.shape[1],
            FUSION=fusion if x.shape[1] > 1 else 0, LAST=i == 0, SELECT=0 < count < nn_, PROTECT=prot,
            BLOCK=SAMPLE_BLOCK, BLOCK_N=block_n, ROWS=rows_per_step, HIST_MASK=_HIST_MASK, num_warps=SAMPLE_WARPS,
        )  # fmt: skip
        result, spare = spare, result
    return result, flags
