"""Figures of what the selection sees: saliency, kept tokens, per-layer entropy, selection frequency, token budget.

Two kinds of functions live here:

- **Pure helpers** that compute the data of a figure (``patch_grid_scores``, ``kept_patch_mask``,
  ``attention_entropy``, ``selection_frequency``, ``token_schedule``). They take and return tensors / numbers and are
  safe to use anywhere (logging, tests, notebooks).
- **Figure builders** (``plot_*``) that draw with matplotlib's Agg canvas and return a
  :class:`matplotlib.figure.Figure`. They never call ``pyplot`` (so they never open a window and never touch global
  figure state); pass ``save="file.png"`` to write a PNG, or ``ax=`` to draw into an existing axes.

Token layouts: a ViT sequence is ``[prefix tokens, patches]``. ``num_prefix_tokens`` is 1 for a CLS token
(CLIP, ViT, DINOv2), ``1 + R`` with R register tokens (timm ``reg_tokens``, HF DINOv2-with-registers) and 0 without
CLS (SigLIP vision, timm ``class_token=False``). ``grid`` is ``(rows, cols)`` of the patch grid, e.g. ``(14, 14)``
for ViT-B/16 at 224x224 and ``(24, 8)`` for a 384x128 person crop.

matplotlib is imported on first use of a figure builder, so ``import attnselect.viz`` stays cheap.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .scheduler import AdaptiveTokenScheduler

__all__ = [
    "SelectionCounter",
    "attention_entropy",
    "figure_to_array",
    "image_to_array",
    "infer_grid",
    "kept_patch_mask",
    "patch_grid_scores",
    "plot_attention_entropy",
    "plot_inspection",
    "plot_kept_tokens",
    "plot_pruning_stages",
    "plot_saliency",
    "plot_selection_frequency",
    "plot_token_schedule",
    "query_row_saliency",
    "save_figure",
    "selection_frequency",
    "token_schedule",
]

PathLike = str | Path


# --------------------------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------------------------
def _check_prefix(num_prefix_tokens: object) -> int:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    return num_prefix_tokens


def _check_grid(grid: object) -> tuple[int, int]:
    """``(rows, cols)`` from a pair of positive integers (Python, numpy or 0-d torch integers, or a length-2
    integer array / tensor)."""
    items = grid.tolist() if isinstance(grid, (np.ndarray, Tensor)) else grid
    out = []
    if isinstance(items, (tuple, list)) and len(items) == 2:
        for g in items:
            if isinstance(g, (bool, np.bool_)) or (isinstance(g, Tensor) and g.dtype == torch.bool):
                break
            try:
                value = operator.index(g)
            except TypeError:
                break
            if value < 1:
                break
            out.append(value)
    if len(out) != 2:
        raise ValueError(f"grid must be a pair of positive ints (rows, cols), got {grid!r}")
    return out[0], out[1]


def infer_grid(num_patches: int, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Guess the patch grid ``(rows, cols)`` of ``num_patches`` patches.

    Without ``image_size`` the grid must be square. With ``image_size = (height, width)`` the factorisation
    ``rows * cols = num_patches`` whose aspect ratio is closest to the image's is chosen (a 384x128 crop with 192
    patches gives ``(24, 8)``).

    Args:
        num_patches: patch count ``rows * cols`` (the token count N minus the prefix tokens).
        image_size: optional ``(height, width)`` of the input image.

    Returns:
        ``(rows, cols)``.

    Raises:
        ValueError: when no grid fits; pass ``grid=`` explicitly then.

    Examples:
        >>> infer_grid(196)
        (14, 14)
        >>> infer_grid(192, image_size=(384, 128))
        (24, 8)
    """
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
    if image_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"{num_patches} patches do not form a square grid; pass grid=(rows, cols) or the image size"
            )
        return side, side
    height, width = _check_grid(image_size)
    target = math.log(height / width)
    pairs = [(r, num_patches // r) for r in range(1, num_patches + 1) if num_patches % r == 0]
    return min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1]) - target))


def _resolve_grid(
    n_tokens: int,
    grid: tuple[int, int] | None,
    num_prefix_tokens: int,
    name: str,
    image_size: tuple[int, int] | None = None,
    padded: bool = False,
) -> tuple[int, int]:
    num_prefix_tokens = _check_prefix(num_prefix_tokens)
    num_patches = n_tokens - num_prefix_tokens
    if num_patches < 1:
        raise ValueError(f"{name} has {n_tokens} tokens, not more than num_prefix_tokens={num_prefix_tokens}")
    if grid is None:
        if image_size is not None:
            guess = infer_grid(num_patches, image_size=image_size)
            how = f"the image's aspect ratio {image_size[0]}x{image_size[1]}"
        else:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(
                    f"{name}: {num_patches} patches do not form a square grid and there is no image to take the aspect "
                    f"ratio from; pass grid=(rows, cols) (e.g. (24, 8) for a 384x128 crop with 16-pixel patches)"
                )
            guess, how = (side, side), "a square layout"
        warnings.warn(
            f"{name}: no grid given; {num_patches} patches laid out as {guess[0]}x{guess[1]} from {how}. Pass "
            "grid= (AttentionCapture.grid, or .grids[i] for variable-resolution inputs) to draw the host's own grid",
            stacklevel=3,
        )
        return guess
    rows, cols = _check_grid(grid)
    if rows * cols < num_patches and padded:  # variable resolution: the real patches first, then padding
        return rows, cols
    if rows * cols != num_patches:
        raise ValueError(
            f"{name} has {n_tokens} tokens = {num_prefix_tokens} prefix + {num_patches} patches, which does not match "
            f"grid {rows}x{cols} = {rows * cols} patches; check grid and num_prefix_tokens"
        )
    return rows, cols


