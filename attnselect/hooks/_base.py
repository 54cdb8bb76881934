"""Common pieces of the attention-capture adapters.

An *adapter* knows one attention-module type: from the module's input (as a forward hook with kwargs sees it) and
its own weights it rebuilds the queries, keys, logit scale and mask that the module used. The capture then turns
them into probabilities with :func:`attnselect.functional.attention_probs`, the single funnel for every host, so
the host keeps its fused attention and only the chosen layers pay for the recomputation.

Mask conventions differ between ecosystems; each adapter converts its host's convention into an additive float
``bias`` (``-inf`` or ``finfo.min`` for blocked entries) plus a ``causal`` flag:

- ``torch.nn.MultiheadAttention`` and open_clip ``Attention``: bool ``True`` = blocked, or additive float.
- timm ``Attention`` and HF ``sdpa``: SDPA semantics, bool ``True`` = attend, or additive float.
- HF ``eager``: additive float (``finfo.min`` for blocked entries).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "QK",
    "AttentionAdapter",
    "MultiheadAttentionAdapter",
    "TowerSpec",
    "arg",
    "bool_mask_to_bias",
    "class_in_mro",
    "unsupported_reason",
    "windowed_reason",
]


@dataclass
class QK:
    """What an adapter rebuilds for one call of an attention module.

    Attributes:
        q: queries ``[B,H,Nq,d]`` (any float dtype; the probabilities are computed in fp32).
        k: keys ``[B,H,Nk,d]``.
        scale: multiplier of ``q k^T``.
        bias: additive float mask broadcastable to ``[B,H,Nq,Nk]``, or None.
        causal: block keys after the query position.
        query_valid: bool ``[B,Nq]``, False at query rows the host never computed (padding removed by a
            nested-tensor fast path): their rows are 0. None: every row.

    Examples:
        >>> from attnselect.functional import attention_probs
        >>> qk = QK(q=torch.randn(1, 2, 5, 8), k=torch.randn(1, 2, 5, 8), scale=8**-0.5, causal=True)
        >>> attention_probs(qk.q, qk.k, scale=qk.scale, bias=qk.bias, causal=qk.causal).shape  # [B,Nq,Nk]
        torch.Size([1, 5, 5])
    """

    q: Tensor
    k: Tensor
    scale: float
    bias: Tensor | None = None
    causal: bool = False
    query_valid: Tensor | None = None


def arg(args: tuple, kwargs: dict, name: str, position: int, default: Any = None) -> Any:
    """Read an argument that may arrive by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    return default


def bool_mask_to_bias(mask: Tensor, *, true_means: str) -> Tensor:
    """Turn a bool mask into an additive fp32 bias.

    Args:
        mask: bool tensor.
        true_means: ``"attend"`` (SDPA, timm, HF sdpa) or ``"blocked"`` (nn.MultiheadAttention, open_clip).

    Returns:
        fp32 tensor of the same shape with 0 where attention is allowed and ``finfo(float32).min`` where it is
        blocked (the value HF eager uses, so a fully blocked row gives the same uniform row as the host).
    """
    blocked = ~mask if true_means == "attend" else mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
        blocked, torch.finfo(torch.float32).min
    )


def class_in_mro(module: object, module_prefix: str, qualname: str) -> bool:
    """Whether ``type(module)`` has a base class ``qualname`` defined in a module starting with ``module_prefix``.

    Checks by name so that no host library has to be imported to test a module's type.
    """
    for cls in type(module).__mro__:
        if cls.__qualname__ == qualname and cls.__module__.startswith(module_prefix):
            return True
    return False


def _overrides_forward(module: nn.Module, module_prefix: str, qualname: str) -> bool:
    for cls in type(module).__mro__:
        if cls.__qualname__ == qualname and cls.__module__.startswith(module_prefix):
            return type(module).forward is not cls.forward
    return False


_ROPE_WORDS = ("rope", "rotary")

#: what the capture supports, for the refusals to point to
SUPPORTED_HOSTS = (
    "global-attention ViTs: timm VisionTransformer, Eva (EVA02, vit_pe_*, vit_*_dinov3, vit_*_rope_*) and NaFlexVit; "
    "HF transformers ViT, DeiT, CLIP, SigLIP, SigLIP 2 (NaFlex too), DINOv2, DINOv3, AIMv2, MLCD; open_clip CLIP "
    "towers, EVA02 and PE-Core"
)

