"""open_clip adapters and towers.

Default open_clip blocks use ``torch.nn.MultiheadAttention`` (see
:class:`attnselect.hooks._base.MultiheadAttentionAdapter`; the text tower passes its ``[L,L]`` causal ``-inf`` mask
as ``attn_mask``). Blocks built with ``qk_norm``, scaled cosine attention and the like use
``open_clip.transformer.Attention``, handled here: ``F.linear(x, in_proj_weight, in_proj_bias)`` split in three,
``ln_q``/``ln_k`` or cosine logits times ``exp(clamp(logit_scale))``, and a mask where bool True = blocked.

Towers: ``CLIP`` / ``CustomTextCLIP`` (``tower="vision"|"text"``), or a ``VisionTransformer`` / ``TextTransformer``
passed directly. Final tokens are what ITSELF uses: ``ln_post`` then ``proj`` on all image tokens, ``ln_final``
then ``text_projection`` on all text positions. Vision towers built on a timm model (``TimmModel``: EVA02, PE-Core)
are captured through their timm trunk (:func:`attnselect.hooks.timm.timm_spec`), their tokens projected by the
trunk's head. Text towers built on a transformers model (``HFTextEncoder``) are refused: capture the wrapped model.

open_clip builds some towers from the Hugging Face hub (``hf_model_name``: ``AutoConfig.from_pretrained``) or with
pretrained timm weights; :func:`hub_download_reason` names them, so that nothing is ever downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import QK, AttentionAdapter, TowerSpec, arg, bool_mask_to_bias, class_in_mro, pair, project

__all__ = ["OpenClipAttentionAdapter", "hub_download_reason", "is_open_clip_model", "resolve_open_clip"]


class OpenClipAttentionAdapter(AttentionAdapter):
    """``open_clip.transformer.Attention`` (``CustomResidualAttentionBlock``), with or without qk-norm."""

    name = "open_clip.transformer.Attention"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return class_in_mro(module, "open_clip.", "Attention") and hasattr(module, "in_proj_weight")

    @classmethod
    def qk(cls, module: nn.Module, args: tuple, kwargs: dict) -> QK:
        x = arg(args, kwargs, "x", 0)
        mask = arg(args, kwargs, "attn_mask", 1)
        batch, n, _ = x.shape
        heads = module.num_heads
        q, k, _v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
        q = q.reshape(batch, n, heads, -1).transpose(1, 2)
        k = k.reshape(batch, n, heads, -1).transpose(1, 2)
        bias = None
        if mask is not None:
            if mask.dim() == 3:
                mask = mask.reshape(batch, heads, n, n)
            bias = bool_mask_to_bias(mask, true_means="blocked") if mask.dtype == torch.bool else mask
        if module.logit_scale is not None:
            # scaled cosine attention: cosine logits times a per-head temperature, folded into q
            temp = torch.clamp(module.logit_scale, max=module.logit_scale_max).exp()  # [H,1,1]
            q = F.normalize(q, dim=-1) * temp.to(q.dtype)
            k = F.normalize(k, dim=-1)
            return QK(q=q, k=k, scale=1.0, bias=bias)
        q, k = module.ln_q(q), module.ln_k(k)
        return QK(q=q, k=k, scale=float(module.scale), bias=bias)


def is_open_clip_model(model: nn.Module) -> bool:
    """Whether ``model`` is an open_clip module (CLIP, CustomTextCLIP, VisionTransformer, TextTransformer)."""
    return type(model).__module__.startswith("open_clip.")


def _vision_spec(visual: nn.Module) -> TowerSpec:
    def read_inputs(args: tuple, kwargs: dict) -> dict:
        return {"pixels": arg(args, kwargs, "x", 0)}

    def stash_hidden(capture: Any, output: Any) -> None:
        capture._scratch["hidden"] = output

    def read_tokens(capture: Any, output: Any) -> Tensor | None:
        hidden = capture._scratch.get("hidden")
        if hidden is None or getattr(visual, "attn_pool", None) is not None:
            return None
        batch = capture._batch
        if hidden.dim() == 3 and batch is not None and hidden.shape[0] != batch and hidden.shape[1] == batch:
            hidden = hidden.transpose(0, 1)  # older open_clip returns LND from the transformer
        return project(visual.ln_post(hidden), visual.proj)

    return TowerSpec(
        family="open_clip",
        tower="vision",
        layers_root=visual.transformer,
        start=visual,
        end=visual,
        read_inputs=read_inputs,
        read_tokens=read_tokens,
        num_prefix_tokens=1,
        cls_index=0,
        patch_size=pair(visual.patch_size),
        aux_hooks=((visual.transformer, stash_hidden),),
    )


def _text_eos(pool_type: str, eos_id: int | None):
    if pool_type == "eos" and eos_id is not None:
        return lambda ids: (ids == eos_id).int().argmax(dim=-1)
    if pool_type == "last":
        return lambda ids: torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    if pool_type == "first":
        return lambda ids: torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    return lambda ids: ids.argmax(dim=-1)  # "argmax": the EOT id is the largest in CLIP's vocabulary


def _text_spec(owner: nn.Module, *, pool_type: str, eos_id: int | None) -> TowerSpec:
    if getattr(owner, "cls_emb", None) is not None:
        raise TypeError(
            "open_clip text towers with an appended class token (CoCa) are not supported: ln_final is applied to "
            "the pooled token only"
        )
    proj = owner.text_projection

    def read_inputs(args: tuple, kwargs: dict) -> dict:
        return {"ids": arg(args, kwargs, "input", 0)}

    def read_tokens(capture: Any, output: Any) -> Tensor | None:
        if not isinstance(output, Tensor) or output.dim() != 3:
            return None
        return project(output, proj)  # output = ln_final of every position

    return TowerSpec(
        family="open_clip",
        tower="text",
        layers_root=owner.transformer,
        start=owner.token_embedding,
        end=owner.ln_final,
        read_inputs=read_inputs,
        read_tokens=read_tokens,
        eos_index=_text_eos(pool_type, eos_id),
        sos_index=0,
        valid_through_eos=pool_type not in ("first", "last"),
        pad_id=getattr(owner, "pad_id", None),
    )


def hub_download_reason(cfg: dict | None) -> str | None:
    """Why building an open_clip model from ``cfg`` (its model config dict) would download, or None."""
    if not cfg:
        return None
    for tower in ("text_cfg", "vision_cfg"):
        sub = cfg.get(tower) or {}
        if sub.get("hf_model_name"):
            return (
                f"its {tower[:-4]} tower is the Hugging Face model {sub['hf_model_name']!r}, which open_clip builds "
                "with transformers' AutoConfig.from_pretrained (a download from the model hub)"
            )
        if sub.get("timm_model_pretrained"):
            return f"its {tower[:-4]} tower loads pretrained timm weights ({sub.get('timm_model_name')!r}) from the hub"
    return None


def _timm_vision_spec(visual: nn.Module) -> TowerSpec:
    from .timm import timm_spec

    trunk = visual.trunk
    head = trunk.head if isinstance(getattr(trunk, "head", None), nn.Module) else None
    extra = getattr(visual, "head", None)

    def projected(tokens: Tensor) -> Tensor:  # what the tower applies to its pooled token, on every token
        if head is not None:
            tokens = head(tokens)
        return extra(tokens) if isinstance(extra, nn.Module) else tokens

    def read_inputs(args: tuple, kwargs: dict) -> dict:
        return {"pixels": arg(args, kwargs, "x", 0)}

    return timm_spec(trunk, family="open_clip", start=visual, read_inputs=read_inputs, project=projected)


def _vision(visual: nn.Module) -> TowerSpec:
    return _timm_vision_spec(visual) if hasattr(visual, "trunk") else _vision_spec(visual)


def resolve_open_clip(model: nn.Module, tower: str | None) -> TowerSpec | None:
    """Tower description for an open_clip model, or None when ``model`` is not one."""
    if not is_open_clip_model(model):
        return None
    has_visual = hasattr(model, "visual")
    has_text = hasattr(model, "token_embedding") or hasattr(model, "text")
    if has_visual and has_text:
        tower = tower or "vision"
        if tower not in ("vision", "text"):
            raise ValueError(f"tower must be 'vision' or 'text', got {tower!r}")
        if tower == "vision":
            return _vision(model.visual)
        if hasattr(model, "text"):  # CustomTextCLIP
            text = model.text
            if not hasattr(text, "token_embedding"):
                raise TypeError(
                    f"{type(model).__name__}: the text tower is {type(text).__name__}, a wrapped transformers model "
                    f"({type(getattr(text, 'transformer', text)).__name__}); capture it on that model "
                    "(capture_attention(model.text.transformer, ...)): its pooling and projection are open_clip's"
                )
            return _text_spec(text, pool_type=text.pool_type, eos_id=getattr(text, "eos_id", None))
        return _text_spec(model, pool_type=model.text_pool_type, eos_id=getattr(model, "text_eos_id", None))
    if hasattr(model, "trunk") and not has_text:  # TimmModel
        if tower not in (None, "vision"):
            raise ValueError(f"tower={tower!r} was asked for, but {type(model).__name__} is a vision tower")
        return _timm_vision_spec(model)
    if hasattr(model, "conv1") and hasattr(model, "ln_post"):  # VisionTransformer
        if tower not in (None, "vision"):
            raise ValueError(f"tower={tower!r} was asked for, but {type(model).__name__} is a vision tower")
        return _vision_spec(model)
    if hasattr(model, "token_embedding") and hasattr(model, "ln_final"):  # TextTransformer
        if tower not in (None, "text"):
            raise ValueError(f"tower={tower!r} was asked for, but {type(model).__name__} is a text tower")
        return _text_spec(model, pool_type=model.pool_type, eos_id=getattr(model, "eos_id", None))
    return None
