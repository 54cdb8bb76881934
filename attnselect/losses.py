"""Training losses for image-text retrieval: TAL, CID, ID and SDM.

All losses compute in fp32 whatever the input dtype (and with autocast switched off), because TAL's
``exp(s / tau)`` with ``tau = 0.015`` reaches ``e^66.7``, far beyond the fp16 range. Each loss can gather its inputs
from every ``torch.distributed`` rank (``gather=True``) so that negatives come from the global batch; gradients flow
back to the local shard (see :func:`all_gather_with_grad`). Without an initialised process group the option is a
no-op.

Formulas, published quirks and the options reproducing them: ``docs/losses_metrics.md``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CIDLoss",
    "CIDOutput",
    "all_gather_with_grad",
    "id_loss",
    "sdm_loss",
    "tal_loss",
]

logger = logging.getLogger(__name__)

# The published TAL clamps the sum of exponentials over negatives at 10e35 (= 1e36) before the log.
_TAL_CLAMP = 1e36
_LOG_TAL_CLAMP = math.log(_TAL_CLAMP)


# --------------------------------------------------------------------------------------------------------------
# distributed gather
# --------------------------------------------------------------------------------------------------------------
def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _AllGather(torch.autograd.Function):
    """Concatenate a tensor's rows from every rank; the backward returns this rank's slice of the summed gradient.

    Every rank computes its loss on the full gathered batch, so the gradient of the sum of all ranks' losses with
    respect to the local rows is the all-reduced (summed) incoming gradient restricted to those rows. Combined with
    DDP's gradient averaging this yields exactly the gradient of the global-batch loss. Ranks may hold different
    numbers of rows (the last batch of an epoch): rows are padded to the largest count for the collective.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        world = torch.distributed.get_world_size()
        rank = torch.distributed.get_rank()
        n_local = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
        counts = [torch.zeros_like(n_local) for _ in range(world)]
        torch.distributed.all_gather(counts, n_local)
        sizes = [int(c.item()) for c in counts]
        n_max = max(sizes)
        padded = tensor.contiguous()
        if tensor.shape[0] < n_max:
            pad = tensor.new_zeros((n_max - tensor.shape[0], *tensor.shape[1:]))
            padded = torch.cat([padded, pad], dim=0)
        buffers = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(buffers, padded)
        ctx.sizes = sizes
        ctx.rank = rank
        return torch.cat([b[:s] for b, s in zip(buffers, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad_output.contiguous().clone()
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (``[n_r, ...]`` on rank r) over all ranks in rank order, differentiably.

    Returns ``tensor`` itself when ``torch.distributed`` is not initialised or the world has one process. Integer
    tensors (identity labels) are gathered without autograd.

    Args:
        tensor: ``[n, ...]`` local rows; ranks may hold different ``n``.

    Returns:
        ``[sum_r n_r, ...]``.

    Examples:
        >>> x = torch.randn(3, 4)
        >>> all_gather_with_grad(x) is x  # one process: nothing to gather
        True
    """
    if not _dist_ready() or torch.distributed.get_world_size() == 1:
        return tensor
    if tensor.is_floating_point() and tensor.requires_grad:
        return _AllGather.apply(tensor)
    with torch.no_grad():
        return _AllGather.forward(_NoCtx(), tensor)


class _NoCtx:
    """Attribute sink standing in for an autograd ctx when gathering without gradients."""


# --------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------
def _check_pair(image_features: Tensor, text_features: Tensor, pids: Tensor, fn: str) -> None:
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must have shape [B, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"{fn}: image_features and text_features must have the same batch size B, got "
            f"{image_features.shape[0]} and {text_features.shape[0]}"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"{fn}: image_features [B, D] and text_features [B, D] must share D, got "
            f"{image_features.shape[1]} and {text_features.shape[1]}"
        )
    if image_features.shape[0] == 0:
        raise ValueError(f"{fn}: the batch is empty (B = 0)")
    _check_pids(pids, image_features.shape[0], fn)


def _check_pids(pids: Tensor, batch: int, fn: str, name: str = "pids") -> None:
    if not isinstance(pids, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(pids).__name__}")
    if pids.dim() != 1 or pids.shape[0] != batch:
        raise ValueError(f"{fn}: {name} must be a 1-D tensor of shape [B] = [{batch}], got {tuple(pids.shape)}")
    if pids.is_floating_point() or pids.is_complex() or pids.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be an integer tensor, got {pids.dtype}")


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------------------------------------------
# TAL
# --------------------------------------------------------------------------------------------------------------
def _tal_direction(scores: Tensor, positive: Tensor, tau: float, margin: float) -> Tensor:
    """One TAL direction for anchors on the rows of ``scores`` ([B, B] fp32, positive bool [B, B]) -> [B]."""
    logits = scores / tau
    # Positive weights: softmax over each row's positives only (the diagonal is always positive), no gradient.
    alpha = torch.softmax(logits.masked_fill(~positive, float("-inf")), dim=1).detach()
    pos_term = (alpha * scores).sum(dim=1)
    negative = ~positive
    has_neg = negative.any(dim=1)
    # log(min(sum_neg exp(s / tau), 1e36)) computed as min(logsumexp, log 1e36): identical values, no overflow.
    # Rows without negatives get a dummy finite input so that neither value nor gradient becomes NaN; their
    # loss is 0 (the published loss gives log(0) = -inf there, which the hinge turns into 0).
    safe = torch.where(has_neg[:, None], logits.masked_fill(positive, float("-inf")), torch.zeros_like(logits))
    lse = torch.logsumexp(safe, dim=1).clamp(max=_LOG_TAL_CLAMP)
    hinge = (margin - pos_term + tau * lse).clamp(min=0)
    return torch.where(has_neg, hinge, torch.zeros_like(hinge))


def tal_loss(
    image_features: Tensor,
    text_features: Tensor,
    pids: Tensor,
    tau: float = 0.015,
    margin: float = 0.1,
    reduction: str = "sum",
    *,
    gather: bool = False,
) -> Tensor:
    """Triplet Alignment Loss (RDE, CVPR 2024), as used by ITSELF.

    With cosine similarities ``s_ij = cos(t_i, v_j)``, positives ``P_ij = [y_i == y_j]`` and negatives ``N = 1 - P``::

        l_i^t2i = max(0, m - sum_j alpha_ij s_ij + tau * log(min(sum_j N_ij exp(s_ij / tau), 1e36)))

    with ``alpha_i = softmax over the positives of row i of s / tau`` (detached), and the same on the transposed
    matrix for the image anchors. A row without negatives contributes 0 (never NaN).

    Args:
        image_features: ``[B, D]`` image embeddings (normalised inside).
        text_features: ``[B, D]`` text embeddings of the same pairs.
        pids: ``[B]`` integer identity labels.
        tau: temperature of the log-sum-exp over negatives.
        margin: hinge margin ``m``.
        reduction: ``"sum"`` (published: sum over the batch of both directions), ``"mean"`` (divided by B) or
            ``"none"`` (``[B]``: text-anchored plus image-anchored term of pair i).
        gather: gather features and pids from all distributed ranks first (no-op when not distributed).

    Returns:
        A scalar fp32 tensor, or ``[B]`` (``[B_global]`` with ``gather``) for ``reduction="none"``.

    Examples:
        >>> v, t = torch.randn(4, 16), torch.randn(4, 16)  # [B,D]
        >>> pids = torch.tensor([0, 0, 1, 2])
        >>> tal_loss(v, t, pids).shape, tal_loss(v, t, pids, reduction="none").shape
        (torch.Size([]), torch.Size([4]))
        >>> tal_loss(torch.eye(4), torch.eye(4), torch.arange(4))  # aligned pairs, orthogonal negatives
        tensor(0.)
    """
    _check_pair(image_features, text_features, pids, "tal_loss")
    if tau <= 0:
        raise ValueError(f"tal_loss: tau must be > 0, got {tau}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"tal_loss: reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    with _no_autocast(image_features.device):
        v = F.normalize(image_features.float(), dim=-1)
        t = F.normalize(text_features.float(), dim=-1)
        pids = pids.to(v.device)
        if gather:
            v, t, pids = all_gather_with_grad(v), all_gather_with_grad(t), all_gather_with_grad(pids)
        positive = pids[:, None] == pids[None, :]
        scores = t @ v.t()  # rows: texts, columns: images
        loss = _tal_direction(scores, positive, tau, margin) + _tal_direction(scores.t(), positive, tau, margin)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


# --------------------------------------------------------------------------------------------------------------
# ID
# --------------------------------------------------------------------------------------------------------------
def id_loss(
    image_logits: Tensor,
    text_logits: Tensor,
    pids: Tensor,
    *,
    combine: str = "sum",
    gather: bool = False,
) -> Tensor:
    """Identity classification loss: cross-entropy of both modalities' logits against the identity labels.

    Args:
        image_logits: ``[B, C']`` classifier logits of the image features.
        text_logits: ``[B, C']`` classifier logits of the text features (usually the same classifier).
        pids: ``[B]`` integer labels in ``[0, C')``.
        combine: ``"sum"`` (ITSELF: ``CE_img + CE_txt``) or ``"mean"`` (IRRA: ``(CE_img + CE_txt) / 2``).
        gather: gather logits and labels from all ranks first (global-batch mean).

    Returns:
        Scalar fp32 tensor.

    Examples:
        >>> logits = torch.zeros(4, 10)  # [B,C']: uniform predictions, CE = log(10) per modality
        >>> id_loss(logits, logits, torch.tensor([0, 1, 2, 3]))
        tensor(4.6052)
        >>> id_loss(logits, logits, torch.tensor([0, 1, 2, 3]), combine="mean")
        tensor(2.3026)
    """
    for name, t in (("image_logits", image_logits), ("text_logits", text_logits)):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(
                f"id_loss: {name} must be a floating-point tensor of shape [B, C], got "
                f"{getattr(t, 'shape', type(t).__name__)}"
            )
    if image_logits.shape != text_logits.shape:
        raise ValueError(
            f"id_loss: image_logits and text_logits must have the same shape [B, C], got "
            f"{tuple(image_logits.shape)} and {tuple(text_logits.shape)}"
        )
    _check_pids(pids, image_logits.shape[0], "id_loss")
    if combine not in ("sum", "mean"):
        raise ValueError(f"id_loss: combine must be 'sum' or 'mean', got {combine!r}")
    num_classes = image_logits.shape[1]
    if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= num_classes):
        raise ValueError(
            f"id_loss: pids must lie in [0, {num_classes}) (C = logits.shape[1]), got range "
            f"[{int(pids.min())}, {int(pids.max())}]"
        )
    with _no_autocast(image_logits.device):
        li, lt = image_logits.float(), text_logits.float()
        pids = pids.to(device=li.device, dtype=torch.long)
        if gather:
            li, lt, pids = all_gather_with_grad(li), all_gather_with_grad(lt), all_gather_with_grad(pids)
        loss = F.cross_entropy(li, pids) + F.cross_entropy(lt, pids)
    return loss if combine == "sum" else loss / 2


# --------------------------------------------------------------------------------------------------------------
# SDM
# --------------------------------------------------------------------------------------------------------------
def sdm_loss(
    image_features: Tensor,
    text_features: Tensor,
    pids: Tensor,
    logit_scale: float | Tensor = 50.0,
    *,
    image_ids: Tensor | None = None,
    factor: float = 0.3,
    epsilon: float = 1e-8,
    gather: bool = False,
) -> Tensor:
    """Similarity Distribution Matching (IRRA, CVPR 2023).

    ``p_i = softmax_j(logit_scale * s_ij)`` and the target ``q_i = P_i / sum_j P_ij``;
    ``loss = mean_i KL(p_i || q_i)`` computed as ``sum_j p_ij (log p_ij - log(q_ij + eps))``, for the image-to-text
    and text-to-image directions, summed.

    Args:
        image_features: ``[B, D]``.
        text_features: ``[B, D]``.
        pids: ``[B]`` integer identities.
        logit_scale: inverse temperature (IRRA: ``1 / 0.02 = 50``); a tensor keeps its gradient.
        image_ids: optional ``[B]`` image identifiers; with them, same-identity pairs from other images get the
            label weight ``factor`` and same-image pairs 1 (IRRA's option), before row normalisation.
        factor: weight of same-identity, different-image pairs when ``image_ids`` is given.
        epsilon: added to the target before its log.
        gather: gather features, pids (and image ids) from all ranks first.

    Returns:
        Scalar fp32 tensor.

    Examples:
        >>> v, t = torch.randn(4, 16), torch.randn(4, 16)  # [B,D]
        >>> loss = sdm_loss(v, t, torch.tensor([0, 0, 1, 2]))
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
    """
    _check_pair(image_features, text_features, pids, "sdm_loss")
    if image_ids is not None:
        _check_pids(image_ids, pids.shape[0], "sdm_loss", name="image_ids")
    with _no_autocast(image_features.device):
        v = F.normalize(image_features.float(), dim=-1)
        t = F.normalize(text_features.float(), dim=-1)
        pids = pids.to(v.device)
        image_ids = image_ids.to(v.device) if image_ids is not None else None
        if gather:
            v, t, pids = all_gather_with_grad(v), all_gather_with_grad(t), all_gather_with_grad(pids)
            if image_ids is not None:
                image_ids = all_gather_with_grad(image_ids)
        labels = (pids[:, None] == pids[None, :]).float()
        if image_ids is not None:
            same_image = (image_ids[:, None] == image_ids[None, :]).float()
            labels = (labels - same_image) * factor + same_image
        target = labels / labels.sum(dim=1, keepdim=True)
        log_target = torch.log(target + epsilon)
        scale = logit_scale.float() if isinstance(logit_scale, Tensor) else float(logit_scale)
        t2i = scale * (t @ v.t())
        loss = 0.0
        for logits in (t2i.t(), t2i):  # image-to-text rows, then text-to-image rows
            log_p = F.log_softmax(logits, dim=1)
            loss = loss + (log_p.exp() * (log_p - log_target)).sum(dim=1).mean()
    return loss


# --------------------------------------------------------------------------------------------------------------
# CID
# --------------------------------------------------------------------------------------------------------------
@dataclass
class CIDOutput:
    """Result of :class:`CIDLoss`.

    Attributes:
        pair_loss: scalar, ``0.5 * (CE(W_pair g([v; t])) + CE(W_pair g([t; v])))`` over the 3B pairs.
        id_loss: scalar, ``CE(W_id v, y) + CE(W_id t, y)`` (0 when the module was built with ``use_id=False``).
        image_negatives: ``[B]`` index of the hardest negative image of each text (-1: none in the batch).
        text_negatives: ``[B]`` index of the hardest negative text of each image (-1: none in the batch).

    Examples:
        >>> pids = torch.tensor([0, 0, 1, 2])
        >>> out = CIDLoss(dim=16, num_classes=3)(torch.randn(4, 16), torch.randn(4, 16), pids)
        >>> out.image_negatives.shape, bool((pids[out.image_negatives] != pids).all())  # never the same identity
        (torch.Size([4]), True)
    """

    pair_loss: Tensor
    id_loss: Tensor
    image_negatives: Tensor
    text_negatives: Tensor

    @property
    def total(self) -> Tensor:
        """``pair_loss + id_loss`` (the published weighting: plain sum)."""
        return self.pair_loss + self.id_loss


def hardest_negatives(similarity: Tensor, pids_rows: Tensor, pids_cols: Tensor) -> tuple[Tensor, Tensor]:
    """For every row, the column with the highest similarity among columns of a different identity.

    Args:
        similarity: ``[R, K]``.
        pids_rows: ``[R]`` identities of the rows.
        pids_cols: ``[K]`` identities of the columns.

    Returns:
        ``(index [R] int64, valid [R] bool)``; ties go to the lowest column index; ``valid`` is False (index 0)
        for rows whose identity is shared by every column.
    """
    same = pids_rows[:, None] == pids_cols[None, :]
    masked = similarity.masked_fill(same, float("-inf"))
    return masked.argmax(dim=1), (~same).any(dim=1)


class CIDLoss(nn.Module):
    """Cross-modal identity discrimination with hardest in-batch negatives (UFineBench/CFAM, as used by ITSELF).

    For a batch of pairs ``(v_i, t_i, y_i)`` the hardest negative text of image i (highest cosine among texts of
    another identity) and the hardest negative image of text i are found without Python loops. The 3B pairs
    ``(v_i, t_i) -> y_i``, ``(v_neg(i), t_i) -> NEG`` and ``(v_i, t_neg(i)) -> NEG`` go through the pair head
    ``g = Linear(2D, D) -> LayerNorm(D) -> GELU`` in both concatenation orders and the pair classifier
    ``Linear(D, C + 1)``. ``NEG`` is the extra mismatch class ``C`` by default; ``negative_label="batch_max"``
    reproduces the published label ``max(y in batch) + 1`` (which usually collides with a real identity).
    Anchors whose identity fills the whole batch have no negative; their negative pairs are left out.

    The identity loss ``CE(W_id v, y) + CE(W_id t, y)`` uses a separate ``Linear(D, C + 1)`` shared by both
    modalities. Both classifiers are initialised Normal(0, 0.001) with zero bias.

    Args:
        dim: feature width D.
        num_classes: number of training identities C (labels in ``[0, C)``).
        negative_label: ``"extra"`` (class C) or ``"batch_max"`` (published quirk).
        use_id: also compute the identity loss.
        gather: gather features and pids from all ranks before mining negatives.

    Forward:
        ``forward(image_features [B, D], text_features [B, D], pids [B]) -> CIDOutput``.

    Examples:
        >>> cid = CIDLoss(dim=16, num_classes=5)
        >>> out = cid(torch.randn(4, 16), torch.randn(4, 16), torch.tensor([0, 0, 1, 2]))  # [B,D], [B,D], [B]
        >>> out.pair_loss.shape, out.id_loss.shape, out.text_negatives.shape
        (torch.Size([]), torch.Size([]), torch.Size([4]))
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        negative_label: str = "extra",
        use_id: bool = True,
        gather: bool = False,
    ) -> None:
        super().__init__()
        if dim < 1 or num_classes < 1:
            raise ValueError(f"CIDLoss: dim and num_classes must be >= 1, got {dim} and {num_classes}")
        if negative_label not in ("extra", "batch_max"):
            raise ValueError(f"CIDLoss: negative_label must be 'extra' or 'batch_max', got {negative_label!r}")
        self.dim = dim
        self.num_classes = num_classes
        self.negative_label = negative_label
        self.use_id = use_id
        self.gather = gather
        self.pair_head = nn.Sequential(nn.Linear(2 * dim, dim), nn.LayerNorm(dim), nn.GELU())
        self.pair_classifier = nn.Linear(dim, num_classes + 1)
        self.id_classifier = nn.Linear(dim, num_classes + 1) if use_id else None
        for layer in (self.pair_classifier, self.id_classifier):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.001)
                nn.init.zeros_(layer.bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_classes={self.num_classes}, negative_label={self.negative_label!r}, "
            f"use_id={self.use_id}, gather={self.gather}"
        )

    def forward(self, image_features: Tensor, text_features: Tensor, pids: Tensor) -> CIDOutput:
        _check_pair(image_features, text_features, pids, "CIDLoss")
        if image_features.shape[1] != self.dim:
            raise ValueError(f"CIDLoss: features must have D = {self.dim}, got {image_features.shape[1]}")
        if int(pids.min()) < 0 or int(pids.max()) >= self.num_classes:
            raise ValueError(
                f"CIDLoss: pids must lie in [0, {self.num_classes}) (num_classes), got range "
                f"[{int(pids.min())}, {int(pids.max())}]"
            )
        with _no_autocast(image_features.device):
            v = image_features.float()
            t = text_features.float()
            pids = pids.to(v.device)
            if self.gather:
                v, t, pids = all_gather_with_grad(v), all_gather_with_grad(t), all_gather_with_grad(pids)
            pids = pids.long()
            with torch.no_grad():
                sim = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()  # rows images, columns texts
                text_neg, text_ok = hardest_negatives(sim, pids, pids)  # per image
                image_neg, image_ok = hardest_negatives(sim.t(), pids, pids)  # per text
            if self.negative_label == "extra":
                neg = self.num_classes
            else:
                neg = int(pids.max()) + 1
            batch = torch.arange(v.shape[0], device=v.device)
            vi = torch.cat([batch, image_neg[image_ok], batch[text_ok]])
            ti = torch.cat([batch, batch[image_ok], text_neg[text_ok]])
            labels = torch.cat([pids, pids.new_full((vi.shape[0] - batch.shape[0],), neg)])  # no read-back
            pv, pt = v[vi], t[ti]
            logits1 = self.pair_classifier(self.pair_head(torch.cat([pv, pt], dim=1)))
            logits2 = self.pair_classifier(self.pair_head(torch.cat([pt, pv], dim=1)))
            pair = 0.5 * (F.cross_entropy(logits1, labels) + F.cross_entropy(logits2, labels))
            if self.id_classifier is not None:
                ident = F.cross_entropy(self.id_classifier(v), pids) + F.cross_entropy(self.id_classifier(t), pids)
            else:
                ident = pair.new_zeros(())
        return CIDOutput(
            pair_loss=pair,
            id_loss=ident,
            image_negatives=torch.where(image_ok, image_neg, torch.full_like(image_neg, -1)),
            text_negatives=torch.where(text_ok, text_neg, torch.full_like(text_neg, -1)),
        )