def _as_tensor(x: object, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


# --------------------------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------------------------
def patch_grid_scores(
    saliency: Tensor | np.ndarray, grid: tuple[int, int] | None = None, num_prefix_tokens: int = 1
) -> Tensor:
    """Drop the prefix tokens of per-token scores and lay the patch scores out on the patch grid.

    Args:
        saliency: ``[N]`` or ``[B,N]`` scores over the whole token sequence (e.g. ``BankOutput.saliency``), where
            ``N = num_prefix_tokens + rows * cols``.
        grid: ``(rows, cols)``; None infers a square grid.
        num_prefix_tokens: tokens before the patches (CLS and register tokens).

    Returns:
        fp32 ``[rows, cols]`` (or ``[B, rows, cols]``), row-major as the patch embedding flattens them, detached.

    Examples:
        >>> patch_grid_scores(torch.arange(7.0), grid=(2, 3), num_prefix_tokens=1)
        tensor([[1., 2., 3.],
                [4., 5., 6.]])
    """
    s = _as_tensor(saliency, "saliency")
    if s.dim() not in (1, 2):
        raise ValueError(f"saliency must have shape [N] or [B,N], got {tuple(s.shape)}")
    patches = s.detach()[..., num_prefix_tokens:].float()
    # a sample of a variable-resolution (NaFlex) batch: its rows x cols real patches come first, then padding, whose
    # scores a padded rollout leaves at 0
    rows, cols = _resolve_grid(s.shape[-1], grid, num_prefix_tokens, "saliency", padded=True)
    if rows * cols < patches.shape[-1]:
        if bool(patches[..., rows * cols :].any()):
            raise ValueError(
                f"saliency has {patches.shape[-1]} patches for grid {rows}x{cols}, and the ones beyond it are not 0 "
                "(padding): check grid and num_prefix_tokens"
            )
        patches = patches[..., : rows * cols]
    return patches.reshape(*s.shape[:-1], rows, cols)


def kept_patch_mask(
    indices: Tensor | np.ndarray,
    grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    mask: Tensor | np.ndarray | None = None,
) -> Tensor:
    """Bool map of the patches a bank kept.

    Args:
        indices: ``[k]`` or ``[B,k]`` kept token positions (``BankOutput.indices``), in the full sequence.
        grid: ``(rows, cols)`` of the patch grid.
        num_prefix_tokens: tokens before the patches; kept prefix tokens are not patches and are ignored.
        mask: optional bool ``[k]`` / ``[B,k]`` (``BankOutput.mask``); entries where it is False are ignored.

    Returns:
        bool ``[rows, cols]`` (or ``[B, rows, cols]``), True where the patch was kept.

    Examples:
        >>> kept_patch_mask(torch.tensor([1, 4, 6]), grid=(2, 3))  # CLS at 0: tokens 1, 4, 6 are patches 0, 3, 5
        tensor([[ True, False, False],
                [ True, False,  True]])
    """
    rows, cols = _check_grid(grid)
    num_prefix_tokens = _check_prefix(num_prefix_tokens)
    idx = _as_tensor(indices, "indices")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"indices must hold integer token positions, got dtype {idx.dtype}")
    if idx.dim() not in (1, 2):
        raise ValueError(f"indices must have shape [k] or [B,k], got {tuple(idx.shape)}")
    n_tokens = num_prefix_tokens + rows * cols
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_tokens):
        raise ValueError(
            f"indices must lie in [0, {n_tokens}) for grid {rows}x{cols} with {num_prefix_tokens} prefix tokens"
        )
    squeeze = idx.dim() == 1
    idx = idx.reshape(-1, idx.shape[-1]).long().cpu()
    keep = torch.ones_like(idx, dtype=torch.bool)
    if mask is not None:
        m = _as_tensor(mask, "mask")
        if m.dtype != torch.bool or m.numel() != idx.numel():
            raise ValueError(f"mask must be a bool tensor shaped like indices {tuple(indices.shape)}")
        keep = m.reshape(idx.shape).cpu()
    keep = keep & (idx >= num_prefix_tokens)
    # scatter_add, not scatter: a masked-out repeat of a kept index must not overwrite its True
    hits = torch.zeros(idx.shape[0], n_tokens, dtype=torch.long).scatter_add_(1, idx, keep.long())
    out = (hits > 0)[:, num_prefix_tokens:].reshape(-1, rows, cols)
    return out[0] if squeeze else out


