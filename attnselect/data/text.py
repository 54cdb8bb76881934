"""Caption tokenisation (CLIP BPE, offline) and the published text augmentation.

Token ids follow the CLIP vocabulary of 49408 entries: 0 is padding, 49406 SOS, 49407 EOS, and the reference
(IRRA) tokenizer reuses id 49405 as ``<|mask|>``. open_clip's ``SimpleTokenizer`` reads its BPE table from a file
shipped with the package, so tokenisation never touches the network. open_clip is imported on first use only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "EOS_ID",
    "MASK_ID",
    "SOS_ID",
    "VOCAB_SIZE",
    "augment_tokens",
    "get_tokenizer",
    "tokenize",
]

logger = logging.getLogger(__name__)

VOCAB_SIZE = 49408
MASK_ID = 49405
SOS_ID = 49406
EOS_ID = 49407


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The shared ``open_clip.tokenizer.SimpleTokenizer`` (built once; needs ``open_clip_torch``)."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("caption tokenisation needs open_clip_torch: pip install 'attnselect[open_clip]'") from exc
    return SimpleTokenizer()


def tokenize(
    caption: str | Sequence[str],
    text_length: int = 77,
    *,
    truncate: bool = True,
    tokenizer=None,
) -> Tensor:
    """``[SOS] + BPE(caption) + [EOS]``, zero-padded to ``text_length``.

    A sequence longer than ``text_length`` is cut to ``text_length`` and its last position set to EOS (as the
    reference code does), so EOS is always present and is the position of the largest id.

    Args:
        caption: one caption, or a list of captions.
        text_length: context length (77 for CLIP).
        truncate: if False, an over-long caption raises ValueError instead.
        tokenizer: an object with ``encode(str) -> list[int]``; default :func:`get_tokenizer`.

    Returns:
        ``[text_length]`` int64 for one caption, ``[n, text_length]`` for a list.

    Examples:
        >>> ids = tokenize("a man in a red shirt", text_length=16)
        >>> ids.shape, int(ids[0]), int(ids.argmax())  # SOS first; EOS (the largest id) right after the 6 words
        (torch.Size([16]), 49406, 7)
        >>> tokenize(["a man", "a woman in a red coat"], text_length=16).shape
        torch.Size([2, 16])
    """
    if text_length < 2:
        raise ValueError(f"tokenize: text_length must be >= 2 (SOS and EOS), got {text_length}")
    if not isinstance(caption, str):
        if not isinstance(caption, Sequence):
            raise TypeError(f"tokenize: caption must be a string or a list of strings, got {type(caption).__name__}")
        rows = [tokenize(c, text_length, truncate=truncate, tokenizer=tokenizer) for c in caption]
        return torch.stack(rows) if rows else torch.zeros(0, text_length, dtype=torch.long)
    tok = tokenizer if tokenizer is not None else get_tokenizer()
    ids = [SOS_ID, *tok.encode(caption), EOS_ID]
    if len(ids) > text_length:
        if not truncate:
            raise ValueError(
                f"tokenize: caption has {len(ids)} tokens with SOS/EOS, more than text_length={text_length}: "
                f"{caption[:60]!r}..."
            )
        ids = ids[:text_length]
        ids[-1] = EOS_ID
    out = torch.zeros(text_length, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def augment_tokens(
    ids: Tensor,
    *,
    prob: float = 0.2,
    mask_prob: float = 0.6,
    replace_prob: float = 0.2,
    generator: torch.Generator | None = None,
    allow_empty: bool = False,
) -> Tensor:
    """The published caption augmentation (RDE/ITSELF ``txt_data_aug``), vectorised.

    Every word token (``0 < id < 49405``: not padding, mask, SOS or EOS) is perturbed with probability ``prob``;
    a perturbed token becomes ``<|mask|>`` (49405) with probability ``mask_prob``, a uniformly random id in
    ``[1, 49404]`` with probability ``replace_prob``, and is deleted otherwise (later tokens shift left, the tail is
    zero-padded). If every word token would be deleted (an empty caption, which makes the reference pooling NaN),
    the first deleted token is kept unchanged, unless ``allow_empty=True``.

    Args:
        ids: ``[T]`` int64 token ids (from :func:`tokenize`); not modified.
        prob: per-token perturbation probability.
        mask_prob: share of perturbed tokens that become the mask id.
        replace_prob: share of perturbed tokens replaced by a random id (the rest are deleted).
        generator: torch random generator for reproducibility (default: the global RNG).
        allow_empty: reproduce the reference behaviour that can delete every word.

    Returns:
        ``[T]`` int64, a new tensor.

    Examples:
        >>> ids = torch.tensor([49406, 320, 786, 530, 320, 736, 2523, 49407, 0, 0])  # [T]: SOS, 6 words, EOS, padding
        >>> augment_tokens(ids, prob=1.0, mask_prob=1.0, replace_prob=0.0).tolist()  # every word becomes <|mask|>
        [49406, 49405, 49405, 49405, 49405, 49405, 49405, 49407, 0, 0]
        >>> augment_tokens(ids, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([10])
    """
    if ids.dim() != 1 or ids.is_floating_point():
        raise ValueError(f"augment_tokens: ids must be a 1-D integer tensor [T], got {ids.dtype} {tuple(ids.shape)}")
    if not (0 <= prob <= 1 and 0 <= mask_prob and 0 <= replace_prob and mask_prob + replace_prob <= 1):
        raise ValueError(
            f"augment_tokens: need 0 <= prob <= 1 and mask_prob, replace_prob >= 0 with sum <= 1, got "
            f"{prob}, {mask_prob}, {replace_prob}"
        )
    t = ids.shape[0]
    word = (ids > 0) & (ids < MASK_ID)
    u = torch.rand(t, generator=generator)
    v = torch.rand(t, generator=generator)
    rand_ids = torch.randint(1, MASK_ID, (t,), generator=generator)
    perturbed = word & (u < prob)
    to_mask = perturbed & (v < mask_prob)
    to_replace = perturbed & (v >= mask_prob) & (v < mask_prob + replace_prob)
    to_delete = perturbed & ~to_mask & ~to_replace
    if not allow_empty and bool(word.any()) and bool((word & ~to_delete).sum() == 0):
        first = int(torch.nonzero(to_delete)[0])
        to_delete = to_delete.clone()
        to_delete[first] = False
    out = ids.clone()
    out = torch.where(to_mask, torch.full_like(out, MASK_ID), out)
    out = torch.where(to_replace, rand_ids.to(out.dtype), out)
    kept = out[~to_delete]
    result = torch.zeros_like(ids)
    result[: kept.shape[0]] = kept
    return result
