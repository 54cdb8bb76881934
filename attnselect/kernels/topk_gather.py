"""Fused top-k selection + token gather in Triton.

One launch, grid ``(B, cdiv(k, BLOCK_K))``: every program loads its sample's scores ``[N]`` (and the optional valid
mask), builds one int64 sort key per token, ``(reversed order key of the fp32 score) << 32 | token index``, with
invalid tokens pushed behind every valid one, and sorts it ascending with ``tl.sort`` (bitonic). The sorted order is
descending score, ties to the lower token index, exactly :func:`attnselect.functional.select_topk`. Each program then
writes its ``BLOCK_K`` slice of ``indices`` / ``mask`` (positions past the number of valid tokens repeat the last
valid index with ``mask`` False) and gathers those rows of ``tokens [B,N,D]`` into ``[B,k,D]``. Sorting a row again
in every program costs ``O(N log^2 N)`` register work and buys parallelism over ``k`` for small batches.

The backward (``gather_backward``, grid ``(B, cdiv(N, 16))``) writes every row of the ``[B,N,D]`` token gradient once:
each program finds, for its 16 tokens, the position that selected them (a ``[16, k]`` comparison with the saved
indices) and copies that row of the output gradient, or zeros; the tail positions that repeat the last valid token
add to its row, as ``torch.gather``'s gradient does. No zero fill and no scatter.

Errors are reported without a device synchronisation: the forward writes a per-sample code (1: a NaN score,
2: no valid token) that the caller checks (see :mod:`attnselect.kernels`).

Limits: scores in fp32/fp16/bf16 (fp64 scores would lose ties in the fp32 key: the gate sends them to the reference),
N up to 8192 (one sorted row per program), tokens of any float dtype including fp64 (gradcheck runs in fp64).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the gate never calls in here without Triton
    triton = None
    tl = None

__all__ = ["MAX_TOKENS", "gather_backward", "topk_gather_forward"]

MAX_TOKENS = 8192


if triton is not None:

    @triton.jit
    def _topk_gather_kernel(
        S,
        VALID,
        T,
        IDX,
        MASK,
        OUT,
        ERR,
        B,
        N,
        K,
        D,
        stride_sb,
        stride_vb,
        stride_tb,
        stride_tn,
        stride_ob,
        stride_ok,
        HAS_VALID: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        n = tl.arange(0, BLOCK_N)
        inside = n < N
        s = tl.load(S + b * stride_sb + n, mask=inside, other=0.0).to(tl.float32) + 0.0
        ok = inside
        if HAS_VALID:
            ok = ok & (tl.load(VALID + b * stride_vb + n, mask=inside, other=0) != 0)
        bits = s.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed, ordered like the floats
        rev = tl.where(ok, -1 - key, 2147483647)  # ascending rev = descending score; invalid last
        packed = rev.to(tl.int64) * 4294967296 + n.to(tl.int64)
        order = (tl.sort(packed) & 4294967295).to(tl.int32)
        num_valid = tl.sum(ok.to(tl.int32), axis=0)
        if tl.program_id(1) == 0:  # per-sample error code: 1 = NaN score, 2 = no valid token
            has_nan = tl.max((inside & (s != s)).to(tl.int32), axis=0)
            code = has_nan + 2 * (num_valid == 0).to(tl.int32)
            tl.store(ERR + b, code)
            if code != 0:
                tl.atomic_or(ERR + B, code)
        last_valid = tl.sum(tl.where(n == num_valid - 1, order, 0), axis=0)
        p = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        pm = p < K
        # this program's slice of the sorted order: row pid(1) of the order viewed as [BLOCK_N / BLOCK_K, BLOCK_K]
        # (BLOCK_N work, where comparing positions with tokens would take a [BLOCK_K, BLOCK_N] tile)
        part = tl.arange(0, BLOCK_N // BLOCK_K)
        rows2d = tl.reshape(order, [BLOCK_N // BLOCK_K, BLOCK_K])
        picked = tl.sum(tl.where(part[:, None] == tl.program_id(1), rows2d, 0), axis=0)
        keep = p < num_valid
        idx = tl.where(keep, picked, last_valid)
        tl.store(IDX + b * K + p, idx.to(tl.int64), mask=pm)
        tl.store(MASK + b * K + p, keep, mask=pm)
        d = tl.arange(0, BLOCK_D)
        src = T + b * stride_tb + idx.to(tl.int64)[:, None] * stride_tn
        dst = OUT + b * stride_ob + p.to(tl.int64)[:, None] * stride_ok
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + d
            m = pm[:, None] & (dd < D)[None, :]
            tl.store(dst + dd[None, :], tl.load(src + dd[None, :], mask=m), mask=m)


if triton is not None:

    @triton.jit
    def _gather_backward_kernel(
        GO,
        IDX,
        MASK,
        G,
        N,
        K,
        D,
        stride_gb,
        stride_gk,
        stride_b,
        stride_n,
        BLOCK_T: tl.constexpr,
        BLOCK_KK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        nm = n < N
        jj = tl.arange(0, BLOCK_KK)
        first = tl.full([BLOCK_T], 2147483647, dtype=tl.int32)
        kept = tl.program_id(0) * 0
        for k0 in range(0, K, BLOCK_KK):
            j = k0 + jj
            jm = j < K
            idx = tl.load(IDX + b * K + j, mask=jm, other=-1).to(tl.int32)
            kept += tl.sum(tl.load(MASK + b * K + j, mask=jm, other=0).to(tl.int32), axis=0)
            hit = idx[None, :] == n[:, None]
            first = tl.minimum(first, tl.min(tl.where(hit, j[None, :], 2147483647), axis=1))
        sel = nm & (first < K)
        src = GO + b * stride_gb + tl.where(sel, first, 0).to(tl.int64)[:, None] * stride_gk
        dst = G + b * stride_b + n.to(tl.int64)[:, None] * stride_n
        # positions kept..K-1 repeat the last valid token: their gradients add to its row
        last = tl.load(IDX + b * K + K - 1).to(tl.int32)
        tail = nm & (n == last) & (kept < K)
        has_tail = tl.max(tail.to(tl.int32), axis=0) > 0
        d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + d
            dm = (dd < D)[None, :]
            g = tl.load(src + dd[None, :], mask=sel[:, None] & dm, other=0.0)
            if has_tail:
                for p in range(kept, K):
                    row = tl.load(GO + b * stride_gb + p * stride_gk + dd, mask=dd < D, other=0.0)
                    g += tl.where(tail[:, None], row[None, :], 0.0).to(g.dtype)
            tl.store(dst + dd[None, :], g, mask=nm[:, None] & dm)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton top-k kernel needs the `triton` package (pip install attnselect[triton])")


def _check(scores: Tensor, k: int, tokens: Tensor, valid: Tensor | None) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [B,N], got {tuple(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"scores must be fp32, fp16 or bf16 for the Triton path, got {scores.dtype}")
    b, n = scores.shape
    if tokens.dim() != 3 or tokens.shape[:2] != (b, n):
        raise ValueError(f"tokens must have shape [B,N,D] = [{b},{n},D] like scores, got {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"tokens must be a floating-point tensor, got {tokens.dtype}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (N = {n}), got {k}")
    if n > MAX_TOKENS:
        raise ValueError(f"the Triton top-k kernel handles N <= {MAX_TOKENS} tokens, got N = {n}")
    if valid is not None and (valid.shape != scores.shape or valid.dtype != torch.bool):
        raise ValueError(
            f"valid must be a bool tensor of shape {tuple(scores.shape)}, got {valid.dtype} {tuple(valid.shape)}"
        )
    for t, name in ((tokens, "tokens"), (valid, "valid")):
        if t is not None and t.device != scores.device:
            raise ValueError(f"{name} is on {t.device} but scores are on {scores.device}")


def topk_gather_forward(
    scores: Tensor, k: int, tokens: Tensor, valid: Tensor | None = None, *, checked: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the fused top-k + gather.

    Args:
        scores: ``[B,N]`` fp32/fp16/bf16 scores (no NaN).
        k: tokens to keep, in ``[1, N]``.
        tokens: ``[B,N,D]`` token features.
        valid: optional bool ``[B,N]``; every sample needs one True entry.
        checked: the caller has validated shapes, dtypes and devices (the gate's hot path); skip doing it again.

    Returns:
        ``(indices [B,k] int64, mask [B,k] bool, gathered [B,k,D], errors [B+1] int32)``; ``errors[:B]`` is 1 for a
        sample with a NaN score, 2 for a sample without a valid token (its other outputs are then meaningless), else
        0, and ``errors[B]`` is the bitwise or of them. It is left on the device: the launch never
        synchronises.
    """
    _require_triton()
    if not checked:
        _check(scores, k, tokens, valid)
    b, n = scores.shape
    dim = tokens.shape[-1]
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    device = scores.device
    indices = torch.empty(b, k, device=device, dtype=torch.int64)
    mask = torch.empty(b, k, device=device, dtype=torch.bool)
    out = torch.empty(b, k, dim, device=device, dtype=tokens.dtype)
    errors = torch.zeros(b + 1, device=device, dtype=torch.int32)  # codes, then their bitwise or
    if valid is not None and valid.stride(-1) != 1:
        valid = valid.contiguous()
    block_n = _pow2(n)
    block_k = min(64 if block_n <= 1024 else 16, _pow2(k))
    block_d = min(256 // tokens.element_size(), _pow2(dim))  # 256 bytes of a row per step, whatever the dtype
    if b:  # even with D = 0: the indices, mask and error codes are still written
        _topk_gather_kernel[(b, (k + block_k - 1) // block_k)](
            scores,
            valid if valid is not None else scores,  # never read without HAS_VALID
            tokens,
            indices,
            mask,
            out,
            errors,
            b,
            n,
            k,
            dim,
            scores.stride(0),
            valid.stride(0) if valid is not None else 0,
            tokens.stride(0),
            tokens.stride(1),
            out.stride(0),
            out.stride(1),
            HAS_VALID=valid is not None,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            num_warps=4 if block_n <= 1024 else 8,
        )
    return indices, mask, out, errors


def _pow2(x: int) -> int:
    """The next power of two, at least 16 (Triton's smallest useful block)."""
    return max(16, 1 << (x - 1).bit_length())


def gather_backward(grad_out: Tensor, indices: Tensor, mask: Tensor, num_tokens: int) -> Tensor:
    """Token gradient of the gather, ``[B,N,D]``: row ``n`` is the sum of the rows of ``grad_out [B,k,D]`` whose
    ``indices`` are ``n`` (the selected position, plus the tail that repeats the last valid token), zero elsewhere.

    One launch writes every row of the gradient once (no zero fill, no scatter).
    """
    _require_triton()
    b, k, dim = grad_out.shape
    grad = torch.empty(b, num_tokens, dim, device=grad_out.device, dtype=grad_out.dtype)
    if grad.numel() == 0:
        return grad.zero_()
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if not (indices.is_contiguous() and mask.is_contiguous()):
        indices, mask = indices.contiguous(), mask.contiguous()
    block_t = 16
    block_kk = min(1024, _pow2(k))
    block_d = min(256, _pow2(dim))
    _gather_backward_kernel[(b, (num_tokens + block_t - 1) // block_t)](
        grad_out,
        indices,
        mask,
        grad,
        num_tokens,
        k,
        dim,
        grad_out.stride(0),
        grad_out.stride(1),
        grad.stride(0),
        grad.stride(1),
        BLOCK_T=block_t,
        BLOCK_KK=block_kk,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return grad
