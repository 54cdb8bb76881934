"""Attention-guided token pruning inside an unmodified host's forward: fewer tokens enter the later blocks.

``handle = prune(model, keep=0.7, layers=(3, 6, 9))`` places hooks on the host's transformer blocks. At the input of
each listed block the tokens entering it are cut to the ``keep`` fraction of the droppable ones (every token but the
prefix: CLS, registers, distillation), ranked by a signal read from the attention of the block just before:

- ``"cls"``: the query's attention row there (the class token's; hosts without one use ``"mean"``), one row
  ``[B,1,N]`` computed from that block's q and k (never a ``[B,H,N,N]`` buffer on the Triton path);
- ``"mean"``: the mean attention each token receives there (the column mean of the head-averaged map);
- ``"rollout"``: the query row of the rollout over every block so far (residual-normalised maps multiplied as the
  tokens shrink, ``[B,n,n]`` head-averaged).

The kept tokens keep their order; rotary embeddings (timm ``rope=``, HF DINOv3 ``position_embeddings``) are gathered
for them at every later block, so each keeps its own rotation. What happens to the dropped tokens (``merge``):

- ``False``: they are dropped;
- ``True``: they are fused into one extra token at the end, weighted by their saliency (as EViT does);
- ``"similar"``: each is averaged into the kept token it resembles most (cosine of the token states), weighted by the
  number of original tokens each stands for, and every later block adds ``log(size)`` to its attention logits
  (proportional attention, as ToMe does), passed as the blocks' additive attention mask, so the host keeps its SDPA.
  The default schedule uses it: at equal token counts it keeps the host's outputs closest (``docs/prune.md``).

The host's pooled outputs keep their types and shapes; ``handle.kept`` holds, for the last forward, one LongTensor
``[B, n_l]`` per pruning layer: the positions of the tokens entering that block in the host's input token sequence
(-1 for a fused token). ``handle.remove()`` (or leaving ``with handle:``) restores the host bit-identically.

Supported hosts: timm ``VisionTransformer`` and ``Eva`` (EVA02, PE, DINOv3-style, RoPE ViTs), HF ViT, CLIP vision,
SigLIP, DINOv2 and DINOv3 towers, open_clip vision towers (CLIP, EVA02, PE-Core). Windowed or hierarchical hosts and
blocks whose attention depends on token positions in a way that cannot follow the cut (relative position biases,
unknown rotary embeddings) are refused with an error naming the block.
"""

from __future__ import annotations

import inspect
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["DEFAULT_KEEP", "PruneHandle", "default_layers", "prune", "prune_flops"]

logger = logging.getLogger(__name__)

SIGNALS = ("cls", "rollout", "mean")
#: the default keep fraction at each default pruning layer (see :func:`default_layers`), with ``merge="similar"``
DEFAULT_KEEP = 0.6
_ROPE_KWARGS = ("rope", "position_embeddings")
_MASK_KWARGS = ("attn_mask", "attention_mask")

# layers root of a host tower -> its live pruner (weak: never keeps a host alive)
_PRUNED: weakref.WeakKeyDictionary[nn.Module, _Pruner] = weakref.WeakKeyDictionary()


def default_layers(depth: int) -> tuple[int, ...]:
    """The default pruning layers of a ``depth``-block host: a quarter, half and three quarters of the way
    (3, 6, 9 of 12; 6, 12, 18 of 24).

    Examples:
        >>> default_layers(12), default_layers(24), default_layers(4)
        ((3, 6, 9), (6, 12, 18), (1, 2, 3))
    """
    if depth < 2:
        raise ValueError(f"a host needs at least 2 blocks to prune after the first, got {depth}")
    return tuple(sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75)} - {depth}))


# ----------------------------------------------------------------------------------------------------------- FLOPs
def _block_flops(n: float, width: int, mlp: int) -> float:
    """FLOPs of one block on ``n`` tokens: q, k, v and output projections, ``QK^T`` and ``AV``, the MLP."""
    return 2 * (4 * n * width * width + 2 * n * n * width + 2 * n * width * mlp)


