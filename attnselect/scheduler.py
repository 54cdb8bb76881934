"""AdaptiveTokenScheduler (ATS): a coarse-to-fine token budget over training."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch
from torch import nn

__all__ = ["SCHEDULES", "AdaptiveTokenScheduler"]

SCHEDULES = ("exp", "linear", "cosine", "fixed")
GRANULARITIES = ("step", "epoch")


def _as_int(value: object, name: str) -> int:
    """An integer scalar (Python or numpy int, or a one-element integer tensor) as an int; TypeError otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        if value.dtype != torch.bool and not value.is_complex():
            return int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return operator.index(value)
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class AdaptiveTokenScheduler(nn.Module):
    """Token budget ``k(t)`` annealed from ``rho_start * n`` to ``rho_end * n`` over ``total_steps`` steps.

    ``schedule="exp"`` is ITSELF's Eq. 4, computed exactly as the published code does: with ``t`` clamped to
    ``[1, T]``, ``k = int(n * rho_start * (rho_end / rho_start) ** (t / T))``, then clamped to ``[1, n]``.
    ``"linear"`` and ``"cosine"`` interpolate the ratio between the same end points; ``"fixed"`` always uses
    ``rho_end``. Reference values (T = 1450): n = 192 gives 124, 121, 109, 96, 96 at t = 1, 145, 725, 1450, 5000;
    n = 75 (a CLIP text tower: 77 minus SOS and EOS) gives 48, 47, 42, 37, 37.

    The scheduler owns a step counter that starts at 0 and is advanced by :meth:`step` (call it once before each
    training forward, as the published loop does). ``granularity="epoch"`` holds ``t`` constant within an epoch
    (``t = epoch index * steps_per_epoch``). The counter is part of ``state_dict()`` so resuming continues where
    training stopped.

    Args:
        rho_start: kept share at the start, in ``(0, 1]``.
        rho_end: kept share at the end, in ``(0, 1]``.
        total_steps: schedule length ``T`` in steps (the published code hard-codes 1450 = 10 epochs of RSTPReid).
        schedule: ``"exp"``, ``"linear"``, ``"cosine"`` or ``"fixed"``.
        granularity: ``"step"`` or ``"epoch"``.
        steps_per_epoch: needed for ``granularity="epoch"``.

    Examples:
        >>> ats = AdaptiveTokenScheduler()
        >>> [ats.num_tokens(192, step=t) for t in (1, 145, 725, 1450)]
        [124, 121, 109, 96]
    """

    def __init__(
        self,
        rho_start: float = 0.65,
        rho_end: float = 0.5,
        total_steps: int = 1450,
        schedule: str = "exp",
        granularity: str = "step",
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        for name, rho in (("rho_start", rho_start), ("rho_end", rho_end)):
            if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < rho <= 1.0:
                raise ValueError(f"{name} must be a float in (0, 1], got {rho!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.rho_start = float(rho_start)
        self.rho_end = float(rho_end)
        self.total_steps = _positive_int(total_steps, "total_steps")
        self.schedule = schedule
        self.granularity = granularity
        if granularity == "epoch" and steps_per_epoch is None:
            raise ValueError('steps_per_epoch is required with granularity="epoch"')
        if steps_per_epoch is not None:
            steps_per_epoch = _positive_int(steps_per_epoch, "steps_per_epoch")
        self.steps_per_epoch = steps_per_epoch
        self._step = 0

    # ---------------------------------------------------------------------------------------------------- counter
    @property
    def current_step(self) -> int:
        """Steps taken so far (the ``t`` used when no step is given)."""
        return self._step

    def step(self) -> int:
        """Advance the counter by one step and return the new value."""
        self._step += 1
        return self._step

    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self._step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"scheduler state must hold a non-negative int 'step', got {state!r}")
        self._step = step

    # ---------------------------------------------------------------------------------------------------- values
    def _t(self, step: int | None) -> int:
        t = self._step if step is None else _as_int(step, "step")
        if t < 0:
            raise ValueError(f"step must be a non-negative int, got {t!r}")
        if self.granularity == "epoch":
            assert self.steps_per_epoch is not None
            t = (max(t, 1) - 1) // self.steps_per_epoch * self.steps_per_epoch
        return min(max(t, 1), self.total_steps)

    def _scaled(self, n: float, step: int | None) -> float:
        """``n * ratio`` evaluated in the published order of operations (exactness of the reference values)."""
        if self.schedule == "fixed":
            return n * self.rho_end
        r = self._t(step) / self.total_steps
        if self.schedule == "exp":
            return n * self.rho_start * (self.rho_end / self.rho_start) ** r
        if self.schedule == "linear":
            return n * (self.rho_start + (self.rho_end - self.rho_start) * r)
        return n * (self.rho_end + (self.rho_start - self.rho_end) * 0.5 * (1.0 + math.cos(math.pi * r)))

    def ratio(self, step: int | None = None) -> float:
        """The kept share at ``step`` (the scheduler's own counter when None)."""
        return self._scaled(1.0, step)

    def num_tokens(self, n: int, step: int | None = None) -> int:
        """Tokens to keep out of ``n`` selectable ones at ``step``, clamped to ``[1, n]``."""
        n = _positive_int(_as_int(n, "n"), "n")
        return min(max(int(self._scaled(n, step)), 1), n)

    def extra_repr(self) -> str:
        return (
            f"rho_start={self.rho_start}, rho_end={self.rho_end}, total_steps={self.total_steps}, "
            f"schedule={self.schedule!r}, granularity={self.granularity!r}, step={self._step}"
        )
