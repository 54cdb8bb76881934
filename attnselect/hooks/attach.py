"""Drop-in attach: run an :class:`attnselect.AttentiveBank` on every forward of an unmodified host tower.

``bank.attach(model)`` captures the bank rollout's layers and, when the tower's forward ends (``model(x)``,
open_clip ``encode_image``/``encode_text``, HF ``get_image_features``/``get_text_features``: the trigger is a hook on
the tower itself, so every entry point works), stores ``bank(tokens, maps, ...)`` in ``bank.last``. Query row: CLS
for images, the per-sample summary position for text (EOS for causal CLIP towers, the first token for BERT-style
towers); excluded: the query token, the register and detection (YOLOS) tokens of an image tower, and the start token
for text; valid: not padding.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .capture import AttentionCapture, resolve_tower

__all__ = ["AttachHandle", "attach_bank", "detach_bank"]

# host model -> {tower: weak reference to its AttachHandle}. Weak on both sides: the registry never keeps a host
# or a handle alive; the bank owns its handles.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, dict[str, weakref.ref]] = weakref.WeakKeyDictionary()
_BANK_ATTR = "_attached_handles"


class AttachHandle:
    """The hooks one bank placed on one host tower.

    Attributes:
        bank: the attached bank; ``bank.last`` holds the :class:`attnselect.BankOutput` of the latest forward.
        capture: the :class:`attnselect.hooks.AttentionCapture` feeding it (maps, tokens, layout metadata).
        tower: ``"vision"`` or ``"text"``.

    Examples:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=0)
        >>> bank = asel.AttentiveBank(ratio=0.5)
        >>> with bank.attach(vit) as handle:  # the hooks go when the block ends
        ...     _ = vit(torch.randn(2, 3, 32, 32))  # 2 x 2 patches + CLS: N = 5
        ...     handle.active, handle.capture.layers, bank.last.indices.shape
        (True, (1, 2), torch.Size([2, 2]))
        >>> handle.active
        False
    """

    def __init__(self, bank: nn.Module, model: nn.Module, capture: AttentionCapture, query: Any, layers_given: bool):
        self.bank = bank
        self.capture = capture
        self.tower = capture.tower
        self._model_ref = weakref.ref(model)
        self._query = query
        self._num_layers = capture.num_layers if not layers_given or self._rollout_in(capture) else None
        capture.add_callback(self._on_forward)

    def _rollout_in(self, capture: AttentionCapture) -> bool:
        """Whether the bank's rollout layers, resolved against the host depth, are all among the captured layers
        (then they are read at those layers; otherwise the captured maps are used as the rollout's layers)."""
        rollout = getattr(self.bank, "rollout", None)
        if rollout is None or not hasattr(rollout, "resolve_layers"):
            return False
        try:
            wanted = rollout.resolve_layers(capture.num_layers)
        except ValueError:  # e.g. an index beyond this host's depth
            return False
        return set(wanted) <= set(capture.layers)

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed."""
        return self.capture.active

    def _query_for(self, capture: AttentionCapture) -> int | Tensor:
        query = self._query
        if callable(query):
            return query(capture)
        if query is not None:
            return query
        if capture.modality == "text":
            if capture.eos_index is None:
                raise RuntimeError("the text tower ran without token ids: cannot find the EOS query row")
            return capture.eos_index
        return capture.cls_index

    def _on_forward(self, capture: AttentionCapture) -> None:
        if capture.tokens is None:
            raise RuntimeError(
                f"{capture.family} {capture.tower} tower: no final tokens were found for the bank to select from"
            )
        query = self._query_for(capture)
        exclude = None
        if capture.modality == "text":
            batch = capture.tokens.shape[0]
            device = capture.tokens.device
            rows = torch.as_tensor(query, dtype=torch.long, device=device).reshape(-1, 1).expand(batch, 1)
            if capture.sos_index is not None:
                rows = torch.cat([torch.full_like(rows, capture.sos_index), rows], dim=1)
            exclude = rows
        elif (capture.num_prefix_tokens or 0) > (0 if capture.cls_index is None else 1) or (
            capture.num_suffix_tokens or 0
        ) > 0:
            # register tokens (DINOv2-with-registers, timm reg_tokens) and tokens after the patch grid (YOLOS
            # detection tokens) are never kept, like the CLS token
            batch, n_tok, _ = capture.tokens.shape
            device = capture.tokens.device
            prefix = torch.arange(capture.num_prefix_tokens, device=device)
            suffix = torch.arange(n_tok - capture.num_suffix_tokens, n_tok, device=device)
            fixed = torch.cat([prefix, suffix]).expand(batch, -1)
            rows = torch.as_tensor(query, dtype=torch.long, device=device).reshape(-1, 1).expand(batch, 1)
            exclude = torch.cat([fixed, rows], dim=1)
        self.bank.last = self.bank(
            capture.tokens,
            capture.maps,
            query=query,
            valid=capture.valid,
            exclude=exclude,
            num_layers=self._num_layers,
        )

    def remove(self) -> None:
        """Remove the hooks; the host is left exactly as it was. Idempotent."""
        self.capture.remove()
        model = self._model_ref()
        if model is not None and model in _ATTACHED:
            towers = _ATTACHED[model]
            ref = towers.get(self.tower)
            if ref is not None and ref() is self:
                del towers[self.tower]
            if not towers:
                del _ATTACHED[model]
        handles = getattr(self.bank, _BANK_ATTR, None)
        if handles is not None and self in handles:
            handles.remove(self)

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        model = self._model_ref()
        name = type(model).__name__ if model is not None else "<collected>"
        state = "active" if self.active else "removed"
        return f"AttachHandle({name}, tower={self.tower!r}, layers={self.capture.layers}, {state})"


def attach_bank(
    bank: nn.Module,
    model: nn.Module,
    *,
    layers: Any = None,
    query: int | Tensor | Callable[[AttentionCapture], Any] | None = None,
    tower: str | None = None,
) -> AttachHandle:
    """Attach ``bank`` to a host tower so that after each forward ``bank.last`` holds that forward's BankOutput.

    Args:
        bank: an :class:`attnselect.AttentiveBank` (or any module with the same ``forward`` signature).
        model: the host (HF transformers, open_clip, timm; see :func:`attnselect.hooks.capture_attention`).
        layers: layers to capture; None takes ``bank.rollout.layers`` (resolved against the host depth).
        query: the summary row: None for CLS (images) / the per-sample summary position (text), an int, a
            LongTensor ``[B]`` or a callable ``capture -> int | LongTensor``.
        tower: ``"vision"`` (default) or ``"text"`` for dual encoders.

    Returns:
        An :class:`AttachHandle` (``remove()``, context manager).

    Raises:
        RuntimeError: this tower of ``model`` already has a bank attached, or ``bank`` is already attached to
            ``model``.
        ValueError: no layers to capture, or an image tower without class token and no ``query``.
        TypeError: ``model`` is not a known host (its final tokens cannot be located).

    Examples:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=0)
        >>> bank = asel.AttentiveBank(ratio=0.5)
        >>> handle = attach_bank(bank, vit)
        >>> _ = vit(torch.randn(2, 3, 32, 32))  # [B,3,H,W]; N = 5 tokens, 4 selectable
        >>> bank.last.tokens.shape  # [B,k,D]
        torch.Size([2, 2, 32])
        >>> handle.remove()
    """
    spec = resolve_tower(model, tower)
    if spec.family == "generic":
        raise TypeError(
            f"{type(model).__name__} is not a known HF transformers, open_clip or timm host: its final tokens "
            "cannot be located for the bank (use capture_attention and call the bank yourself)"
        )
    towers = _ATTACHED.get(model, {})
    live = {t: r() for t, r in towers.items() if r() is not None and r().active}
    if spec.tower in live:
        raise RuntimeError(
            f"{type(model).__name__} ({spec.tower} tower) already has a bank attached; remove its handle first"
        )
    if any(h.bank is bank for h in live.values()):
        raise RuntimeError(f"this bank is already attached to {type(model).__name__}; use one bank per tower")
    layers_given = layers is not None
    if layers is None:
        layers = getattr(getattr(bank, "rollout", None), "layers", None)
        if layers is None:
            raise ValueError("layers=None needs a bank whose rollout has `.layers`; pass layers= explicitly")
    if query is None and spec.modality == "image" and spec.cls_index is None:
        raise ValueError(
            f"{type(model).__name__} has no class token: pass query= (a token index or a callable) to attach"
        )
    fusion = getattr(getattr(bank, "rollout", None), "head_fusion", None)
    capture = AttentionCapture(
        model, layers, head_fusion=fusion if fusion in ("mean", "max", "min") else None, tower=tower
    )
    handle = AttachHandle(bank, model, capture, query, layers_given)
    live_refs = {t: weakref.ref(h) for t, h in live.items()}
    live_refs[capture.tower] = weakref.ref(handle)
    _ATTACHED[model] = live_refs
    handles = getattr(bank, _BANK_ATTR, None)
    if handles is None:
        handles = []
        object.__setattr__(bank, _BANK_ATTR, handles)
    handles.append(handle)
    if not hasattr(bank, "last"):
        bank.last = None
    return handle


def detach_bank(bank: nn.Module) -> None:
    """Remove every hook ``bank`` placed on host models (no-op when it is attached nowhere).

    Args:
        bank: a bank previously passed to :func:`attach_bank` (or :meth:`attnselect.AttentiveBank.attach`).

    Examples:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=0)
        >>> bank = asel.AttentiveBank(ratio=0.5)
        >>> handle = attach_bank(bank, vit)
        >>> detach_bank(bank)
        >>> handle.active
        False
    """
    for handle in list(getattr(bank, _BANK_ATTR, ()) or ()):
        handle.remove()