# windowed or hierarchical towers, by a word of their attention (or block) class names and their module
_WINDOWED: tuple[tuple[str, str, str], ...] = (
    ("Swin", "", "Swin / Swin V2 attend inside (shifted) local windows of a hierarchical feature map that is merged "
     "between stages"),
    ("Hiera", "", "Hiera attends inside mask units (local windows) of a hierarchical tower whose stages pool tokens"),
    ("MaskUnitAttention", "timm.", "Hiera attends inside mask units (local windows) of a hierarchical tower whose "
     "stages pool tokens"),
    ("WindowAttention", "timm.", "windowed (Swin-style) attention attends inside local windows of a hierarchical "
     "feature map"),
    ("SamVision", "", "the SAM / ViTDet image encoder attends inside local windows in most blocks (with relative "
     "position terms), so its blocks share no global token grid"),
    ("", "timm.models.vision_transformer_sam", "the SAM / ViTDet image encoder attends inside local windows in most "
     "blocks (with relative position terms), so its blocks share no global token grid"),
)  # fmt: skip


def windowed_reason(module: nn.Module) -> str | None:
    """Why a windowed or hierarchical attention module has no global map to capture, or None."""
    name, mod = type(module).__name__, type(module).__module__
    for word, prefix, why in _WINDOWED:
        if (not word or word in name) and mod.startswith(prefix) and ("ttention" in name or not word):
            return f"{name}: {why}. There is no global token grid whose attention a rollout could follow"
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a known attention type cannot be captured by the generic adapters (None when there is no known reason)."""
    name = type(module).__name__
    lname = name.lower()
    if lname.startswith("tome"):
        return (
            f"{name} is a ToMe-patched attention (token merging): it adds a log(size) bias and the token count "
            "shrinks per layer, so a recomputed map would be wrong"
        )
    windowed = windowed_reason(module)
    if windowed is not None:
        return f"{windowed}; it is not supported. Supported: {SUPPORTED_HOSTS}"
    rotary_handled = (
        class_in_mro(module, "timm.models.eva", "EvaAttention")
        or class_in_mro(module, "timm.layers.", "AttentionRope")
        or (type(module).__module__.startswith("transformers.") and name in ROTARY_HF)
    )
    if not rotary_handled and any(w in lname for w in _ROPE_WORDS):
        return (
            f"{name} applies rotary position embeddings to q and k inside the module in a way attnselect does not "
            f"reproduce; recomputed maps would be wrong (supported rotary hosts: {SUPPORTED_HOSTS})"
        )
    mod = type(module).__module__
    if name == "Attention" and mod.startswith("timm.") and not mod.startswith("timm.layers"):
        return (
            f"{mod}.{name} is a model-specific timm attention, not timm.layers.Attention (it may add relative "
            "position biases, windows or other terms), so it is not captured"
        )
    if getattr(module, "continuous_position_bias_mlp", None) is not None or (
        getattr(module, "logit_scale", None) is not None and hasattr(module, "query")
    ):
        return (
            f"{name} uses cosine attention with a learned position-bias network (Swin V2); recomputed maps would be "
            "wrong, so it is not captured"
        )
    rel = getattr(module, "relative_position_bias", None)
    attention = any(hasattr(module, a) for a in ("q_proj", "query", "qkv"))
    if getattr(module, "relative_position_bias_table", None) is not None or (
        # a relative-bias module inside the attention itself; reproduced only for BEiT/data2vec-style
        # self-attention (`has_relative_position_bias`). A bias computed outside and passed as the mask is fine.
        attention and isinstance(rel, nn.Module) and not hasattr(module, "has_relative_position_bias")
    ):
        return (
            f"{name} adds a learned relative position bias inside the module (Swin-style window attention); "
            "recomputed maps would be wrong, so it is not captured"
        )
    for prefix, qual in (("timm.layers.", "Attention"), ("open_clip.", "Attention")):
        if _overrides_forward(module, prefix, qual):
            return (
                f"{name} subclasses {prefix.rstrip('.')} {qual} but overrides forward(); its attention may differ "
                "from the parent's, so it is not captured"
            )
    return None


#: transformers attention classes whose rotary embedding the HF adapter applies with the model file's own helper
ROTARY_HF = ("DINOv3ViTAttention", "MLCDAttention")


class AttentionAdapter:
    """Rebuilds ``QK`` for one attention-module type. Subclasses set ``name`` and implement the three methods.

    ``qk`` returns queries ``[B,H,Nq,d]`` and keys ``[B,H,Nk,d]`` as the module computed them, plus its logit scale
    and mask (see :class:`QK`).

    Examples:
        >>> from torch import nn
        >>> from attnselect.hooks import adapter_for
        >>> mha = nn.MultiheadAttention(16, 2, batch_first=True)
        >>> adapter = adapter_for(mha)
        >>> issubclass(adapter, AttentionAdapter), adapter.name
        (True, 'torch.nn.MultiheadAttention')
        >>> x = torch.randn(3, 5, 16)  # [B,N,D]
        >>> qk = adapter.qk(mha, (x, x, x), {})
        >>> qk.q.shape, qk.k.shape  # [B,H,N,d]
        (torch.Size([3, 2, 5, 8]), torch.Size([3, 2, 5, 8]))
    """

    name: str = "attention"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether this adapter handles ``module`` (checked in dispatch-table order)."""
        raise NotImplementedError

    @classmethod
    def check(cls, module: nn.Module) -> None:
        """Raise TypeError when this particular module's configuration is not supported."""

    @classmethod
    def qk(cls, module: nn.Module, args: tuple, kwargs: dict) -> QK:
        """Rebuild queries, keys, scale and mask from the module input (as seen by a forward hook with kwargs)."""
        raise NotImplementedError