def prune_flops(
    n_tokens: int, num_prefix_tokens: int, depth: int, width: int, mlp: int, layers: Sequence[int],
    keep: Sequence[float],
) -> tuple[float, float]:  # fmt: skip
    """FLOPs of the attention and MLP blocks with and without the pruning schedule, and the kept token counts.

    Args:
        n_tokens: tokens entering the first block (prefix included).
        num_prefix_tokens: tokens that are never dropped (CLS, registers).
        depth: blocks of the host.
        width: token width D; ``mlp``: the MLP's hidden width.
        layers: the pruning layers, ascending; ``keep``: the kept fraction at each.

    Returns:
        ``(pruned, unpruned)`` FLOPs of one sample.

    Examples:
        >>> pruned, full = prune_flops(197, 1, 12, 768, 3072, (3, 6, 9), (0.7, 0.7, 0.7))
        >>> round(pruned / full, 3)
        0.613
    """
    counts = _token_counts(n_tokens, num_prefix_tokens, depth, layers, keep)
    pruned = sum(_block_flops(n, width, mlp) for n in counts)
    full = depth * _block_flops(n_tokens, width, mlp)
    return pruned, full


def _kept_count(keep: float, droppable: int) -> int:
    """Droppable tokens kept: ``floor(keep * droppable + 0.5)`` (rounded half up), at least 1."""
    return max(1, min(droppable, math.floor(keep * droppable + 0.5)))


def _token_counts(n_tokens: int, prefix: int, depth: int, layers: Sequence[int], keep: Sequence[float]) -> list[int]:
    counts, n = [], n_tokens
    schedule = dict(zip(layers, keep))
    for i in range(depth):
        if i in schedule:
            n = prefix + _kept_count(schedule[i], n - prefix)
        counts.append(n)
    return counts


def _keep_for_flops(target: float, n_tokens: int, prefix: int, depth: int, width: int, mlp: int,
                    layers: Sequence[int]) -> float:  # fmt: skip
    """The one keep fraction, used at every pruning layer, whose FLOPs are closest to ``target`` x unpruned."""
    lowest, full = prune_flops(n_tokens, prefix, depth, width, mlp, layers, [0.0] * len(layers))
    if target * full < lowest:
        raise ValueError(
            f"flops={target} is below what the schedule can reach: keeping one droppable token after layers "
            f"{tuple(layers)} (the prefix tokens are never dropped) costs {lowest / full:.3f} of the unpruned FLOPs"
        )
    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection on a monotone function of keep
        mid = (lo + hi) / 2
        cost = prune_flops(n_tokens, prefix, depth, width, mlp, layers, [mid] * len(layers))[0] / full
        lo, hi = (mid, hi) if cost < target else (lo, mid)
    return hi


# ----------------------------------------------------------------------------------------------------------- hosts
@dataclass
class _Host:
    """What pruning needs to know about one host tower."""

    spec: Any  # attnselect.hooks.TowerSpec
    blocks: list[nn.Module]
    attentions: list[nn.Module]
    adapters: list[Any]
    rotary: bool
    width: int
    mlp: int
    names: dict[int, str] = field(default_factory=dict)


def _width_and_mlp(block: nn.Module) -> tuple[int, int]:
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    width = max((m.in_features for m in linears), default=0)
    hidden = [m.out_features for m in linears if m.out_features not in (width, 2 * width, 3 * width)]
    mlp = max(hidden, default=4 * width)
    return width, mlp


