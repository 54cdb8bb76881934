"""Triton kernels behind one gate.

The gate decides per call, from the tensor it is given:

- ``ATTNSELECT_KERNELS=0`` (or ``false``/``off``/``no``) in the environment forces the pure-PyTorch reference;
- a CUDA tensor takes the Triton path when ``triton`` imports;
- a CPU tensor takes it only when ``TRITON_INTERPRET=1`` (Triton's interpreter; how the tests run the kernels);
- anything else (other devices, fp64 scores or maps, inputs that need autograd through rollout or capture, more
  tokens than a kernel takes: 8192 for top-k, 2**15 for the rollout) takes the reference.

The entry points :func:`rollout`, :func:`select_topk_gather` and :func:`attention_probs` have the signatures and
results of their :mod:`attnselect.functional` twins. The Triton launchers are registered as PyTorch custom ops
(``torch.ops.attnselect.rollout``, ``.topk_gather``, ``.attention_probs``) with fake (meta) implementations, and the
gather with an autograd formula, so ``torch.compile(fullgraph=True)`` traces modules that call them; eager calls skip
the custom-op dispatch and call the launchers directly.

Input errors that depend on the data (NaN scores, samples without a valid token, negative or non-finite maps, query
rows out of range) are found by the kernels. On CPU they raise in the call. On CUDA nothing waits for them: each call
copies an error summary asynchronously into pinned host memory, a later op call raises the first error already
written, and :func:`check_errors` waits for the device and raises what is left. Traced graphs and CUDA graph capture
skip these checks.

Importing this package never imports Triton and never touches CUDA: the kernel modules are imported by the custom
ops' implementations on first call.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import functional as F

__all__ = [
    "attention_probs",
    "check_errors",
    "explain",
    "kernels_enabled",
    "rollout",
    "select_topk_gather",
    "triton_available",
]

logger = logging.getLogger(__name__)

_ENV_SWITCH = "ATTNSELECT_KERNELS"
_FALSE = ("0", "false", "off", "no")
_TRUE = ("1", "true", "on", "yes", "y")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ROLLOUT_MAX_N = 2**15  # kernels/rollout.py MAX_TOKENS: longer maps take the reference
_TOPK_MAX_N = 8192  # kernels/topk_gather.py MAX_TOKENS
_triton_state: dict[str, object] = {}


def _switched_off() -> bool:
    return os.environ.get(_ENV_SWITCH, "1").strip().lower() in _FALSE


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def _triton_import() -> tuple[bool, str]:
    """Import Triton once (only when a decision needs it) and remember the outcome."""
    if "ok" not in _triton_state:
        if importlib.util.find_spec("triton") is None:
            _triton_state.update(ok=False, why="the `triton` package is not installed")
        else:
            try:
                triton = importlib.import_module("triton")
                _triton_state.update(ok=True, why=f"triton {getattr(triton, '__version__', '?')} imports")
            except Exception as err:  # a broken install must not break the reference path
                _triton_state.update(ok=False, why=f"`import triton` failed: {err!r}")
    return bool(_triton_state["ok"]), str(_triton_state["why"])


def triton_available() -> bool:
    """Whether ``import triton`` succeeds (imports Triton on first call).

    Returns:
        True when the ``triton`` package imports; the outcome is remembered for the process.

    Examples:
        >>> isinstance(triton_available(), bool)
        True
    """
    return _triton_import()[0]


def _decide(tensor: Tensor) -> tuple[bool, str]:
    if _switched_off():
        return False, f"{_ENV_SWITCH}={os.environ.get(_ENV_SWITCH)} forces the PyTorch reference"
    device = tensor.device.type
    if device == "cuda":
        ok, why = _triton_import()
        return ok, f"CUDA tensor and {why}" if ok else f"CUDA tensor but {why}: using the PyTorch reference"
    if device == "cpu":
        if not _interpreting():
            return False, "CPU tensor without TRITON_INTERPRET=1: using the PyTorch reference"
        ok, why = _triton_import()
        if ok:
            return True, f"CPU tensor with TRITON_INTERPRET=1 and {why}: the Triton interpreter runs the kernels"
        return False, f"CPU tensor with TRITON_INTERPRET=1 but {why}: using the PyTorch reference"
    return False, f"{device} tensors have no Triton kernels here: using the PyTorch reference"


_decisions: dict[tuple[str, str | None, str | None], bool] = {}


def _enabled_for(device_type: str) -> bool:
    """The gate for a device type; a constant for torch.compile (the decision is made when tracing).

    Remembered per device type and values of the two environment switches, so a call costs two dictionary lookups.
    """
    key = (device_type, os.environ.get(_ENV_SWITCH), os.environ.get("TRITON_INTERPRET"))
    ok = _decisions.get(key)
    if ok is None:
        ok = _decisions[key] = _decide(_Probe(device_type))[0]  # type: ignore[arg-type]
    return ok


class _Probe:
    """Stand-in carrying only a device type, so the gate can be asked without allocating on that device."""

    def __init__(self, device_type: str) -> None:
        self.device = torch.device(device_type)


def kernels_enabled(tensor: Tensor) -> bool:
    """Whether ops on ``tensor`` would take the Triton path.

    Args:
        tensor: any tensor; only its device is looked at.

    Returns:
        True for CUDA tensors when Triton imports, for CPU tensors only with ``TRITON_INTERPRET=1``, and never when
        ``ATTNSELECT_KERNELS=0``.

    Examples:
        >>> kernels_enabled(torch.empty(2, 3, device="meta"))  # no Triton path for this device
        False
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    return _decide(tensor)[0]


