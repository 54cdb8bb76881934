"""Attention capture from unmodified host models (HF transformers, open_clip, timm).

One adapter per attention-module type, chosen by type through the dispatch table :data:`ADAPTERS`
(``nn.MultiheadAttention``, timm ``Attention``, open_clip ``Attention``, transformers ``q_proj``/``k_proj`` and the
4.x ``query``/``key`` layout). Host libraries are never imported here: types are recognised by name.

Examples:
    >>> import attnselect as asel
    >>> cap = asel.hooks.capture_attention(model, ("middle", "late"))  # doctest: +SKIP
    >>> _ = model(images)                                              # doctest: +SKIP
    >>> cap.maps, cap.tokens                                           # doctest: +SKIP
    >>> cap.remove()                                                   # doctest: +SKIP
"""

from __future__ import annotations

from ._base import QK, AttentionAdapter, TowerSpec
from .attach import AttachHandle, attach_bank, detach_bank
from .capture import ADAPTERS, AttentionCapture, adapter_for, capture_attention, find_attention_layers, resolve_tower

__all__ = [
    "ADAPTERS",
    "QK",
    "AttachHandle",
    "AttentionAdapter",
    "AttentionCapture",
    "TowerSpec",
    "adapter_for",
    "attach_bank",
    "capture_attention",
    "detach_bank",
    "find_attention_layers",
    "resolve_tower",
]