def query_row_saliency(attn: Tensor, query: int | Tensor = 0) -> Tensor:
    """The attention a query token pays to every token of one layer: row ``query`` of the head-fused map.

    Args:
        attn: ``[B,N,N]`` or ``[B,H,N,N]`` attention probabilities (heads are averaged).
        query: the query row (0 for CLS), or a LongTensor ``[B]`` of per-sample rows.

    Returns:
        fp32 ``[B,N]``.

    Examples:
        >>> query_row_saliency(torch.softmax(torch.randn(2, 4, 5, 5), -1), query=0).shape  # [B,H,N,N] -> [B,N]
        torch.Size([2, 5])
        >>> query_row_saliency(torch.eye(3).unsqueeze(0), query=1)
        tensor([[0., 1., 0.]])
    """
    a = _as_tensor(attn, "attn")
    if a.dim() == 4:
        a = a.float().mean(dim=1)
    if a.dim() != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attn must have shape [B,N,N] or [B,H,N,N], got {tuple(attn.shape)}")
    batch, n = a.shape[0], a.shape[-1]
    if isinstance(query, Tensor):
        q = query.to(device=a.device, dtype=torch.long).reshape(-1)
        if q.numel() != batch:
            raise ValueError(f"query as a tensor must have shape [B] = [{batch}], got {tuple(query.shape)}")
    elif isinstance(query, int) and not isinstance(query, bool):
        q = torch.full((batch,), query, dtype=torch.long, device=a.device)
    else:
        raise TypeError(f"query must be an int or a LongTensor [B], got {type(query).__name__}")
    if int(q.min()) < 0 or int(q.max()) >= n:
        raise ValueError(f"query rows must lie in [0, {n})")
    return a.detach().float()[torch.arange(batch, device=a.device), q]


def _entropy_of(attn: Tensor, head_fusion: str | None, normalize: bool) -> float:
    a = attn.detach().float()
    if a.dim() == 4 and head_fusion is not None:
        if head_fusion != "mean":
            raise ValueError(f"head_fusion must be None or 'mean', got {head_fusion!r}")
        a = a.mean(dim=1)
    if a.dim() not in (3, 4) or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"each map must have shape [B,N,N] or [B,H,N,N], got {tuple(attn.shape)}")
    if a.numel() and (not bool(torch.isfinite(a).all()) or float(a.min()) < 0):
        raise ValueError("attention maps must be finite and non-negative")
    rowsum = a.sum(dim=-1)
    live = rowsum > 0  # rows blocked entirely (all-zero) carry no distribution and are left out
    p = a / rowsum.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    ent = -(p * torch.log(p.clamp(min=torch.finfo(torch.float32).tiny))).sum(dim=-1)
    if not bool(live.any()):
        raise ValueError("every row of the attention map is zero; no entropy can be computed")
    value = float(ent[live].mean())
    if normalize:
        n = a.shape[-1]
        value = value / math.log(n) if n > 1 else 0.0
    return value


def attention_entropy(
    maps: Mapping[int, Tensor] | Sequence[Tensor], *, head_fusion: str | None = None, normalize: bool = False
) -> dict[int, float]:
    """Mean row entropy of each layer's attention: the layer-choice diagnostic of ITSELF (its Fig. 7).

    Each row (query) of an attention map is a distribution over keys; its entropy ``-sum_j p_j log p_j`` (nats) is
    low where the query attends to few tokens. The value per layer is the mean over rows, heads and samples. Rows are
    renormalised to sum 1 first and all-zero rows (fully masked queries) are left out.

    Args:
        maps: a mapping ``layer index -> map`` (e.g. ``AttentionCapture.maps``) or a per-layer sequence (index =
            position), each map ``[B,N,N]`` or ``[B,H,N,N]``.
        head_fusion: None averages the entropy of every head (``[B,H,N,N]`` maps); ``"mean"`` averages the heads'
            maps first and takes the entropy of the fused map.
        normalize: divide by ``log N`` so that 1 is uniform attention and layers of different N compare.

    Returns:
        ``{layer: mean entropy}`` in ascending layer order.

    Examples:
        >>> attention_entropy({0: torch.full((1, 4, 4), 0.25)})  # uniform over 4 keys: log 4
        {0: 1.3862943649291992}
    """
    if isinstance(maps, Mapping):
        items = sorted(maps.items())
    elif isinstance(maps, Sequence) and not isinstance(maps, (str, bytes)):
        items = list(enumerate(maps))
    else:
        raise TypeError(f"maps must be a mapping layer -> map or a sequence of maps, got {type(maps).__name__}")
    if not items:
        raise ValueError("maps is empty: no layer to measure")
    return {int(layer): _entropy_of(_as_tensor(m, f"maps[{layer}]"), head_fusion, normalize) for layer, m in items}


