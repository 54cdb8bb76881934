"""HuggingFace transformers adapters: CLIP (vision, causal text, ``CLIPModel`` towers), ViT, SigLIP, DINOv2.

Attention modules with ``q_proj``/``k_proj`` (transformers 5.x: ``CLIPAttention``, ``SiglipAttention``,
``ViTAttention``, ``Dinov2Attention``, ``Dinov2WithRegistersAttention``) and the legacy ``query``/``key`` layout of
transformers 4.x (``ViTSelfAttention`` and relatives). The hook sees ``hidden_states`` (keyword in CLIP/SigLIP
layers, positional in ViT/DINOv2 layers), ``attention_mask`` and the ``is_causal`` keyword that ``CLIPTextModel``
passes: a bool mask means True = attend (sdpa), a float mask is additive (eager), and ``None`` with
``is_causal=True`` means plain causal attention.

Text towers are summarised at the first ``eos_token_id`` (causal CLIP towers), the last position (SigLIP) or the first
token (BERT-style towers with token-type embeddings: BERT, RoBERTa, Chinese-CLIP, AltCLIP). Vision towers may carry
tokens after the patches (YOLOS detection tokens, ``num_suffix_tokens``); hierarchical towers with stages that change
the token set (GroupViT) are rejected.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import Tensor, nn

from ._base import (
    QK,
    ROTARY_HF,
    SUPPORTED_HOSTS,
    AttentionAdapter,
    MultiheadAttentionAdapter,
    TowerSpec,
    arg,
    bool_mask_to_bias,
    class_in_mro,
    last_hidden_state,
    pair,
    windowed_reason,
)

__all__ = [
    "HFAttentionAdapter",
    "HFAttentionPoolingHeadAdapter",
    "HFLegacyAttentionAdapter",
    "is_hf_model",
    "resolve_hf",
]

_ROTARY_KWARGS = ("position_embeddings", "rotary_pos_emb", "rope", "freqs_cis")


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _mask_bias(mask: Any) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"attention_mask of type {type(mask).__name__} (e.g. a flex_attention BlockMask) is not supported; "
            "use attn_implementation='sdpa' or 'eager'"
        )
    if mask.dtype == torch.bool:
        return bool_mask_to_bias(mask, true_means="attend")
    return mask


def _check_no_rotary(module: nn.Module, kwargs: dict) -> None:
    for key in _ROTARY_KWARGS:
        if kwargs.get(key) is not None:
            raise TypeError(
                f"{type(module).__name__} received `{key}`: it applies rotary position embeddings to q and k, "
                "which the q_proj/k_proj adapter does not reproduce; this attention type is not supported"
            )


class HFAttentionAdapter(AttentionAdapter):
    """transformers attention modules with ``q_proj``, ``k_proj`` and ``head_dim`` (the 5.x layout)."""

    name = "transformers q_proj/k_proj attention"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (
            _from_transformers(module)
            and isinstance(getattr(module, "q_proj", None), nn.Module)
            and isinstance(getattr(module, "k_proj", None), nn.Module)
            and hasattr(module, "head_dim")
        )

    @classmethod
    def check(cls, module: nn.Module) -> None:
        if getattr(module, "scale", None) is None and getattr(module, "scaling", None) is None:
            raise TypeError(f"{type(module).__name__} has neither `scale` nor `scaling`; cannot rebuild its logits")
        heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
        kv_heads = getattr(module, "num_key_value_heads", heads)
        if heads is not None and kv_heads != heads:
            raise TypeError(f"{type(module).__name__} uses grouped key/value heads, which is not supported")

    @classmethod
    def qk(cls, module: nn.Module, args: tuple, kwargs: dict) -> QK:
        name = type(module).__name__
        if name not in ROTARY_HF:
            _check_no_rotary(module, kwargs)
        hidden = arg(args, kwargs, "hidden_states", 0)
        mask = arg(args, kwargs, "attention_mask", 1 if name != "MLCDAttention" else 2)
        batch, n = hidden.shape[:2]
        q = module.q_proj(hidden).view(batch, n, -1, module.head_dim)
        k = module.k_proj(hidden).view(batch, n, -1, module.head_dim)
        rope = sys.modules[type(module).__module__]  # the model file's own rotary helper, as the module calls it
        if name == "MLCDAttention":  # 2-D RoPE on every token, class token included, on [B,N,H,d]
            cos, sin = arg(args, kwargs, "position_embeddings", 1)
            q, k = rope.apply_rotary_pos_emb_vision(q, k, cos.unsqueeze(0).float(), sin.unsqueeze(0).float())
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if name == "DINOv3ViTAttention":  # RoPE on the patches only: the helper skips the CLS and register tokens
            cos, sin = arg(args, kwargs, "position_embeddings", 2)
            q, k = rope.apply_rotary_pos_emb(q, k, cos, sin)
        scale = getattr(module, "scale", None)
        if scale is None:
            scale = module.scaling
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        return QK(q=q, k=k, scale=float(scale), bias=_mask_bias(mask), causal=causal)


class HFAttentionPoolingHeadAdapter(AttentionAdapter):
    """AIMv2's attention-pooling head (``Aimv2AttentionPoolingHead``): its ``cls_token`` (per head) is the query, the
    tokens through ``k_proj`` the keys, SDPA's default scale and no mask."""

    name = "transformers Aimv2AttentionPoolingHead"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return _from_transformers(module) and hasattr(module, "cls_token") and hasattr(module, "k_proj")

    @classmethod
    def qk(cls, module: nn.Module, args: tuple, kwargs: dict) -> QK:
        hidden = arg(args, kwargs, "hidden_states", 0)
        batch, n, width = hidden.shape
        heads = module.num_heads
        head_dim = width // heads
        k = module.k_proj(hidden).reshape(batch, n, heads, head_dim).transpose(1, 2)
        q = module.cls_token.expand(batch, -1, -1).reshape(batch, 1, heads, head_dim).transpose(1, 2)
        return QK(q=q, k=k, scale=head_dim**-0.5)


