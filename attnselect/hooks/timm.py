"""timm adapters and towers: ``VisionTransformer``, ``Eva`` (EVA02, Perception Encoder ``vit_pe_*``, ``vit_*_dinov3``,
``vit_*_rope_*``) and ``NaFlexVit``.

``timm.layers.Attention`` computes ``qkv(x)`` reshaped to ``[B,N,3,H,d]``, applies ``q_norm``/``k_norm`` and calls SDPA
(``scale = head_dim ** -0.5``) unless ``fused_attn`` is off. The rotary attentions, ``timm.models.eva.EvaAttention``
and ``timm.layers.AttentionRope``, take the rotary embedding as the ``rope=`` keyword (computed once per forward by the
model, per block for mixed RoPE) and rotate q and k after the ``num_prefix_tokens`` leading tokens with timm's own
``apply_rot_embed_cat`` (interleaved, or rotate-half with ``rotate_half``); the adapter calls that same helper from
the module's own file on the ``rope`` it receives. ``AttentionRope`` may have fewer key/value heads (grouped queries):
the keys are repeated as the module does. Masks follow SDPA semantics (bool True = attend, or additive float, e.g.
NaFlex's ``finfo.min`` padding mask) and ``is_causal`` takes precedence. The pooling probe of ``global_pool="map"`` is
``AttentionPoolLatent``: its latent queries attend to the tokens through ``kv``. Token layout: ``[CLS, reg_1..reg_R,
patches(, padding)]`` with ``model.num_prefix_tokens`` leading tokens; NaFlex inputs put each sample's real patches
first, in row-major order of its own grid, then padding. ToMe-patched attention is rejected with a TypeError.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import QK, AttentionAdapter, TowerSpec, arg, bool_mask_to_bias, class_in_mro, pair

__all__ = [
    "AttentionPoolLatentAdapter",
    "TimmAttentionAdapter",
    "TimmRopeAttentionAdapter",
    "is_timm_vit",
    "resolve_timm",
    "timm_spec",
]


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


def _sdpa_mask(mask: Any, causal: bool) -> Tensor | None:
    if mask is None or causal:
        return None
    return bool_mask_to_bias(mask, true_means="attend") if mask.dtype == torch.bool else mask


def _rope_helper(module: nn.Module):
    """The module file's own ``apply_rot_embed_cat`` (timm's rotary helper), as the host calls it."""
    helper = getattr(sys.modules.get(type(module).__module__), "apply_rot_embed_cat", None)
    if helper is None:
        from timm.layers import apply_rot_embed_cat as helper
    return helper


def _rotate(module: nn.Module, t: Tensor, rope: Tensor) -> Tensor:
    npt = int(getattr(module, "num_prefix_tokens", 0) or 0)
    half = bool(getattr(module, "rotate_half", False))
    rotated = _rope_helper(module)(t[:, :, npt:, :], rope, half=half)
    return torch.cat([t[:, :, :npt, :], rotated], dim=2).type_as(t) if npt else rotated.type_as(t)


class TimmRopeAttentionAdapter(AttentionAdapter):
    """timm's rotary attentions: ``timm.models.eva.EvaAttention`` (EVA02, ``vit_*_dinov3``, ``vit_*_rope_reg*``) and
    ``timm.layers.AttentionRope`` (``vit_pe_*``, ``vit_*_rope_*`` axial and mixed, NaFlexVit with RoPE).

    q and k come from the fused ``qkv`` (the EVA layout: ``q_bias``, a zero ``k_bias`` buffer and ``v_bias``) or
    from ``q_proj``/``k_proj``; then ``q_norm``/``k_norm``, then the module file's ``apply_rot_embed_cat`` on the
    tokens after the prefix with the ``rope`` the block passed, and the keys repeated for grouped key/value heads.
    """

    name = "timm rotary attention (EvaAttention, AttentionRope)"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return class_in_mro(module, "timm.models.eva", "EvaAttention") or class_in_mro(
            module, "timm.layers.", "AttentionRope"
        )

    @classmethod
    def qk(cls, module: nn.Module, args: tuple, kwargs: dict) -> QK:
        x = arg(args, kwargs, "x", 0)
        rope = arg(args, kwargs, "rope", 1)
        mask = arg(args, kwargs, "attn_mask", 2)
        causal = bool(arg(args, kwargs, "is_causal", 3, False))
        batch, n, _ = x.shape
        heads = module.num_heads
        kv_heads = int(getattr(module, "num_kv_heads", heads) or heads)
        qkv = getattr(module, "qkv", None)
        if qkv is not None:
            weight = qkv.weight
            if getattr(module, "q_bias", None) is not None:  # EvaAttention: separate q/k/v biases, k's a zero buffer
                bias = torch.cat((module.q_bias, module.k_bias))
            else:
                bias = qkv.bias
            q_dim = getattr(module, "attn_dim", None) or weight.shape[0] // 3
            width = q_dim + q_dim * kv_heads // heads
            proj = F.linear(x, weight[:width], None if bias is None else bias[:width])
            q = proj[..., :q_dim].reshape(batch, n, heads, -1).transpose(1, 2)
            k = proj[..., q_dim:].reshape(batch, n, kv_heads, -1).transpose(1, 2)
        else:
            q = module.q_proj(x).reshape(batch, n, heads, -1).transpose(1, 2)
            k = module.k_proj(x).reshape(batch, n, kv_heads, -1).transpose(1, 2)
        q, k = module.q_norm(q), module.k_norm(k)
        if rope is not None:
            q, k = _rotate(module, q, rope), _rotate(module, k, rope)
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
        return QK(q=q, k=k, scale=float(module.scale), bias=_sdpa_mask(mask, causal), causal=causal)


class AttentionPoolLatentAdapter(AttentionAdapter):
    """The pooling probe of timm ``global_pool="map"``, ``timm.layers.AttentionPoolLatent``: ``latent_len`` latent
    queries (through ``q``) attend to the tokens (keys: the first half of ``kv``, after the optional ``pos_embed``)."""

    name = "timm.layers.AttentionPoolLatent"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return class_in_mro(module, "timm.layers.", "AttentionPoolLatent")

    @classmethod
    def qk(cls, module: nn.Module, args: tuple, kwargs: dict) -> QK:
        x = arg(args, kwargs, "x", 0)
        mask = arg(args, kwargs, "attn_mask", 1)
        batch, n, _ = x.shape
        heads, head_dim, latents = module.num_heads, module.head_dim, module.latent_len
        if getattr(module, "pos_embed", None) is not None:
            x = x + module.pos_embed.unsqueeze(0).to(x.dtype)
        q = module.q(module.latent.expand(batch, -1, -1)).reshape(batch, latents, heads, head_dim).transpose(1, 2)
        width = heads * head_dim
        kv = module.kv
        k = F.linear(x, kv.weight[:width], None if kv.bias is None else kv.bias[:width])
        k = k.reshape(batch, n, heads, head_dim).transpose(1, 2)
        q, k = module.q_norm(q), module.k_norm(k)
        return QK(q=q, k=k, scale=float(module.scale), bias=_sdpa_mask(mask, False))


def is_timm_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ViT-like model (``patch_embed`` or NaFlex ``embeds``, ``blocks``, ``norm``,
    ``num_prefix_tokens``)."""
    return (
        type(model).__module__.startswith("timm.")
        and (hasattr(model, "patch_embed") or hasattr(model, "embeds"))
        and all(hasattr(model, a) for a in ("blocks", "norm", "num_prefix_tokens"))
    )