def _resolve_host(model: nn.Module, tower: str | None) -> _Host:
    from .hooks.capture import adapter_for, find_blocks, resolve_tower

    spec = resolve_tower(model, tower)
    if spec.tower != "vision":
        raise ValueError("prune works on vision towers; text towers keep every token (pass tower='vision')")
    if spec.family == "generic":
        raise TypeError(
            f"{type(model).__name__} is not a known HF transformers, open_clip or timm vision tower: its blocks' token "
            "layout cannot be followed through a cut"
        )
    found = find_blocks(spec.layers_root)
    if not found:
        from .hooks.capture import find_attention_layers

        find_attention_layers(spec.layers_root)  # raises the capture's own, specific refusal
        raise TypeError(f"{type(model).__name__}: no stack of transformer blocks found")
    names = {id(m): n for n, m in model.named_modules()}
    blocks, attentions, adapters = [], [], []
    rotary = False
    for i, (block, attention) in enumerate(found):
        where = f"block {i} ({names.get(id(block), type(block).__name__)})"
        try:
            adapter = adapter_for(attention)
        except TypeError as err:
            raise TypeError(f"{where} cannot be pruned: {err}") from None
        if adapter is None:
            raise TypeError(f"{where} cannot be pruned: no adapter rebuilds its attention ({type(attention).__name__})")
        if getattr(attention, "has_relative_position_bias", False) or hasattr(attention, "relative_position_bias"):
            raise TypeError(
                f"{where} cannot be pruned: its attention adds a relative position bias sized for the full token "
                "grid, which no longer matches once tokens are dropped"
            )
        name = type(attention).__name__
        if name == "MLCDAttention":
            raise TypeError(
                f"{where} cannot be pruned: MLCD rotates every token, the class token included, with angles the "
                "model passes for the full grid"
            )
        rotary = rotary or adapter.__name__ == "TimmRopeAttentionAdapter" or name == "DINOv3ViTAttention"
        blocks.append(block)
        attentions.append(attention)
        adapters.append(adapter)
    width, mlp = _width_and_mlp(blocks[0])
    return _Host(spec, blocks, attentions, adapters, rotary, width, mlp, names)


# ----------------------------------------------------------------------------------------------------------- state
class _Forward:
    """One forward of the host: the current token positions and the signal for the next cut."""

    def __init__(self) -> None:
        self.positions: Tensor | None = None  # [B, n] original positions of the current tokens (-1: a fused token)
        self.saliency: Tensor | None = None  # [B, n] from the block just before the next cut
        self.rollout: Tensor | None = None  # [B, n, n] for signal="rollout"
        self.kept: list[Tensor] = []
        self.stages: list[tuple[int, Tensor]] = []  # (first block, positions) of each token set after a cut
        self.n_original: int | None = None  # tokens entering the first block
        self.size: Tensor | None = None  # [B, n, 1] original tokens each current token stands for (merge="similar")


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _gather_rope(rope: Tensor, patches: Tensor) -> Tensor:
    """A rotary table over the patch tokens, gathered for the kept patches ``patches [B,n]`` (patch indices):
    ``[N,D]`` -> ``[B,1,n,D]``; ``[H,N,D]`` -> ``[B,H,n,D]``; batched ``[B,h,N,D]`` -> ``[B,h,n,D]``."""
    batch, n = patches.shape
    if rope.dim() == 2:
        rope = rope.unsqueeze(0).unsqueeze(0).expand(batch, 1, -1, -1)
    elif rope.dim() == 3:
        rope = rope.unsqueeze(0).expand(batch, -1, -1, -1)
    elif rope.dim() != 4:
        raise TypeError(f"unexpected rotary embedding of shape {tuple(rope.shape)}")
    index = patches.view(batch, 1, n, 1).expand(-1, rope.shape[1], -1, rope.shape[-1])
    return rope.gather(2, index)


