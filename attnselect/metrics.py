"""Retrieval metrics for text-to-image (or image-to-text) person search, as defined by the IRRA evaluator.

For each query the gallery is sorted by descending similarity and ``m_q(r) = [pid(gallery at rank r) == pid(q)]``
(r = 1..G) is formed. Then, in percent:

- ``R@K``: share of queries with at least one match within the first K ranks;
- ``mAP``: mean over queries of ``AP_q = (1 / n_q) * sum_r m_q(r) * (matches within ranks 1..r) / r``;
- ``mINP``: mean over queries of ``n_q / R_hard(q)`` with ``R_hard(q)`` the rank of the last positive;
- ``rsum``: the sum of the R@K values.

Ties: the sort is stable, so gallery items with equal similarity are ranked by ascending gallery index (the IRRA
code's ``argsort`` leaves their order unspecified). ``-inf`` scores rank last; NaN scores cannot be ranked and raise a
ValueError. The queries are processed in chunks so that at most ``chunk_size x G`` ranks exist at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["retrieval_metrics", "rsum"]

logger = logging.getLogger(__name__)

_DEFAULT_CHUNK_ELEMENTS = 1 << 22  # ranks held at once when chunk_size is None (32 MiB of int64)


def _as_tensor(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray | list | tuple):
        return torch.as_tensor(np.asarray(x))
    raise TypeError(f"retrieval_metrics: {name} must be a torch.Tensor or array-like, got {type(x).__name__}")


def rsum(metrics: dict[str, float], ks: Sequence[int] = (1, 5, 10)) -> float:
    """``R@1 + R@5 + R@10`` (or the sum over ``ks``) of a :func:`retrieval_metrics` result.

    Args:
        metrics: a dict holding ``"R{k}"`` for every ``k`` in ``ks``.
        ks: the cut-offs to add up.

    Returns:
        The sum, a Python float (percent points).

    Examples:
        >>> rsum({"R1": 50.0, "R5": 80.0, "R10": 90.0})
        220.0
    """
    return float(sum(metrics[f"R{k}"] for k in ks))


def retrieval_metrics(
    similarity: Tensor,
    query_ids: Tensor,
    gallery_ids: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    *,
    missing: str = "raise",
) -> dict[str, float]:
    """R@K, mAP, mINP and rsum of a similarity matrix.

    Args:
        similarity: ``[Q, G]`` scores, higher = more similar (rows are queries, e.g. captions; columns gallery
            items, e.g. images). Any float dtype and device; computed on that device. NaN raises a ValueError.
        query_ids: ``[Q]`` integer identities of the queries.
        gallery_ids: ``[G]`` integer identities of the gallery items.
        ks: distinct cut-offs K of R@K (each >= 1; K > G counts the whole gallery).
        chunk_size: queries sorted at once; ``None`` picks ``max(1, 2**22 // G)``.
        missing: what to do with queries that have no positive in the gallery (their AP and INP are undefined):
            ``"raise"`` (default) raises a ValueError naming them; ``"skip"`` leaves them out of every metric
            (the count is in ``"num_skipped"``).

    Returns:
        ``{"R1": ..., "R5": ..., "R10": ..., "mAP": ..., "mINP": ..., "rsum": ..., "num_queries": Q_used,
        "num_skipped": n}``, metrics as Python floats in percent (keys ``R{k}`` follow ``ks``).

    Examples:
        >>> sim = torch.tensor([[0.9, 0.1, 0.3], [0.8, 0.4, 0.2]])  # [Q=2, G=3]
        >>> m = retrieval_metrics(sim, torch.tensor([0, 1]), torch.tensor([0, 1, 1]), ks=(1, 2))
        >>> {key: round(value, 2) for key, value in m.items()}
        {'R1': 50.0, 'R2': 100.0, 'mAP': 79.17, 'mINP': 83.33, 'rsum': 150.0, 'num_queries': 2, 'num_skipped': 0}
    """
    similarity = _as_tensor(similarity, "similarity")
    query_ids = _as_tensor(query_ids, "query_ids")
    gallery_ids = _as_tensor(gallery_ids, "gallery_ids")
    if similarity.dim() != 2:
        raise ValueError(f"retrieval_metrics: similarity must have shape [Q, G], got {tuple(similarity.shape)}")
    q, g = similarity.shape
    if q == 0 or g == 0:
        raise ValueError(f"retrieval_metrics: similarity must be non-empty, got shape {(q, g)}")
    for name, ids, n in (("query_ids", query_ids, q), ("gallery_ids", gallery_ids, g)):
        if ids.dim() != 1 or ids.shape[0] != n:
            raise ValueError(f"retrieval_metrics: {name} must have shape [{n}], got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"retrieval_metrics: {name} must hold integers, got {ids.dtype}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"retrieval_metrics: ks must be a non-empty sequence of integers >= 1, got {ks}")
    if len(set(ks)) != len(ks):
        raise ValueError(
            f"retrieval_metrics: ks must be distinct (each R@K is one key and counts once in rsum), got {ks}"
        )
    if missing not in ("raise", "skip"):
        raise ValueError(f"retrieval_metrics: missing must be 'raise' or 'skip', got {missing!r}")
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_CHUNK_ELEMENTS // g)
    if chunk_size < 1:
        raise ValueError(f"retrieval_metrics: chunk_size must be >= 1, got {chunk_size}")

    device = similarity.device
    query_ids = query_ids.to(device=device, dtype=torch.long)
    gallery_ids = gallery_ids.to(device=device, dtype=torch.long)
    if similarity.dtype in (torch.float16, torch.bfloat16):
        similarity = similarity.float()
    if similarity.is_floating_point():
        num_nan = int(torch.isnan(similarity).sum())
        if num_nan:
            rows = torch.nonzero(torch.isnan(similarity).any(dim=1)).flatten()[:20].tolist()
            raise ValueError(
                f"retrieval_metrics: similarity holds {num_nan} NaN value(s) (first query rows {rows}); a NaN cannot "
                "be ranked (a sort would place it first), check the features for NaN"
            )

    num_pos = torch.cat(
        [(query_ids[i : i + chunk_size, None] == gallery_ids[None, :]).sum(dim=1) for i in range(0, q, chunk_size)]
    )
    lacking = torch.nonzero(num_pos == 0).flatten()
    if lacking.numel() and missing == "raise":
        shown = lacking[:20].tolist()
        more = f" (and {lacking.numel() - 20} more)" if lacking.numel() > 20 else ""
        raise ValueError(
            f"retrieval_metrics: {lacking.numel()} queries have no positive in the gallery, query indices "
            f"{shown}{more}; pass missing='skip' to leave them out"
        )
    keep = num_pos > 0
    if not bool(keep.any()):
        raise ValueError("retrieval_metrics: no query has a positive in the gallery; nothing to evaluate")

    hits = torch.zeros(len(ks), dtype=torch.float64, device=device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    ranks = torch.arange(1, g + 1, device=device, dtype=torch.float64)
    for start in range(0, q, chunk_size):
        stop = min(start + chunk_size, q)
        sel = keep[start:stop]
        if not bool(sel.any()):
            continue
        order = torch.sort(similarity[start:stop][sel], dim=1, descending=True, stable=True).indices
        matches = gallery_ids[order] == query_ids[start:stop][sel][:, None]  # [c, G] bool
        del order
        cum = matches.cumsum(dim=1, dtype=torch.float64)
        n_q = cum[:, -1]
        for j, k in enumerate(ks):
            hits[j] += (cum[:, min(k, g) - 1] > 0).sum()
        ap_sum += ((cum / ranks) * matches).sum(dim=1).div(n_q).sum()
        last = (ranks * matches).amax(dim=1)  # rank of the hardest positive
        inp_sum += (n_q / last).sum()

    used = int(keep.sum())
    out: dict[str, float] = {}
    for j, k in enumerate(ks):
        out[f"R{k}"] = float(hits[j] / used * 100)
    out["mAP"] = float(ap_sum / used * 100)
    out["mINP"] = float(inp_sum / used * 100)
    out["rsum"] = float(sum(out[f"R{k}"] for k in ks))
    out["num_queries"] = used
    out["num_skipped"] = q - used
    if lacking.numel():
        logger.warning("retrieval_metrics: skipped %d queries without a positive in the gallery", lacking.numel())
    return out