def _patch_size(model: nn.Module) -> Any:
    embed = getattr(model, "patch_embed", None) or getattr(getattr(model, "embeds", None), "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        size = getattr(getattr(model, "embeds", None), "patch_size", None)
    return size


def timm_spec(
    model: nn.Module,
    *,
    family: str = "timm",
    start: nn.Module | None = None,
    read_inputs: Any = None,
    project: Any = None,
) -> TowerSpec:
    """The tower description of a timm ViT-like model (also used for open_clip towers built on one)."""
    naflex = hasattr(model, "embeds") and not hasattr(model, "patch_embed")

    if naflex:

        def read_naflex(args: tuple, kwargs: dict) -> dict:
            x = arg(args, kwargs, "x", 0)
            coord = arg(args, kwargs, "patch_coord", 1)
            valid = arg(args, kwargs, "patch_valid", 2)
            out: dict[str, Any] = {"pixels": x}
            if isinstance(coord, Tensor) and coord.dim() == 3:
                # each sample's grid: the largest (row, column) of its patches, plus one
                out["grids"] = coord.amax(dim=1) + 1
            if isinstance(valid, Tensor) and valid.dim() == 2:
                out["patch_valid"] = valid
            return out

        start, read_inputs = model.embeds, read_naflex
    elif read_inputs is None:

        def read_pixels(args: tuple, kwargs: dict) -> dict:
            return {"pixels": arg(args, kwargs, "x", 0)}

        read_inputs = read_pixels

    def read_tokens(capture: Any, output: Any) -> Tensor | None:
        if not isinstance(output, Tensor) or output.dim() != 3:
            return None
        return output if project is None else project(output)

    embeds = getattr(model, "embeds", None)  # NaFlexVit keeps its class token in its embedder
    has_cls = getattr(model, "cls_token", None) is not None or getattr(embeds, "cls_token", None) is not None
    patch = _patch_size(model)
    probe = getattr(model, "attn_pool", None)
    return TowerSpec(
        family=family,
        tower="vision",
        layers_root=model.blocks,
        start=start if start is not None else model.patch_embed,
        end=model.norm,
        read_inputs=read_inputs,
        read_tokens=read_tokens,
        num_prefix_tokens=int(model.num_prefix_tokens),
        cls_index=0 if has_cls else None,
        patch_size=pair(patch) if patch is not None else None,
        probe=probe if isinstance(probe, nn.Module) and AttentionPoolLatentAdapter.matches(probe) else None,
        probe_adapter=AttentionPoolLatentAdapter,
    )


def resolve_timm(model: nn.Module, tower: str | None) -> TowerSpec | None:
    """Tower description for a timm ViT, or None when ``model`` is not one."""
    if not is_timm_vit(model):
        return None
    if tower not in (None, "vision"):
        raise ValueError(f"tower={tower!r} was asked for, but {type(model).__name__} is a vision model")
    return timm_spec(model)