class _Pruner:
    def __init__(self, model: nn.Module, host: _Host, layers: tuple[int, ...], keeps: tuple[float, ...], signal: str,
                 merge: bool | str) -> None:  # fmt: skip
        self.model_ref = weakref.ref(model)
        self.host = host
        self.layers = layers
        self.keeps = dict(zip(layers, keeps))
        self.signal = signal
        self.merge = merge
        self.prefix = int(host.spec.num_prefix_tokens)
        self.query = 0 if host.spec.cls_index is not None else None  # None: the mean over the current tokens
        self.fwd = _Forward()
        self.last: _Forward = _Forward()
        self.handles: list[Any] = []
        self._signatures: dict[int, inspect.Signature] = {}
        first = layers[0]
        self.handles.append(host.spec.start.register_forward_pre_hook(self._on_start, with_kwargs=True))
        watched = range(layers[-1]) if signal == "rollout" else sorted({p - 1 for p in layers})
        for i in watched:
            self.handles.append(host.attentions[i].register_forward_hook(self._signal_hook(i), with_kwargs=True))
        for i in range(first, len(host.blocks)):
            self.handles.append(host.blocks[i].register_forward_pre_hook(self._block_hook(i), with_kwargs=True))
        _PRUNED[host.spec.layers_root] = self

    # ------------------------------------------------------------------------------------------ hooks
    def _on_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.fwd = _Forward()

    def _signal_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._read_signal(index, module, args, kwargs)

        return hook

    def _read_signal(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        from . import kernels

        fwd = self.fwd
        with torch.no_grad():
            qk = self.host.adapters[index].qk(module, args, kwargs)
            with torch.autocast(qk.q.device.type, enabled=False):
                if self.signal == "cls" and self.query is not None:
                    rows = torch.tensor([self.query], device=qk.q.device)
                    row = kernels.attention_probs(qk.q, qk.k, scale=qk.scale, bias=qk.bias, causal=qk.causal,
                                                  query_rows=rows)  # fmt: skip
                    fwd.saliency = row[:, 0]
                    return
                fused = kernels.attention_probs(qk.q, qk.k, scale=qk.scale, bias=qk.bias, causal=qk.causal)
            if self.signal in ("mean", "cls"):  # "cls" without a class token: what all tokens attend to
                fwd.saliency = fused.mean(dim=1)
                return
            step = F.residual_normalize(fused)  # rollout: R <- Â R over the current tokens
            fwd.rollout = step if fwd.rollout is None else torch.bmm(step, fwd.rollout)
            if index + 1 in self.keeps:
                r = fwd.rollout
                fwd.saliency = r[:, self.query] if self.query is not None else r.mean(dim=1)

    def _signature(self, index: int) -> inspect.Signature:
        sig = self._signatures.get(index)
        if sig is None:
            sig = self._signatures[index] = inspect.signature(self.host.blocks[index].forward)
        return sig

    def _block_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return self._at_block(index, args, kwargs)

        return hook

    def _at_block(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        fwd = self.fwd
        args, kwargs = list(args), dict(kwargs)
        params = list(self._signature(index).parameters)
        x = args[0] if args else kwargs[params[0]]
        if index in self.keeps:
            x = self._cut(index, x)
            if args:
                args[0] = x
            else:
                kwargs[params[0]] = x
        if fwd.positions is None:
            return tuple(args), kwargs
        positions = fwd.positions
        mask_name = next((m for m in _MASK_KWARGS if m in params), None)
        for name in _ROPE_KWARGS + _MASK_KWARGS:
            if name in kwargs:
                value, where = kwargs[name], ("kw", name)
            elif name in params and params.index(name) < len(args):
                value, where = args[params.index(name)], ("pos", params.index(name))
            else:
                continue
            if value is None:
                continue
            if name in _MASK_KWARGS:
                raise TypeError(
                    f"block {index} ({self._name(index)}) received an attention mask ({name}); masked inputs "
                    "(padding, variable resolution) are not pruned"
                )
            patches = positions[:, self.prefix :] - self.prefix
            if isinstance(value, Tensor):
                value = _gather_rope(value, patches)
            else:  # HF DINOv3: (cos, sin) over the patch tokens
                value = tuple(_gather_rope(v, patches) for v in value)
            if where[0] == "kw":
                kwargs[name] = value
            else:
                args[where[1]] = value
        if fwd.size is not None:  # proportional attention for the merged tokens
            if mask_name is None:
                raise TypeError(
                    f"block {index} ({self._name(index)}) takes no attention mask: merge='similar' needs one"
                )
            mask = self._proportional_mask(index, x.shape[1], x)
            if mask_name in params and params.index(mask_name) < len(args):
                args[params.index(mask_name)] = mask
            else:
                kwargs[mask_name] = mask
        return tuple(args), kwargs

    def _name(self, index: int) -> str:
        block = self.host.blocks[index]
        return self.host.names.get(id(block), type(block).__name__)

    def _cut(self, index: int, x: Tensor) -> Tensor:
        fwd = self.fwd
        batch, n, _ = x.shape
        if fwd.positions is None:
            fwd.positions = torch.arange(n, device=x.device).expand(batch, n)
            fwd.n_original = n
        saliency = fwd.saliency
        if saliency is None or saliency.shape != (batch, n):
            raise RuntimeError(
                f"block {index} ({self._name(index)}): no attention signal from block {index - 1} for the {n} tokens "
                "entering it (was the block skipped?)"
            )
        prefix = self.prefix
        droppable = n - prefix
        k = _kept_count(self.keeps[index], droppable)
        scores = saliency[:, prefix:].float()
        top = scores.topk(k, dim=1).indices.sort(dim=1).values + prefix
        head = torch.arange(prefix, device=x.device).expand(batch, prefix)
        keep_index = torch.cat([head, top], dim=1)
        kept = _gather_tokens(x, keep_index)
        positions = fwd.positions.gather(1, keep_index)
        if self.merge == "similar" and k < droppable:
            kept = self._merge_similar(x, keep_index, kept)
        elif self.merge is True and k < droppable:
            dropped = torch.ones(batch, n, dtype=torch.bool, device=x.device)
            dropped.scatter_(1, keep_index, False)
            weights = (saliency.float() * dropped).unsqueeze(-1)
            fused = (x.float() * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
            kept = torch.cat([kept, fused.to(x.dtype)], dim=1)
            positions = torch.cat([positions, positions.new_full((batch, 1), -1)], dim=1)
        if fwd.rollout is not None:
            fwd.rollout = fwd.rollout.gather(1, keep_index.unsqueeze(-1).expand(-1, -1, n)).gather(
                2, keep_index.unsqueeze(1).expand(-1, keep_index.shape[1], -1)
            )
            if kept.shape[1] > keep_index.shape[1]:  # the fused token starts its own rollout row and column
                fwd.rollout = torch.nn.functional.pad(fwd.rollout, (0, 1, 0, 1))
                fwd.rollout[:, -1, -1] = 1.0
        fwd.positions = positions
        fwd.saliency = None
        fwd.kept.append(positions)
        fwd.stages.append((index, positions))
        self.last = fwd
        return kept

    def _merge_similar(self, x: Tensor, keep_index: Tensor, kept: Tensor) -> Tensor:
        """Average each dropped token into the kept patch token it resembles most, weighted by sizes (ToMe's
        size-weighted merge); the prefix tokens receive nothing."""
        fwd = self.fwd
        batch, n, width = x.shape
        size = fwd.size if fwd.size is not None else x.new_ones(batch, n, 1, dtype=torch.float32)
        kept_size = size.gather(1, keep_index.unsqueeze(-1))
        dropped = torch.ones(batch, n, dtype=torch.bool, device=x.device)
        dropped.scatter_(1, keep_index, False)
        metric = torch.nn.functional.normalize(x.float(), dim=-1)
        similarity = metric @ _gather_tokens(metric, keep_index).transpose(1, 2)  # [B, n, n_kept]
        similarity[:, :, : self.prefix] = -math.inf
        target = similarity.argmax(dim=-1)  # [B, n]
        weight = size.squeeze(-1) * dropped
        total = kept_size.squeeze(-1).scatter_add(1, target, weight)
        summed = (kept.float() * kept_size).scatter_add(
            1, target.unsqueeze(-1).expand(-1, -1, width), x.float() * weight.unsqueeze(-1)
        )
        fwd.size = total.unsqueeze(-1)
        return (summed / fwd.size).to(x.dtype)

    def _proportional_mask(self, index: int, n: int, like: Tensor) -> Tensor:
        """``log(size)`` on the logits of every query, as the block's attention mask expects it."""
        bias = self.fwd.size.squeeze(-1).log().to(like.dtype)  # [B, n]
        attention = self.host.attentions[index]
        if isinstance(attention, nn.MultiheadAttention):  # [B * heads, n, n], True/float semantics of nn.MHA
            heads = attention.num_heads
            return bias.view(-1, 1, 1, n).expand(-1, heads, n, n).reshape(-1, n, n)
        return bias.view(-1, 1, 1, n)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        root = self.host.spec.layers_root
        if _PRUNED.get(root) is self:
            del _PRUNED[root]

    def positions_at(self, layer: int) -> Tensor | None:
        """Original positions ``[B, n]`` of the tokens entering block ``layer`` in the last forward (None: all)."""
        current = None
        for first, positions in self.last.stages:
            if first <= layer:
                current = positions
        return current


class PruneHandle:
    """Token pruning placed on one host tower by :func:`prune`.

    Attributes:
        layers: the pruning layers (block indices, ascending); ``keep``: the kept fraction of the droppable tokens at
            each; ``signal``; ``merge``.
        kept: for the last forward, one LongTensor ``[B, n_l]`` per pruning layer: the positions, in the host's input
            token sequence (prefix tokens included), of the tokens entering that block; -1 marks a fused token.
        num_prefix_tokens: tokens that are never dropped.

    Examples:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2).eval()
        >>> with prune(vit, keep=0.5, layers=(1, 2)) as handle, torch.no_grad():  # 16 patches -> 8 -> 4
        ...     logits = vit(torch.randn(2, 3, 32, 32))
        >>> logits.shape, [k.shape for k in handle.kept]
        (torch.Size([2, 1000]), [torch.Size([2, 9]), torch.Size([2, 5])])
    """

    def __init__(self, pruner: _Pruner) -> None:
        self._pruner = pruner
        self.layers = pruner.layers
        self.keep = tuple(pruner.keeps[i] for i in pruner.layers)
        self.signal = pruner.signal
        self.merge = pruner.merge
        self.num_prefix_tokens = pruner.prefix

    @property
    def kept(self) -> list[Tensor]:
        return list(self._pruner.last.kept)

    @property
    def active(self) -> bool:
        return bool(self._pruner.handles)

    def positions_at(self, layer: int) -> Tensor | None:
        """Positions ``[B, n]`` in the host's input sequence of the tokens entering block ``layer`` in the last
        forward, or None before the first cut (every token)."""
        return self._pruner.positions_at(layer)

    def flops(self, n_tokens: int) -> tuple[float, float]:
        """``(pruned, unpruned)`` FLOPs of the attention and MLP blocks for one sample of ``n_tokens`` tokens."""
        host = self._pruner.host
        return prune_flops(n_tokens, self.num_prefix_tokens, len(host.blocks), host.width, host.mlp, self.layers,
                           self.keep)  # fmt: skip

    def remove(self) -> None:
        """Remove every hook: the host is bit-identical to before. Idempotent."""
        self._pruner.remove()

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        model = self._pruner.model_ref()
        name = type(model).__name__ if model is not None else "<collected>"
        state = "active" if self.active else "removed"
        return f"PruneHandle({name}, layers={self.layers}, keep={self.keep}, signal={self.signal!r}, {state})"


def active_pruner(layers_root: nn.Module) -> _Pruner | None:
    """The pruner placed on a tower (by its layers root), if any."""
    return _PRUNED.get(layers_root)


def prune(
    model: nn.Module,
    keep: float | Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
    *,
    flops: float | None = None,
    signal: str = "cls",
    merge: bool | str | None = None,
    tower: str | None = None,
    n_tokens: int | None = None,
) -> PruneHandle:
    """Prune tokens inside the forward of an unmodified host, by attention.

    Args:
        model: a timm ``VisionTransformer`` / ``Eva``, an HF ViT / CLIP vision / SigLIP / DINOv2 / DINOv3 model, or an
            open_clip CLIP (vision tower) or vision tower.
        keep: the kept fraction of the droppable tokens entering each pruning block, in ``(0, 1]``: one float, or one
            per layer. Kept count: ``floor(keep * droppable + 0.5)``, at least 1. None (and no ``flops``): the
            default, ``DEFAULT_KEEP`` at the default layers.
        layers: the blocks at whose input tokens are cut, ascending, each at least 1 (the signal comes from the block
            before). None: :func:`default_layers` of the host depth.
        flops: instead of ``keep``: the target fraction of the unpruned attention and MLP FLOPs; one keep fraction,
            used at every pruning layer, is derived from it (``n_tokens`` or the host's default input size sets the
            token count).
        signal: ``"cls"``, ``"rollout"`` or ``"mean"`` (see the module docstring).
        merge: ``False`` (drop), ``True`` (fuse the dropped tokens into one extra token, weighted by their saliency, as
            EViT; not on rotary hosts) or ``"similar"`` (average each into its most similar kept token, with
            proportional attention in the later blocks). None: ``"similar"`` for the default schedule (no ``keep``,
            ``layers`` or ``flops``), else ``False``.
        tower: ``"vision"`` for dual encoders (the default).
        n_tokens: tokens entering the first block, for ``flops`` (default: from the host's configured image size).

    Returns:
        A :class:`PruneHandle` (``kept``, ``remove()``, context manager).

    Raises:
        ValueError: ``keep`` outside ``(0, 1]``, ``keep`` and ``flops`` together, layers out of range, unsorted or
            repeated, a ``flops`` target below what the prefix tokens alone cost, an unknown signal.
        RuntimeError: the host is already pruned.
        TypeError: a host that cannot be pruned (windowed, hierarchical, or a position-dependent layer after the
            cut), naming the block.

    Examples:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2).eval()
        >>> handle = prune(vit, keep=0.5, layers=(2,))
        >>> _ = vit(torch.randn(1, 3, 32, 32))
        >>> handle.kept[0].shape  # CLS + 8 of 16 patches entering block 2
        torch.Size([1, 9])
        >>> handle.remove()
    """
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
    if keep is not None and flops is not None:
        raise ValueError("pass keep or flops, not both")
    host = _resolve_host(model, tower)
    if active_pruner(host.spec.layers_root) is not None:
        raise RuntimeError(f"{type(model).__name__} is already pruned: remove that handle first")
    depth = len(host.blocks)
    given_layers = layers
    if layers is None:
        layers = default_layers(depth)
    if isinstance(layers, int) or not isinstance(layers, Sequence) or isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of block indices, got {layers!r}")
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one block")
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"layers must hold block indices (ints), got {i!r}")
        if not 1 <= i < depth:
            raise ValueError(
                f"layers: block {i} is out of range: pruning layers lie in [1, {depth - 1}] for a {depth}-block host "
                "(the signal comes from the block before)"
            )
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be strictly ascending without repeats, got {layers}")
    if flops is not None:
        if not isinstance(flops, (int, float)) or isinstance(flops, bool) or not 0 < flops <= 1:
            raise ValueError(f"flops must be a fraction in (0, 1] of the unpruned FLOPs, got {flops!r}")
        n = n_tokens if n_tokens is not None else _default_tokens(host)
        keeps = (_keep_for_flops(float(flops), n, int(host.spec.num_prefix_tokens), depth, host.width, host.mlp,
                                 layers),) * len(layers)  # fmt: skip
    else:
        keeps = _check_keep(DEFAULT_KEEP if keep is None else keep, len(layers))
    default_schedule = keep is None and flops is None and given_layers is None
    if merge is None:
        merge = "similar" if default_schedule else False
    if merge not in (False, True, "similar"):
        raise ValueError(f"merge must be False, True or 'similar', got {merge!r}")
    if merge is True and host.rotary:
        raise ValueError(
            "merge=True is not supported on rotary hosts: the fused token has no position to rotate (use "
            "merge='similar' or False)"
        )
    pruner = _Pruner(model, host, layers, keeps, signal, merge)
    logger.debug("pruning %s at blocks %s keeping %s (signal %s)", type(model).__name__, layers, keeps, signal)
    return PruneHandle(pruner)


def _check_keep(keep: float | Sequence[float], count: int) -> tuple[float, ...]:
    values = [keep] * count if isinstance(keep, (int, float)) and not isinstance(keep, bool) else keep
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"keep must be a float in (0, 1] or one per layer, got {keep!r}")
    values = list(values)
    if len(values) != count:
        raise ValueError(f"keep has {len(values)} values for {count} pruning layers; give one per layer")
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1:
            raise ValueError(f"keep must lie in (0, 1], got {v!r}")
    return tuple(float(v) for v in values)


def _default_tokens(host: _Host) -> int:
    """Tokens entering the first block at the host's configured input size (for ``flops=``)."""
    spec = host.spec
    if spec.patch_size is None:
        raise ValueError("flops= needs n_tokens= for this host (its input size is unknown)")
    root = spec.start
    size = None
    places = ("patch_embed", "embeddings", "config")
    for obj in (root, *(getattr(root, p, None) for p in places)):
        size = getattr(obj, "img_size", None) or getattr(obj, "image_size", None)
        if size is not None:
            break
    if size is None:
        raise ValueError("flops= needs n_tokens= for this host (its input size is unknown)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return spec.num_prefix_tokens + (h // spec.patch_size[0]) * (w // spec.patch_size[1])
