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
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..rollout import resolve_layers
from ._base import (
    SUPPORTED_HOSTS,
    AttentionAdapter,
    MultiheadAttentionAdapter,
    TowerSpec,
    unsupported_reason,
    windowed_reason,
)
from .hf import HFAttentionAdapter, HFLegacyAttentionAdapter, resolve_hf
from .open_clip import OpenClipAttentionAdapter, resolve_open_clip
from .timm import TimmAttentionAdapter, TimmRopeAttentionAdapter, resolve_timm

__all__ = [
    "ADAPTERS",
    "AttentionCapture",
    "adapter_for",
    "capture_attention",
    "find_attention_layers",
    "find_blocks",
]

logger = logging.getLogger(__name__)

#: Dispatch table, checked in this order (a module is handled by the first adapter whose ``matches`` is True).
ADAPTERS: tuple[type[AttentionAdapter], ...] = (
    MultiheadAttentionAdapter,
    TimmAttentionAdapter,
    TimmRopeAttentionAdapter,
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


def find_blocks(root: nn.Module) -> list[tuple[nn.Module, nn.Module]] | None:
    """The transformer blocks under ``root`` with the self-attention module of each, in forward order: the children of
    the longest ``nn.ModuleList``/``nn.Sequential`` whose every child holds an attention module. None without such a
    stack.

    Examples:
        >>> from torch import nn
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), num_layers=3)
        >>> [(type(b).__name__, type(a).__name__) for b, a in find_blocks(enc)][0]
        ('TransformerEncoderLayer', 'MultiheadAttention')
    """
    best: list[tuple[nn.Module, nn.Module]] | None = None
    for container in root.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            continue
        picks = []
        for child in container:
            first = _first_attention(child)
            if first is None:
                break
            picks.append((child, first))
        else:
            if best is None or len(picks) > len(best):
                best = picks
    return best


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
    blocks = find_blocks(root)
    best = None if blocks is None else [attention for _, attention in blocks]
    if best is None:
        best = [m for m in root.modules() if _attention_like(m)]
    if not best:
        if any(isinstance(m, nn.Conv2d) for m in root.modules()) and not any(
            "attention" in type(m).__name__.lower() for m in root.modules()
        ):
            raise TypeError(
                f"{type(root).__name__} is a convolutional network: it has no self-attention between tokens, so "
                f"there is no attention map to capture. Supported: {SUPPORTED_HOSTS}"
            )
        windowed = next((r for r in map(windowed_reason, root.modules()) if r is not None), None)
        if windowed is not None:
            raise TypeError(f"{type(root).__name__}: {windowed}; it is not supported. Supported: {SUPPORTED_HOSTS}")
        raise TypeError(
            f"{type(root).__name__}: found no supported attention module. Module types found: "
            f"{_describe_types(root)}. Supported: " + ", ".join(a.name for a in ADAPTERS)
        )
    return best


def _generic_spec(model: nn.Module, tower: str | None) -> TowerSpec:
    if tower == "text":
        raise ValueError(f"tower='text' needs a known dual encoder; {type(model).__name__} is not one")
    mha = next((m for m in model.modules() if isinstance(m, nn.MultiheadAttention)), None)
    batch_first = bool(getattr(mha, "batch_first", True))

    def read_inputs(args: tuple, kwargs: dict) -> dict:
        # nn.TransformerEncoder(src, mask, src_key_padding_mask): the sequence, and the padding the layers may not
        # see (the nested-tensor fast path hands them each sample's real tokens only)
        return {
            "sequence": args[0] if args else next(iter(kwargs.values()), None),
            "batch_first": batch_first,
            "key_padding_mask": kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None),
        }

    return TowerSpec(
        family="generic",
        tower="vision",
        layers_root=model,
        start=model,
        end=model,
        read_inputs=read_inputs,
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


def _compiling() -> bool:
    """Whether ``torch.compile`` is tracing the hooks (they are then traced into the graph: nothing untraceable)."""
    compiling = getattr(torch.compiler, "is_compiling", None)
    return compiling is not None and compiling()


def _in_backward() -> bool:
    """Whether autograd is running a backward pass (a checkpointed block recomputing its forward)."""
    if _compiling():
        return False
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class _InertHook:
    """What a capture hook becomes in a copy of the host (``copy.deepcopy``, EMA/SWA ``AveragedModel``,
    ``torch.save``/``torch.load``): it does nothing, so the copy runs as the bare host would. Attach again to the copy
    to capture from it."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "<attnselect capture hook (inert in a copy of the host)>"


class _HubHook:
    """A hook of a :class:`_TowerHub`: calls ``hub.<method>(*args)``. Copies and pickles of the host get an inert hook
    instead (the hub, its consumers and their tensors belong to the original host only)."""

    def __init__(self, method: Callable[..., None], *bound: Any) -> None:
        self.method, self.bound = method, bound

    def __call__(self, *args: Any) -> None:
        return self.method(*self.bound, *args)

    def __deepcopy__(self, memo: dict) -> _InertHook:
        return _InertHook()

    def __reduce__(self) -> tuple:
        return (_InertHook, ())


class _HubForward:
    """State of one forward of a tower, shared by the hub's consumers (what ``read_tokens`` sees)."""

    def __init__(self) -> None:
        self.scratch: dict[str, Any] = {}
        self.batch: int | None = None
        self.length: int | None = None  # the tower's sequence length, when its layers may see shorter ones

    # the names the tower specs read (kept short: `capture._scratch`, `capture._batch`)
    @property
    def _scratch(self) -> dict[str, Any]:
        return self.scratch

    @property
    def _batch(self) -> int | None:
        return self.batch


class _ForwardState:
    """What one consumer holds for the latest forward of the tower."""

    def __init__(self) -> None:
        self.maps: dict[int, Tensor] = {}
        self.tokens: Tensor | None = None
        self.eos_index: Tensor | None = None
        self.valid: Tensor | None = None
        self.input_ids: Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self.grids: Tensor | None = None
        self.probe: Tensor | None = None
        self.batch: int | None = None
        self.rows: Tensor | None = None
        self.finished = False
        self.waiting = False  # finished, the callbacks waiting for the pooling probe


def _thread() -> int | None:
    """The calling thread, or None while ``torch.compile`` traces (the hooks are traced into the graph then)."""
    return None if _compiling() else threading.get_ident()


_EMPTY = _ForwardState()  # what a capture reads before its first forward (never written to)


class _TowerHub:
    """The hooks of one host tower, shared by every consumer (captures, attached banks) of that tower.

    One pre-hook on the tower's first module starts a forward, one hook per attention layer that some consumer wants
    computes its queries and keys once and each consumer's map (consumers that ask for the same head fusion, query
    rows and autograd mode share one map), and one hook on the tower's last module reads the final tokens and runs
    the consumers' callbacks. The union of the consumers' layers is hooked; removing the last consumer removes every
    hook.
    """

    def __init__(self, spec: TowerSpec, found: list[nn.Module]) -> None:
        self.spec = spec
        self.found = found
        self.consumers: list[AttentionCapture] = []
        self.adapters: dict[int, type[AttentionAdapter]] = {}
        self._fixed: list[Any] = []
        self._layer_handles: dict[int, Any] = {}
        self._probe_handle: Any = None
        self._forward = _HubForward()
        self._owner: int | None = None  # the thread whose forward runs (checked outside torch.compile)

    # ------------------------------------------------------------------------------------------ consumers
    def add(self, consumer: AttentionCapture) -> None:
        if not self.consumers:
            spec = self.spec
            self._fixed.append(
                spec.start.register_forward_pre_hook(_HubHook(self._on_start), with_kwargs=True)
            )
            for module, fn in spec.aux_hooks:
                self._fixed.append(module.register_forward_hook(_HubHook(self._on_aux, fn)))
            self._fixed.append(spec.end.register_forward_hook(_HubHook(self._on_end), with_kwargs=True))
        self.consumers.append(consumer)
        self._sync_hooks()

    def discard(self, consumer: AttentionCapture) -> None:
        if consumer in self.consumers:
            self.consumers.remove(consumer)
        self._sync_hooks()
        if not self.consumers:
            for handle in self._fixed:
                handle.remove()
            self._fixed = []
            self._forward = _HubForward()
            if _HUBS.get(self.spec.layers_root) is self:
                del _HUBS[self.spec.layers_root]

    def _sync_hooks(self) -> None:
        wanted = set().union(*(c._layer_set for c in self.consumers)) if self.consumers else set()
        for index in list(self._layer_handles):
            if index not in wanted:
                self._layer_handles.pop(index).remove()
        for index in sorted(wanted - set(self._layer_handles)):
            self._layer_handles[index] = self.found[index].register_forward_hook(
                _HubHook(self._on_layer, index), with_kwargs=True
            )
        want_probe = any(c.probe_wanted for c in self.consumers)
        if want_probe and self._probe_handle is None:
            self._probe_handle = self.spec.probe.register_forward_hook(_HubHook(self._on_probe), with_kwargs=True)
        elif not want_probe and self._probe_handle is not None:
            self._probe_handle.remove()
            self._probe_handle = None

    # ------------------------------------------------------------------------------------------ hooks
    def _check_thread(self) -> None:
        owner, me = self._owner, _thread()
        if owner is not None and me is not None and me != owner:
            raise RuntimeError(
                "attnselect: a forward of this host started in another thread while this one was running. An attached "
                "host keeps one set of maps and one bank output per forward, so two threads cannot run it at once: "
                "give each thread its own copy (copy.deepcopy(host) carries no hooks) and attach to each copy"
            )

    def _on_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._owner = _thread()
        fwd = self._forward = _HubForward()
        meta = _read_metadata(self.spec, self.spec.read_inputs(args, kwargs))
        fwd.batch, fwd.length = meta.batch, meta.length
        for consumer in list(self.consumers):
            consumer._begin(meta)

    def _on_aux(self, fn: Callable[[Any, Any], None], module: nn.Module, args: tuple, output: Any) -> None:
        self._check_thread()
        fn(self._forward, output)

    def _on_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if _in_backward():  # a checkpointed block recomputed in the backward pass: the map is stored already
            return
        self._check_thread()
        consumers = [c for c in self.consumers if index in c._layer_set]
        states = [(c, c._state_for_layer()) for c in consumers]
        states = [(c, st) for c, st in states if st is not None and index not in st.maps]
        if not states:
            return
        adapter = self.adapters[index]
        grad = any(not c.detach for c, _ in states)
        with contextlib.nullcontext() if grad else torch.no_grad():
            qk = adapter.qk(module, args, kwargs)
        shared: dict[tuple, Tensor] = {}
        for consumer, st in states:
            rows = consumer._query_rows(st, qk.q.shape[2], qk.q.device)
            key = (consumer.head_fusion, consumer.detach, None if rows is None else id(rows))
            if key not in shared:
                shared[key] = _probs(qk, consumer.head_fusion, rows, consumer.detach, self._forward.length)
            st.maps[index] = shared[key]

    def _on_probe(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if _in_backward():
            return
        consumers = [c for c in self.consumers if c.probe_wanted]
        if not consumers:
            return
        with torch.no_grad():
            qk = self.spec.probe_adapter.qk(module, args, kwargs)
            probs = _probs(qk, "mean", None, True)  # [B,L,N]: the probe's (latents') rows, heads averaged
            probe = probs.mean(dim=1)  # several latent queries (timm latent_len > 1): their mean
        for consumer in consumers:
            st = consumer._current()
            if st is None or st.probe is not None or (st.finished and not st.waiting):
                continue
            st.probe = probe
            if st.waiting:  # the tower's end ran first (timm: the pool follows the final norm): finish now
                st.waiting = False
                consumer._run_callbacks()

    def _on_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._check_thread()
        fwd = self._forward
        tokens = None
        read = False
        for consumer in list(self.consumers):
            st = consumer._current()
            if st is None or st.finished:
                continue
            if not read:
                tokens, read = self.spec.read_tokens(fwd, output), True
            st.tokens = tokens
            st.finished = True
            if consumer.probe_wanted and st.probe is None:  # the pooling probe runs after the tower's end
                st.waiting = True
                continue
            consumer._run_callbacks()
        self._owner = None  # the forward is over: another thread may start the next one


def _probs(qk: Any, head_fusion: str | None, rows: Tensor | None, detach: bool, length: int | None = None) -> Tensor:
    with torch.no_grad() if detach else contextlib.nullcontext():
        # q and k keep the host's precision (autocast included); the logits and softmax run in fp32
        with torch.autocast(qk.q.device.type, enabled=False):
            # the gate: the fused Triton capture for CUDA tensors (no [B,H,N,N]), else the reference
            probs = kernels.attention_probs(
                qk.q,
                qk.k,
                scale=qk.scale,
                bias=qk.bias,
                causal=qk.causal,
                head_fusion=head_fusion,
                query_rows=rows,
            )
        if qk.query_valid is not None:  # rows the host never computed (a nested tensor's padding) are 0
            real = qk.query_valid
            if rows is not None:
                real = real.gather(1, rows.expand(real.shape[0], -1) if rows.dim() == 1 else rows)
            shape = (real.shape[0],) + (1,) * (probs.dim() - 3) + (real.shape[1], 1)
            probs = probs * real.reshape(shape).to(probs.dtype)
        if length is not None and probs.shape[-1] < length:  # back to the host's sequence length (zeros)
            pad = length - probs.shape[-1]
            probs = torch.nn.functional.pad(probs, (0, pad) if rows is not None else (0, pad, 0, pad))
        return probs


class _Metadata:
    """Per-forward layout read from the tower's inputs (image size, token ids, padding)."""

    def __init__(self) -> None:
        self.batch: int | None = None
        self.grid: tuple[int, int] | None = None
        self.grids: Tensor | None = None
        self.input_ids: Tensor | None = None
        self.eos_index: Tensor | None = None
        self.valid: Tensor | None = None
        self.length: int | None = None


def _read_metadata(spec: TowerSpec, inputs: dict) -> _Metadata:
    meta = _Metadata()
    seq = inputs.get("sequence")
    if isinstance(seq, Tensor) and seq.dim() == 3 and not seq.is_nested:  # a generic stack of attention blocks
        first = inputs.get("batch_first", True)
        meta.batch, meta.length = (seq.shape[0], seq.shape[1]) if first else (seq.shape[1], seq.shape[0])
        padding = inputs.get("key_padding_mask")
        if isinstance(padding, Tensor) and padding.dim() == 2 and padding.dtype == torch.bool:
            meta.valid = ~padding
    pixels = inputs.get("pixels")
    if isinstance(pixels, Tensor) and pixels.dim() == 4:
        meta.batch = pixels.shape[0]
        if spec.patch_size is not None:
            meta.grid = (pixels.shape[-2] // spec.patch_size[0], pixels.shape[-1] // spec.patch_size[1])
            meta.grids = torch.tensor([meta.grid], dtype=torch.long).expand(meta.batch, 2)
    grids = inputs.get("grids")
    if isinstance(grids, Tensor) and grids.dim() == 2 and grids.shape[-1] == 2:
        # variable resolution (NaFlex): each sample's own (rows, cols); the tokens beyond rows * cols are padding
        meta.batch = grids.shape[0]
        meta.grids = grids.detach().to("cpu", torch.long)
        uniform = bool((meta.grids == meta.grids[:1]).all())
        meta.grid = tuple(int(v) for v in meta.grids[0]) if uniform else None  # type: ignore[assignment]
    patch_valid = inputs.get("patch_valid")
    if isinstance(patch_valid, Tensor) and patch_valid.dim() == 2:
        prefix = torch.ones(patch_valid.shape[0], spec.num_prefix_tokens, dtype=torch.bool, device=patch_valid.device)
        meta.valid = torch.cat([prefix, patch_valid.bool()], dim=1)
        meta.batch = patch_valid.shape[0]
    ids = inputs.get("ids")
    if isinstance(ids, Tensor) and ids.dim() == 2:
        meta.batch = ids.shape[0]
        meta.input_ids = ids
        if spec.eos_index is not None:
            with torch.no_grad():
                eos = spec.eos_index(ids).long()
                pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
                if spec.valid_through_eos:
                    valid = pos <= eos.unsqueeze(1)
                else:  # pooled at the first/last position: every non-padding token, and the summary
                    valid = torch.ones_like(ids, dtype=torch.bool)
                    if spec.pad_id is not None:
                        valid = (ids != spec.pad_id) | (pos == eos.unsqueeze(1))
                mask = inputs.get("attention_mask")
                if isinstance(mask, Tensor) and mask.shape == ids.shape:
                    valid = valid & mask.bool()
            meta.eos_index, meta.valid = eos, valid
    return meta


#: layers root of a host tower -> its hub (weak: the registry never keeps a host alive)
_HUBS: weakref.WeakKeyDictionary[nn.Module, _TowerHub] = weakref.WeakKeyDictionary()


def _hub_for(spec: TowerSpec, found: list[nn.Module]) -> _TowerHub:
    hub = _HUBS.get(spec.layers_root)
    if hub is None or not hub.consumers:
        hub = _HUBS[spec.layers_root] = _TowerHub(spec, found)
    return hub


class AttentionCapture:
    """Attention maps of chosen layers and the final tokens of one tower, refreshed by every forward of the host.

    Build it with :func:`capture_attention`. After each forward of the host (or of the chosen tower, e.g.
    ``encode_image``/``get_text_features``):

    Attributes:
        maps: dict ``layer -> map``: ``[B,N,N]`` fused, ``[B,H,N,N]`` with ``head_fusion=None``, ``[B,R,N]`` /
            ``[B,H,R,N]`` with ``query_rows``; fp32. Only the chosen layers; emptied when the next forward starts.
        tokens: final token features ``[B,N,D]`` (projected tokens for CLIP towers: ``ln_post``/``ln_final`` then the
            projection on every token; the last hidden state after the final norm for ViT, DINOv2, SigLIP, timm),
            or None when the host's layout is unknown or the forward stopped before the tower's end (a partial
            forward such as timm ``forward_intermediates(..., stop_early=True)``). Not detached: gradients reach the
            host through them.
        probe: with ``probe=True``, the attention of the host's pooling probe (MAP head) over the tokens, ``[B,N]``
            (heads and latent queries averaged), else None.
        eos_index: text towers: LongTensor ``[B]`` of the per-sample summary position (EOS for causal CLIP towers,
            0 for BERT-style ``[CLS]`` towers, the last position for SigLIP), else None.
        valid: bool ``[B,N]``, True at real tokens: text towers up to and including EOS (causal towers) or at every
            non-padding token; variable-resolution image towers (NaFlex) at the prefix tokens and the real patches;
            else None (every token is real).
        input_ids: text towers: the token ids of the last forward.
        grid: ``(h, w)`` patch grid of the last image forward, when every sample has the same one; ``grids``:
            LongTensor ``[B,2]``, each sample's own grid (NaFlex inputs differ per sample).
        layers: the chosen layer indices (0-based, forward order); ``num_layers``: the host depth.
        num_prefix_tokens, num_suffix_tokens, cls_index, sos_index: token layout (CLS and register tokens before
            the patches, YOLOS detection tokens after them).
        tower: ``"vision"`` or ``"text"``; ``family``: ``"hf"``, ``"open_clip"``, ``"timm"`` or ``"generic"``.

    The results of the latest forward stay readable after :meth:`remove` (figures drawn after a ``with`` block);
    :meth:`clear` drops them. One forward at a time: a forward that another thread starts while one runs makes the
    running one raise a RuntimeError (give each thread its own copy of the host; a copy carries no hooks).

    Several captures (and attached banks) may share one tower: the union of their layers is hooked once and each gets
    its own maps.

    Examples:
        >>> from torch import nn
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), num_layers=3)
        >>> with AttentionCapture(enc, "all", head_fusion=None) as cap:  # removes its hooks on exit
        ...     _ = enc(torch.randn(2, 5, 16))  # [B,N,D]
        >>> sorted(cap.maps), cap.maps[0].shape  # per head: [B,H,N,N]; still readable after the block
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
        probe: bool = False,
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
        self._layer_set = frozenset(self.layers)
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
        if probe and spec.probe is None:
            raise ValueError(
                f"probe=True but {type(model).__name__} ({spec.tower} tower) has no attention-pooling probe (MAP head)"
            )

        self.head_fusion = head_fusion
        self.detach = bool(detach)
        self.probe_wanted = bool(probe)
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
        self._start_callbacks: list[Callable[[AttentionCapture], None]] = []
        self._st: _ForwardState | None = None  # the latest forward's results (None before the first)
        self._hub = _hub_for(spec, found)
        self._hub.adapters.update(adapters)
        self._hub.add(self)
        logger.debug("capturing layers %s of %s (%s)", self.layer_names, type(model).__name__, spec.family)

    # ----------------------------------------------------------------------------------------------- state
    @property
    def probe(self) -> Any:
        """The probe's attention ``[B,N]`` of the latest forward (with ``probe=True``), else None."""
        return self._current_or_last().probe if self.probe_wanted else None

    def _current(self) -> _ForwardState | None:
        return self._st

    def _current_or_last(self) -> _ForwardState:
        return self._st if self._st is not None else _EMPTY

    def _begin(self, meta: _Metadata) -> _ForwardState:
        st = _ForwardState()
        st.batch, st.grid, st.grids = meta.batch, meta.grid, meta.grids
        st.input_ids, st.eos_index, st.valid = meta.input_ids, meta.eos_index, meta.valid
        self._st = st
        for fn in self._start_callbacks:
            fn(self)
        return st

    def _state_for_layer(self) -> _ForwardState | None:
        """This thread's state for a layer's map, or None when the latest forward has ended (an attention module
        called on its own afterwards). Blocks run without the tower's start (called directly) open a forward."""
        st = self._current()
        if st is None:
            st = self._begin(_Metadata())
        return None if st.finished else st

    def _run_callbacks(self) -> None:
        for fn in self._callbacks:
            fn(self)

    maps = property(lambda self: self._current_or_last().maps, doc="``layer -> map`` of the latest forward.")
    tokens = property(lambda self: self._current_or_last().tokens, doc="Final tokens ``[B,N,D]`` or None.")
    eos_index = property(lambda self: self._current_or_last().eos_index, doc="Text summary rows ``[B]`` or None.")
    valid = property(lambda self: self._current_or_last().valid, doc="bool ``[B,N]`` real tokens, or None.")
    input_ids = property(lambda self: self._current_or_last().input_ids, doc="Text token ids or None.")
    grid = property(lambda self: self._current_or_last().grid, doc="``(h, w)`` patch grid, or None.")
    grids = property(lambda self: self._current_or_last().grids, doc="``[B,2]`` per-sample grids, or None.")

    @property
    def finished(self) -> bool:
        """Whether the latest forward reached the tower's end (False after a partial forward)."""
        return self._current_or_last().finished

    def clear(self) -> None:
        """Drop the stored maps, tokens and per-forward metadata."""
        self._st = None

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return self in self._hub.consumers

    @property
    def summary_index(self) -> int | Tensor | None:
        """The summary row: ``cls_index`` for images (None without CLS), ``eos_index`` ``[B]`` for text."""
        return self.eos_index if self.modality == "text" else self.cls_index

    def add_callback(self, fn: Callable[[AttentionCapture], None]) -> None:
        """Call ``fn(capture)`` at the end of every forward of the tower, once its maps and tokens are stored."""
        self._callbacks.append(fn)

    def add_start_callback(self, fn: Callable[[AttentionCapture], None]) -> None:
        """Call ``fn(capture)`` when a forward of the tower starts (before any map is computed)."""
        self._start_callbacks.append(fn)

    def remove(self) -> None:
        """Remove this capture's hooks (the hooks other consumers of the tower need stay); with the last consumer
        gone the host is left exactly as it was. The latest forward's results stay readable. Idempotent."""
        self._hub.discard(self)
        self._callbacks = []
        self._start_callbacks = []

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

    def __getstate__(self) -> dict:
        raise TypeError(
            "an AttentionCapture holds hooks on a live host and cannot be pickled; save the host (its copy carries no "
            "capture) and capture again after loading"
        )

    def __deepcopy__(self, memo: dict) -> AttentionCapture:
        raise TypeError(
            "an AttentionCapture holds hooks on a live host and cannot be copied; copy the host (the copy carries no "
            "capture) and capture from the copy"
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

    def _query_rows(self, st: _ForwardState, n: int, device: torch.device) -> Tensor | None:
        spec = self.query_rows
        if spec is None:
            return None
        if st.rows is None:
            if callable(spec):
                rows = spec(self)
            elif spec == "cls":
                rows = [self.cls_index]
            elif spec == "eos":
                if st.eos_index is None:
                    raise RuntimeError("query_rows='eos' but no token ids were seen in this forward")
                rows = st.eos_index.view(-1, 1)
            else:
                rows = spec
            rows = torch.as_tensor(rows, dtype=torch.long, device=device)
            st.rows = torch.where(rows < 0, rows + n, rows)
        return st.rows


def capture_attention(
    model: nn.Module,
    layers: Any,
    *,
    head_fusion: str | None = "mean",
    query_rows: QueryRows = None,
    detach: bool = True,
    tower: str | None = None,
    probe: bool = False,
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
        probe: also capture the attention of the host's pooling probe (the MAP head of SigLIP, SigLIP 2, AIMv2,
            timm ``global_pool="map"``) over the tokens, as ``capture.probe`` ``[B,N]``.

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
    return AttentionCapture(
        model, layers, head_fusion=head_fusion, query_rows=query_rows, detach=detach, tower=tower, probe=probe
    )