def explain(tensor: Tensor | None = None) -> str:
    """Say in words which path ops take and why.

    Args:
        tensor: the tensor to decide for; None describes CPU and (if present) CUDA tensors.

    Returns:
        A one-line (tensor given) or multi-line explanation.

    Examples:
        >>> explain(torch.empty(1, device="meta"))
        'PyTorch reference: meta tensors have no Triton kernels here: using the PyTorch reference'
        >>> print(explain())  # doctest: +ELLIPSIS
        cpu tensors: ...
    """
    if tensor is not None:
        ok, why = _decide(tensor)
        return f"{'Triton kernels' if ok else 'PyTorch reference'}: {why}"
    lines = []
    for dev in ("cpu", "cuda"):
        ok, why = _decide(_Probe(dev))  # type: ignore[arg-type]
        lines.append(f"{dev} tensors: {'Triton kernels' if ok else 'PyTorch reference'}: {why}")
    if not torch.cuda.is_available():  # asks the driver for a device count; creates no CUDA context
        lines.append("(no CUDA device is visible to this process)")
    return "\n".join(lines)


def _grad_needed(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Package(types.ModuleType):
    """This package's module type: importing the submodule ``kernels/rollout.py`` must not replace the entry point
    :func:`rollout` (Python binds a loaded submodule as an attribute of its package). The kernel module stays
    reachable as ``sys.modules["attnselect.kernels.rollout"]`` and through ``from attnselect.kernels.rollout import``.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name == "rollout" and isinstance(value, types.ModuleType) and "rollout" in self.__dict__:
            return
        super().__setattr__(name, value)


# --------------------------------------------------------------------------------------------------------------------
# errors found on the device, reported without a synchronisation
# --------------------------------------------------------------------------------------------------------------------
_RING = 1024  # pinned int32 slots per device, each the error summary of one op call


class _ErrorQueue:
    """The error summaries of one device's op calls, in issue order, read back without a synchronisation.

    Each call copies its int32 summary (0: the input was fine) into the next slot of a pinned host ring, preset to -1
    so that a slot still at -1 has not been written yet. Slots are checked oldest first and the check stops at the
    first one not yet written (copies on one stream land in issue order; on several streams a later error only waits
    for the earlier calls). At most half the ring is in flight: beyond that the host waits for the device.
    """

    def __init__(self, ring: Tensor, device: int | None) -> None:
        self.ring = ring
        self.view = ring.numpy()
        self.slots = ring.split(1)  # one view per slot, made once: no slicing per call
        self.device = device
        self.next = 0
        self.pending: collections.deque[tuple[int, Tensor, Callable[[int, Tensor], str | None]]] = collections.deque()

    def push(self, summary: Tensor, detail: Tensor, describe: Callable[[int, Tensor], str | None]) -> None:
        msg = None
        if 2 * len(self.pending) >= len(self.slots):  # far behind: wait rather than reuse slots still in flight
            msg = self.pop_ready(wait=True)
        slot = self.next
        self.next = (slot + 1) % len(self.slots)
        self.view[slot] = -1
        self.slots[slot].copy_(summary, non_blocking=True)
        self.pending.append((slot, detail, describe))
        if msg:
            raise ValueError(msg)

    def pop_ready(self, wait: bool) -> str | None:
        """Drop the written summaries up to the first error and return its message (None when none is written)."""
        if wait and self.pending and self.device is not None:
            torch.cuda.synchronize(self.device)
        while self.pending:
            slot, detail, describe = self.pending[0]
            value = int(self.view[slot])
            if value < 0:
                return None
            self.pending.popleft()
            if value:
                msg = describe(value, detail)
                if msg:
                    return msg
        return None


_queues: dict[int, _ErrorQueue] = {}


def _report(summary: Tensor, detail: Tensor, describe: Callable[[int, Tensor], str | None]) -> None:
    """Raise ``describe(summary, detail)`` now (CPU), or queue it until the device has written it (CUDA).

    ``summary`` is an int32 ``[1]`` tensor, 0 when the input was fine. On CUDA it is copied asynchronously into the
    device's :class:`_ErrorQueue`; nothing waits for it here.
    """
    if summary.device.type != "cuda":
        msg = describe(int(summary[0]), detail)
        if msg:
            raise ValueError(msg)
        return
    if torch.cuda.is_current_stream_capturing():  # a CUDA graph replays no host-side check
        return
    dev = summary.device.index if summary.device.index is not None else torch.cuda.current_device()
    queue = _queues.get(dev)
    if queue is None:
        queue = _queues[dev] = _ErrorQueue(torch.full((_RING,), -1, dtype=torch.int32, pin_memory=True), dev)
    queue.push(summary, detail, describe)


def _raise_ready(wait: bool) -> None:
    """Raise the oldest error the devices have written (with ``wait``: after waiting for them)."""
    for queue in _queues.values():
        msg = queue.pop_ready(wait)
        if msg:
            raise ValueError(msg)


def check_errors() -> None:
    """Wait for the CUDA ops issued so far and raise the first input error they found.

    On CPU every op raises its ``ValueError`` in the call. On CUDA the data-dependent checks (NaN scores, samples
    without a valid token, negative or non-finite attention maps, query rows out of range) run inside the kernels and
    are read back without stopping the host: an error surfaces in the first op call made after the device has
    written it, or here. Calling this after a step makes the errors of that step certain to surface.

    Raises:
        ValueError: an earlier op call on CUDA received bad input.

    Examples:
        >>> check_errors()  # nothing pending: returns at once
    """
    for queue in _queues.values():
        while queue.pending:
            msg = queue.pop_ready(wait=True)
            if msg:
                raise ValueError(msg)


def _rollout_message(code: int, detail: Tensor) -> str | None:
    if code & 1:
        return "attention maps must be finite and non-negative (softmax probabilities)"
    if code & 2:
        return "query rows must lie in [0, N): got a row outside the map"
    return None


def _topk_message(code: int, errors: Tensor) -> str | None:
    if not code:
        return None
    errors = errors[:-1].cpu()
    nan_rows = (errors & 1).nonzero().flatten().tolist()
    if nan_rows:
        return f"scores contains NaN (sample(s) {nan_rows[:8]})"
    rows = (errors & 2).nonzero().flatten().tolist()
    return f"valid has no True entry in sample(s) {rows[:8]}: every sample needs at least one valid token"


def _capture_message(code: int, detail: Tensor) -> str | None:
    return "query_rows must lie in [0, Nq): got a row outside the queries" if code else None


# --------------------------------------------------------------------------------------------------------------------
# custom ops: the Triton launchers as PyTorch operators (opaque to torch.compile, with fake implementations). Eager
# calls skip the custom-op dispatch and call the launchers directly; a traced graph holds these ops, and the
# data-dependent checks are skipped there (a compiled graph or a CUDA graph cannot raise from device data).
# --------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("attnselect::rollout", mutates_args=())
def _rollout_op(maps: list[Tensor], ratios: list[float], head_fusion: str, protect: str, rows: Tensor | None) -> Tensor:
    from .rollout import rollout_forward

    return rollout_forward(maps, ratios, head_fusion, protect, rows)[0]


@_rollout_op.register_fake
def _(maps: list[Tensor], ratios: list[float], head_fusion: str, protect: str, rows: Tensor | None) -> Tensor:
    b, n = maps[0].shape[0], maps[0].shape[-1]
    shape = (b, n, n) if rows is None else (b, n)
    return maps[0].new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("attnselect::topk_gather", mutates_args=())
def _topk_gather_op(scores: Tensor, k: int, tokens: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    from .topk_gather import topk_gather_forward

    return topk_gather_forward(scores, k, tokens, valid)[:3]


@_topk_gather_op.register_fake
def _(scores: Tensor, k: int, tokens: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    b = scores.shape[0]
    return (
        scores.new_empty((b, k), dtype=torch.int64),
        scores.new_empty((b, k), dtype=torch.bool),
        tokens.new_empty((b, k, tokens.shape[-1])),
    )


@torch.library.custom_op("attnselect::gather_backward", mutates_args=())
def _gather_backward_op(grad_out: Tensor, indices: Tensor, mask: Tensor, num_tokens: int) -> Tensor:
    from .topk_gather import gather_backward

    return gather_backward(grad_out, indices, mask, num_tokens)


@_gather_backward_op.register_fake
def _(grad_out: Tensor, indices: Tensor, mask: Tensor, num_tokens: int) -> Tensor:
    return grad_out.new_empty((grad_out.shape[0], num_tokens, grad_out.shape[-1]))


def _topk_gather_setup(ctx, inputs, output) -> None:
    _, _, tokens, _ = inputs
    ctx.save_for_backward(output[0], output[1])
    ctx.num_tokens = tokens.shape[1]


def _topk_gather_backward(ctx, grad_indices, grad_mask, grad_out):
    indices, mask = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    return None, None, torch.ops.attnselect.gather_backward(grad_out, indices, mask, ctx.num_tokens), None


_topk_gather_op.register_autograd(_topk_gather_backward, setup_context=_topk_gather_setup)


class _TopkGatherFn(torch.autograd.Function):
    """Eager autograd wrapper of the launchers (no custom-op dispatch on the hot path).

    The error codes leave through ``box`` rather than as an output, and gradients are not materialised for the
    integer outputs: the backward is one allocation and one launch.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, k: int, tokens: Tensor, valid: Tensor | None, box: list):  # type: ignore[override]
        from .topk_gather import topk_gather_forward

        indices, mask, out, errors = topk_gather_forward(scores, k, tokens, valid, checked=True)
        box.append(errors)
        ctx.save_for_backward(indices, mask)
        ctx.num_tokens = tokens.shape[1]
        ctx.mark_non_differentiable(indices, mask)
        ctx.set_materialize_grads(False)
        return indices, mask, out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the launch is opaque to autograd: refuse double backward
    def backward(ctx, grad_indices, grad_mask, grad_out):  # type: ignore[override]
        from .topk_gather import gather_backward

        if grad_out is None:
            return None, None, None, None, None
        indices, mask = ctx.saved_tensors
        return None, None, gather_backward(grad_out, indices, mask, ctx.num_tokens), None, None


