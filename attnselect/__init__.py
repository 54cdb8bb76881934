"""attnselect: attention-guided token selection for Vision Transformers and CLIP-style dual encoders.

Importing this package is cheap: it never imports Triton, transformers, open_clip or timm and never touches CUDA.
The host-model integrations (:mod:`attnselect.hooks`), kernels, models and data load on first use.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from . import functional
from ._version import __version__
from .bank import AttentiveBank, BankOutput, MaskedBatchNorm1d, TokenAdapter
from .pooling import GPOPool, MaxPool
from .rollout import MultiLayerRollout, resolve_layers
from .scheduler import AdaptiveTokenScheduler

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AdaptiveTokenScheduler",
    "AttentionCapture",
    "AttentiveBank",
    "BankOutput",
    "GPOPool",
    "MaskedBatchNorm1d",
    "MaxPool",
    "MultiLayerRollout",
    "PruneHandle",
    "TokenAdapter",
    "__version__",
    "capture_attention",
    "functional",
    "prune",
    "resolve_layers",
]

_LAZY_ATTRS = {
    "capture_attention": "attnselect.hooks",
    "AttentionCapture": "attnselect.hooks",
    "prune": "attnselect.pruning",
    "PruneHandle": "attnselect.pruning",
}
_LAZY_MODULES = ("hooks", "kernels", "models", "losses", "metrics", "data", "viz", "cli")


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"attnselect.{name}")
    raise AttributeError(f"module 'attnselect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_LAZY_MODULES))
