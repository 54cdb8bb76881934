"""Stateless reference ops in plain PyTorch.

These functions define the results of the library: every Triton kernel is tested against them, and they are the path
taken on CPU. They are vectorised over the batch (no Python loop over samples) and never modify their inputs.

Notation: ``B`` batch, ``H`` heads, ``N`` tokens, ``D`` feature width, ``L`` layers, ``k`` kept tokens. Rows of an
attention map are queries, columns are keys.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FUSION_MODES",
    "PROTECT_MODES",
    "attention_probs",
    "check_maps",
    "discard_lowest",
    "fuse_heads",
    "gather_tokens",
    "layer_statistic",
    "masked_max_pool",
    "residual_normalize",
    "rollout",
    "select_topk",
]

FUSION_MODES = ("mean", "max", "min")
PROTECT_MODES = ("entry0", "none")
_STATS = ("mean", "std")


# --------------------------------------------------------------------------------------------------------------------
# argument checks (shared with the kernels' launchers)
# --------------------------------------------------------------------------------------------------------------------
def _check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_float(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32/fp16/bf16), got dtype {x.dtype}")


def _check_finite(x: Tensor, name: str) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values; attention maps must be finite")


def _check_nonnegative_finite(x: Tensor, name: str) -> None:
    """One cheap pass (``aminmax``); NaN fails both comparisons."""
    if not x.numel():
        return
    low, high = torch.aminmax(x)
    if not (bool(low >= 0) and bool(high < float("inf"))):
        _check_finite(x, name)
        raise ValueError(f"{name} must be non-negative (softmax probabilities)")


def _check_choice(value: object, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_maps(attn: Tensor, name: str = "attn", *, allow_heads: bool = True) -> Tensor:
    """Validate one attention map: a floating tensor ``[B,H,N,N]`` (when ``allow_heads``) or ``[B,N,N]``.

    Args:
        attn: the map to check, ``[B,H,N,N]`` or ``[B,N,N]``.
        name: the argument name used in error messages.
        allow_heads: accept per-head ``[B,H,N,N]`` maps (otherwise only ``[B,N,N]``).

    Returns:
        The same tensor, unchanged.

    Raises:
        TypeError: ``attn`` is not a floating-point tensor.
        ValueError: wrong rank, not square in its last two dims, or empty.

    Examples:
        >>> check_maps(torch.rand(2, 4, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
        >>> check_maps(torch.rand(2, 5, 4), "maps")
        Traceback (most recent call last):
            ...
        ValueError: maps must be square in its last two dims (queries x keys), got (2, 5, 4)
    """
    _check_tensor(attn, name)
    _check_float(attn, name)
    ranks = (3, 4) if allow_heads else (3,)
    if attn.dim() not in ranks:
        want = "[B,H,N,N] or [B,N,N]" if allow_heads else "[B,N,N]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(attn.shape)}")
    if attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dims (queries x keys), got {tuple(attn.shape)}")
    if attn.shape[-1] < 1 or attn.shape[0] < 1:
        raise ValueError(f"{name} must have at least one sample and one token, got {tuple(attn.shape)}")
    return attn


def _check_ratio(ratio: float, name: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):  # numbers.Real: numpy scalars too
        raise TypeError(f"{name} must be a float in [0, 1], got {type(ratio).__name__}")
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"{name} must be in [0, 1], got {ratio}")
    return ratio


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """The accumulation dtype: fp32, or fp64 when an input is fp64 (never less precise than the input)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _fused_acc(attn: Tensor, mode: str, dtype: torch.dtype | None = None) -> Tensor:
    """Head fusion accumulated in ``dtype`` (default :func:`_acc_dtype`: fp32, fp64 for fp64 maps); ``[B,N,N]`` maps
    are only converted. May return ``attn`` itself (a ``[B,N,N]`` map already in ``dtype``)."""
    dtype = _acc_dtype(attn) if dtype is None else dtype
    if attn.dim() == 3:
        return attn.to(dtype)
    if mode == "mean":
        # heads added one by one in order in fp32, then one correctly rounded division: a defined order (torch.mean's
        # depends on the device and on H), which the Triton kernels follow, so both discard the same entries
        heads = attn.shape[1]
        acc = attn[:, 0].to(dtype) if heads == 1 else attn[:, 0].to(dtype) + attn[:, 1]
        for h in range(2, heads):
            acc += attn[:, h]
        return acc / heads
    if mode == "max":
        return attn.amax(dim=1).to(dtype)
    return attn.amin(dim=1).to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# rollout pieces
# --------------------------------------------------------------------------------------------------------------------
def fuse_heads(attn: Tensor, mode: str = "mean") -> Tensor:
    """Fuse the heads of an attention map.

    Args:
        attn: ``[B,H,N,N]`` per-head map (a ``[B,N,N]`` map passes through unchanged).
        mode: ``"mean"``, ``"max"`` or ``"min"`` over heads.

    Returns:
        ``[B,N,N]`` in the input dtype (the mean adds the heads in order in fp32, fp64 for fp64 maps, then divides
        by H).

    Examples:
        >>> fuse_heads(torch.rand(2, 12, 197, 197)).shape
        torch.Size([2, 197, 197])
    """
    check_maps(attn)
    _check_choice(mode, FUSION_MODES, "mode")
    if attn.dim() == 3:
        return attn
    return _fused_acc(attn, mode).to(attn.dtype)


def _threshold(flat: Tensor, count: int) -> tuple[Tensor, bool]:
    """The ``count``-th smallest value (1-based) of each row of ``[B, M]`` as ``[B, 1]``, and whether some row has
    another entry equal to it beyond the ``count`` smallest (a tie straddling the threshold)."""
    if flat.device.type == "cpu":  # numpy's introselect is several times faster than torch.kthvalue on CPU
        x = np.ascontiguousarray(flat.detach().numpy())
        if x.dtype == np.float32 and x.view(np.int32).min() >= 0:
            # non-negative floats (no -0.0, no NaN) order like their bit patterns, and integer selection is faster
            x = x.view(np.int32)
        part = np.partition(x, count - 1, axis=1)
        threshold = part[:, count - 1 : count]
        straddles = bool((part[:, count:].min(axis=1, keepdims=True) == threshold).any())
        threshold = np.ascontiguousarray(threshold).view(np.float32) if x.dtype == np.int32 else threshold
        return torch.from_numpy(np.ascontiguousarray(threshold)), straddles
    threshold = flat.kthvalue(count, dim=1, keepdim=True).values
    straddles = not bool((torch.count_nonzero(flat <= threshold, dim=1) == count).all())
    return threshold, straddles


def _straddled_drop(flat: Tensor, threshold: Tensor, count: int) -> Tensor:
    """Bool ``[B, M]`` of the ``count`` entries to drop when entries equal to the threshold straddle the cut: all below
    it, then those equal to it with the lowest flat indices."""
    below = flat < threshold
    equal = flat == threshold
    still_needed = count - torch.count_nonzero(below, dim=1).unsqueeze(1)
    return below | (equal & (torch.cumsum(equal, dim=1) <= still_needed))


def _discarded(
    attn: Tensor, ratio: float, protect: str, *, inplace: bool = False, rows: Tensor | None = None
) -> Tensor:
    """``attn [B,N,N]`` (fp32 or fp64) with the entries :func:`discard_lowest` zeroes set to zero.

    A new tensor, or ``attn`` itself modified when ``inplace`` (for buffers the caller owns: it saves allocating, and
    first touching, another ``[B,N,N]`` buffer). With ``rows`` (LongTensor ``[B]``) only those rows are returned,
    ``[B,N]``: the threshold still comes from the whole matrix, but nothing else is written.
    """
    b, n, _ = attn.shape
    count = math.floor(n * n * ratio)
    index = None if rows is None else torch.arange(b, device=attn.device)
    if rows is not None:
        out = attn[index, rows]  # a copy
    else:
        out = attn if inplace else attn.clone()
    if count == 0:
        return out
    entry0 = attn[:, 0, 0].clone() if protect == "entry0" else None  # before any in-place write
    if count >= n * n:
        out.zero_()
    else:
        # everything up to the count-th smallest value goes; when entries equal to it straddle the cut, the lowest
        # flat indices among them go first, so that exactly `count` entries are dropped
        flat = attn.reshape(b, n * n)
        threshold, straddles = _threshold(flat, count)
        if straddles:
            drop = _straddled_drop(flat, threshold, count).view(b, n, n)
            out.masked_fill_(drop if rows is None else drop[index, rows], 0)
        else:
            out.masked_fill_(out <= (threshold.view(b, 1, 1) if rows is None else threshold), 0)
    if entry0 is not None:  # flat index 0 keeps its value
        if rows is None:
            out[:, 0, 0] = entry0
        else:
            out[:, 0] = torch.where(rows == 0, entry0, out[:, 0])
    return out


def discard_lowest(attn: Tensor, ratio: float, protect: str = "entry0") -> Tensor:
    """Zero the ``floor(ratio * N * N)`` smallest entries of each sample's whole map (global, not per row).

    The count is computed as the published code does, ``int(N * N * ratio)`` (``N * N`` first, one rounding).

    Ties at the threshold: the entry with the lower flat index is zeroed first. ``protect="entry0"`` keeps flat index 0
    (entry (0, 0)) untouched even when it is among them, exactly as the published ITSELF / vit-explain rollout does
    (it then zeroes one entry fewer); ``protect="none"`` keeps nothing.

    Args:
        attn: ``[B,N,N]`` map.
        ratio: share of entries to zero, in ``[0, 1]``.
        protect: ``"entry0"`` or ``"none"``.

    Returns:
        A new ``[B,N,N]`` tensor (the input is not modified).

    Examples:
        >>> discard_lowest(torch.tensor([[[0.4, 0.1], [0.2, 0.3]]]), 0.5)  # floor(0.5 * 4) = 2 entries go
        tensor([[[0.4000, 0.0000],
                 [0.0000, 0.3000]]])
        >>> discard_lowest(torch.tensor([[[0.1, 0.4], [0.2, 0.3]]]), 0.25)  # the smallest is entry (0, 0): kept
        tensor([[[0.1000, 0.4000],
                 [0.2000, 0.3000]]])
    """
    check_maps(attn, allow_heads=False)
    ratio = _check_ratio(ratio, "ratio")
    _check_choice(protect, PROTECT_MODES, "protect")
    _check_finite(attn, "attn")
    return _discarded(attn.to(_acc_dtype(attn)), ratio, protect).to(attn.dtype)


def residual_normalize(attn: Tensor) -> Tensor:
    """Add the residual path and renormalise: ``(A + I) / 2``, then divide each row by its sum (L1).

    Args:
        attn: ``[B,N,N]`` non-negative map.

    Returns:
        ``[B,N,N]`` row-stochastic map in the input dtype (computed in fp32, or fp64 for fp64 maps).

    Examples:
        >>> residual_normalize(torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]))
        tensor([[[0.5000, 0.5000],
                 [0.0000, 1.0000]]])
    """
    check_maps(attn, allow_heads=False)
    _check_nonnegative_finite(attn, "attn")
    x = attn.to(_acc_dtype(attn))  # fp16/bf16 maps: computed in fp32, rounded once at the end
    a = (x + torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)) / 2
    return (a / a.sum(dim=-1, keepdim=True)).to(attn.dtype)


def _per_layer_ratios(discard_ratio: float | Sequence[float], num_layers: int) -> list[float]:
    if isinstance(discard_ratio, (Tensor, np.ndarray)):  # one value or one per layer
        discard_ratio = discard_ratio.tolist()
    if isinstance(discard_ratio, numbers.Real) and not isinstance(discard_ratio, (bool, np.bool_)):
        return [_check_ratio(discard_ratio, "discard_ratio")] * num_layers
    if not isinstance(discard_ratio, Sequence) or isinstance(discard_ratio, str):
        raise TypeError(f"discard_ratio must be a float or one float per layer, got {type(discard_ratio).__name__}")
    if len(discard_ratio) != num_layers:
        raise ValueError(f"discard_ratio has {len(discard_ratio)} values for {num_layers} layers; give one per layer")
    return [_check_ratio(r, f"discard_ratio[{i}]") for i, r in enumerate(discard_ratio)]


def _check_layer_list(attentions: Sequence[Tensor], name: str = "attentions") -> list[Tensor]:
    if isinstance(attentions, Tensor):
        if attentions.dim() in (4, 5):  # a stacked [L,B,N,N] / [L,B,H,N,N] tensor
            attentions = list(attentions.unbind(0))
        else:
            raise ValueError(
                f"{name} must be a sequence of per-layer maps ([B,H,N,N] or [B,N,N]) or a stacked "
                f"[L,B,N,N] / [L,B,H,N,N] tensor, got a tensor of shape {tuple(attentions.shape)}"
            )
    if not isinstance(attentions, Sequence) or len(attentions) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of per-layer attention maps")
    maps = [check_maps(a, f"{name}[{i}]") for i, a in enumerate(attentions)]
    first = maps[0]
    for i, a in enumerate(maps[1:], start=1):
        if a.shape[0] != first.shape[0] or a.shape[-1] != first.shape[-1]:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(a.shape)} but {name}[0] has {tuple(first.shape)}: every layer must "
                "have the same batch size B and token count N"
            )
        if a.device != first.device:
            raise ValueError(f"{name}[{i}] is on {a.device} but {name}[0] is on {first.device}")
    return maps


