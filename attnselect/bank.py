"""AttentiveBank: keep the most salient tokens of a transformer, adapt and pool them into a local embedding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import functional as F
from .pooling import build_pool
from .rollout import MultiLayerRollout
from .scheduler import AdaptiveTokenScheduler

if TYPE_CHECKING:  # pragma: no cover
    from .hooks.attach import AttachHandle

__all__ = ["AttentiveBank", "BankOutput", "MaskedBatchNorm1d", "TokenAdapter"]


@dataclass
class BankOutput:
    """What one bank forward produced.

    Attributes:
        tokens: ``[B,k,D]`` the kept tokens, gathered from the input tokens (before any adapter).
        indices: ``[B,k]`` int64 positions of the kept tokens, by descending saliency.
        mask: ``[B,k]`` bool; False where a sample had fewer than k selectable tokens (the index repeats).
        saliency: ``[B,N]`` fp32 scores of every token (the rollout's query row; fp64 for fp64 maps).
        embedding: ``[B,D']`` pooled local embedding, or None when the bank has no pool.
        k: tokens kept per sample.

    Examples:
        >>> maps = [torch.softmax(torch.randn(1, 5, 5), -1) for _ in range(12)]  # 12 layers of [B,N,N]
        >>> out = AttentiveBank(ratio=0.5)(torch.randn(1, 5, 8), maps)  # n = 4 selectable tokens (CLS excluded)
        >>> out.k, out.tokens.shape, out.indices.shape, out.saliency.shape, out.embedding.shape
        (2, torch.Size([1, 2, 8]), torch.Size([1, 2]), torch.Size([1, 5]), torch.Size([1, 8]))
    """

    tokens: Tensor
    indices: Tensor
    mask: Tensor
    saliency: Tensor
    embedding: Tensor | None
    k: int


def _distributed_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the channels of ``[B,K,C]`` token sets whose statistics use the valid tokens only.

    Parameters and buffers have the names of :class:`torch.nn.BatchNorm1d`, so weights load either way. Padded tokens
    are normalised with the batch statistics of the valid ones but never enter them.

    Under ``torch.distributed`` (``sync=None``, the default, or ``sync=True``) the training statistics are
    all-reduced over the ranks, with gradients, so that DistributedDataParallel on a split batch computes what one
    process computes on the whole batch (what :class:`torch.nn.SyncBatchNorm` does for unmasked inputs).

    Args:
        *args: positional arguments of :class:`torch.nn.BatchNorm1d` (``num_features`` = channels ``C`` first).
        sync: all-reduce the statistics over ranks: None (when distributed), True, or False (never).
        **kwargs: keyword arguments of :class:`torch.nn.BatchNorm1d` (``eps``, ``momentum``, ``affine``, ...).

    Shapes:
        ``forward(x [B,K,C], mask [B,K] bool or None) -> [B,K,C]`` in the dtype of ``x``.

    Examples:
        >>> bn = MaskedBatchNorm1d(3)
        >>> x = torch.randn(2, 4, 3)
        >>> mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
        >>> y = bn(x, mask)
        >>> y.shape
        torch.Size([2, 4, 3])
        >>> bool(y[mask].mean(0).abs().max() < 1e-5)  # the valid tokens are standardised per channel
        True
    """

    def __init__(self, *args: Any, sync: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sync = sync

    def _batch_stats(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = mask.unsqueeze(-1).to(torch.float32)
        xf = x.float()
        if self.sync is not False and _distributed_world() > 1:
            from torch.distributed.nn.functional import all_reduce

            # two passes, as on one process: the global mean first, then the squared deviations from it
            total = all_reduce(torch.cat([(xf * m).sum(dim=(0, 1)), m.sum().reshape(1)]))
            count = total[-1].clamp(min=1.0)
            mean = total[:-1] / count
            var = all_reduce((((xf - mean) ** 2) * m).sum(dim=(0, 1))) / count
            return mean, var, count
        count = m.sum().clamp(min=1.0)
        mean = (xf * m).sum(dim=(0, 1)) / count
        var = (((xf - mean) ** 2) * m).sum(dim=(0, 1)) / count
        return mean, var, count

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if x.dim() != 3:
            raise ValueError(f"x must have shape [B,K,C], got {tuple(x.shape)}")
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            F._check_valid(mask, x.shape[:2], x.device, name="mask")  # bool [B,K], one valid token per sample
        use_batch = self.training or self.running_mean is None
        if use_batch:
            mean, var, count = self._batch_stats(x, mask)
            if self.training and self.track_running_stats and self.running_mean is not None:
                with torch.no_grad():
                    self.num_batches_tracked += 1
                    momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                    unbiased = var * count / (count - 1).clamp(min=1.0)
                    self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype) * momentum)
                    self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype) * momentum)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        out = (x.float() - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.float() + self.bias.float()
        return out.to(x.dtype)


class TokenAdapter(nn.Module):
    """Token-wise residual adapter ``Linear(x) + MLP(x)`` on L2-normalised tokens (VSE-infinity / ITSELF GRAB).

    ``MLP = Linear(in, hidden) -> norm -> ReLU -> Linear(hidden, out)``. With ``norm="batch"`` the statistics are
    computed over the valid tokens only (padding never enters them); ``norm="layer"`` uses LayerNorm; ``"none"`` no
    norm. ITSELF uses 512 -> 4096 with hidden 2048.

    Args:
        in_dim: token width D.
        out_dim: output width D'.
        hidden_dim: MLP hidden width (default ``out_dim // 2``).
        norm: ``"batch"``, ``"layer"`` or ``"none"``.

    Shapes:
        ``forward(tokens [B,K,D], mask [B,K] or None) -> [B,K,D']``.

    Examples:
        >>> TokenAdapter(512, 4096)(torch.randn(2, 10, 512)).shape
        torch.Size([2, 10, 4096])
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, norm: str = "batch") -> None:
        super().__init__()
        hidden_dim = hidden_dim or max(out_dim // 2, 1)
        if norm not in ("batch", "layer", "none"):
            raise ValueError(f"norm must be 'batch', 'layer' or 'none', got {norm!r}")
        self.in_dim, self.out_dim, self.hidden_dim, self.norm_type = in_dim, out_dim, hidden_dim, norm
        self.fc = nn.Linear(in_dim, out_dim)
        self.mlp_in = nn.Linear(in_dim, hidden_dim)
        if norm == "batch":
            self.norm: nn.Module = MaskedBatchNorm1d(hidden_dim)
        elif norm == "layer":
            self.norm = nn.LayerNorm(hidden_dim)
        else:
            self.norm = nn.Identity()
        self.mlp_out = nn.Linear(hidden_dim, out_dim)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.in_dim:
            raise ValueError(f"tokens must have shape [B,K,{self.in_dim}], got {tuple(tokens.shape)}")
        if mask is not None:
            F._check_valid(mask, tokens.shape[:2], tokens.device, name="mask")
        x = tokens / (tokens.norm(dim=-1, keepdim=True) + 1e-8)
        h = self.mlp_in(x)
        h = self.norm(h, mask) if isinstance(self.norm, MaskedBatchNorm1d) else self.norm(h)
        return self.fc(x) + self.mlp_out(torch.relu(h))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, hidden_dim={self.hidden_dim}, norm={self.norm_type!r}"


def _exclusion_mask(
    exclude: Any, query_rows: Tensor | None, batch: int, n: int, device: torch.device, per_sample_query: bool = False
) -> Tensor:
    """Bool ``[B,N]``: True at the positions that are never kept."""
    out = torch.zeros(batch, n, dtype=torch.bool, device=device)
    if exclude is None:
        if query_rows is None:  # a query mode or row weights: no token is the query
            return out
        out[torch.arange(batch, device=device), query_rows] = True
        if per_sample_query:  # per-sample summary rows are a text tower's EOS: its SOS (position 0) goes too
            out[:, 0] = True
        return out
    if isinstance(exclude, Tensor) and exclude.dtype == torch.bool:
        if exclude.shape != (batch, n):
            raise ValueError(f"exclude as a bool mask must have shape [B,N] = {(batch, n)}, got {tuple(exclude.shape)}")
        return exclude.to(device)
    if not isinstance(exclude, Tensor):
        if isinstance(exclude, int) and not isinstance(exclude, bool):
            exclude = [exclude]
        if not isinstance(exclude, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in exclude
        ):
            raise TypeError("exclude must be None, a sequence of ints, a LongTensor [E] or [B,E], or a bool [B,N]")
        exclude = torch.tensor(list(exclude), dtype=torch.long, device=device)
    if exclude.dtype.is_floating_point:
        raise TypeError(f"exclude must hold integer positions, got dtype {exclude.dtype}")
    if exclude.numel() == 0:
        return out
    exclude = exclude.to(device=device, dtype=torch.long)
    if exclude.dim() == 1:
        exclude = exclude.unsqueeze(0).expand(batch, -1)
    if exclude.dim() != 2 or exclude.shape[0] != batch:
        raise ValueError(f"exclude must have shape [E] or [B,E] with B = {batch}, got {tuple(exclude.shape)}")
    exclude = torch.where(exclude < 0, exclude + n, exclude)
    if int(exclude.min()) < 0 or int(exclude.max()) >= n:
        raise ValueError(f"exclude positions must lie in [-{n}, {n})")
    return out.scatter(1, exclude, True)


class AttentiveBank(nn.Module):
    """Attention-guided top-k token bank: rollout saliency -> top-k -> gather -> optional adapter -> pool.

    Args:
        rollout: the saliency module (default :class:`MultiLayerRollout` with layers ``("middle", "late")``).
        scheduler: optional :class:`AdaptiveTokenScheduler` giving ``k`` per step; without one ``k = int(n * ratio)``.
        ratio: kept share when there is no scheduler, in ``[0, 1]`` (the published inference value is 0.4).
        adapter: optional module mapping kept tokens ``[B,k,D] (+mask) -> [B,k,D']`` (e.g. :class:`TokenAdapter`).
        pool: ``"max"``, ``"gpo"``, an ``nn.Module`` taking ``(tokens, mask)``, or None (no embedding).

    ``n``, the number of selectable tokens, is ``N`` minus the positions excluded for every sample (192 for a
    193-token image with CLS, 75 for a 77-token CLIP text tower without SOS and EOS), as the published code counts.

    Examples:
        >>> bank = AttentiveBank(ratio=0.4)
        >>> maps = {4: torch.softmax(torch.randn(2, 193, 193), -1), 11: torch.softmax(torch.randn(2, 193, 193), -1)}
        >>> out = bank(torch.randn(2, 193, 512), maps)
        >>> out.indices.shape, out.embedding.shape
        (torch.Size([2, 76]), torch.Size([2, 512]))
    """

    def __init__(
        self,
        rollout: MultiLayerRollout | nn.Module | None = None,
        scheduler: AdaptiveTokenScheduler | None = None,
        ratio: float = 0.4,
        adapter: nn.Module | None = None,
        pool: str | nn.Module | None = "max",
    ) -> None:
        super().__init__()
        self.rollout = rollout if rollout is not None else MultiLayerRollout()
        self.scheduler = scheduler
        self.ratio = F._check_ratio(ratio, "ratio")
        self.adapter = adapter
        self.pool = build_pool(pool)
        #: the :class:`BankOutput` of the latest forward of a host this bank is attached to; None before the first,
        #: while a forward runs, and after a forward that stopped before the tower's end
        self.last: BankOutput | None = None

    def num_tokens(self, n: int, step: int | None = None) -> int:
        """Tokens kept out of ``n`` selectable ones (from the scheduler when present), clamped to ``[1, n]``."""
        if self.scheduler is not None:
            return self.scheduler.num_tokens(n, step)
        return min(max(int(n * self.ratio), 1), n)

    def forward(
        self,
        tokens: Tensor,
        attentions: Mapping[int, Tensor] | Sequence[Tensor],
        *,
        query: int | str | Tensor = 0,
        valid: Tensor | None = None,
        exclude: Any = None,
        step: int | None = None,
        num_layers: int | None = None,
        padding: Tensor | None = None,
        probe: Tensor | None = None,
    ) -> BankOutput:
        """Select, gather, adapt and pool.

        Args:
            tokens: ``[B,N,D]`` token features to gather from (e.g. the projected final tokens).
            attentions: per-layer maps (a mapping ``layer -> map`` or the full sequence), see
                :meth:`MultiLayerRollout.forward`.
            query: the summary row: 0 (CLS) for images, a LongTensor ``[B]`` of EOS positions for text; for hosts
                without a class token ``"mean"`` (what all real tokens attend to) or ``"probe"`` (through the host's
                pooling probe, ``probe=``), or float row weights ``[B,N]``. A mode or weights query has no query
                token, so nothing is excluded by default.
            valid: optional bool ``[B,N]``, False at tokens never to keep (text padding); the rollout still sees them.
            padding: optional bool ``[B,N]``, False at padded positions of variable-resolution inputs (NaFlex): they
                take no part in the rollout and are never kept.
            probe: the host's pooling probe's attention ``[B,N]`` for ``query="probe"``.
            exclude: positions never kept: None (the query token; with per-sample ``query`` rows, i.e. a text
                tower's EOS positions, also SOS at position 0), ints, a LongTensor ``[E]``/``[B,E]`` or a bool
                ``[B,N]`` mask.
            step: scheduler step (None: the scheduler's own counter).
            num_layers: host depth, to resolve named layers against a mapping.
        """
        F._check_tensor(tokens, "tokens")
        if tokens.dim() != 3:
            raise ValueError(f"tokens must have shape [B,N,D], got {tuple(tokens.shape)}")
        batch, n_tok = tokens.shape[:2]
        extra = {k: v for k, v in (("valid", padding), ("probe", probe)) if v is not None}
        saliency = self.rollout(attentions, query=query, num_layers=num_layers, **extra)
        if saliency.device != tokens.device:
            raise ValueError(
                f"tokens are on {tokens.device} but the attention maps are on {saliency.device}; put both on one device"
            )
        if saliency.shape != (batch, n_tok):
            raise ValueError(
                f"the attention maps give saliency of shape {tuple(saliency.shape)} but tokens are "
                f"{tuple(tokens.shape)}: maps and tokens must have the same B and N"
            )
        row_query = not isinstance(query, str) and not (
            isinstance(query, Tensor) and query.is_floating_point() and query.dim() == 2
        )
        query_rows = F._check_query(query, batch, n_tok, tokens.device) if row_query else None
        per_sample = row_query and isinstance(query, Tensor) and query.dim() > 0
        excluded = _exclusion_mask(exclude, query_rows, batch, n_tok, tokens.device, per_sample)
        selectable = ~excluded
        for name, mask in (("valid", valid), ("padding", padding)):
            if mask is not None:
                F._check_valid(mask, (batch, n_tok), tokens.device, name=name, each_row=False)  # rows: checked below
                selectable = selectable & mask
        empty = ~selectable.any(dim=1)
        # one read-back for both (on CUDA each is a wait for the device)
        # padding counts as excluded: n is the most real tokens any sample has (text padding, `valid`, does not: n
        # stays N minus the excluded positions, as the published code counts)
        counted = excluded if padding is None else excluded | ~padding
        fewest_excluded, any_empty = torch.stack([counted.sum(dim=1).min(), empty.sum()]).tolist()
        n = n_tok - fewest_excluded
        if n < 1:
            raise ValueError("exclude removes every token: nothing is left to select")
        if any_empty:
            for name, mask in (("valid", valid), ("padding", padding)):
                if mask is not None:  # names the samples without a valid token
                    F._check_valid(mask, (batch, n_tok), tokens.device, name=name)
            samples = empty.nonzero().flatten().tolist()[:8]
            what = "exclude (default: the query row, and SOS for per-sample query rows)"
            raise ValueError(
                f"no token is left to select in sample(s) {samples}: {what}"
                + (" and valid remove every position" if valid is not None else " removes every position")
            )
        k = self.num_tokens(n, step)
        from . import kernels  # the gate: fused Triton top-k + gather for CUDA tensors, else the reference

        indices, mask, kept = kernels.select_topk_gather(saliency, k, tokens, valid=selectable)
        embedding = None
        if self.pool is not None:
            x = self.adapter(kept, mask) if self.adapter is not None else kept
            embedding = self.pool(x, mask)
        return BankOutput(tokens=kept, indices=indices, mask=mask, saliency=saliency, embedding=embedding, k=k)

    # ---------------------------------------------------------------------------------------------- host models
    def attach(
        self, model: nn.Module, *, layers: Any = None, query: Any = None, tower: str | None = None
    ) -> AttachHandle:
        """Capture attention from an unmodified host so that after ``model(x)`` :attr:`last` holds its BankOutput.

        See :mod:`attnselect.hooks` for the supported hosts. Returns a handle with ``remove()`` that is also a
        context manager; attaching twice to the same model raises.
        """
        from .hooks.attach import attach_bank

        return attach_bank(self, model, layers=layers, query=query, tower=tower)

    def detach(self) -> None:
        """Remove every hook this bank placed on host models."""
        from .hooks.attach import detach_bank

        detach_bank(self)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"
