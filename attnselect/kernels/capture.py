"""Fused attention-probability capture in Triton: ``softmax(q k^T * scale + bias)`` fused over heads.

Two kernels, neither of which ever materialises the per-head ``[B,H,N,N]`` probabilities:

- ``_capture_onepass_kernel`` (key range up to 512, next power of two, times the head dim padded up to 64 in
  fp16/bf16; 256 x 64 in fp32): grid ``(B, cdiv(R, BLOCK_M))``, R the number of query rows kept (N, or the chosen
  ``query_rows``). Each program holds the whole key range of ``BLOCK_M`` query rows: per head, one ``QK^T`` tile,
  its exact row max and sum, and ``exp(s - m) / l`` folded into one register accumulator (sum for ``mean``, max,
  min), written once to the fp32 output (or per head with ``head_fusion=None``). Each head's logits are computed once.
- ``_capture_kernel`` (wider key ranges, such as N = 577 or 1025): two phases per program, flash-attention style:
  an online-softmax sweep over key blocks gives every head's row max and normaliser (a ``[B,H,R,2]`` fp32
  scratch), then every key block's logits are recomputed and folded. Two ``QK^T`` per layer.

Logits are fp32: fp16/bf16 ``q``, ``k`` use tensor-core dots with fp32 accumulation (their products are exact in
fp32), fp32 inputs use IEEE fp32 dots (no TF32). Under the Triton interpreter bf16 tiles are upcast to fp32 first
(the interpreter's bf16 dot is wrong). The additive bias may be any broadcastable view (strides of 0 are read as
such, nothing is expanded in memory); ``-inf`` blocks an entry and a fully blocked row gives zeros, as in
:func:`attnselect.functional.attention_probs`. Query rows outside ``[0, Nq)`` are clamped (memory stays in bounds)
and flagged in a device int32 the caller checks, so nothing here synchronises.

Limits: head dim up to 256, fp32/fp16/bf16 inputs (fp64 goes to the reference).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the gate never calls in here without Triton
    triton = None
    tl = None

__all__ = ["attention_probs_forward"]

_FUSION = {"mean": 0, "max": 1, "min": 2, None: 3}

if triton is not None:

    @triton.jit
    def _logits(
        Q,
        K,
        BIAS,
        b,
        h,
        qpos,
        rm,
        cols,
        d,
        NK,
        HD,
        scale,
        sqb,
        sqh,
        sqn,
        skb,
        skh,
        skn,
        sbb,
        sbh,
        sbn,
        sbk,
        HAS_BIAS: tl.constexpr,
        CAUSAL: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        h = b * 0 + h  # 64-bit like b: h * (head stride) wraps in 32 bits past 2**31 elements
        dm = d < HD
        cm = cols < NK
        q = tl.load(
            Q + b * sqb + h * sqh + qpos[:, None].to(tl.int64) * sqn + d[None, :],
            mask=rm[:, None] & dm[None, :],
            other=0.0,
        )
        k = tl.load(
            K + b * skb + h * skh + cols[:, None].to(tl.int64) * skn + d[None, :],
            mask=cm[:, None] & dm[None, :],
            other=0.0,
        )
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if HAS_BIAS:
            bias = tl.load(
                BIAS + b * sbb + h * sbh + qpos[:, None].to(tl.int64) * sbn + cols[None, :].to(tl.int64) * sbk,
                mask=rm[:, None] & cm[None, :],
                other=0.0,
            )
            s = s + bias.to(tl.float32)
        ok = cm[None, :] & rm[:, None]
        if CAUSAL:
            ok = ok & (cols[None, :] <= qpos[:, None])
        return tl.where(ok, s, float("-inf"))

    @triton.jit
    def _fold_init(FUSION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # the identity of the head fusion: 0 for the mean's sum, -inf for max, +inf for min
        if FUSION == 1:
            acc = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
        elif FUSION == 2:
            acc = tl.full([BLOCK_M, BLOCK_N], float("inf"), dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        return acc

    @triton.jit
    def _fold(acc, p, FUSION: tl.constexpr):
        # one head's probabilities into the accumulator (FUSION 3, per head, stores them instead and keeps acc)
        if FUSION == 0:
            acc += p
        elif FUSION == 1:
            acc = tl.maximum(acc, p)
        elif FUSION == 2:
            acc = tl.minimum(acc, p)
        return acc

    @triton.jit
    def _store_fused(OUT, acc, b, r, cols, om, sob, sor, H, FUSION: tl.constexpr):
        if FUSION != 3:
            if FUSION == 0:
                acc = acc / H
            tl.store(OUT + b * sob + r[:, None].to(tl.int64) * sor + cols[None, :], acc, mask=om)

    @triton.jit
    def _program_ids(ROWS_FIRST: tl.constexpr):
        # (sample, row block). With the row blocks on the fast grid axis a sample's row blocks run side by side and
        # share its keys through L2; otherwise every row block of a wave belongs to a different sample and the keys
        # are likely read from memory once per row block (reasoned from the launch order, not profiled).
        if ROWS_FIRST:
            return tl.program_id(1).to(tl.int64), tl.program_id(0)
        else:
            return tl.program_id(0).to(tl.int64), tl.program_id(1)

    @triton.jit
    def _rows_of(ROWS, FLAG, b, r, rm, srb, NQ, HAS_ROWS: tl.constexpr):
        if HAS_ROWS:
            qpos = tl.load(ROWS + b * srb + r, mask=rm, other=0)
            bad = tl.max((rm & ((qpos < 0) | (qpos >= NQ))).to(tl.int32), axis=0)  # in the loaded width
            if bad > 0:
                tl.atomic_or(FLAG, 1)
            qpos = tl.minimum(tl.maximum(qpos, 0), NQ - 1).to(tl.int32)  # in bounds; the flag reports the bad row
        else:
            qpos = r
        return qpos

    @triton.jit
    def _capture_onepass_kernel(
        Q,
        K,
        BIAS,
        ROWS,
        OUT,
        FLAG,
        H,
        R,
        NQ,
        NK,
        HD,
        scale,
        sqb,
        sqh,
        sqn,
        skb,
        skh,
        skn,
        sbb,
        sbh,
        sbn,
        sbk,
        srb,
        sob,
        soh,
        sor,
        HAS_BIAS: tl.constexpr,
        HAS_ROWS: tl.constexpr,
        CAUSAL: tl.constexpr,
        FUSION: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS_FIRST: tl.constexpr,
    ):
        # the whole key range in one tile: each head's logits are computed once, normalised exactly and folded
        b, rb = _program_ids(ROWS_FIRST)
        r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = r < R
        qpos = _rows_of(ROWS, FLAG, b, r, rm, srb, NQ, HAS_ROWS)
        d = tl.arange(0, BLOCK_D)
        cols = tl.arange(0, BLOCK_N)
        om = rm[:, None] & (cols < NK)[None, :]
        acc = _fold_init(FUSION, BLOCK_M, BLOCK_N)
        for h in range(H):
            s = _logits(
                Q, K, BIAS, b, h, qpos, rm, cols, d, NK, HD, scale,
                sqb, sqh, sqn, skb, skh, skn, sbb, sbh, sbn, sbk, HAS_BIAS, CAUSAL, IEEE,
            )  # fmt: skip
            m_i = tl.max(s, axis=1)
            m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
            p = tl.exp(s - m_i[:, None])
            l_i = tl.sum(p, axis=1)
            inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
            p = p * inv[:, None]
            if FUSION == 3:
                dst = OUT + b * sob + (b * 0 + h) * soh + r[:, None].to(tl.int64) * sor + cols[None, :]  # 64-bit
                tl.store(dst, p, mask=om)
            acc = _fold(acc, p, FUSION)
        _store_fused(OUT, acc, b, r, cols, om, sob, sor, H, FUSION)

    @triton.jit
    def _capture_kernel(
        Q,
        K,
        BIAS,
        ROWS,
        OUT,
        STATS,
        FLAG,
        H,
        R,
        NQ,
        NK,
        HD,
        scale,
        sqb,
        sqh,
        sqn,
        skb,
        skh,
        skn,
        sbb,
        sbh,
        sbn,
        sbk,
        srb,
        sob,
        soh,
        sor,
        HAS_BIAS: tl.constexpr,
        HAS_ROWS: tl.constexpr,
        CAUSAL: tl.constexpr,
        FUSION: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS_FIRST: tl.constexpr,
    ):
        b, rb = _program_ids(ROWS_FIRST)
        r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = r < R
        qpos = _rows_of(ROWS, FLAG, b, r, rm, srb, NQ, HAS_ROWS)
        d = tl.arange(0, BLOCK_D)
        cols0 = tl.arange(0, BLOCK_N)
        stats_m = STATS + (b * H * R) * 2
        # phase 1: per-head row max and normaliser
        for h in range(H):
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            for n0 in range(0, NK, BLOCK_N):
                s = _logits(
                    Q, K, BIAS, b, h, qpos, rm, n0 + cols0, d, NK, HD, scale,
                    sqb, sqh, sqn, skb, skh, skn, sbb, sbh, sbn, sbk, HAS_BIAS, CAUSAL, IEEE,
                )  # fmt: skip
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
                m_i = m_new
            m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
            inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
            tl.store(stats_m + (h * R + r) * 2, m_i, mask=rm)
            tl.store(stats_m + (h * R + r) * 2 + 1, inv, mask=rm)
        tl.debug_barrier()
        # phase 2: probabilities of every head folded into one tile, written once
        for n0 in range(0, NK, BLOCK_N):
            cols = n0 + cols0
            om = rm[:, None] & (cols < NK)[None, :]
            acc = _fold_init(FUSION, BLOCK_M, BLOCK_N)
            for h in range(H):
                s = _logits(
                    Q, K, BIAS, b, h, qpos, rm, cols, d, NK, HD, scale,
                    sqb, sqh, sqn, skb, skh, skn, sbb, sbh, sbn, sbk, HAS_BIAS, CAUSAL, IEEE,
                )  # fmt: skip
                m_i = tl.load(stats_m + (h * R + r) * 2, mask=rm, other=0.0)
                inv = tl.load(stats_m + (h * R + r) * 2 + 1, mask=rm, other=0.0)
                p = tl.exp(s - m_i[:, None]) * inv[:, None]
                if FUSION == 3:
                    dst = OUT + b * sob + (b * 0 + h) * soh + r[:, None].to(tl.int64) * sor + cols[None, :]  # 64-bit
                    tl.store(dst, p, mask=om)
                acc = _fold(acc, p, FUSION)
            _store_fused(OUT, acc, b, r, cols, om, sob, sor, H, FUSION)


# one-pass kernel: the largest keys x head-dim tile (next powers of two) it takes; above, the two-phase kernel runs
ONEPASS_MAX_TILE = 512 * 64
# (query rows per program, warps) by the key tile's width. 256 keys (ITSELF's image tower, N = 193): 64 rows on 16
# warps, measured on an H200 (benchmarks/results/capture.csv, two runs) at 0.31 / 0.37 ms against 0.44 / 0.49 ms for
# 32 rows on 8 warps; 128 keys (the text tower) stay at 32 rows (0.104 / 0.110 ms against 0.124 / 0.126 ms)
ONEPASS_CONFIG = {16: (32, 4), 32: (32, 4), 64: (32, 4), 128: (32, 4), 256: (64, 16), 512: (16, 8)}


def _onepass_config(keys_pow2: int, rows: int) -> tuple[int, int]:
    block_m, warps = ONEPASS_CONFIG[keys_pow2]
    return (16 if rows <= 16 else block_m), warps


_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension


def _grid(b: int, r: int, block_m: int) -> tuple[int, int]:
    """Row blocks on the fast axis (a sample's row blocks can share its keys in L2), unless B exceeds the y limit."""
    blocks = (r + block_m - 1) // block_m
    return (blocks, b) if b <= _MAX_GRID_Y else (b, blocks)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton capture kernel needs the `triton` package (pip install attnselect[triton])")


def attention_probs_forward(
    q: Tensor,
    k: Tensor,
    scale: float,
    bias: Tensor | None = None,
    causal: bool = False,
    head_fusion: str | None = "mean",
    query_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Launch the fused capture.

    Args:
        q: ``[B,H,Nq,d]`` queries (fp32/fp16/bf16).
        k: ``[B,H,Nk,d]`` keys, same dtype.
        scale: logit multiplier.
        bias: optional additive bias broadcastable to ``[B,H,Nq,Nk]``.
        causal: block keys after each query position (``Nq == Nk``).
        head_fusion: ``"mean"``, ``"max"``, ``"min"`` or None (per head).
        query_rows: optional LongTensor ``[R]`` or ``[B,R]`` of query rows to keep.

    Returns:
        ``(probs, flags)``: fp32 ``[B,R,Nk]`` (fused) or ``[B,H,R,Nk]`` (``head_fusion=None``), R = Nq without
        ``query_rows``; ``flags`` is None without ``query_rows``, else an int32 ``[1]`` device tensor, non-zero when a
        query row lay outside ``[0, Nq)`` (it was clamped; the caller raises). Nothing here synchronises.
    """
    _require_triton()
    if head_fusion not in _FUSION:
        raise ValueError(f"head_fusion must be 'mean', 'max', 'min' or None, got {head_fusion!r}")
    for t, name in ((q, "q"), (k, "k")):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B,H,N,d], got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be fp32, fp16 or bf16 for the Triton path, got {t.dtype}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and d")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    b, h, nq, hd = q.shape
    nk = k.shape[2]
    if hd > 256:
        raise ValueError(f"the Triton capture kernel handles head dims up to 256, got {hd}")
    if causal and nq != nk:
        raise ValueError(f"causal attention needs as many queries as keys, got {nq} and {nk}")
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if query_rows is not None:
        if query_rows.dtype.is_floating_point or query_rows.dtype == torch.bool:
            raise TypeError(f"query_rows must hold integer row indices, got dtype {query_rows.dtype}")
        if query_rows.dim() not in (1, 2) or (query_rows.dim() == 2 and query_rows.shape[0] != b):
            raise ValueError(f"query_rows must have shape [R] or [B,R] with B = {b}, got {tuple(query_rows.shape)}")
        rows = query_rows  # int32/int64 rows are read as they are; a 1-D list is shared by the batch (stride 0)
        if rows.device != q.device or rows.dtype not in (torch.int32, torch.int64):
            rows = rows.to(device=q.device, dtype=torch.int64)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        r = rows.shape[-1]
        rows_stride = rows.stride(0) if rows.dim() == 2 else 0
    else:
        rows = None
        rows_stride = 0
        r = nq
    if bias is not None:
        if not bias.is_floating_point():
            bias = bias.float()
        bias = bias.to(q.device)
        try:
            bias = bias.expand(b, h, nq, nk)
        except RuntimeError:
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to {(b, h, nq, nk)}") from None
    fused = head_fusion is not None
    shape = (b, r, nk) if fused else (b, h, r, nk)
    out = torch.empty(shape, device=q.device, dtype=torch.float32)
    flags = torch.zeros(1, device=q.device, dtype=torch.int32) if rows is not None else None
    if out.numel() == 0:
        return out, flags
    block_d = max(16, triton.next_power_of_2(hd))
    bs = bias.stride() if bias is not None else (0, 0, 0, 0)
    ieee = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and _interpreting())
    keys_pow2 = max(16, triton.next_power_of_2(nk))
    if keys_pow2 * block_d <= ONEPASS_MAX_TILE and not (ieee and not _interpreting() and keys_pow2 * block_d > 16384):
        block_m, warps = _onepass_config(keys_pow2, r)
        _capture_onepass_kernel[_grid(b, r, block_m)](
            q, k, bias if bias is not None else q, rows if rows is not None else q, out,
            flags if flags is not None else out, h, r, nq, nk, hd, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *bs,
            rows_stride, out.stride(0), out.stride(1) if not fused else 0, out.stride(-2),
            HAS_BIAS=bias is not None, HAS_ROWS=rows is not None, CAUSAL=bool(causal), FUSION=_FUSION[head_fusion],
            IEEE=ieee, BLOCK_M=block_m, BLOCK_N=keys_pow2, BLOCK_D=block_d, ROWS_FIRST=b <= _MAX_GRID_Y,
            num_warps=warps,
        )  # fmt: skip
        return out, flags
    stats = torch.empty(b, h, r, 2, device=q.device, dtype=torch.float32)
    block_m = 32 if block_d <= 64 else 16
    block_n = 64 if block_d <= 128 else 32
    _capture_kernel[_grid(b, r, block_m)](
        q,
        k,
        bias if bias is not None else q,
        rows if rows is not None else q,
        out,
        stats,
        flags if flags is not None else out,
        h,
        r,
        nq,
        nk,
        hd,
        float(scale),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        *bs,
        rows_stride,
        out.stride(0),
        out.stride(1) if not fused else 0,
        out.stride(-2),
        HAS_BIAS=bias is not None,
        HAS_ROWS=rows is not None,
        CAUSAL=bool(causal),
        FUSION=_FUSION[head_fusion],
        # the Triton interpreter multiplies bf16 tiles wrongly (bit patterns as integers), so it upcasts them
        IEEE=ieee,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ROWS_FIRST=b <= _MAX_GRID_Y,
        num_warps=4,
    )
    return out, flags
