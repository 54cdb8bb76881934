"""Drop-in attach: run an :class:`attnselect.AttentiveBank` on every forward of an unmodified host tower.

``bank.attach(model)`` captures the bank rollout's layers and, when the tower's forward ends (``model(x)``,
open_clip ``encode_image``/``encode_text``, HF ``get_image_features``/``get_text_features``: the trigger is a hook on
the tower itself, so every entry point works), stores ``bank(tokens, maps, ...)`` in ``bank.last``. Query: the class
token for images that have one, the per-sample summary position for text (EOS for causal CLIP towers, the first token
for BERT-style towers), the pooling probe (``"probe"``) or the mean over real tokens (``"mean"``) for towers without
a class token; excluded: the prefix tokens (CLS, registers, distillation) and detection (YOLOS) tokens of an image
tower, the query and start tokens of text; valid: not padding.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .capture import AttentionCapture, resolve_tower

__all__ = ["AttachHandle", "attach_bank", "detach_bank"]

logger = logging.getLogger(__name__)

# bank -> the handles it placed (weak on the bank: a bank that is garbage collected takes nothing with it; a copy of
# a bank is attached nowhere)
_HANDLES: weakref.WeakKeyDictionary[nn.Module, list[AttachHandle]] = weakref.WeakKeyDictionary()


def _pad_probe(probe: Tensor, n: int) -> Tensor:
    """The probe's attention over all ``n`` tokens: a pool that skips the prefix tokens (timm ViT and NaFlexVit
    ``global_pool="map"``) attends to the last ``probe.shape[1]`` tokens, so the prefix gets 0."""
    missing = n - probe.shape[1]
    if missing == 0:
        return probe
    if missing < 0:
        raise RuntimeError(f"the pooling probe attends to {probe.shape[1]} tokens but the tower has {n}")
    return torch.cat([probe.new_zeros(probe.shape[0], missing), probe], dim=1)


class AttachHandle:
    """The hooks one bank placed on one host tower.

    Attributes:
        bank: the attached bank; ``bank.last`` holds the :class:`attnselect.BankOutput` of the latest forward (in the
            calling thread), or None while a forward runs and after a forward that stopped before the tower's end.
        capture: the :class:`attnselect.hooks.AttentionCapture` feeding it (maps, tokens, layout metadata).
        tower: ``"vision"`` or ``"text"``.
        query: the summary the rollout reads: an int or LongTensor row, a callable, ``"cls"``, ``"eos"``,
            ``"probe"`` or ``"mean"`` (the host family's default when ``attach`` got none).

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
        self.query = query if query is not None else capture._spec.default_query
        self._num_layers = capture.num_layers if not layers_given or self._rollout_in(capture) else None
        self._warned = False
        capture.add_start_callback(self._on_start)
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

    def _query_for(self, capture: AttentionCapture) -> int | str | Tensor:
        query = self.query
        if callable(query):
            query = query(capture)
        if query == "cls":
            return capture.cls_index
        if query == "eos":
            if capture.eos_index is None:
                raise RuntimeError("the text tower ran without token ids: cannot find the EOS query row")
            return capture.eos_index
        return query

    def _on_start(self, capture: AttentionCapture) -> None:
        self.bank.last = None  # never the previous batch's selection, whatever happens to this forward

    def _on_forward(self, capture: AttentionCapture) -> None:
        if capture.tokens is None:
            raise RuntimeError(
                f"{capture.family} {capture.tower} tower: no final tokens were found for the bank to select from"
            )
        query = self._query_for(capture)
        batch, n_tok, _ = capture.tokens.shape
        device = capture.tokens.device
        row_query = not isinstance(query, str) and not (
            isinstance(query, Tensor) and query.is_floating_point() and query.dim() == 2
        )
        exclude = None
        extra: dict[str, Any] = {}
        if capture.modality == "text":
            rows = torch.as_tensor(query, dtype=torch.long, device=device).reshape(-1, 1).expand(batch, 1)
            if capture.sos_index is not None:
                rows = torch.cat([torch.full_like(rows, capture.sos_index), rows], dim=1)
            exclude = rows
        else:
            # prefix tokens (CLS, registers, distillation) and tokens after the patch grid (YOLOS detection tokens)
            # are never kept; nor is the query row when it is the class token. A position index on a tower without
            # one is a real patch: it stays selectable, and the first forward says so.
            fixed = list(range(capture.num_prefix_tokens)) + list(range(n_tok - capture.num_suffix_tokens, n_tok))
            positions = torch.tensor(fixed, dtype=torch.long, device=device).expand(batch, -1)
            if row_query and capture.cls_index is not None:
                rows = torch.as_tensor(query, dtype=torch.long, device=device).reshape(-1, 1).expand(batch, 1)
                positions = torch.cat([positions, rows], dim=1)
            elif row_query and not self._warned:
                self._warned = True
                logger.warning(
                    "%s has no class token: query=%s reads the rollout at a patch, which stays selectable (pass "
                    "exclude= to the bank yourself, or query='mean' / 'probe')",
                    capture.family,
                    query if not isinstance(query, Tensor) else "a tensor",
                )
            exclude = positions
            if capture.valid is not None:
                extra["padding"] = capture.valid
            if isinstance(query, str) and query == "probe":
                if capture.probe is None:
                    raise RuntimeError("query='probe' but the pooling probe did not run in this forward")
                extra["probe"] = _pad_probe(capture.probe, n_tok)
        tokens, maps = capture.tokens, capture.maps
        survivors = self._pruned_survivors(capture)
        if survivors is not None:  # the host is pruned: select among the tokens that reached the end
            tokens, maps = survivors.restrict(tokens, maps)
            if "padding" in extra:
                extra["padding"] = survivors.restrict_rows(extra["padding"])
        out = self.bank(
            tokens,
            maps,
            query=query,
            valid=capture.valid if capture.modality == "text" else None,
            exclude=exclude,
            num_layers=self._num_layers,
            **extra,
        )
        if survivors is not None:
            out = survivors.to_original(out)
        self.bank.last = out

    def _pruned_survivors(self, capture: AttentionCapture) -> _Survivors | None:
        from ..pruning import active_pruner

        pruner = active_pruner(capture._spec.layers_root)
        if pruner is None or pruner.fwd is not pruner.last or not pruner.last.stages:
            return None  # not pruned, or no cut in this forward
        return _Survivors(pruner, capture)

    def remove(self) -> None:
        """Remove the hooks (other consumers of the tower keep theirs); the host is left exactly as it was once
        the last one goes. Idempotent."""
        self.capture.remove()
        handles = _HANDLES.get(self.bank)
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
        layers = self.capture.layers
        return f"AttachHandle({name}, tower={self.tower!r}, layers={layers}, query={self.query!r}, {state})"


class _Survivors:
    """The tokens of a pruned host (:func:`attnselect.prune`) that reached the tower's end, as positions in the host's
    input sequence: the bank selects among them, from maps restricted to them, and reports original positions."""

    def __init__(self, pruner: Any, capture: AttentionCapture) -> None:
        self.pruner = pruner
        final = pruner.last.positions  # [B, n_f], -1 for fused tokens
        self.real = final >= 0
        counts = self.real.sum(dim=1)
        if bool((counts != counts[0]).any()):  # pragma: no cover - every sample keeps the same count
            raise RuntimeError("pruned samples kept different numbers of tokens")
        self.positions = final[self.real].view(final.shape[0], -1)  # [B, n_r] ascending
        self.final = final
        self.n_original = pruner.last.n_original

    def _index_in(self, set_positions: Tensor | None, device: torch.device) -> Tensor:
        """Where each survivor sits in a token set given by its original positions (None: the full sequence)."""
        if set_positions is None:
            return self.positions
        batch, n = set_positions.shape
        size = int(self.positions.max()) + 1 if self.positions.numel() else 1
        size = max(size, int(set_positions.max()) + 1)
        lookup = torch.full((batch, size), -1, dtype=torch.long, device=device)
        real = set_positions >= 0
        rows = torch.arange(batch, device=device).unsqueeze(1).expand(batch, n)
        slots = torch.arange(n, device=device).unsqueeze(0).expand(batch, n)
        lookup[rows[real], set_positions[real]] = slots[real]
        return lookup.gather(1, self.positions)

    def restrict_rows(self, x: Tensor) -> Tensor:
        index = self._index_in(self.final, x.device)
        return x.gather(1, index)

    def restrict(self, tokens: Tensor, maps: dict) -> tuple[Tensor, dict]:
        index = self._index_in(self.final, tokens.device)
        kept = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        restricted = {}
        for layer, m in maps.items():
            where = self._index_in(self.pruner.positions_at(layer), m.device)
            rows = where.view(where.shape[0], *([1] * (m.dim() - 3)), -1, 1).expand(*m.shape[:-2], -1, m.shape[-1])
            m = m.gather(-2, rows)
            cols = where.view(where.shape[0], *([1] * (m.dim() - 2)), -1).expand(*m.shape[:-1], -1)
            restricted[layer] = m.gather(-1, cols)
        return kept, restricted

    def to_original(self, out: Any) -> Any:
        """Indices into the host's input sequence; saliency over it (0 at pruned tokens)."""
        import dataclasses

        indices = self.positions.gather(1, out.indices)
        saliency = out.saliency
        if self.n_original is not None:
            full = saliency.new_zeros(saliency.shape[0], max(self.n_original, int(self.positions.max()) + 1))
            saliency = full.scatter(1, self.positions, saliency)
        return dataclasses.replace(out, indices=indices, saliency=saliency)


def attach_bank(
    bank: nn.Module,
    model: nn.Module,
    *,
    layers: Any = None,
    query: int | str | Tensor | Callable[[AttentionCapture], Any] | None = None,
    tower: str | None = None,
) -> AttachHandle:
    """Attach ``bank`` to a host tower so that after each forward ``bank.last`` holds that forward's BankOutput.

    Several banks (with their own layers, rollouts and ratios) and user captures may share one tower: the union of
    their layers is captured once per forward and each gets its own maps.

    Args:
        bank: an :class:`attnselect.AttentiveBank` (or any module with the same ``forward`` signature).
        model: the host (HF transformers, open_clip, timm; see :func:`attnselect.hooks.capture_attention`).
        layers: layers to capture; None takes ``bank.rollout.layers`` (resolved against the host depth).
        query: the summary the rollout reads. None takes the host family's default: the class token where there is
            one, the per-sample summary position for text (EOS for causal CLIP towers, the first token for BERT-style
            towers), ``"probe"`` for towers pooled by an attention probe without a class token (SigLIP, SigLIP 2,
            AIMv2, timm ``global_pool="map"``), else ``"mean"``. Also an int, a LongTensor ``[B]``, ``"cls"``,
            ``"eos"``, ``"mean"``, ``"probe"`` or a callable ``capture -> one of those``.
        tower: ``"vision"`` (default) or ``"text"`` for dual encoders.

    Returns:
        An :class:`AttachHandle` (``remove()``, context manager).

    Raises:
        RuntimeError: ``bank`` is already attached to this tower of ``model``.
        ValueError: no layers to capture, or ``query="probe"`` on a tower without a pooling probe.
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
    for handle in _HANDLES.get(bank, ()):
        if handle.active and handle._model_ref() is model and handle.tower == spec.tower:
            raise RuntimeError(
                f"this bank is already attached to {type(model).__name__} ({spec.tower} tower); remove that handle "
                "first, or attach another bank"
            )
    layers_given = layers is not None
    if layers is None:
        layers = getattr(getattr(bank, "rollout", None), "layers", None)
        if layers is None:
            raise ValueError("layers=None needs a bank whose rollout has `.layers`; pass layers= explicitly")
    mode = query if query is not None else spec.default_query
    if isinstance(mode, str) and mode not in ("cls", "eos", "probe", "mean"):
        raise ValueError(
            f"query must be an int, a LongTensor, 'cls', 'eos', 'mean', 'probe' or a callable, got {mode!r}"
        )
    if mode == "cls" and spec.cls_index is None:
        raise ValueError(f"query='cls' but {type(model).__name__} has no class token (try 'mean' or 'probe')")
    if mode == "eos" and spec.modality != "text":
        raise ValueError("query='eos' is for text towers")
    if mode == "probe" and spec.probe is None:
        raise ValueError(
            f"query='probe' but {type(model).__name__} ({spec.tower} tower) has no attention-pooling probe "
            "(SigLIP, SigLIP 2, AIMv2 and timm global_pool='map' towers have one); use 'mean'"
        )
    fusion = getattr(getattr(bank, "rollout", None), "head_fusion", None)
    capture = AttentionCapture(
        model,
        layers,
        head_fusion=fusion if fusion in ("mean", "max", "min") else None,
        tower=tower,
        probe=mode == "probe",
    )
    handle = AttachHandle(bank, model, capture, query, layers_given)
    _HANDLES.setdefault(bank, []).append(handle)
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
    for handle in list(_HANDLES.get(bank, ())):
        handle.remove()