def _integer(value: object) -> int | None:
    """``value`` as an int when it is an integer scalar (Python or numpy int, not bool), else None."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return operator.index(value)
    return None


def _check_query(
    query: int | Tensor, batch: int, n: int, device: torch.device, *, range_on_device: bool = False
) -> Tensor:
    """Per-sample query rows as a LongTensor ``[B]`` on ``device``.

    With ``range_on_device`` (the kernels, which flag rows outside ``[0, N)`` themselves) the rows of a tensor are not
    read back to check their range, and int32 rows stay int32.
    """
    if isinstance(query, bool):
        raise TypeError("query must be an int or a LongTensor [B] of row indices, got bool")
    as_int = _integer(query)
    query = query if as_int is None else as_int
    if isinstance(query, int):
        if not -n <= query < n:
            raise ValueError(f"query must be a row index in [0, {n}), got {query}")
        return torch.full((batch,), query % n, dtype=torch.long, device=device)
    if not isinstance(query, Tensor):
        raise TypeError(f"query must be an int or a LongTensor [B], got {type(query).__name__}")
    if query.dtype.is_floating_point or query.dtype == torch.bool or query.is_complex():
        raise TypeError(f"query must hold integer row indices, got dtype {query.dtype}")
    if query.dim() == 0:
        query = query.expand(batch)
    if query.shape != (batch,):
        raise ValueError(f"query must have shape [B] = [{batch}], got {tuple(query.shape)}")
    if range_on_device:
        keep = query.dtype in (torch.int32, torch.int64)
        return query.to(device=device, dtype=query.dtype if keep else torch.long)
    query = query.to(device=device, dtype=torch.long)
    if batch and (int(query.min()) < 0 or int(query.max()) >= n):
        raise ValueError(f"query rows must lie in [0, {n}), got min {int(query.min())} max {int(query.max())}")
    return query


def _prepared_layer(
    attn: Tensor,
    ratio: float,
    head_fusion: str,
    protect: str,
    rows: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Head-fused, discarded map ``A_d`` (in ``dtype``) and the row sums of ``A_d + I`` (so ``Â = (A_d + I) / s``);
    with ``rows`` only those rows of ``A_d`` (``[B,N]``) and their sums (``[B]``)."""
    if head_fusion == "min" and attn.dim() == 4:
        _check_finite(attn, "attentions")  # a minimum over heads can hide an inf
    a = _fused_acc(attn, head_fusion, dtype)
    _check_nonnegative_finite(a, "attentions")  # on the fused map: one cheap pass
    # the fused map is our own buffer and may be written in place, unless autograd needs it (amax / amin save their
    # output for the backward pass)
    own = a is not attn and not (a.requires_grad and torch.is_grad_enabled())
    a = _discarded(a, ratio, protect, inplace=own, rows=rows)
    return a, a.sum(dim=-1) + 1