@torch.library.custom_op("attnselect::attention_probs", mutates_args=())
def _attention_probs_op(
    q: Tensor,
    k: Tensor,
    scale: float,
    bias: Tensor | None,
    causal: bool,
    head_fusion: str,
    query_rows: Tensor | None,
) -> Tensor:
    from .capture import attention_probs_forward

    return attention_probs_forward(
        q, k, scale, bias, causal, None if head_fusion == "none" else head_fusion, query_rows
    )[0]


@_attention_probs_op.register_fake
def _(
    q: Tensor,
    k: Tensor,
    scale: float,
    bias: Tensor | None,
    causal: bool,
    head_fusion: str,
    query_rows: Tensor | None,
) -> Tensor:
    b, h, nq, _ = q.shape
    r = nq if query_rows is None else query_rows.shape[-1]
    shape = (b, h, r, k.shape[2]) if head_fusion == "none" else (b, r, k.shape[2])
    return q.new_empty(shape, dtype=torch.float32)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------------------------------
# dispatching entry points (same signatures and results as attnselect.functional)
# --------------------------------------------------------------------------------------------------------------------
def rollout(
    attentions: Sequence[Tensor],
    *,
    discard_ratio: float | Sequence[float] = 0.25,
    head_fusion: str = "mean",
    protect: str = "entry0",
    query: int | Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Multi-layer attention rollout, Triton when the gate allows, else :func:`attnselect.functional.rollout`.

    Args and returns: exactly those of :func:`attnselect.functional.rollout` (maps ``[B,H,N,N]`` or ``[B,N,N]`` per
    layer; result ``[B,N,N]``, or ``[B,N]`` with ``query``; fp32). The Triton path is taken for fp32/fp16/bf16 maps
    of at most 2**15 tokens that need no autograd, with row-index queries and without a padding mask (``valid``);
    query weights and padded inputs take the reference.

    Examples:
        >>> from attnselect import functional
        >>> maps = [torch.softmax(torch.randn(2, 4, 17, 17), -1) for _ in range(3)]  # L = 3 layers of [B,H,N,N]
        >>> out = rollout(maps, query=0)
        >>> out.shape
        torch.Size([2, 17])
        >>> torch.allclose(out, functional.rollout(maps, query=0), atol=1e-5)
        True
    """
    maps = F._check_layer_list(attentions)
    use = (
        _enabled_for(maps[0].device.type)
        and all(a.dtype in _KERNEL_DTYPES for a in maps)
        and maps[0].shape[-1] <= _ROLLOUT_MAX_N
        and not _grad_needed(*maps)
        and valid is None
        and not (isinstance(query, Tensor) and query.is_floating_point() and query.dim() == 2)
    )
    if not use:
        return F.rollout(
            maps, discard_ratio=discard_ratio, head_fusion=head_fusion, protect=protect, query=query, valid=valid
        )
    ratios = F._per_layer_ratios(discard_ratio, len(maps))
    F._check_choice(head_fusion, F.FUSION_MODES, "head_fusion")
    F._check_choice(protect, F.PROTECT_MODES, "protect")
    batch, n = maps[0].shape[0], maps[0].shape[-1]
    rows = None if query is None else F._check_query(query, batch, n, maps[0].device, range_on_device=True)
    if _tracing():
        return torch.ops.attnselect.rollout(list(maps), ratios, head_fusion, protect, rows)
    from .rollout import rollout_forward

    if _queues:
        _raise_ready(wait=False)
    result, flags = rollout_forward(maps, ratios, head_fusion, protect, rows, checked=True)
    _report(flags, flags, _rollout_message)
    return result


def select_topk_gather(
    scores: Tensor, k: int, tokens: Tensor, *, valid: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k selection and gather in one step.

    Same results as ``indices, mask = functional.select_topk(scores, k, valid=valid)`` followed by
    ``functional.gather_tokens(tokens, indices)``; differentiable with respect to ``tokens``.

    Args:
        scores: ``[B,N]`` floating scores (no NaN).
        k: tokens to keep, in ``[1, N]``.
        tokens: ``[B,N,D]`` token features.
        valid: optional bool ``[B,N]``; invalid tokens are never chosen.

    Returns:
        ``(indices [B,k] int64, mask [B,k] bool, gathered [B,k,D])``.

    Examples:
        >>> tokens = torch.arange(8.0).view(1, 4, 2)  # [B=1, N=4, D=2]
        >>> indices, mask, kept = select_topk_gather(torch.tensor([[0.1, 0.9, 0.5, 0.2]]), 2, tokens)
        >>> indices, kept
        (tensor([[1, 2]]), tensor([[[2., 3.],
                 [4., 5.]]]))
    """
    F._check_tensor(scores, "scores")
    F._check_float(scores, "scores")
    F._check_tensor(tokens, "tokens")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [B,N], got {tuple(scores.shape)}")
    if tokens.dim() != 3 or tokens.shape[:2] != scores.shape:
        raise ValueError(
            f"tokens must have shape [B,N,D] = {[*scores.shape, 'D']} like scores, got {tuple(tokens.shape)}"
        )
    k = F.check_k(k, scores.shape[1])
    use = (
        _enabled_for(scores.device.type)
        and scores.dtype in _KERNEL_DTYPES
        and tokens.is_floating_point()
        and tokens.device == scores.device
        and scores.shape[1] <= _TOPK_MAX_N
    )
    if not use:
        indices, mask = F.select_topk(scores, k, valid=valid)
        return indices, mask, F.gather_tokens(tokens, indices)
    if valid is not None:
        F._check_tensor(valid, "valid")
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor [B,N] (True = may be selected), got dtype {valid.dtype}")
        if valid.shape != scores.shape:
            raise ValueError(f"valid must have shape {tuple(scores.shape)} like scores, got {tuple(valid.shape)}")
        if valid.device != scores.device:
            raise ValueError(f"valid is on {valid.device} but scores are on {scores.device}")
    if _tracing():
        return torch.ops.attnselect.topk_gather(scores, k, tokens, valid)
    if _queues:
        _raise_ready(wait=False)
    if tokens.requires_grad and torch.is_grad_enabled():
        box: list[Tensor] = []
        indices, mask, out = _TopkGatherFn.apply(scores, k, tokens, valid, box)
        errors = box[0]
    else:
        from .topk_gather import topk_gather_forward

        indices, mask, out, errors = topk_gather_forward(scores, k, tokens, valid, checked=True)
    _report(errors[-1:], errors, _topk_message)
    return indices, mask, out


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
    """Softmax attention probabilities, fused over heads, Triton when the gate allows.

    Args and returns: exactly those of :func:`attnselect.functional.attention_probs` (``q [B,H,Nq,d]``,
    ``k [B,H,Nk,d]`` -> ``[B,Nq,Nk]`` fused or ``[B,H,Nq,Nk]``; fp32). The Triton path never materialises the
    per-head ``[B,H,N,N]`` logits; it is taken for fp32/fp16/bf16 ``q``/``k`` with head dim <= 256 that need no
    autograd.

    Examples:
        >>> q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)  # [B,H,N,d]
        >>> probs = attention_probs(q, k, scale=8**-0.5)
        >>> probs.shape
        torch.Size([2, 6, 6])
        >>> torch.allclose(probs.sum(-1), torch.ones(2, 6))
        True
    """
    use = (
        isinstance(q, Tensor)
        and isinstance(k, Tensor)
        and _enabled_for(q.device.type)
        and q.dtype in _KERNEL_DTYPES
        and k.dtype == q.dtype
        and q.dim() == 4
        and k.dim() == 4
        and q.shape[-1] <= 256
        and (bias is None or (isinstance(bias, Tensor) and bias.is_floating_point()))
        and (query_rows is None or isinstance(query_rows, Tensor))
        and not _grad_needed(q, k, bias)
    )
    if not use:
        return F.attention_probs(
            q, k, scale=scale, bias=bias, causal=causal, head_fusion=head_fusion, query_rows=query_rows
        )
    if head_fusion is not None:
        F._check_choice(head_fusion, F.FUSION_MODES, "head_fusion")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and d")
    fusion = "none" if head_fusion is None else head_fusion
    if _tracing():
        return torch.ops.attnselect.attention_probs(q, k, float(scale), bias, bool(causal), fusion, query_rows)
    from .capture import attention_probs_forward

    if _queues:
        _raise_ready(wait=False)
    out, flags = attention_probs_forward(q, k, float(scale), bias, bool(causal), head_fusion, query_rows)
    if flags is not None:
        _report(flags, flags, _capture_message)
    return out


sys.modules[__name__].__class__ = _Package