class SelectionCounter:
    """Accumulates how often each token position is kept, over any number of batches.

    Use it over a data loader to see where on the image (or the body, for person crops) a bank looks::

        counter = SelectionCounter(n_tokens=193)
        for images in loader:
            model(images)
            counter.update(bank.last.indices, bank.last.mask)
        freq = counter.frequency()  # [193] share of samples that kept each token

    A token counts at most once per sample, and entries where ``mask`` is False (the repeated tail of a sample with
    fewer than k selectable tokens) are ignored.

    Args:
        n_tokens: sequence length N.

    Examples:
        >>> counter = SelectionCounter(n_tokens=4)
        >>> _ = counter.update(torch.tensor([[1, 2], [2, 3]]))  # [B,k] kept positions of one batch
        >>> _ = counter.update(torch.tensor([[2, 2]]), mask=torch.tensor([[True, False]]))  # masked tail ignored
        >>> counter.frequency()  # [N]
        tensor([0.0000, 0.3333, 1.0000, 0.3333])
    """

    def __init__(self, n_tokens: int) -> None:
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
        self.n_tokens = n_tokens
        self.counts = torch.zeros(n_tokens, dtype=torch.long)
        self.num_samples = 0

    def update(self, indices: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None) -> SelectionCounter:
        """Add one batch: ``indices`` ``[B,k]`` (or ``[k]`` for one sample) and optional bool ``mask`` alike."""
        idx = _as_tensor(indices, "indices")
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(f"indices must hold integer token positions, got dtype {idx.dtype}")
        if idx.dim() not in (1, 2):
            raise ValueError(f"indices must have shape [k] or [B,k], got {tuple(idx.shape)}")
        idx = idx.reshape(-1, idx.shape[-1]).long().cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_tokens):
            raise ValueError(f"indices must lie in [0, {self.n_tokens})")
        keep = torch.ones_like(idx, dtype=torch.bool)
        if mask is not None:
            m = _as_tensor(mask, "mask")
            if m.dtype != torch.bool or m.numel() != idx.numel():
                raise ValueError(f"mask must be a bool tensor shaped like indices {tuple(indices.shape)}")
            keep = m.reshape(idx.shape).cpu()
        hit = torch.zeros(idx.shape[0], self.n_tokens, dtype=torch.long)
        hit.scatter_add_(1, idx, keep.long())
        self.counts += (hit > 0).sum(dim=0)
        self.num_samples += idx.shape[0]
        return self

    def frequency(self) -> Tensor:
        """fp32 ``[N]``: the share of samples (0 to 1) that kept each token."""
        if self.num_samples == 0:
            raise ValueError("no sample was added; call update() first")
        return self.counts.float() / self.num_samples

    def reset(self) -> None:
        """Forget every sample."""
        self.counts.zero_()
        self.num_samples = 0


def selection_frequency(
    indices_list: Tensor | np.ndarray | Iterable[Tensor | np.ndarray],
    n_tokens: int,
    masks: Iterable[Tensor | np.ndarray | None] | Tensor | None = None,
) -> Tensor:
    """Share of samples (0 to 1) in which each token position was kept.

    Args:
        indices_list: one ``[B,k]`` tensor or an iterable of them (e.g. ``BankOutput.indices`` of every batch;
            k may differ between batches).
        n_tokens: sequence length N.
        masks: matching bool masks (``BankOutput.mask``), one per entry of ``indices_list``, or None.

    Returns:
        fp32 ``[N]``.

    Examples:
        >>> selection_frequency([torch.tensor([[1, 2], [2, 3]])], n_tokens=4)
        tensor([0.0000, 0.5000, 1.0000, 0.5000])
    """
    batches = [indices_list] if isinstance(indices_list, (Tensor, np.ndarray)) else list(indices_list)
    if masks is None:
        mask_list: list[Any] = [None] * len(batches)
    else:
        mask_list = [masks] if isinstance(masks, (Tensor, np.ndarray)) else list(masks)
        if len(mask_list) != len(batches):
            raise ValueError(f"masks has {len(mask_list)} entries but indices_list has {len(batches)}")
    counter = SelectionCounter(n_tokens)
    for idx, m in zip(batches, mask_list):
        counter.update(idx, m)
    return counter.frequency()