def rollout(
    attentions: Sequence[Tensor],
    *,
    discard_ratio: float | Sequence[float] = 0.25,
    head_fusion: str = "mean",
    protect: str = "entry0",
    query: int | Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Multi-layer attention rollout (MARS).

    For each layer: fuse heads, discard the lowest entries (:func:`discard_lowest`), add the residual path and
    row-normalise (:func:`residual_normalize`), giving ``Â_l``. The rollout is ``R = Â_last @ ... @ Â_first`` (later
    layers multiply on the left), accumulated in fp32 (fp64 when a map is fp64).

    Args:
        attentions: per-layer maps in forward order (lowest layer first), each ``[B,H,N,N]`` or ``[B,N,N]``, already
            restricted to the chosen layers. A tensor is read as stacked layers, ``[L,B,N,N]`` (4-D) or
            ``[L,B,H,N,N]`` (5-D): pass a single per-head ``[B,H,N,N]`` map inside a list.
        discard_ratio: a float in ``[0, 1]``, or one float per layer.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` (ignored for ``[B,N,N]`` maps).
        protect: ``"entry0"`` (published behaviour) or ``"none"``; see :func:`discard_lowest`.
        query: None for the full product, or the query row(s): an int, or a LongTensor ``[B]`` of per-sample rows
            (such as the text EOS position), or a float ``[B,N]`` of non-negative weights over the query rows (the
            result is ``w^T R / sum(w)``: uniform weights over the real tokens give what all of them attend to,
            ``query="mean"`` of :class:`attnselect.MultiLayerRollout`; a pooling probe's attention gives what the
            host's summary attends to through the layers).
        valid: optional bool ``[B,N]``, False at padding (variable-resolution inputs). Each sample is then rolled out
            over its real tokens only, as if the padding did not exist: the discard counts and ranks only the
            ``n_b x n_b`` entries among real tokens, the residual and the row sums cover those, and padded rows and
            columns of the result are 0. A query row must be a real token.

    Returns:
        ``[B,N,N]`` fp32 rollout (fp64 for fp64 maps), or its query rows ``R[b, query[b], :]`` as ``[B,N]``
        computed as the row-vector chain ``e_q^T Â_last ... Â_first`` (O(L N^2); the N x N product is never formed).
        Computed without autograd unless an input requires grad.

    Examples:
        >>> maps = [torch.softmax(torch.randn(2, 12, 193, 193), -1) for _ in range(2)]
        >>> rollout(maps, query=0).shape
        torch.Size([2, 193])
    """
    maps = _check_layer_list(attentions)
    ratios = _per_layer_ratios(discard_ratio, len(maps))
    _check_choice(head_fusion, FUSION_MODES, "head_fusion")
    _check_choice(protect, PROTECT_MODES, "protect")
    batch, n = maps[0].shape[0], maps[0].shape[-1]
    device = maps[0].device
    weights = _query_weights(query, batch, n, device)
    rows = None if query is None or weights is not None else _check_query(query, batch, n, device)
    dtype = _acc_dtype(*maps)
    if valid is not None:
        _check_valid(valid, (batch, n), device)
        if not bool(valid.all()):
            return _rollout_padded(maps, ratios, head_fusion, protect, rows, weights, valid)

    with torch.set_grad_enabled(torch.is_grad_enabled() and any(a.requires_grad for a in maps)):
        if weights is not None:  # a distribution over query rows: v = w, then v <- v Â_l from the last layer down
            v = weights.to(dtype)
            for attn, ratio in zip(reversed(maps), reversed(ratios)):
                a, sums = _prepared_layer(attn, ratio, head_fusion, protect, dtype=dtype)
                w = v / sums
                v = torch.bmm(w.unsqueeze(1), a).squeeze(1) + w
            return v
        if rows is None:
            result = torch.eye(n, device=device, dtype=dtype).expand(batch, n, n)
            for attn, ratio in zip(maps, ratios):
                a, sums = _prepared_layer(attn, ratio, head_fusion, protect, dtype=dtype)
                # Â @ R = ((A_d + I) @ R) / s  with s the row sums of A_d + I
                result = (torch.bmm(a, result) + result) / sums.unsqueeze(-1)
            return result.contiguous()
        # row-vector chain, last layer first. The last layer contributes only its query rows:
        # v = e_q Â_last = (A_d[q] + e_q) / s_q; then v <- v Â_l = (v / s) A_d + v / s for the earlier layers.
        a_rows, sums = _prepared_layer(maps[-1], ratios[-1], head_fusion, protect, rows=rows, dtype=dtype)
        samples = torch.arange(batch, device=device)
        v = a_rows.index_put((samples, rows), a_rows[samples, rows] + 1.0)
        v = v / sums.unsqueeze(-1)
        for attn, ratio in zip(reversed(maps[:-1]), reversed(ratios[:-1])):
            a, sums = _prepared_layer(attn, ratio, head_fusion, protect, dtype=dtype)
            w = v / sums
            v = torch.bmm(w.unsqueeze(1), a).squeeze(1) + w
        return v


def _query_weights(query: object, batch: int, n: int, device: torch.device) -> Tensor | None:
    """A float ``[B,N]`` query, checked and normalised to sum 1 per sample; None for row indices (or no query)."""
    if not isinstance(query, Tensor) or not query.is_floating_point() or query.dim() != 2:
        return None  # row indices (a float [B] is refused as such by _check_query)
    if query.shape != (batch, n):
        raise ValueError(f"query weights must have shape [B,N] = {(batch, n)}, got {tuple(query.shape)}")
    if query.device != device:
        raise ValueError(f"query weights are on {query.device} but the maps are on {device}")
    _check_nonnegative_finite(query, "query weights")
    total = query.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        rows = (total.squeeze(1) <= 0).nonzero().flatten().tolist()[:8]
        raise ValueError(f"query weights sum to 0 in sample(s) {rows}: give each sample some weight")
    return query / total


def _rollout_padded(
    maps: list[Tensor],
    ratios: list[float],
    head_fusion: str,
    protect: str,
    rows: Tensor | None,
    weights: Tensor | None,
    valid: Tensor,
) -> Tensor:
    """:func:`rollout` of each sample over its real tokens only (the rows and columns where ``valid`` is True)."""
    batch, n = valid.shape
    dtype = _acc_dtype(*maps)
    full = rows is None and weights is None
    out = torch.zeros((batch, n, n) if full else (batch, n), dtype=dtype, device=valid.device)
    for b in range(batch):
        idx = valid[b].nonzero().flatten()
        sub = [m[b : b + 1].index_select(-1, idx).index_select(-2, idx) for m in maps]
        query: int | Tensor | None = None
        if weights is not None:
            query = weights[b : b + 1].index_select(1, idx)
            if not bool(query.sum() > 0):
                raise ValueError(f"query weights of sample {b} are 0 at every real token (valid)")
        elif rows is not None:
            position = (idx == rows[b]).nonzero()
            if position.numel() == 0:
                raise ValueError(f"query row {int(rows[b])} of sample {b} is a padding position (valid is False there)")
            query = int(position[0, 0])
        r = rollout(sub, discard_ratio=ratios, head_fusion=head_fusion, protect=protect, query=query)[0]
        if full:
            out[b, idx.unsqueeze(1), idx] = r
        else:
            out[b, idx] = r
    return out


def layer_statistic(attentions: Sequence[Tensor], stat: str, query: int | Tensor) -> Tensor:
    """A per-layer statistic of the head-fused maps, read at the query row (the heuristics of ITSELF's Table 6).

    Args:
        attentions: per-layer maps as for :func:`rollout`.
        stat: ``"mean"`` or ``"std"`` (population standard deviation) over layers.
        query: an int or a LongTensor ``[B]`` of per-sample rows.

    Returns:
        ``[B,N]`` fp32 scores (fp64 for fp64 maps).

    Examples:
        >>> maps = [torch.softmax(torch.randn(2, 4, 10, 10), -1) for _ in range(3)]  # L = 3 layers of [B,H,N,N]
        >>> layer_statistic(maps, "mean", query=0).shape
        torch.Size([2, 10])
        >>> eye = torch.eye(2).unsqueeze(0)  # [1,2,2]; row 0 is [1, 0] in one layer and [0, 1] in the other
        >>> layer_statistic([eye, eye.flip(-1)], "std", query=0)
        tensor([[0.5000, 0.5000]])
    """
    maps = _check_layer_list(attentions)
    _check_choice(stat, _STATS, "stat")
    batch, n = maps[0].shape[0], maps[0].shape[-1]
    rows = _check_query(query, batch, n, maps[0].device)
    index = rows.view(batch, 1, 1).expand(batch, 1, n)
    with torch.set_grad_enabled(torch.is_grad_enabled() and any(a.requires_grad for a in maps)):
        dtype = _acc_dtype(*maps)
        stacked = torch.stack([_fused_acc(a, "mean", dtype).gather(1, index).squeeze(1) for a in maps])  # [L,B,N]
        _check_finite(stacked, "attentions")
        if stat == "mean":
            return stacked.mean(0)
        return stacked.std(0, unbiased=False)


# --------------------------------------------------------------------------------------------------------------------
# selection, gather, pooling
# --------------------------------------------------------------------------------------------------------------------
def _check_valid(
    valid: Tensor | None, shape: torch.Size, device: torch.device, name: str = "valid", *, each_row: bool = True
) -> Tensor | None:
    """Type, shape and device of a ``valid`` mask; with ``each_row``, also that every sample has a True entry (a
    read-back of device data: callers that check it together with other values pass ``each_row=False``)."""
    if valid is None:
        return None
    _check_tensor(valid, name)
    if valid.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor [B,N] (True = may be selected), got dtype {valid.dtype}")
    if valid.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} like scores, got {tuple(valid.shape)}")
    if valid.device != device:
        raise ValueError(f"{name} is on {valid.device} but scores are on {device}")
    if not each_row:
        return valid
    empty = ~valid.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()[:8]
        raise ValueError(f"{name} has no True entry in sample(s) {rows}: every sample needs at least one valid token")
    return valid


def check_k(k: int, n: int, name: str = "k") -> int:
    """Validate a token count ``k`` against ``n`` tokens: an int in ``[1, n]``."""
    as_int = _integer(k)
    if as_int is not None:
        k = as_int
    else:
        if isinstance(k, Tensor) and k.numel() == 1 and not k.is_floating_point() and k.dtype != torch.bool:
            k = int(k)
        else:
            raise TypeError(f"{name} must be an int in [1, {n}], got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"{name} must be in [1, {n}] (N = {n}), got {k}")
    return k


def select_topk(scores: Tensor, k: int, *, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k token selection with a deterministic tie-break.

    Args:
        scores: ``[B,N]`` floating scores (no NaN).
        k: tokens to keep, in ``[1, N]``.
        valid: optional bool ``[B,N]``; invalid tokens are never chosen. Every sample needs one valid token.

    Returns:
        ``(indices [B,k] int64, mask [B,k] bool)``: indices sorted by descending score, ties to the lower token index.
        When a sample has fewer than ``k`` valid tokens its tail repeats the last valid index and ``mask`` is False
        there.

    Examples:
        >>> select_topk(torch.tensor([[0.1, 0.5, 0.5, 0.2]]), 2)
        (tensor([[1, 2]]), tensor([[True, True]]))
    """
    _check_tensor(scores, "scores")
    _check_float(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [B,N], got {tuple(scores.shape)}")
    batch, n = scores.shape
    k = check_k(k, n)
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contains NaN")
    valid = _check_valid(valid, scores.shape, scores.device)
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
    if valid is None:
        return order[:, :k].contiguous(), torch.ones(batch, k, dtype=torch.bool, device=scores.device)
    # stable second sort on validity keeps the score order within the valid and the invalid groups
    invalid_sorted = (~valid).gather(1, order).to(torch.uint8)
    order = order.gather(1, torch.sort(invalid_sorted, dim=1, stable=True).indices)
    indices = order[:, :k]
    count = valid.sum(dim=1, keepdim=True)
    mask = torch.arange(k, device=scores.device).unsqueeze(0) < count
    last_valid = indices.gather(1, (count.clamp(max=k) - 1))
    indices = torch.where(mask, indices, last_valid)
    return indices.contiguous(), mask


def _check_tokens_indices(tokens: Tensor, indices: Tensor) -> None:
    _check_tensor(tokens, "tokens")
    _check_tensor(indices, "indices")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must have shape [B,N,D], got {tuple(tokens.shape)}")
    if indices.dim() != 2:
        raise ValueError(f"indices must have shape [B,k], got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be an int64 (or int32) tensor, got dtype {indices.dtype}")
    if indices.device != tokens.device:
        raise ValueError(f"indices are on {indices.device} but tokens are on {tokens.device}; put both on one device")
    if indices.shape[0] != tokens.shape[0]:
        raise ValueError(f"indices batch {indices.shape[0]} does not match tokens batch {tokens.shape[0]}")
    n = tokens.shape[1]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"indices must lie in [0, {n}), got min {int(indices.min())} max {int(indices.max())}")


def gather_tokens(tokens: Tensor, indices: Tensor) -> Tensor:
    """Gather selected tokens: ``[B,N,D], [B,k] -> [B,k,D]``, differentiable with respect to ``tokens``.

    Args:
        tokens: ``[B,N,D]`` token features.
        indices: ``[B,k]`` int64 (or int32) positions in ``[0, N)``.

    Returns:
        ``[B,k,D]`` with ``out[b, j] = tokens[b, indices[b, j]]``.

    Examples:
        >>> tokens = torch.arange(12.0).view(1, 4, 3)  # [B=1, N=4, D=3]
        >>> gather_tokens(tokens, torch.tensor([[2, 0]]))
        tensor([[[6., 7., 8.],
                 [0., 1., 2.]]])
    """
    _check_tokens_indices(tokens, indices)
    index = indices.long().unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, index)


def masked_max_pool(tokens: Tensor, mask: Tensor) -> Tensor:
    """Max over the tokens where ``mask`` is True (the published code's pooling): ``[B,k,D], [B,k] -> [B,D]``.

    Padded positions never influence the result. Every sample needs at least one True entry.

    Args:
        tokens: ``[B,k,D]`` token features.
        mask: bool ``[B,k]``, True where a token counts.

    Returns:
        ``[B,D]`` channel-wise maxima over the valid tokens, in the dtype of ``tokens``.

    Examples:
        >>> tokens = torch.tensor([[[1.0, 5.0], [3.0, 2.0], [9.0, 9.0]]])  # [B=1, k=3, D=2]
        >>> masked_max_pool(tokens, torch.tensor([[True, True, False]]))
        tensor([[3., 5.]])
    """
    _check_tensor(tokens, "tokens")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must have shape [B,k,D], got {tuple(tokens.shape)}")
    if tokens.dtype == torch.bool or tokens.is_complex():
        raise TypeError(f"tokens must be a real floating-point or integer tensor, got dtype {tokens.dtype}")
    mask = _check_valid(mask, tokens.shape[:2], tokens.device, name="mask")
    fill = float("-inf") if tokens.is_floating_point() else torch.iinfo(tokens.dtype).min
    return tokens.masked_fill(~mask.unsqueeze(-1), fill).amax(dim=1)


# --------------------------------------------------------------------------------------------------------------------
# attention probabilities from Q and K (the capture hooks' single funnel)
# --------------------------------------------------------------------------------------------------------------------
def attention_probs(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    bias: Tensor | None = None,
    causal: bool = False,
    head_fusion: str | None = "mean",
    query_rows: Tensor | None = None,
) -> Tensor:
    """Softmax attention probabilities ``softmax(q k^T * scale + bias)`` in fp32, optionally head-fused.

    Args:
        q: ``[B,H,Nq,d]`` queries.
        k: ``[B,H,Nk,d]`` keys.
        scale: multiplier of the logits (usually ``d ** -0.5``).
        bias: optional additive float bias broadcastable to ``[B,H,Nq,Nk]`` (``-inf`` blocks an entry).
        causal: block keys after the query position (needs ``Nq == Nk``).
        head_fusion: ``"mean"``, ``"max"``, ``"min"`` (-> ``[B,Nq,Nk]``) or None (-> ``[B,H,Nq,Nk]``).
        query_rows: optional LongTensor ``[R]`` or ``[B,R]``: keep only these query rows (-> ``[B,R,Nk]`` or
            ``[B,H,R,Nk]``), computing nothing for the others.

    Returns:
        fp32 probabilities ``[B,Nq,Nk]`` (fused) or ``[B,H,Nq,Nk]`` (``head_fusion=None``), with ``R`` in place of
        ``Nq`` when ``query_rows`` is given; a fully blocked row gives zeros.

    Examples:
        >>> q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)  # [B,H,N,d]
        >>> attention_probs(q, k, scale=8**-0.5).shape
        torch.Size([2, 6, 6])
        >>> attention_probs(q, k, scale=8**-0.5, head_fusion=None, query_rows=torch.tensor([0])).shape
        torch.Size([2, 4, 1, 6])
        >>> attention_probs(q, k, scale=8**-0.5, causal=True)[0, 0]  # the first query sees only itself
        tensor([1., 0., 0., 0., 0., 0.])
    """
    for t, name in ((q, "q"), (k, "k")):
        _check_tensor(t, name)
        _check_float(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B,H,N,d], got {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and d")
    if head_fusion is not None:
        _check_choice(head_fusion, FUSION_MODES, "head_fusion")
    batch, heads, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if causal and nq != nk:
        raise ValueError(f"causal attention needs as many queries as keys, got {nq} and {nk}")
    rows = torch.arange(nq, device=q.device).expand(batch, nq)
    if query_rows is not None:
        _check_tensor(query_rows, "query_rows")
        if query_rows.dtype.is_floating_point or query_rows.dtype == torch.bool:
            raise TypeError(f"query_rows must hold integer row indices, got dtype {query_rows.dtype}")
        if query_rows.dim() == 1:
            query_rows = query_rows.unsqueeze(0).expand(batch, -1)
        if query_rows.dim() != 2 or query_rows.shape[0] != batch:
            raise ValueError(f"query_rows must have shape [R] or [B,R] with B = {batch}, got {tuple(query_rows.shape)}")
        rows = query_rows.to(device=q.device, dtype=torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= nq):
            raise ValueError(f"query_rows must lie in [0, {nq})")
        q = q.gather(2, rows.view(batch, 1, -1, 1).expand(batch, heads, -1, q.shape[-1]))
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B,H,R,Nk]
    if bias is not None:
        _check_tensor(bias, "bias")
        if not bias.is_floating_point():
            raise TypeError(
                f"bias must be an additive float tensor (-inf blocks an entry), got dtype {bias.dtype}; convert a "
                "boolean mask first, e.g. torch.zeros(mask.shape).masked_fill(~allowed, float('-inf'))"
            )
        bias = bias.to(device=q.device, dtype=torch.float32)
        try:
            bias = bias.expand(batch, heads, nq, nk)
        except RuntimeError:
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} does not broadcast to {(batch, heads, nq, nk)}"
            ) from None
        if query_rows is not None:
            bias = bias.gather(2, rows.view(batch, 1, -1, 1).expand(batch, heads, -1, nk))
        logits = logits + bias
    if causal:
        blocked = torch.arange(nk, device=q.device).view(1, 1, nk) > rows.unsqueeze(-1)  # [B,R,Nk]
        logits = logits.masked_fill(blocked.unsqueeze(1), float("-inf"))
    # a fully blocked row attends to nothing (zeros); NaN coming from NaN inputs stays NaN
    probs = torch.softmax(logits, dim=-1).masked_fill(torch.isneginf(logits).all(dim=-1, keepdim=True), 0.0)
    if head_fusion is None:
        return probs
    return _fused_acc(probs, head_fusion)
