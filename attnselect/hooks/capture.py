"""``capture_attention``: attention maps and final tokens from an unmodified host model.

The capture places forward hooks (with kwargs) on the chosen layers' attention modules only. Each hook rebuilds
``softmax(Q K^T * scale + mask)`` from the module input and the module's own weights through
:func:`attnselect.functional.attention_probs`; the hook returns None, so the host's output and its fused
attention path are untouched. Two more hooks delimit one forward of the chosen tower: a pre-hook on its first
module clears the maps and reads the inputs (image size, token ids, padding mask), a hook on its last module reads
the final tokens and runs the callbacks (what :meth:`attnselect.AttentiveBank.attach` uses).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..rollout import resolve_layers
from ._base import (
    AttentionAdapter,
    MultiheadAttentionAdapter,
    TowerSpec,
    unsupported_reason,
)
from .hf import HFAttentionAdapter, HFLegacyAttentionAdapter, resolve_hf
from .open_clip import OpenClipAttentionAdapter, resolve_open_clip
from .timm import TimmAttentionAdapter, resolve_timm

__all__ = ["ADAPTERS", "AttentionCapture", "adapter_for", "capture_attention", "find_attention_layers"]

logger = logging.getLogger(__name__)

#: Dispatch table, checked in this order (a module is handled by the first adapter whose ``matches`` is True).
ADAPTERS: tuple[type[AttentionAdapter], ...] = (
    MultiheadAttentionAdapter,
    TimmAttentionAdapter,
    OpenClipAttentionAdapter,
    HFAttentionAdapter,
    HFLegacyAttentionAdapter,
)

_RESOLVERS = (resolve_hf, resolve_open_clip, resolve_timm)
_HEAD_FUSIONS = ("mean", "max", "min")


def adapter_for(module: nn.Module) -> type[AttentionAdapter] | None:
    """The adapter for ``module`` (None when no adapter handles it).

    Args:
        module: any module; only attention modules have an adapter.

    Returns:
        The first adapter class of :data:`ADAPTERS` whose ``matches`` accepts ``module``, or None.

    Raises:
        TypeError: ``module`` is a known attention type that cannot be captured (rotary attention, ToMe-patched
            attention, subclasses that override ``forward``).

    Examples:
        >>> from torch import nn
        >>> adapter_for(nn.MultiheadAttention(16, 2)).name
        'torch.nn.MultiheadAttention'
        >>> adapter_for(nn.Linear(4, 4)) is None
        True
    """
    reason = unsupported_reason(module)
    if reason is not None:
        raise TypeError(reason)
    for adapter in ADAPTERS:
        if adapter.matches(module):
            return adapter
    return None


def _attention_like(module: nn.Module) -> bool:
    return unsupported_reason(module) is not None or any(a.matches(module) for a in ADAPTERS)


def _first_attention(block: nn.Module) -> nn.Module | None:
    for m in block.modules():
        if _attention_like(m):
            return m
    return None


def _describe_types(root: nn.Module) -> str:
    names = sorted({type(m).__name__ for m in root.modules()})
    attn = [n for n in names if "attn" in n.lower() or "attention" in n.lower()]
    shown = attn or names
    more = "" if len(shown) <= 20 else f" (+{len(shown) - 20} more)"
    return ", ".join(shown[:20]) + more


def find_attention_layers(root: nn.Module) -> list[nn.Module]:
    """The attention module of each transformer block under ``root``, in forward order.

    The block stack is the longest ``nn.ModuleList``/``nn.Sequential`` whose every child holds an attention module
    (its first one is the block's self-attention); pooling heads outside the stack (SigLIP's MAP head) are not
    layers. Without such a stack, every attention module in registration order.

    Args:
        root: the module to search (a whole host or one tower).

    Returns:
        One attention module per block, lowest layer first.

    Raises:
        TypeError: no attention module at all, naming the module types found.

    Examples:
        >>> from torch import nn
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), num_layers=3)
        >>> layers = find_attention_layers(enc)
        >>> len(layers), type(layers[0]).__name__
        (3, 'MultiheadAttention')
    """
    best: list[nn.Module] | None = None
    for container in root.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            continue
        picks = []
        for child in container:
            first = _first_attention(child)
            if first is None:
                break
            picks.append(first)
        else:
            if best is None or len(picks) > len(best):
                best = picks
    if best is None:
        best = [m for m in root.modules() if _attention_like(m)]
    if not best:
        raise TypeError(
            f"{type(root).__name__}: found no supported attention module. Module types found: "
            f"{_describe_types(root)}. Supported: " + ", ".join(a.name for a in ADAPTERS)
        )
    return best


def _generic_spec(model: nn.Module, tower: str | None) -> TowerSpec:
    if tower == "text":
        raise ValueError(f"tower='text' needs a known dual encoder; {type(model).__name__} is not one")
    return TowerSpec(
        family="generic",
        tower="vision",
        layers_root=model,
        start=model,
        end=model,
        read_inputs=lambda args, kwargs: {},
        read_tokens=lambda capture, output: None,
    )


def resolve_tower(model: nn.Module, tower: str | None = None) -> TowerSpec:
    """Describe the tower of ``model`` to capture (HF, open_clip, timm, else a generic stack of attention blocks).

    Args:
        model: the host model.
        tower: None (the default tower: vision for dual encoders), ``"vision"`` or ``"text"``.

    Returns:
        A :class:`TowerSpec` (family, layout and the modules that delimit one forward of the tower).

    Examples:
        >>> from torch import nn
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), num_layers=3)
        >>> resolve_tower(enc).family
        'generic'
    """
    if tower not in (None, "vision", "text"):
        raise ValueError(f"tower must be None, 'vision' or 'text', got {tower!r}")
    for resolver in _RESOLVERS:
        spec = resolver(model, tower)
        if spec is not None:
            return spec
    return _generic_spec(model, tower)


QueryRows = int | str | Sequence[int] | Tensor | Callable[["AttentionCapture"], Tensor] | None


class AttentionCapture:
    """Attention maps of chosen layers and the final tokens of one tower, refreshed by every forward of the host.

    Build it with :func:`capture_attention`. After each forward of the host (or of the chosen tower, e.g.
    ``encode_image``/``get_text_features``):

    Attributes:
        maps: dict ``layer -> map``: ``[B,N,N]`` fused, ``[B,H,N,N]`` with ``head_fusion=None``, ``[B,R,N]`` /
            ``[B,H,R,N]`` with ``query_rows``; fp32. Only the chosen layers; emptied when the next forward starts.
        tokens: final token features ``[B,N,D]`` (projected tokens for CLIP towers: ``ln_post``/``ln_final`` then the
            projection on every token; the last hidden state after the final norm for ViT, DINOv2, SigLIP, timm),
            or None when the host's layout is unknown. Not detached: gradients reach the host through them.
        eos_index: text towers: LongTensor ``[B]`` of the per-sample summary position (EOS for causal CLIP towers,
            0 for BERT-style ``[CLS]`` towers, the last position for SigLIP), else None.
        valid: text towers: bool ``[B,N]``, True up to and including EOS (causal towers) or at every non-padding
            token (towers pooled at the first/last position), and where the padding mask allows; else None.
        input_ids: text towers: the token ids of the last forward.
        grid: ``(h, w)`` patch grid of the last image forward, when known.
        layers: the chosen layer indices (0-based, forward order); ``num_layers``: the host depth.
        num_prefix_tokens, num_suffix_tokens, cls_index, sos_index: token layout (CLS and register tokens before
            the patches, YOLOS detection tokens after them).
        tower: ``"vision"`` or ``"text"``; ``family``: ``"hf"``, ``"open_clip"``, ``"timm"`` or ``"generic"``.

    Examples:
        >>> from torch import nn
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), num_layers=3)
        >>> with AttentionCapture(enc, "all", head_fusion=None) as cap:  # removes its hooks on exit
        ...     _ = enc(torch.randn(2, 5, 16))  # [B,N,D]
        ...     maps = dict(cap.maps)
        >>> sorted(maps), maps[0].shape  # per head: [B,H,N,N]
        ([0, 1, 2], torch.Size([2, 2, 5, 5]))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Any,
        *,
        head_fusion: str | None = "mean",
        query_rows: QueryRows = None,
        detach: bool = True,
        tower: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if head_fusion is not None and head_fusion not in _HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {_HEAD_FUSIONS} or None, got {head_fusion!r}")
        self._spec = spec = resolve_tower(model, tower)
        found = find_attention_layers(spec.layers_root)
        self.num_layers = len(found)
        if not isinstance(layers, (int, str, Sequence, Tensor)) or isinstance(layers, bool):
            raise TypeError(
                "layers must be an int, a name ('early', 'middle', 'late'), 'all' or a sequence of those, "
                f"got {type(layers).__name__}"
            )
        if isinstance(layers, Tensor):
            layers = [int(i) for i in layers.reshape(-1).tolist()]
        if isinstance(layers, str) and layers == "all":
            self.layers: tuple[int, ...] = tuple(range(self.num_layers))
        else:
            self.layers = resolve_layers(layers, self.num_layers)
        names = {id(m): n for n, m in model.named_modules()}
        self.layer_names = {i: names.get(id(found[i]), type(found[i]).__name__) for i in self.layers}
        adapters: dict[int, type[AttentionAdapter]] = {}
        for i in self.layers:
            module = found[i]
            try:
                adapter = adapter_for(module)
            except TypeError as err:
                raise TypeError(f"layer {i} ({self.layer_names[i]}): {err}") from None
            if adapter is None:
                raise TypeError(
                    f"layer {i} ({self.layer_names[i]}) is a {type(module).__name__}, which no adapter handles. "
                    "Supported: " + ", ".join(a.name for a in ADAPTERS)
                )
            adapter.check(module)
            adapters[i] = adapter

        self.head_fusion = head_fusion
        self.detach = bool(detach)
        self.query_rows = self._check_query_rows(query_rows)
        self.family = spec.family
        self.tower = spec.tower
        self.modality = spec.modality
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.num_suffix_tokens = spec.num_suffix_tokens
        self.cls_index = spec.cls_index
        self.sos_index = spec.sos_index
        self.patch_size = spec.patch_size
        self._callbacks: list[Callable[[AttentionCapture], None]] = []
        self._handles: list[Any] = []
        self._reset()

        self._handles.append(spec.start.register_forward_pre_hook(self._start_hook, with_kwargs=True))
        for module, fn in spec.aux_hooks:
            self._handles.append(module.register_forward_hook(self._aux(fn)))
        for i in self.layers:
            self._handles.append(found[i].register_forward_hook(self._layer_hook(i, adapters[i]), with_kwargs=True))
        self._handles.append(spec.end.register_forward_hook(self._end_hook, with_kwargs=True))
        logger.debug("capturing layers %s of %s (%s)", self.layer_names, type(model).__name__, spec.family)

    # ----------------------------------------------------------------------------------------------- state
    def _reset(self) -> None:
        self.maps: dict[int, Tensor] = {}
        self.tokens: Tensor | None = None
        self.eos_index: Tensor | None = None
        self.valid: Tensor | None = None
        self.input_ids: Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self._batch: int | None = None
        self._scratch: dict[str, Any] = {}
        self._rows: Tensor | None = None
        self._finished = False

    def clear(self) -> None:
        """Drop the stored maps, tokens and per-forward metadata."""
        self._reset()

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return bool(self._handles)

    @property
    def summary_index(self) -> int | Tensor | None:
        """The summary row: ``cls_index`` for images (None without CLS), ``eos_index`` ``[B]`` for text."""
        return self.eos_index if self.modality == "text" else self.cls_index

    def add_callback(self, fn: Callable[[AttentionCapture], None]) -> None:
        """Call ``fn(capture)`` at the end of every forward of the tower, once its maps and tokens are stored."""
        self._callbacks.append(fn)

    def remove(self) -> None:
        """Remove every hook and drop the stored tensors; the host is left exactly as it was. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._callbacks = []
        self._reset()

    def __enter__(self) -> AttentionCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (
            f"AttentionCapture({self.family}, tower={self.tower!r}, layers={self.layers}, "
            f"num_layers={self.num_layers}, head_fusion={self.head_fusion!r}, {state})"
        )

    # ----------------------------------------------------------------------------------------------- query rows
    def _check_query_rows(self, spec: QueryRows) -> QueryRows:
        if spec is None or callable(spec):
            return spec
        if isinstance(spec, str):
            if spec == "cls":
                if self._spec.cls_index is None:
                    raise ValueError("query_rows='cls' but this tower has no class token")
                return spec
            if spec == "eos":
                if self._spec.eos_index is None:
                    raise ValueError("query_rows='eos' needs a text tower with a known EOS position")
                return spec
            raise ValueError(f"query_rows must be 'cls', 'eos', ints, a LongTensor or a callable, got {spec!r}")
        if isinstance(spec, bool):
            raise TypeError("query_rows must not be a bool")
        if isinstance(spec, int):
            return [spec]
        if isinstance(spec, Tensor):
            if spec.dtype.is_floating_point or spec.dtype == torch.bool or spec.dim() not in (1, 2):
                raise ValueError(
                    f"query_rows as a tensor must be an integer [R] or [B,R], got {spec.dtype} {tuple(spec.shape)}"
                )
            return spec
        if isinstance(spec, Sequence) and spec and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
            return list(spec)
        raise TypeError(f"query_rows must be None, 'cls', 'eos', ints, a LongTensor or a callable, got {spec!r}")

    def _query_rows(self, n: int, device: torch.device) -> Tensor | None:
        spec = self.query_rows
        if spec is None:
            return None
        if self._rows is None:
            if callable(spec):
                rows = spec(self)
            elif spec == "cls":
                rows = [self.cls_index]
            elif spec == "eos":
                if self.eos_index is None:
                    raise RuntimeError("query_rows='eos' but no token ids were seen in this forward")
                rows = self.eos_index.view(-1, 1)
            else:
                rows = spec
            rows = torch.as_tensor(rows, dtype=torch.long, device=device)
            self._rows = torch.where(rows < 0, rows + n, rows)
        return self._rows

    # ----------------------------------------------------------------------------------------------- hooks
    def _start_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._reset()
        inputs = self._spec.read_inputs(args, kwargs)
        pixels = inputs.get("pixels")
        if isinstance(pixels, Tensor) and pixels.dim() == 4:
            self._batch = pixels.shape[0]
            if self.patch_size is not None:
                self.grid = (pixels.shape[-2] // self.patch_size[0], pixels.shape[-1] // self.patch_size[1])
        ids = inputs.get("ids")
        if isinstance(ids, Tensor) and ids.dim() == 2:
            self._batch = ids.shape[0]
            self.input_ids = ids
            if self._spec.eos_index is not None:
                with torch.no_grad():
                    eos = self._spec.eos_index(ids).long()
                    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
                    if self._spec.valid_through_eos:
                        valid = pos <= eos.unsqueeze(1)
                    else:  # pooled at the first/last position: every non-padding token, and the summary
                        valid = torch.ones_like(ids, dtype=torch.bool)
                        if self._spec.pad_id is not None:
                            valid = (ids != self._spec.pad_id) | (pos == eos.unsqueeze(1))
                    mask = inputs.get("attention_mask")
                    if isinstance(mask, Tensor) and mask.shape == ids.shape:
                        valid = valid & mask.bool()
                self.eos_index, self.valid = eos, valid

    def _aux(self, fn: Callable[[Any, Any], None]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            fn(self, output)

        return hook

    def _layer_hook(self, index: int, adapter: type[AttentionAdapter]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if index in self.maps:  # a recomputation (gradient checkpointing) of a layer already stored
                return
            grad_ctx = torch.no_grad() if self.detach else contextlib.nullcontext()
            with grad_ctx:
                qk = adapter.qk(module, args, kwargs)
                rows = self._query_rows(qk.q.shape[2], qk.q.device)
                # q and k keep the host's precision (autocast included); the logits and softmax run in fp32
                with torch.autocast(qk.q.device.type, enabled=False):
                    # the gate: the fused Triton capture for CUDA tensors (no [B,H,N,N]), else the reference
                    probs = kernels.attention_probs(
                        qk.q,
                        qk.k,
                        scale=qk.scale,
                        bias=qk.bias,
                        causal=qk.causal,
                        head_fusion=self.head_fusion,
                        query_rows=rows,
                    )
            self.maps[index] = probs

        return hook

    def _end_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._finished:
            return
        self._finished = True
        self.tokens = self._spec.read_tokens(self, output)
        for fn in self._callbacks:
            fn(self)


def capture_attention(
    model: nn.Module,
    layers: Any,
    *,
    head_fusion: str | None = "mean",
    query_rows: QueryRows = None,
    detach: bool = True,
    tower: str | None = None,
) -> AttentionCapture:
    """Capture attention maps (and final tokens) from an unmodified HF transformers, open_clip or timm model.

    Args:
        model: the host: a transformers ``CLIPModel``/``CLIPVisionModel``/``CLIPTextModel``/``ViTModel``/
            ``SiglipModel``/``Dinov2Model``/..., an open_clip ``CLIP`` or tower, a timm ``VisionTransformer``, or
            any module holding a stack of supported attention modules.
        layers: layer indices (negative allowed), names ``"early"`` (0), ``"middle"`` (L // 3), ``"late"`` (L - 1),
            a sequence of those, or ``"all"``.
        head_fusion: ``"mean"``, ``"max"``, ``"min"`` (maps ``[B,N,N]``) or None (per head, ``[B,H,N,N]``).
        query_rows: keep only some query rows (maps ``[B,R,N]``): ints, a LongTensor ``[R]``/``[B,R]``, ``"cls"``,
            ``"eos"`` (per-sample text EOS row) or a callable ``capture -> LongTensor`` evaluated once per forward.
        detach: compute maps without autograd (default). With False, maps carry gradients to the host weights.
        tower: ``"vision"`` (default) or ``"text"`` for dual encoders (``CLIPModel``, ``SiglipModel``, open_clip
            ``CLIP``).

    Returns:
        An :class:`AttentionCapture`; its ``maps``/``tokens`` are refreshed by every forward of the tower. Call
        ``remove()`` (or use it as a context manager) to restore the model exactly.

    Raises:
        TypeError: unsupported model or attention type (the message names the module types found).
        ValueError: bad ``layers``, ``head_fusion``, ``query_rows`` or ``tower``.

    Examples:
        >>> from torch import nn
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), num_layers=3)
        >>> cap = capture_attention(enc, ("middle", "late"))  # layers 1 and 2 of 3
        >>> _ = enc(torch.randn(2, 5, 16))  # [B,N,D]
        >>> sorted(cap.maps), cap.maps[2].shape  # fused over heads: [B,N,N]
        ([1, 2], torch.Size([2, 5, 5]))
        >>> cap.remove()
        >>> cap = capture_attention(enc, -1, query_rows=0)  # only the query row 0 of the last layer: [B,R,N]
        >>> _ = enc(torch.randn(2, 5, 16))
        >>> cap.maps[2].shape
        torch.Size([2, 1, 5])
        >>> cap.remove()
    """
    return AttentionCapture(model, layers, head_fusion=head_fusion, query_rows=query_rows, detach=detach, tower=tower)
