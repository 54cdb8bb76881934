"""Baselines the benchmarks compare against.

:func:`published_rollout` re-implements the loop-based rollout of the published ITSELF code (itself the common
"vit-explain" rollout), step for step, so its cost can be measured next to the library's paths:

- start from the identity ``N x N`` (expanded over the batch) and multiply full ``N x N`` matrices at every layer;
- fuse heads (mean/max/min over dim 1) when a layer has a head axis;
- for each sample, in a Python loop: ``topk`` of the flattened ``N*N`` map with ``largest=False`` for the
  ``int(N*N*ratio)`` smallest entries, drop flat index 0 from that list, write zeros at the rest in place;
- ``(A + I) / 2``, divide each row by its sum, ``result = A @ result``.

Differences from the published code, all without effect on the cost being measured: a ``[B,N,N]`` map is cloned
before the in-place zeroing (the published code writes into the caller's tensor, which would change the inputs of the
next timed call), and the device and dtype of the identity follow the input instead of being hard-coded.
Ties at the threshold are broken by ``torch.topk``, which does not promise an order; :mod:`attnselect.functional`
breaks them lower flat index first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def published_rollout(
    attentions: Sequence[Tensor], discard_ratio: float | Sequence[float] = 0.25, head_fusion: str = "mean"
) -> Tensor:
    """Loop-based rollout as published: ``[B,(H,)N,N]`` per layer -> ``[B,N,N]``."""
    first = attentions[0]
    b, n = first.shape[0], first.shape[-1]
    ratios = [discard_ratio] * len(attentions) if isinstance(discard_ratio, (int, float)) else list(discard_ratio)
    result = torch.eye(n, device=first.device).unsqueeze(0).expand(b, n, n)
    with torch.no_grad():
        for attention, ratio in zip(attentions, ratios):
            if attention.dim() == 4:
                if head_fusion == "mean":
                    fused = attention.mean(dim=1)
                elif head_fusion == "max":
                    fused = attention.max(dim=1)[0]
                elif head_fusion == "min":
                    fused = attention.min(dim=1)[0]
                else:
                    raise ValueError(f"attention head fusion type not supported: {head_fusion}")
            else:
                fused = attention.clone()
            flat = fused.view(b, -1)
            for i in range(b):
                _, indices = flat[i].topk(int(flat[i].size(-1) * ratio), -1, False)
                indices = indices[indices != 0]
                flat[i, indices] = 0
            eye = torch.eye(n, device=first.device)
            a = (fused + 1.0 * eye) / 2
            a = a / a.sum(dim=-1, keepdim=True)
            result = torch.matmul(a, result)
    return result


def topk_gather_torch(scores: Tensor, k: int, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.topk`` + ``torch.gather``, the usual two-call selection (no tie-break guarantee)."""
    indices = torch.topk(scores, k, dim=1).indices
    return indices, torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def eager_attention_probs(q: Tensor, k: Tensor, scale: float, causal: bool = False) -> Tensor:
    """The eager capture: ``[B,H,N,N]`` fp32 probabilities materialised, then averaged over heads."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[2]
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)
