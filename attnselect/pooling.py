"""Pooling of a variable-size set of tokens: the VSE-infinity Generalized Pooling Operator and masked max pooling."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import functional as F

__all__ = ["GPOPool", "MaxPool", "build_pool"]


def _check_tokens_mask(tokens: Tensor, mask: Tensor | None) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must have shape [B,K,D], got {shape}")
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    F._check_valid(mask, tokens.shape[:2], tokens.device, name="mask")
    return mask


class MaxPool(nn.Module):
    """Max over the valid tokens (the published ITSELF pooling): ``[B,K,D], [B,K] -> [B,D]``.

    Examples:
        >>> MaxPool()(torch.randn(2, 5, 8), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()).shape
        torch.Size([2, 8])
    """

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _check_tokens_mask(tokens, mask)
        return F.masked_max_pool(tokens, mask)


def _rank_encoding(length: int, d_pe: int, device: torch.device) -> Tensor:
    """Sinusoidal encoding of the ranks 0..length-1: ``pe[k, 2i] = sin(k / 10000^(2i/d))``, ``pe[k, 2i+1] = cos``."""
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_pe, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / d_pe))
    pe = torch.zeros(length, d_pe, device=device)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


class GPOPool(nn.Module):
    """Generalized Pooling Operator (Chen et al., VSE-infinity, CVPR 2021): ``[B,K,D], [B,K] -> [B,D]``.

    Each channel is sorted over the valid tokens (descending); the pooled value is a weighted sum of the sorted values
    whose weights depend only on the rank and the number of valid tokens: a bidirectional GRU reads sinusoidal
    encodings of the ranks, a linear layer scores each rank, and a softmax with temperature 0.1 turns the scores into
    weights. Max, mean and top-k averaging are special cases. Padded positions never influence the result, and the
    output is invariant to permuting the valid tokens.

    Args:
        d_pe: width of the rank encoding (even).
        d_hidden: hidden width of the GRU.
        temperature: softmax temperature of the rank weights (0.1 in VSE-infinity), positive.

    Examples:
        >>> GPOPool()(torch.randn(2, 7, 16), torch.ones(2, 7, dtype=torch.bool)).shape
        torch.Size([2, 16])
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1) -> None:
        super().__init__()
        if isinstance(d_pe, bool) or not isinstance(d_pe, int) or d_pe < 2 or d_pe % 2:
            raise ValueError(f"d_pe must be an even int >= 2, got {d_pe!r}")
        if isinstance(d_hidden, bool) or not isinstance(d_hidden, int) or d_hidden < 1:
            raise ValueError(f"d_hidden must be a positive int, got {d_hidden!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive float, got {temperature!r}")
        self.d_pe = d_pe
        self.d_hidden = d_hidden
        self.temperature = temperature
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def rank_weights(self, lengths: Tensor, max_len: int) -> Tensor:
        """Pooling weights ``[B, max_len]`` over ranks for samples with ``lengths`` valid tokens (zero past them)."""
        device = self.linear.weight.device
        ranks = torch.arange(max_len, device=device)
        valid = ranks.unsqueeze(0) < lengths.to(device).unsqueeze(1)  # [B, K]
        pe = _rank_encoding(max_len, self.d_pe, device).unsqueeze(0) * valid.unsqueeze(-1)
        pe = pe.to(self.linear.weight.dtype)
        packed = pack_padded_sequence(pe, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        out = (out[..., : self.d_hidden] + out[..., self.d_hidden :]) / 2
        scores = self.linear(out).squeeze(-1).float().masked_fill(~valid, float("-inf"))
        return torch.softmax(scores / self.temperature, dim=1)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = _check_tokens_mask(tokens, mask)
        if tokens.shape[0] == 0:  # an empty batch: nothing to pack through the GRU
            return tokens.new_zeros(0, tokens.shape[-1])
        lengths = mask.sum(dim=1)
        max_len = tokens.shape[1]
        weights = self.rank_weights(lengths, max_len)  # [B, K]
        filled = tokens.float().masked_fill(~mask.unsqueeze(-1), float("-inf"))
        ordered = filled.sort(dim=1, descending=True).values  # valid values first in every channel
        rank_valid = torch.arange(max_len, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        ordered = ordered.masked_fill(~rank_valid.unsqueeze(-1), 0.0)
        return (ordered * weights.unsqueeze(-1)).sum(dim=1).to(tokens.dtype)

    def extra_repr(self) -> str:
        return f"d_pe={self.d_pe}, d_hidden={self.d_hidden}, temperature={self.temperature}"


def build_pool(pool: str | nn.Module | None) -> nn.Module | None:
    """``"max"`` -> :class:`MaxPool`, ``"gpo"`` -> :class:`GPOPool`, a module passes through, None stays None.

    Args:
        pool: ``"max"``, ``"gpo"``, an ``nn.Module`` taking ``(tokens [B,K,D], mask [B,K])`` or None.

    Returns:
        The pooling module (``[B,K,D], [B,K] -> [B,D]``), or None.

    Examples:
        >>> build_pool("max")
        MaxPool()
        >>> build_pool(None) is None
        True
    """
    if pool is None or isinstance(pool, nn.Module):
        return pool
    if pool == "max":
        return MaxPool()
    if pool == "gpo":
        return GPOPool()
    raise ValueError(f"pool must be 'max', 'gpo', an nn.Module or None, got {pool!r}")