class MultiheadAttentionAdapter(AttentionAdapter):
    """``torch.nn.MultiheadAttention`` (open_clip's default blocks, SigLIP's pooling head).

    Handles ``batch_first`` either way, separate q/k/v projection weights, ``attn_mask`` (``[L,S]`` or
    ``[B*H,L,S]``, bool True = blocked or additive float), ``key_padding_mask`` and ``is_causal`` without a mask.
    """

    name = "torch.nn.MultiheadAttention"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    @classmethod
    def check(cls, module: nn.Module) -> None:
        if module.bias_k is not None or module.add_zero_attn:
            raise TypeError(
                "nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not supported: the key "
                "sequence gets extra entries that the captured map would not match"
            )

    @classmethod
    def qk(cls, module: nn.Module, args: tuple, kwargs: dict) -> QK:
        query = arg(args, kwargs, "query", 0)
        key = arg(args, kwargs, "key", 1, query)
        if getattr(query, "is_nested", False):
            return cls._nested(module, query, key)
        if module.batch_first is False and query.dim() == 3:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        if query.dim() == 2:  # unbatched [L,E]
            query, key = query.unsqueeze(0), key.unsqueeze(0)
        batch, nq, embed = query.shape
        nk = key.shape[1]
        heads = module.num_heads
        head_dim = embed // heads
        if module._qkv_same_embed_dim:
            w_q, w_k = module.in_proj_weight[:embed], module.in_proj_weight[embed : 2 * embed]
        else:
            w_q, w_k = module.q_proj_weight, module.k_proj_weight
        b_q = b_k = None
        if module.in_proj_bias is not None:
            b_q, b_k = module.in_proj_bias[:embed], module.in_proj_bias[embed : 2 * embed]
        q = F.linear(query, w_q, b_q).view(batch, nq, heads, head_dim).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(batch, nk, heads, head_dim).transpose(1, 2)

        bias = None
        attn_mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
        if attn_mask is not None:
            m = bool_mask_to_bias(attn_mask, true_means="blocked") if attn_mask.dtype == torch.bool else attn_mask
            bias = m.reshape(batch, heads, nq, nk) if m.dim() == 3 else m
        kpm = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
        if kpm is not None:
            kp = bool_mask_to_bias(kpm, true_means="blocked") if kpm.dtype == torch.bool else kpm.float()
            kp = kp.reshape(batch, 1, 1, nk)
            bias = kp if bias is None else bias.float() + kp
        causal = bool(kwargs.get("is_causal", False)) and attn_mask is None
        return QK(q=q, k=k, scale=head_dim**-0.5, bias=bias, causal=causal)

    @classmethod
    def _nested(cls, module: nn.Module, query: Tensor, key: Tensor) -> QK:
        """``nn.TransformerEncoder``'s nested-tensor fast path (eval, no grad, ``src_key_padding_mask``): the layers
        get a nested tensor of each sample's real tokens and no mask. Padded back to the longest sample, with the
        keys beyond each sample's length blocked; the rows of padding, which the host never computes, are 0."""
        lengths = torch.tensor([t.shape[0] for t in query.unbind()], device=query.device)
        dense_q = torch.nested.to_padded_tensor(query, 0.0)
        dense_k = dense_q if key is query else torch.nested.to_padded_tensor(key, 0.0)
        longest = dense_q.shape[1]
        real = torch.arange(longest, device=query.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B,L]
        out = cls.qk(module, (dense_q, dense_k, dense_k), {"key_padding_mask": ~real})  # nested inputs: batch first
        out.query_valid = real
        return out


