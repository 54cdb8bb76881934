"""timm adapter and tower: ``timm.layers.Attention`` in ``VisionTransformer`` and its relatives.

The module computes ``qkv(x)`` reshaped to ``[B,N,3,H,d]``, applies ``q_norm``/``k_norm`` and calls SDPA (``scale =
head_dim ** -0.5``) unless ``fused_attn`` is off; ``attn_mask`` follows SDPA semantics (bool True = attend, or
additive float) and ``is_causal`` takes precedence over it. Token layout: ``[CLS, reg_1..reg_R, patches]`` with
``model.num_prefix_tokens`` leading tokens. ``AttentionRope`` (EVA-style rotary attention) and ToMe-patched
attention are rejected with a TypeError.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import QK, AttentionAdapter, TowerSpec, arg, bool_mask_to_bias, class_in_mro, pair

__all__ = ["TimmAttentionAdapter", "is_timm_vit", "resolve_timm"]


class TimmAttentionAdapter(AttentionAdapter):
    """``timm.layers.Attention`` (fused or not, with qk-norm, register tokens, scale-norm and gating)."""

    name = "timm.layers.Attention"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        # timm.layers only: several timm.models define their own, different class named `Attention`
        return class_in_mro(module, "timm.layers.", "Attention") and isinstance(getattr(module, "qkv", None), nn.Module)

    @classmethod
    def qk(cls, module: nn.Module, args: tuple, kwargs: dict) -> QK:
        x = arg(args, kwargs, "x", 0)
        mask = arg(args, kwargs, "attn_mask", 1)
        causal = bool(arg(args, kwargs, "is_causal", 2, False))
        batch, n, _ = x.shape
        heads, head_dim = module.num_heads, module.head_dim
        qkv = module.qkv
        if type(qkv) is nn.Linear:  # skip the value projection
            width = 2 * heads * head_dim
            bias = qkv.bias[:width] if qkv.bias is not None else None
            qk = F.linear(x, qkv.weight[:width], bias).reshape(batch, n, 2, heads, head_dim)
        else:  # a wrapped projection (LoRA and the like): call it as the host does
            qk = qkv(x).reshape(batch, n, 3, heads, head_dim)[:, :, :2]
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = module.q_norm(q), module.k_norm(k)
        bias = None
        if mask is not None and not causal:
            bias = bool_mask_to_bias(mask, true_means="attend") if mask.dtype == torch.bool else mask
        return QK(q=q, k=k, scale=float(module.scale), bias=bias, causal=causal)


def is_timm_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ViT-like model (``patch_embed``, ``blocks``, ``norm``, ``num_prefix_tokens``)."""
    return type(model).__module__.startswith("timm.") and all(
        hasattr(model, a) for a in ("patch_embed", "blocks", "norm", "num_prefix_tokens")
    )


def resolve_timm(model: nn.Module, tower: str | None) -> TowerSpec | None:
    """Tower description for a timm ViT, or None when ``model`` is not one."""
    if not is_timm_vit(model):
        return None
    if tower not in (None, "vision"):
        raise ValueError(f"tower={tower!r} was asked for, but {type(model).__name__} is a vision model")

    def read_inputs(args: tuple, kwargs: dict) -> dict:
        return {"pixels": arg(args, kwargs, "x", 0)}

    def read_tokens(capture: Any, output: Any) -> Tensor | None:
        return output if isinstance(output, Tensor) and output.dim() == 3 else None

    has_cls = getattr(model, "cls_token", None) is not None
    patch = getattr(model.patch_embed, "patch_size", None)
    return TowerSpec(
        family="timm",
        tower="vision",
        layers_root=model.blocks,
        start=model.patch_embed,
        end=model.norm,
        read_inputs=read_inputs,
        read_tokens=read_tokens,
        num_prefix_tokens=int(model.num_prefix_tokens),
        cls_index=0 if has_cls else None,
        patch_size=pair(patch) if patch is not None else None,
    )
