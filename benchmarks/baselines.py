"""Baselines the benchmarks compare against.

:func:`published_rollout` is the rollout method of the published ITSELF code (``ITSELF.rollout`` in
``model/build.py``), step for step, over the layers it is given:

- start from the identity ``N x N`` expanded over the batch; multiply full ``N x N`` matrices at every layer;
- fuse heads (mean/max/min over the head axis, under no-grad) when the maps have one;
- discard: **one batched** ``topk(int(N*N*ratio), largest=False)`` over the flattened ``[B, N*N]`` maps (skipped when
  that count is 0), then, for each sample in a Python loop, drop flat index 0 from its index list
  (``idx[idx != 0]``, a boolean mask) and write zeros at the rest;
- a fresh expanded identity per layer, ``(A + I) / 2``, each row divided by its sum, ``result = bmm(A, result)``.

The published forward stacks the layer maps into one ``[L,B,(H,)N,N]`` tensor before calling the method; that stack
is the caller's, so a stacked tensor passed here is used as is (the benchmarks stack outside the timed call), and a
list is stacked first. Differences from the published code, without effect on the cost: maps without a head axis
are cloned before the in-place zeroing (the published code writes into the caller's tensor, which would change the
inputs of the next timed call), the ratio is one float or one per given layer (the published code indexes a
12-entry list by layer and skips the layers in ``skip_layer``), and errors are ``ValueError``. Ties at the threshold
are broken by ``torch.topk``, which promises no order; :mod:`attnselect.functional` breaks them lower flat index
first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def published_rollout(
    attentions: Tensor | Sequence[Tensor], discard_ratio: float | Sequence[float] = 0.25, head_fusion: str = "mean"
) -> Tensor:
    """The published rollout: ``[L,B,(H,)N,N]`` (or a list of ``[B,(H,)N,N]``) -> ``[B,N,N]``."""
    if not isinstance(attentions, Tensor):
        attentions = torch.stack(list(attentions), dim=0)
    if attentions.dim() == 5:
        layers, b, _, n, _ = attentions.shape
    else:
        layers, b, n, _ = attentions.shape
    ratios = [discard_ratio] * layers if isinstance(discard_ratio, (int, float)) else list(discard_ratio)
    device = attentions.device
    result = torch.eye(n, device=device).unsqueeze(0).expand(b, -1, -1)
    for layer in range(layers):
        attn = attentions[layer]
        if attentions.dim() == 5:
            with torch.no_grad():
                if head_fusion == "mean":
                    attn = attn.mean(axis=1)
                elif head_fusion == "max":
                    attn = attn.max(axis=1)[0]
                elif head_fusion == "min":
                    attn = attn.min(axis=1)[0]
                else:
                    raise ValueError(f"attention head fusion type not supported: {head_fusion}")
        else:
            attn = attn.clone()  # the published code zeroes the caller's maps in place
        flat = attn.view(b, -1)
        num_to_discard = int(flat.size(-1) * ratios[layer])
        if num_to_discard > 0:
            _, indices = flat.topk(num_to_discard, dim=-1, largest=False)
            for i in range(b):
                idx = indices[i]
                idx = idx[idx != 0]
                flat[i, idx] = 0
            attn = flat.view(b, n, n)
        eye = torch.eye(n, device=device).unsqueeze(0).expand(b, -1, -1)
        attn = (attn + eye) / 2.0
        attn = attn / attn.sum(dim=-1, keepdim=True)
        result = torch.bmm(attn, result)
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
