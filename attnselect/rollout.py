"""MultiLayerRollout (MARS): attention rollout over a chosen set of layers."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["LAYER_GROUPS", "QUERY_MODES", "MultiLayerRollout", "resolve_layers", "resolve_query"]

LAYER_GROUPS = ("early", "middle", "late")
LayerSpec = int | str


def resolve_layers(spec: LayerSpec | Sequence[LayerSpec], num_layers: int) -> tuple[int, ...]:
    """Resolve a layer specification against a host of ``num_layers`` layers.

    Ints are 0-based layer indices (negative ones count from the end); the names resolve as ``early = 0``,
    ``middle = L // 3`` and ``late = L - 1`` (a 12-layer ViT-B gives ``("middle", "late") -> (4, 11)``, the published
    ITSELF setting). The result is sorted in forward order without duplicates.

    Examples:
        >>> resolve_layers(("middle", "late"), 12)
        (4, 11)
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    items = [spec] if isinstance(spec, (int, str)) else list(spec)
    if not items:
        raise ValueError("layers must name at least one layer")
    out = set()
    for item in items:
        if isinstance(item, str):
            if item == "early":
                out.add(0)
            elif item == "middle":
                out.add(num_layers // 3)
            elif item == "late":
                out.add(num_layers - 1)
            else:
                raise ValueError(f"layers: unknown layer name {item!r}; use an int or one of {LAYER_GROUPS}")
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -num_layers <= item < num_layers:
                raise ValueError(f"layers: index {item} is out of range for a host with {num_layers} layers")
            out.add(item % num_layers)
        else:
            raise TypeError(f"layers must hold ints or names {LAYER_GROUPS}, got {type(item).__name__}")
    return tuple(sorted(out))


QUERY_MODES = ("mean", "probe")


def resolve_query(
    query: int | str | Tensor | None, like: Tensor, *, valid: Tensor | None = None, probe: Tensor | None = None
) -> int | Tensor | None:
    """Turn a query mode into what :func:`attnselect.functional.rollout` takes.

    ``"mean"`` becomes uniform row weights over the real tokens (``valid``, or every token); ``"probe"`` becomes the
    probe's attention ``[B,N]`` as row weights (padding, where ``valid`` is False, gets none). Row indices, float
    weights and None pass through.

    Examples:
        >>> like = torch.zeros(2, 5, 5)  # a map of the batch: B = 2, N = 5
        >>> valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
        >>> resolve_query("mean", like, valid=valid)  # uniform weights over the real tokens
        tensor([[1., 1., 1., 1., 1.],
                [1., 1., 1., 0., 0.]])
        >>> resolve_query(0, like)
        0
    """
    if not isinstance(query, str):
        return query
    if query not in QUERY_MODES:
        raise ValueError(f"query must be a row index, a LongTensor [B], float weights [B,N] or one of {QUERY_MODES}, "
                         f"got {query!r}")  # fmt: skip
    batch, n = like.shape[0], like.shape[-1]
    if query == "mean":
        if valid is None:
            return torch.ones(batch, n, device=like.device, dtype=torch.float32)
        F._check_valid(valid, (batch, n), like.device)
        return valid.to(torch.float32)
    if probe is None:
        raise ValueError(
            "query='probe' needs the probe's attention over the tokens (probe=[B,N]; attach captures it from hosts "
            "with an attention-pooling head)"
        )
    F._check_tensor(probe, "probe")
    if probe.shape != (batch, n):
        raise ValueError(f"probe must have shape [B,N] = {(batch, n)}, got {tuple(probe.shape)}")
    weights = probe.to(device=like.device, dtype=torch.float32)
    return weights if valid is None else weights * valid.to(weights.dtype)


class MultiLayerRollout(nn.Module):
    """Multi-layer attention rollout (MARS) over chosen layers.

    Args:
        layers: layer indices and/or names (``"early"``, ``"middle"``, ``"late"``) resolved against the host depth.
        discard_ratio: share of the lowest entries of each layer's map to zero; a float or one float per chosen layer.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads (for per-head maps).
        protect: ``"entry0"`` keeps entry (0, 0) as the published code does; ``"none"`` keeps nothing.

    Examples:
        >>> mars = MultiLayerRollout()
        >>> maps = [torch.softmax(torch.randn(2, 12, 193, 193), -1) for _ in range(12)]
        >>> mars(maps, query=0).shape  # uses layers 4 and 11 of 12
        torch.Size([2, 193])
    """

    def __init__(
        self,
        layers: LayerSpec | Sequence[LayerSpec] = ("middle", "late"),
        discard_ratio: float | Sequence[float] = 0.25,
        head_fusion: str = "mean",
        protect: str = "entry0",
    ) -> None:
        super().__init__()
        self.layers = (layers,) if isinstance(layers, (int, str)) else tuple(layers)
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        for item in self.layers:
            if isinstance(item, str) and item not in LAYER_GROUPS:
                raise ValueError(f"layers: unknown layer name {item!r}; use an int or one of {LAYER_GROUPS}")
            if not isinstance(item, (int, str)) or isinstance(item, bool):
                raise TypeError(f"layers must hold ints or names {LAYER_GROUPS}, got {type(item).__name__}")
        if isinstance(discard_ratio, (Tensor, np.ndarray)):
            discard_ratio = discard_ratio.tolist()
        if isinstance(discard_ratio, numbers.Real) and not isinstance(discard_ratio, (bool, np.bool_)):
            discard_ratio = F._check_ratio(discard_ratio, "discard_ratio")
        elif isinstance(discard_ratio, Sequence) and not isinstance(discard_ratio, str):
            discard_ratio = tuple(F._check_ratio(r, f"discard_ratio[{i}]") for i, r in enumerate(discard_ratio))
        else:
            raise TypeError(
                f"discard_ratio must be a float in [0, 1] or one float per layer, got {type(discard_ratio).__name__}"
            )
        F._check_choice(head_fusion, F.FUSION_MODES, "head_fusion")
        F._check_choice(protect, F.PROTECT_MODES, "protect")
        self.discard_ratio = discard_ratio
        self.head_fusion = head_fusion
        self.protect = protect

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """The chosen layer indices for a host with ``num_layers`` layers, in forward order."""
        return resolve_layers(self.layers, num_layers)

    def select(
        self, attentions: Mapping[int, Tensor] | Sequence[Tensor], num_layers: int | None = None
    ) -> list[Tensor]:
        """Pick this rollout's layers from a mapping ``layer -> map`` or a full per-layer sequence.

        A mapping is read at the resolved layers when the host depth is known: from ``num_layers``, or because the
        mapping holds every layer ``0..L-1``. Without it, non-negative integer layers are read directly; named layers
        need the depth, except when the mapping holds exactly as many maps as this rollout has layers (what a capture
        of exactly the chosen layers holds), which are then used in ascending layer order.
        """
        if isinstance(attentions, Mapping):
            if not attentions:
                raise ValueError("attentions is empty: no layer was captured")
            keys = sorted(attentions)
            if num_layers is None and keys == list(range(len(keys))):
                # a capture of every layer of a len(keys)-layer host, or exactly this rollout's layers of a deeper one
                # that happen to be 0..m-1: when the two readings pick different maps, only the depth can tell
                named = any(isinstance(i, str) for i in self.layers)
                if named and len(keys) == len(set(self.layers)) and self.resolve_layers(len(keys)) != tuple(keys):
                    raise ValueError(
                        f"attentions holds layers {keys}: as a whole {len(keys)}-layer host this rollout's layers "
                        f"{self.layers} resolve to {list(self.resolve_layers(len(keys)))}, as a capture of exactly "
                        "its layers it uses all of them; pass num_layers (the host depth)"
                    )
                num_layers = len(keys)
            if num_layers is None:
                if all(isinstance(i, int) and i >= 0 for i in self.layers):
                    wanted = tuple(sorted(set(self.layers)))
                elif len(keys) == len(set(self.layers)):
                    return [attentions[i] for i in keys]
                else:
                    raise ValueError(
                        f"attentions holds layers {keys}: pass num_layers (the host depth) to resolve this rollout's "
                        f"layers {self.layers} among them"
                    )
            else:
                wanted = self.resolve_layers(num_layers)
            missing = [i for i in wanted if i not in attentions]
            if missing:
                raise ValueError(
                    f"attentions has no map for layer(s) {missing}; it holds layers {sorted(attentions)} "
                    f"and this rollout needs {list(wanted)}"
                )
            return [attentions[i] for i in wanted]
        if isinstance(attentions, Tensor):
            attentions = list(attentions.unbind(0)) if attentions.dim() in (4, 5) else [attentions]
        if not isinstance(attentions, Sequence) or not attentions:
            raise ValueError("attentions must be a mapping layer -> map or a non-empty per-layer sequence")
        total = len(attentions) if num_layers is None else num_layers
        if num_layers is not None and len(attentions) != num_layers:
            raise ValueError(f"attentions holds {len(attentions)} layers but num_layers is {num_layers}")
        return [attentions[i] for i in self.resolve_layers(total)]

    def forward(
        self,
        attentions: Mapping[int, Tensor] | Sequence[Tensor],
        query: int | str | Tensor | None = None,
        num_layers: int | None = None,
        *,
        valid: Tensor | None = None,
        probe: Tensor | None = None,
    ) -> Tensor:
        """Rollout of the chosen layers.

        Args:
            attentions: a mapping ``layer index -> map`` or the full per-layer sequence (maps ``[B,H,N,N]`` or
                ``[B,N,N]``).
            query: None for the full ``[B,N,N]`` product; an int / LongTensor ``[B]`` of query rows (-> ``[B,N]``);
                ``"mean"``, the mean of the rollout's rows over the real tokens (what all tokens attend to; hosts
                without a class token); ``"probe"``, the rollout read through the host's pooling probe: its
                attention over the tokens (``probe``) weights the rows (SigLIP, AIMv2, timm ``global_pool="map"``);
                or a float ``[B,N]`` of row weights.
            num_layers: host depth, to resolve named layers against a mapping.
            valid: optional bool ``[B,N]``, False at padding (variable-resolution inputs): padded tokens take no part
                in the rollout (see :func:`attnselect.functional.rollout`).
            probe: the probe's attention ``[B,N]`` over the tokens, for ``query="probe"``
                (:attr:`attnselect.hooks.AttentionCapture.probe`).

        Examples:
            >>> maps = [torch.softmax(torch.randn(2, 4, 9, 9), -1) for _ in range(3)]
            >>> mars = MultiLayerRollout(layers=(1, 2))
            >>> mars(maps, query="mean").shape  # no class token: what all tokens attend to
            torch.Size([2, 9])
        """
        maps = self.select(attentions, num_layers)
        if F._integer(query) is not None:  # numpy integers read as Python ints on every path
            query = F._integer(query)
        query = resolve_query(query, maps[0], valid=valid, probe=probe)
        from . import kernels  # the gate: Triton for CUDA tensors (or TRITON_INTERPRET=1), else the reference

        return kernels.rollout(
            maps,
            discard_ratio=self.discard_ratio,
            head_fusion=self.head_fusion,
            protect=self.protect,
            query=query,
            valid=valid,
        )

    def extra_repr(self) -> str:
        return (
            f"layers={self.layers}, discard_ratio={self.discard_ratio}, head_fusion={self.head_fusion!r}, "
            f"protect={self.protect!r}"
        )
