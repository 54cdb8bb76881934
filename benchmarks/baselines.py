"""Baselines the benchmarks compare against.

:func:`tome_vit_forward` is ToMe-style token merging (bipartite soft matching, size-weighted merges, proportional
attention) on a timm ``VisionTransformer``, written from the paper's algorithm, for ``benchmarks/bench_prune.py``.

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

import math
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


# ----------------------------------------------------------------------------------------------------------------
# ToMe-style token merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), from the paper's algorithm
# ----------------------------------------------------------------------------------------------------------------
def bipartite_soft_matching(metric: Tensor, r: int, protect_first: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching: which ``r`` tokens of set A merge into which tokens of set B.

    The tokens alternate between A (even positions) and B (odd positions). Each A token's edge goes to its most
    similar B token (cosine of ``metric``, the keys averaged over heads); the ``r`` A tokens with the strongest edges
    are merged into their B token, the others are kept. The class token (position 0) is never merged.

    Args:
        metric: ``[B,N,C]`` similarity features.
        r: tokens to remove, at most ``|A|``.
        protect_first: keep position 0 (the class token) out of the merge.

    Returns:
        ``(unmerged_a [B,|A|-r], merged_a [B,r], destination [B,r])``: indices into A of the kept (in their order, so
        that the class token stays first, as ToMe sorts them) and merged A tokens, and each merged token's destination
        index into B.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if protect_first:
        scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unmerged = edge_idx[..., r:]
    if protect_first:  # as ToMe does: the kept A tokens in their order, so the class token stays first
        unmerged = unmerged.sort(dim=-1).values
    return unmerged, edge_idx[..., :r], node_idx.gather(-1, edge_idx[..., :r])


def merge_weighted(x: Tensor, size: Tensor, unmerged: Tensor, merged: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Merge tokens as ToMe does: size-weighted averages; sizes add. ``x [B,N,C]``, ``size [B,N,1]``."""
    xs = x * size
    a, b = xs[..., ::2, :], xs[..., 1::2, :]
    sa, sb = size[..., ::2, :], size[..., 1::2, :]
    c = x.shape[-1]
    keep_a = a.gather(-2, unmerged.unsqueeze(-1).expand(-1, -1, c))
    src = a.gather(-2, merged.unsqueeze(-1).expand(-1, -1, c))
    b = b.scatter_reduce(-2, dst.unsqueeze(-1).expand(-1, -1, c), src, reduce="sum")
    keep_sa = sa.gather(-2, unmerged.unsqueeze(-1))
    sb = sb.scatter_reduce(-2, dst.unsqueeze(-1), sa.gather(-2, merged.unsqueeze(-1)), reduce="sum")
    xs = torch.cat([keep_a, b], dim=1)
    size = torch.cat([keep_sa, sb], dim=1)
    return xs / size, size


def tome_vit_forward(model: torch.nn.Module, images: Tensor, remove: dict[int, int]) -> Tensor:
    """A timm ``VisionTransformer`` forward with ToMe merging: ``remove[i]`` tokens merged in block ``i``.

    As in ToMe: each block attends with proportional attention (``+ log(size)`` on the logits, through SDPA's additive
    mask), then merges by bipartite soft matching on the attention keys averaged over heads, between the attention and
    the MLP, with size-weighted averages; the class token is never merged. The tokens leaving block ``i`` are then
    ``remove[i]`` fewer, so a schedule that removes ``n_{p-1} - n_p`` in block ``p - 1`` gives block ``p`` the same
    token count as :func:`attnselect.prune` cutting at the input of block ``p``.
    """
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    size = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        h = blk.norm1(x)
        batch, n, _ = h.shape
        qkv = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = size.log().view(batch, 1, 1, n)  # proportional attention
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, n, -1)))
        x = x + blk.drop_path1(blk.ls1(out))
        r = remove.get(i, 0)
        if r > 0:
            unmerged, merged, dst = bipartite_soft_matching(k.mean(dim=1), r)
            x, size = merge_weighted(x, size, unmerged, merged, dst)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = model.norm(x)
    return model.forward_head(x)
