"""Helpers shared by several test files (imported as ``_helpers``: pytest puts this folder on the path)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode


class SoftmaxRecorder(TorchFunctionMode):
    """Records every softmax computed inside the ``with`` block (fp32 copies): a host's own eager probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "softmax":
            self.out.append(out.detach().float().clone())
        return out


def benchmark_module(name: str):
    """A script module of ``benchmarks/`` (which imports its siblings from its own folder)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