def token_schedule(
    scheduler: AdaptiveTokenScheduler, n: int, steps: Sequence[int] | Tensor | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Kept tokens ``k(t)`` of an :class:`~attnselect.AdaptiveTokenScheduler` out of ``n`` over training steps.

    Args:
        scheduler: the scheduler (its own counter is not changed).
        n: selectable tokens (192 for a 193-token image with CLS, 75 for CLIP text).
        steps: the steps to evaluate; default ``0 .. 1.2 * total_steps``.

    Returns:
        ``(steps, k)`` as int64 arrays.

    Examples:
        >>> from attnselect import AdaptiveTokenScheduler
        >>> steps, k = token_schedule(AdaptiveTokenScheduler(), 192, steps=[1, 145, 725, 1450])
        >>> k.tolist()
        [124, 121, 109, 96]
    """
    if not hasattr(scheduler, "num_tokens") or not hasattr(scheduler, "total_steps"):
        raise TypeError(f"scheduler must be an AdaptiveTokenScheduler, got {type(scheduler).__name__}")
    if steps is None:
        total = int(scheduler.total_steps)
        steps_arr = np.unique(np.linspace(0, int(total * 1.2), num=min(int(total * 1.2) + 1, 400)).astype(np.int64))
    else:
        steps_arr = np.asarray(steps.cpu() if isinstance(steps, Tensor) else steps, dtype=np.int64).reshape(-1)
        if steps_arr.size == 0 or int(steps_arr.min()) < 0:
            raise ValueError("steps must be a non-empty sequence of non-negative ints")
    ks = np.array([scheduler.num_tokens(n, step=int(t)) for t in steps_arr], dtype=np.int64)
    return steps_arr, ks


# --------------------------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------------------------
def image_to_array(image: Any) -> np.ndarray:
    """An image as an fp32 ``[H,W,3]`` array in ``[0, 1]``.

    Accepts a PIL image, a numpy array ``[H,W]``, ``[H,W,3]`` or ``[H,W,4]`` (uint8 or float), or a tensor
    ``[3,H,W]`` / ``[1,3,H,W]`` / ``[H,W]``. Float inputs outside ``[0, 1]`` (e.g. a CLIP-normalised tensor) are
    rescaled by their own min and max so the picture stays visible.

    Args:
        image: the picture, in one of the layouts above.

    Returns:
        fp32 ``[H,W,3]`` in ``[0, 1]``.

    Examples:
        >>> arr = image_to_array(torch.rand(3, 8, 6))  # a [3,H,W] tensor
        >>> arr.shape, arr.dtype
        ((8, 6, 3), dtype('float32'))
        >>> image_to_array(np.full((2, 2), 255, dtype=np.uint8))[0, 0]  # grey uint8 [H,W] -> RGB
        array([1., 1., 1.], dtype=float32)
    """
    if hasattr(image, "convert") and hasattr(image, "size") and not isinstance(image, (Tensor, np.ndarray)):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return arr
    if isinstance(image, Tensor):
        t = image.detach().cpu().float()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        elif t.dim() != 2:
            raise ValueError(f"image as a tensor must have shape [3,H,W], [1,3,H,W] or [H,W], got {tuple(image.shape)}")
        arr = t.numpy()
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        arr = arr.astype(np.float32)
    else:
        raise TypeError(f"image must be a PIL image, numpy array or torch.Tensor, got {type(image).__name__}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must have 1, 3 or 4 channels, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[:, :, :3]
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or inf values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.ascontiguousarray(arr, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------------------------
def _panel_size(rows: int, cols: int, base: float = 3.2, extra_width: float = 0.0) -> tuple[float, float]:
    """Figure size that fits a ``rows x cols`` picture into a ``base``-inch box (plus room for a colorbar)."""
    if rows >= cols:
        return base * cols / rows + extra_width, base + 0.3
    return base + extra_width, base * rows / cols + 0.3


def _new_figure(figsize: tuple[float, float], ax: Axes | None = None) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _new_grid_figure(n_panels: int, panel_size: tuple[float, float], max_cols: int = 6) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def save_figure(fig: Figure, path: PathLike, *, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (parent folders are created) and return the path.

    Args:
        fig: the figure.
        path: the PNG file to write.
        dpi: resolution.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from matplotlib.figure import Figure
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_figure(Figure(figsize=(2, 1)), Path(tmp) / "sub" / "fig.png")
        ...     path.name, path.stat().st_size > 0
        ('fig.png', True)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` and return its pixels as a uint8 ``[H,W,4]`` RGBA array (for loggers and tests).

    Args:
        fig: the figure.

    Returns:
        uint8 ``[H,W,4]``; ``H, W`` = the figure size in inches times its dpi.

    Examples:
        >>> from matplotlib.figure import Figure
        >>> figure_to_array(Figure(figsize=(2, 1), dpi=100)).shape
        (100, 200, 4)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba(), copy=True)


def _finish(fig: Figure, save: PathLike | None) -> Figure:
    if save is not None:
        save_figure(fig, save)
    return fig


def _heat_over(
    ax: Axes,
    scores: np.ndarray,
    image: np.ndarray | None,
    *,
    alpha: float,
    cmap: str,
    interpolation: str = "nearest",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Any:
    rows, cols = scores.shape
    if image is not None:
        height, width = image.shape[:2]
        ax.imshow(image, extent=(0, width, height, 0))
        extent = (0, width, height, 0)
    else:
        extent = (0, cols, rows, 0)
    im = ax.imshow(
        scores,
        cmap=cmap,
        alpha=alpha if image is not None else 1.0,
        extent=extent,
        interpolation=interpolation,
        vmin=vmin,
        vmax=vmax,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    return float(alpha)


def _image_at(image: Any, index: int) -> np.ndarray | None:
    """The picture of sample ``index`` as ``[H,W,3]``: a batched ``[B,3,H,W]`` tensor (or ``[B,H,W,C]`` array)
    gives its ``index``-th image; anything else is one picture (see :func:`image_to_array`)."""
    if image is None:
        return None
    batched = (isinstance(image, Tensor) and image.dim() == 4) or (isinstance(image, np.ndarray) and image.ndim == 4)
    if batched and image.shape[0] > 1:
        if not 0 <= index < image.shape[0]:
            raise ValueError(f"index {index} is out of range for image with batch size {image.shape[0]}")
        image = image[index]
    return image_to_array(image)


def _single(x: Tensor, name: str, index: int) -> Tensor:
    """The sample ``index`` of a ``[B,...]`` tensor, or the tensor itself when it has no batch axis."""
    if x.dim() == 2:
        if not 0 <= index < x.shape[0]:
            raise ValueError(f"index {index} is out of range for {name} with batch size {x.shape[0]}")
        return x[index]
    return x


def plot_saliency(
    image: Any,
    saliency: Tensor | np.ndarray,
    *,
    grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    index: int = 0,
    alpha: float = 0.5,
    cmap: str = "jet",
    title: str | None = None,
    colorbar: bool = True,
    ax: Axes | None = None,
    save: PathLike | None = None,
) -> Figure:
    """Heat map of per-token saliency over the image.

    Args:
        image: the input picture (see :func:`image_to_array`), or None to draw the patch grid alone.
        saliency: ``[N]`` or ``[B,N]`` per-token scores (``BankOutput.saliency``, a rollout query row, one layer's
            CLS row from :func:`query_row_saliency`).
        grid: patch grid ``(rows, cols)``; None infers it from the image's aspect ratio (a square grid without an
            image).
        num_prefix_tokens: CLS + register tokens before the patches (0 for SigLIP).
        index: the sample to draw when ``saliency`` (or a ``[B,3,H,W]`` image batch) has a batch axis.
        alpha: opacity of the heat map over the image.
        cmap: matplotlib colormap name.
        title: axes title.
        colorbar: draw a colorbar.
        ax: draw into this axes instead of a new figure.
        save: write a PNG to this path.

    Returns:
        The :class:`matplotlib.figure.Figure`.

    Examples:
        >>> fig = plot_saliency(torch.rand(3, 32, 48), torch.rand(7), grid=(2, 3), title="CLS row")  # N = 1 + 2 * 3
        >>> fig.axes[0].get_title()
        'CLS row'
    """
    scores = _single(_as_tensor(saliency, "saliency"), "saliency", index)
    img = _image_at(image, index)
    if grid is None:
        grid = _resolve_grid(scores.shape[-1], None, num_prefix_tokens, "saliency", _hw(img))
    heat = patch_grid_scores(scores, grid, num_prefix_tokens).cpu().numpy()
    fig, ax = _new_figure(_panel_size(*heat.shape, extra_width=0.8 if colorbar else 0.0), ax)
    im = _heat_over(ax, heat, img, alpha=_check_alpha(alpha), cmap=cmap, interpolation="bilinear")
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title, fontsize=9)
    return _finish(fig, save)


def _hw(img: np.ndarray | None) -> tuple[int, int] | None:
    return None if img is None else (int(img.shape[0]), int(img.shape[1]))


def _draw_kept(ax: Axes, keep: np.ndarray, image: np.ndarray | None, *, dim: float, color: str) -> None:
    rows, cols = keep.shape
    if image is None:
        image = np.full((rows, cols, 3), 0.85, dtype=np.float32)
    height, width = image.shape[:2]
    ph, pw = height / rows, width / cols
    # Dim the patches that were dropped, at the image's own resolution.
    ys = (np.arange(height) / ph).astype(np.int64).clip(0, rows - 1)
    xs = (np.arange(width) / pw).astype(np.int64).clip(0, cols - 1)
    shade = (~keep)[ys][:, xs]
    out = image.copy()
    out[shade] = out[shade] * (1.0 - dim)
    ax.imshow(out, extent=(0, width, height, 0), interpolation="nearest")
    from matplotlib.patches import Rectangle

    for r, c in zip(*np.nonzero(keep)):
        ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor=color, linewidth=0.8))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_kept_tokens(
    image: Any,
    indices: Tensor | np.ndarray,
    *,
    grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    mask: Tensor | np.ndarray | None = None,
    index: int = 0,
    dim: float = 0.7,
    color: str = "lime",
    title: str | None = None,
    ax: Axes | None = None,
    save: PathLike | None = None,
) -> Figure:
    """The image with the kept patches outlined and the dropped ones dimmed.

    Args:
        image: the input picture (see :func:`image_to_array`), or None for a plain patch grid.
        indices: ``[k]`` or ``[B,k]`` kept token positions (``BankOutput.indices``).
        grid: patch grid ``(rows, cols)``.
        num_prefix_tokens: CLS + register tokens before the patches.
        mask: optional ``BankOutput.mask`` (False entries are not drawn).
        index: the sample to draw when ``indices`` (or a ``[B,3,H,W]`` image batch) has a batch axis.
        dim: how much to darken dropped patches, in ``[0, 1]``.
        color: outline colour of kept patches.
        title: axes title (default: ``"kept k of P patches"``).
        ax: draw into this axes instead of a new figure.
        save: write a PNG to this path.

    Returns:
        The :class:`matplotlib.figure.Figure`.

    Examples:
        >>> fig = plot_kept_tokens(None, torch.tensor([1, 4, 6]), grid=(2, 3))  # [k] kept positions, CLS at 0
        >>> fig.axes[0].get_title()
        'kept 3 of 6 patches'
    """
    idx = _single(_as_tensor(indices, "indices"), "indices", index)
    m = None if mask is None else _single(_as_tensor(mask, "mask"), "mask", index)
    keep = kept_patch_mask(idx, grid, num_prefix_tokens, m).numpy()
    img = _image_at(image, index)
    fig, ax = _new_figure(_panel_size(*keep.shape), ax)
    _draw_kept(ax, keep, img, dim=_check_alpha(dim), color=color)
    ax.set_title(title if title is not None else f"kept {int(keep.sum())} of {keep.size} patches", fontsize=9)
    return _finish(fig, save)


def plot_pruning_stages(
    image: Any,
    kept: Sequence[Tensor | np.ndarray],
    *,
    grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    layers: Sequence[int] | None = None,
    index: int = 0,
    dim: float = 0.7,
    color: str = "lime",
    save: PathLike | None = None,
) -> Figure:
    """The tokens :func:`attnselect.prune` kept at each pruning layer, one panel per stage.

    Args:
        image: the input picture (see :func:`image_to_array`), or None for a plain patch grid.
        kept: ``PruneHandle.kept``: one ``[B, n_l]`` (or ``[n_l]``) tensor of token positions per pruning layer; -1
            marks a fused token (``merge=True``), which has no patch and is not drawn.
        grid: patch grid ``(rows, cols)`` of the input.
        num_prefix_tokens: tokens before the patches (``PruneHandle.num_prefix_tokens``).
        layers: the pruning layers, for the panel titles (``PruneHandle.layers``).
        index: the sample to draw.
        dim: how much to darken dropped patches; ``color``: outline colour of kept ones.
        save: write a PNG to this path.

    Returns:
        The :class:`matplotlib.figure.Figure`.

    Examples:
        >>> kept = [torch.tensor([[0, 1, 2, 5, 6]]), torch.tensor([[0, 2, 6]])]  # CLS + 4, then CLS + 2 of 6 patches
        >>> fig = plot_pruning_stages(None, kept, grid=(2, 3), layers=(3, 6))
        >>> [ax.get_title() for ax in fig.axes]
        ['block 3: 4 of 6 patches', 'block 6: 2 of 6 patches']
    """
    if not kept:
        raise ValueError("kept is empty: run a forward of the pruned host first")
    if layers is not None and len(layers) != len(kept):
        raise ValueError(f"layers has {len(layers)} entries for {len(kept)} stages")
    img = _image_at(image, index)
    rows, cols = _check_grid(grid)
    fig, axes = _new_grid_figure(len(kept), _panel_size(rows, cols))
    for stage, (ax, positions) in enumerate(zip(axes, kept)):
        idx = _single(_as_tensor(positions, "kept"), "kept", index)
        real = idx >= 0
        keep = kept_patch_mask(idx.clamp(min=0), grid, num_prefix_tokens, real).numpy()
        _draw_kept(ax, keep, img, dim=_check_alpha(dim), color=color)
        name = f"block {layers[stage]}" if layers is not None else f"stage {stage + 1}"
        ax.set_title(f"{name}: {int(keep.sum())} of {keep.size} patches", fontsize=9)
    return _finish(fig, save)


def plot_attention_entropy(
    entropy: Mapping[int, float | Tensor] | Mapping[str, Mapping[int, float | Tensor]],
    *,
    highlight: Sequence[int] | None = None,
    normalize: bool = False,
    title: str | None = "attention entropy per layer",
    ax: Axes | None = None,
    save: PathLike | None = None,
) -> Figure:
    """Mean row entropy per layer, the diagnostic for choosing MARS layers (low entropy = focused attention).

    Args:
        entropy: ``{layer: value}`` from :func:`attention_entropy`, ``{layer: map}`` (computed here), or several
            named curves ``{"image": {...}, "text": {...}}``.
        highlight: layers to mark (e.g. the ones a :class:`~attnselect.MultiLayerRollout` uses).
        normalize: when maps are given, divide by ``log N``.
        title: axes title.
        ax: draw into this axes instead of a new figure.
        save: write a PNG to this path.

    Returns:
        The :class:`matplotlib.figure.Figure`.

    Examples:
        >>> fig = plot_attention_entropy({0: 1.9, 4: 1.2, 11: 0.7}, highlight=[4, 11])
        >>> len(fig.axes)
        1
    """
    if not isinstance(entropy, Mapping) or not entropy:
        raise ValueError("entropy must be a non-empty mapping layer -> value (or name -> mapping)")
    first = next(iter(entropy.values()))
    curves = dict(entropy) if isinstance(first, Mapping) else {"": entropy}
    fig, ax = _new_figure((4.5, 3.0), ax)
    for name, curve in curves.items():
        if not isinstance(curve, Mapping) or not curve:
            raise ValueError(f"curve {name!r} must be a non-empty mapping layer -> value")
        values = dict(curve)
        if any(isinstance(v, (Tensor, np.ndarray)) and v.ndim > 1 for v in values.values()):
            values = attention_entropy(values, normalize=normalize)
        layers = sorted(int(k) for k in values)
        ys = [float(values[k]) for k in layers]
        ax.plot(layers, ys, marker="o", label=name or None)
        if highlight:
            hx = [layer for layer in highlight if layer in values]
            ax.scatter(hx, [float(values[h]) for h in hx], s=120, facecolors="none", edgecolors="red", zorder=3)
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel("mean row entropy" + (" / log N" if normalize else " (nats)"))
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _finish(fig, save)


def plot_selection_frequency(
    frequency: Tensor | np.ndarray,
    *,
    grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    image: Any = None,
    alpha: float = 0.6,
    cmap: str = "viridis",
    title: str | None = "selection frequency",
    ax: Axes | None = None,
    save: PathLike | None = None,
) -> Figure:
    """How often each patch is kept over a dataset, on the patch grid (optionally over a mean or example image).

    Args:
        frequency: ``[N]`` from :func:`selection_frequency` / :meth:`SelectionCounter.frequency`.
        grid: patch grid ``(rows, cols)``; None infers it from the image's aspect ratio (a square grid without an
            image).
        num_prefix_tokens: CLS + register tokens before the patches.
        image: optional background picture.
        alpha: heat map opacity over the image.
        cmap: colormap; the colour scale is fixed to ``[0, 1]``.
        title: axes title.
        ax: draw into this axes instead of a new figure.
        save: write a PNG to this path.

    Returns:
        The :class:`matplotlib.figure.Figure`.

    Examples:
        >>> freq = selection_frequency(torch.tensor([[1, 2], [2, 3]]), n_tokens=5)  # [N] = CLS + 2 x 2 patches
        >>> fig = plot_selection_frequency(freq, grid=(2, 2))
        >>> fig.axes[0].get_title()
        'selection frequency'
    """
    f = _as_tensor(frequency, "frequency")
    if f.dim() != 1:
        raise ValueError(f"frequency must have shape [N], got {tuple(f.shape)}")
    img = None if image is None else image_to_array(image)
    if grid is None:
        grid = _resolve_grid(f.shape[-1], None, num_prefix_tokens, "frequency", _hw(img))
    heat = patch_grid_scores(f, grid, num_prefix_tokens).cpu().numpy()
    fig, ax = _new_figure(_panel_size(*heat.shape, extra_width=1.0), ax)
    im = _heat_over(ax, heat, img, alpha=_check_alpha(alpha), cmap=cmap, vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="kept share")
    if title:
        ax.set_title(title, fontsize=9)
    return _finish(fig, save)


def plot_token_schedule(
    scheduler: AdaptiveTokenScheduler,
    n: int | Mapping[str, int],
    *,
    steps: Sequence[int] | None = None,
    title: str | None = "kept tokens over training",
    ax: Axes | None = None,
    save: PathLike | None = None,
) -> Figure:
    """k over training steps from an :class:`~attnselect.AdaptiveTokenScheduler`.

    Args:
        scheduler: the scheduler.
        n: selectable tokens, or several named counts (``{"image": 192, "text": 75}``).
        steps: steps to evaluate (default ``0 .. 1.2 T``).
        title: axes title.
        ax: draw into this axes instead of a new figure.
        save: write a PNG to this path.

    Returns:
        The :class:`matplotlib.figure.Figure`.

    Examples:
        >>> from attnselect import AdaptiveTokenScheduler
        >>> fig = plot_token_schedule(AdaptiveTokenScheduler(total_steps=100), {"image": 192, "text": 75})
        >>> fig.axes[0].get_title()
        'kept tokens over training'
    """
    counts = dict(n) if isinstance(n, Mapping) else {"": n}
    fig, ax = _new_figure((4.5, 3.0), ax)
    for name, count in counts.items():
        xs, ks = token_schedule(scheduler, count, steps)
        ax.step(xs, ks, where="post", label=f"{name} (n={count})" if name else f"n={count}")
    ax.axvline(scheduler.total_steps, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("kept tokens k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _finish(fig, save)


def plot_inspection(
    image: Any,
    layer_saliency: Mapping[int, Tensor | np.ndarray],
    rollout_saliency: Tensor | np.ndarray,
    indices: Tensor | np.ndarray,
    *,
    grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mask: Tensor | np.ndarray | None = None,
    index: int = 0,
    rollout_layers: Sequence[int] | None = None,
    suptitle: str | None = None,
    save: PathLike | None = None,
) -> Figure:
    """One figure with the per-layer saliency, the rollout and the kept tokens over the image.

    Args:
        image: the input picture (a ``[B,3,H,W]`` batch is drawn at ``index``).
        layer_saliency: ``{layer: [N] or [B,N]}`` the query row of each layer (see :func:`query_row_saliency`).
        rollout_saliency: ``[N]`` or ``[B,N]`` the rollout's query row (``BankOutput.saliency``).
        indices: ``[k]`` or ``[B,k]`` kept positions (``BankOutput.indices``).
        grid: patch grid; None infers it from the image's aspect ratio (a square grid without an image).
        num_prefix_tokens: CLS + register tokens before the patches.
        mask: optional ``BankOutput.mask``.
        index: the sample to draw.
        rollout_layers: the layers the rollout used (for the panel title).
        suptitle: figure title.
        save: write a PNG to this path.

    Returns:
        The :class:`matplotlib.figure.Figure`.

    Examples:
        >>> sal = torch.rand(1, 7)  # [B,N] = CLS + 2 x 3 patches
        >>> fig = plot_inspection(torch.rand(3, 32, 48), {4: sal, 11: sal}, sal, torch.tensor([[1, 4, 6]]), grid=(2, 3))
        >>> len(fig.axes) >= 4  # two layers, the rollout and the kept tokens
        True
    """
    if not isinstance(layer_saliency, Mapping):
        raise TypeError("layer_saliency must be a mapping layer -> saliency")
    roll = _single(_as_tensor(rollout_saliency, "rollout_saliency"), "rollout_saliency", index)
    img = _image_at(image, index)
    rows, cols = _resolve_grid(roll.shape[-1], grid, num_prefix_tokens, "rollout_saliency", _hw(img))
    layers = sorted(layer_saliency)
    fig, axes = _new_grid_figure(len(layers) + 2, _panel_size(rows, cols, base=2.6))
    for ax, layer in zip(axes, layers):
        s = _single(_as_tensor(layer_saliency[layer], f"layer_saliency[{layer}]"), f"layer_saliency[{layer}]", index)
        plot_saliency(img, s, grid=(rows, cols), num_prefix_tokens=num_prefix_tokens, colorbar=False, ax=ax)
        ax.set_title(f"layer {layer}", fontsize=8)
    used = "" if not rollout_layers else " " + "+".join(str(i) for i in rollout_layers)
    plot_saliency(img, roll, grid=(rows, cols), num_prefix_tokens=num_prefix_tokens, colorbar=False, ax=axes[-2])
    axes[-2].set_title(f"rollout{used}", fontsize=8)
    idx = _single(_as_tensor(indices, "indices"), "indices", index)
    m = None if mask is None else _single(_as_tensor(mask, "mask"), "mask", index)
    plot_kept_tokens(img, idx, grid=(rows, cols), num_prefix_tokens=num_prefix_tokens, mask=m, ax=axes[-1])
    axes[-1].title.set_fontsize(8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _finish(fig, save)