@dataclass
class TowerSpec:
    """Where one tower of a host keeps its attention layers, inputs and final tokens.

    Attributes:
        family: ``"hf"``, ``"open_clip"``, ``"timm"`` or ``"generic"``.
        tower: ``"vision"`` or ``"text"``.
        layers_root: module searched for the stack of attention blocks.
        start: module whose forward pre-hook opens a new capture (clears the maps, reads the inputs).
        end: module whose forward hook closes it (reads the final tokens, runs the callbacks).
        read_inputs: ``(args, kwargs) -> dict`` of the start module's call; keys ``pixels``, ``ids``,
            ``attention_mask`` when present.
        read_tokens: ``(capture, output) -> Tensor | None``: final token features ``[B,N,D]`` from the end
            module's output (and the auxiliary state).
        eos_index: ``ids [B,N] -> LongTensor [B]``: the text summary position per sample, or None.
        num_prefix_tokens: tokens before the patch grid (CLS + registers).
        num_suffix_tokens: tokens after the patch grid (YOLOS detection tokens); never selected by ``attach``.
        cls_index: position of the class token, or None.
        sos_index: position of the text start token, or None.
        patch_size: ``(ph, pw)`` for images.
        aux_hooks: extra forward hooks ``(module, fn(capture, output))`` that stash state for ``read_tokens``.
        valid_through_eos: text towers: the valid tokens end at the summary position (causal CLIP towers). False
            for towers pooled at the first/last position (BERT-style ``[CLS]`` towers, open_clip
            ``pool_type="first"|"last"``), where every non-padding token is valid.
        pad_id: the padding token id, used for ``valid`` when ``valid_through_eos`` is False.
        probe: the attention module of the tower's pooling probe (MAP head), or None.
        probe_adapter: the adapter that rebuilds the probe's queries (the latents) and keys (the tokens).
        default_query: the summary the bank's rollout reads when ``attach`` gets no ``query``: ``"cls"``,
            ``"eos"``, ``"probe"`` or ``"mean"``.

    Examples:
        >>> from torch import nn
        >>> from attnselect.hooks import resolve_tower
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), num_layers=3)
        >>> spec = resolve_tower(enc)  # not an HF / open_clip / timm host: a generic stack of attention blocks
        >>> spec.family, spec.tower, spec.modality
        ('generic', 'vision', 'image')
    """

    family: str
    tower: str
    layers_root: nn.Module
    start: nn.Module
    end: nn.Module
    read_inputs: Callable[[tuple, dict], dict]
    read_tokens: Callable[[Any, Any], Tensor | None]
    eos_index: Callable[[Tensor], Tensor] | None = None
    num_prefix_tokens: int = 0
    num_suffix_tokens: int = 0
    cls_index: int | None = None
    sos_index: int | None = None
    patch_size: tuple[int, int] | None = None
    aux_hooks: Sequence[tuple[nn.Module, Callable[[Any, Any], None]]] = field(default_factory=tuple)
    valid_through_eos: bool = True
    pad_id: int | None = None
    probe: nn.Module | None = None
    probe_adapter: Any = None
    default_query: str | None = None

    def __post_init__(self) -> None:
        if self.default_query is None:
            if self.tower == "text":
                self.default_query = "eos"
            elif self.cls_index is not None:
                self.default_query = "cls"
            elif self.probe is not None:
                self.default_query = "probe"
            else:
                self.default_query = "mean"

    @property
    def modality(self) -> str:
        return "text" if self.tower == "text" else "image"


def pair(x: int | Sequence[int]) -> tuple[int, int]:
    """``8 -> (8, 8)``; ``(16, 8) -> (16, 8)``."""
    if isinstance(x, int):
        return (x, x)
    a, b = tuple(x)
    return (int(a), int(b))


def last_hidden_state(output: Any) -> Tensor:
    """The token states of a host output: a tensor, a ``ModelOutput`` or a tuple whose first item is the states."""
    if isinstance(output, Tensor):
        return output
    hs = getattr(output, "last_hidden_state", None)
    if hs is not None:
        return hs
    return output[0]


def project(x: Tensor, proj: nn.Module | Tensor | None) -> Tensor:
    """Apply a projection that is a ``Linear``-like module, a ``[D,E]`` matrix or None."""
    if proj is None:
        return x
    if isinstance(proj, Tensor):
        return x @ proj
    return proj(x)