class HFLegacyAttentionAdapter(AttentionAdapter):
    """transformers 4.x self-attention with ``query``/``key`` Linear layers (``ViTSelfAttention`` and relatives).

    The logits are ``q k^T / sqrt(attention_head_size)`` plus the additive ``attention_mask`` when one is passed by
    keyword; the 4.x ``head_mask`` (a post-softmax multiplier) is not applied, so maps are the pre-head-mask
    probabilities.
    """

    name = "transformers query/key self-attention (4.x layout)"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (
            _from_transformers(module)
            and isinstance(getattr(module, "query", None), nn.Linear)
            and isinstance(getattr(module, "key", None), nn.Linear)
            and hasattr(module, "attention_head_size")
            and hasattr(module, "num_attention_heads")
        )

    @classmethod
    def check(cls, module: nn.Module) -> None:
        kind = str(getattr(module, "position_embedding_type", "absolute"))
        if kind.startswith("relative") and getattr(module, "distance_embedding", None) is not None:
            raise TypeError(
                f"{type(module).__name__} uses position_embedding_type={kind!r}: relative position scores are added "
                "inside the module, which this adapter does not reproduce; this attention type is not supported"
            )

    @classmethod
    def qk(cls, module: nn.Module, args: tuple, kwargs: dict) -> QK:
        params = _bind(module, args, kwargs)
        _check_no_rotary(module, params)
        hidden = params["hidden_states"]
        batch, n = hidden.shape[:2]
        heads, head_dim = module.num_attention_heads, module.attention_head_size
        q = module.query(hidden).view(batch, n, heads, head_dim).transpose(1, 2)
        k = module.key(hidden).view(batch, n, heads, head_dim).transpose(1, 2)
        scale = getattr(module, "scaling", None) or head_dim**-0.5
        bias = _mask_bias(params.get("attention_mask"))
        extra = []
        if getattr(module, "has_relative_position_bias", False):
            # BEiT / data2vec-vision: a per-layer relative position bias module, sized from the input resolution
            height, width = params["resolution"]
            ph, pw = pair(module.config.patch_size)
            extra.append(
                module.relative_position_bias(
                    (height // ph, width // pw), bool(params.get("interpolate_pos_encoding", False)), dim_size=n
                )
            )
        shared = params.get("relative_position_bias")
        if isinstance(shared, Tensor):  # the model-wide shared relative position bias
            extra.append(shared)
        for term in extra:
            term = term.float()
            bias = term if bias is None else bias.float() + term
        return QK(q=q, k=k, scale=float(scale), bias=bias)


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward's arguments by name, whether they came by position or by keyword."""
    sig = inspect.signature(module.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        out = dict(kwargs)
        if args:
            out.setdefault("hidden_states", args[0])
        return out
    out = dict(bound.arguments)
    for name in list(out):
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(out.pop(name))
    return out


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel``."""
    return class_in_mro(model, "transformers.", "PreTrainedModel")


def _is_text(sub: nn.Module) -> bool:
    main = getattr(sub, "main_input_name", "")
    if main in ("input_ids", "pixel_values"):  # before input_modalities, which some text towers inherit wrongly
        return main == "input_ids"
    modalities = getattr(sub, "input_modalities", None)
    if modalities is not None and not isinstance(modalities, str):
        modalities = tuple(modalities)
        if modalities == ("text",):
            return True
        if "image" in modalities:
            return False
    return getattr(sub, "main_input_name", "") == "input_ids"


def _embeddings(sub: nn.Module) -> nn.Module | None:
    emb = getattr(sub, "embeddings", None)
    if emb is None:  # OwlViTVisionModel, transformers 4.x CLIPVisionModel: a wrapped `vision_model`
        emb = getattr(getattr(sub, "vision_model", None), "embeddings", None)
    return emb


def _has_cls(sub: nn.Module) -> bool:
    emb = _embeddings(sub)
    return emb is not None and (hasattr(emb, "cls_token") or hasattr(emb, "class_embedding"))


def _extra_prefix(sub: nn.Module) -> int:
    """Prefix tokens after CLS besides registers: DeiT's distillation token."""
    return int(getattr(_embeddings(sub), "distillation_token", None) is not None)


def _suffix(sub: nn.Module) -> int:
    """Tokens appended after the patches: YOLOS detection tokens."""
    det = getattr(_embeddings(sub), "detection_tokens", None)
    return int(det.shape[1]) if isinstance(det, Tensor) and det.dim() == 3 else 0


def _first_token_pooled(sub: nn.Module) -> bool:
    """BERT-style text towers (BERT, RoBERTa, Chinese-CLIP, AltCLIP, FLAVA): ``[CLS] words [SEP] pad``, summarised
    by the first token. Recognised by their token-type embeddings, which CLIP-style towers do not have."""
    return any(isinstance(getattr(m, "token_type_embeddings", None), nn.Module) for m in sub.modules())


def _text_eos(sub: nn.Module, first_token: bool):
    name = type(sub).__name__
    if first_token:
        return lambda ids: torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    if name.startswith("Siglip"):
        return lambda ids: torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    eos_id = getattr(sub, "eos_token_id", None)
    if eos_id is None:
        eos_id = getattr(getattr(sub, "config", None), "eos_token_id", None)
    if eos_id is None or eos_id == 2:
        # transformers keeps the historic `argmax` pooling for configs with eos_token_id == 2
        return lambda ids: ids.argmax(dim=-1)
    return lambda ids: (ids == eos_id).int().argmax(dim=-1)


def _check_vision_tower(model: nn.Module, sub: nn.Module) -> None:
    """Reject vision towers without one global token grid: hierarchical towers whose stages change the token set
    (GroupViT), and windowed ones (Swin, Hiera, the SAM image encoder), naming the reason."""
    for m in sub.modules():
        if type(m).__name__.startswith("GroupViT") and isinstance(getattr(m, "stages", None), nn.ModuleList):
            raise TypeError(
                f"{type(model).__name__}: the vision tower {type(sub).__name__} is hierarchical ({type(m).__name__}"
                ".stages): each stage appends or merges tokens (GroupViT group tokens and grouping blocks), so its "
                "attention maps do not share one token set and cannot be stacked as layers; it is not supported"
                + (" (tower='text' is)" if hasattr(model, "text_model") else "")
                + f". Supported: {SUPPORTED_HOSTS}"
            )
        reason = windowed_reason(m)
        if reason is not None:
            raise TypeError(f"{type(model).__name__}: {reason}; it is not supported. Supported: {SUPPORTED_HOSTS}")


def _has_batch_norm(proj: Any) -> bool:
    return isinstance(proj, nn.Module) and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in proj.modules())


def resolve_hf(model: nn.Module, tower: str | None) -> TowerSpec | None:
    """Tower description for a transformers model, or None when ``model`` is not one."""
    if not is_hf_model(model):
        return None
    dual = hasattr(model, "vision_model") and hasattr(model, "text_model")
    proj = None
    if dual:
        tower = tower or "vision"
        if tower not in ("vision", "text"):
            raise ValueError(f"tower must be 'vision' or 'text', got {tower!r}")
        sub = model.vision_model if tower == "vision" else model.text_model
        proj = getattr(model, "visual_projection" if tower == "vision" else "text_projection", None)
    elif hasattr(model, "vision_model") and hasattr(model, "visual_projection"):
        sub, proj = model.vision_model, model.visual_projection  # CLIPVisionModelWithProjection
    elif hasattr(model, "text_model") and hasattr(model, "text_projection"):
        sub, proj = model.text_model, model.text_projection  # CLIPTextModelWithProjection
    elif _embeddings(model) is not None:  # the model itself embeds its inputs (DINOv3ViTModel: base_model is its
        sub = model  # encoder, which has no embeddings)
    else:
        base = getattr(model, "base_model", model)  # e.g. ViTForImageClassification -> its ViTModel
        sub = base if isinstance(base, nn.Module) else model
    is_text = _is_text(sub) or type(sub).__name__.endswith("TextTransformer")
    actual = "text" if is_text else "vision"
    if tower is not None and tower != actual:
        raise ValueError(f"tower={tower!r} was asked for, but {type(model).__name__} holds only a {actual} tower")
    cfg = getattr(sub, "config", None)
    if _has_batch_norm(proj):
        # GroupViT's projection head: its BatchNorm1d normalises a batch of pooled vectors (and updates its running
        # statistics in train mode), so it is not applied per token; the tokens are the unprojected hidden states
        proj = None
    post_ln = None
    if type(sub).__name__.startswith("CLIPVision"):
        # transformers 4.x wraps a CLIPVisionTransformer as `vision_model`
        post_ln = getattr(sub, "post_layernorm", None) or getattr(
            getattr(sub, "vision_model", None), "post_layernorm", None
        )

    def read_tokens(capture: Any, output: Any) -> Tensor:
        hs = last_hidden_state(output)
        if post_ln is not None:  # CLIP applies post_layernorm to the pooled token only; ITSELF uses all tokens
            hs = post_ln(hs)
        return proj(hs) if proj is not None else hs

    if is_text:

        def read_inputs(args: tuple, kwargs: dict) -> dict:
            return {"ids": arg(args, kwargs, "input_ids", 0), "attention_mask": arg(args, kwargs, "attention_mask", 1)}

        is_clip = type(sub).__name__.startswith("CLIP")
        first = _first_token_pooled(sub)
        return TowerSpec(
            family="hf",
            tower="text",
            layers_root=sub,
            start=sub,
            end=sub,
            read_inputs=read_inputs,
            read_tokens=read_tokens,
            eos_index=_text_eos(sub, first),
            sos_index=0 if is_clip or first else None,
            # [CLS]-pooled towers attend to every non-padding token: valid = not the pad id (and the mask)
            valid_through_eos=not first,
            pad_id=getattr(cfg, "pad_token_id", None) if first else None,
        )

    _check_vision_tower(model, sub)

    def read_image(args: tuple, kwargs: dict) -> dict:
        out = {"pixels": arg(args, kwargs, "pixel_values", 0)}
        patch_valid = arg(args, kwargs, "pixel_attention_mask", 1)  # SigLIP 2 NaFlex: 1 at real patches
        shapes = arg(args, kwargs, "spatial_shapes", 2)  # each sample's (rows, cols)
        if isinstance(shapes, Tensor) and shapes.dim() == 2:
            out["grids"] = shapes
        if isinstance(patch_valid, Tensor) and patch_valid.dim() == 2:
            out["patch_valid"] = patch_valid
        return out

    has_cls = _has_cls(sub)
    registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
    patch = getattr(cfg, "patch_size", None)
    head = getattr(sub, "head", None) if getattr(sub, "use_head", True) else None
    probe, probe_adapter = None, None
    if isinstance(getattr(head, "attention", None), nn.MultiheadAttention):  # SigLIP / SigLIP 2 MAP head
        probe, probe_adapter = head.attention, MultiheadAttentionAdapter
    elif isinstance(head, nn.Module) and HFAttentionPoolingHeadAdapter.matches(head):  # AIMv2
        probe, probe_adapter = head, HFAttentionPoolingHeadAdapter
    return TowerSpec(
        family="hf",
        tower="vision",
        layers_root=sub,
        start=sub,
        end=sub,
        read_inputs=read_image,
        read_tokens=read_tokens,
        num_prefix_tokens=(1 if has_cls else 0) + _extra_prefix(sub) + registers,
        num_suffix_tokens=_suffix(sub),
        cls_index=0 if has_cls else None,
        patch_size=pair(patch) if patch is not None else None,
        probe=probe,
        probe_adapter=probe_adapter,
    )
