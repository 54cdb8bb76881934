"""Fixtures shared by the kernel test files."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch


def _import_kernel_modules() -> None:
    """Import the kernel modules under the environment the run was started with.

    Triton decides when a module's kernels are defined whether they are interpreted (``TRITON_INTERPRET=1``) or
    compiled. Some tests set ``TRITON_INTERPRET=1`` for a while (launch recorders, gate checks); were a kernel module
    first imported inside one of them, its kernels would stay interpreted for the rest of the process, and on a GPU
    every later test in that process would run the interpreter on CUDA tensors. Importing them here, first, keeps
    them as the run's environment says whatever order the tests run in (pytest-xdist included).
    """
    try:
        import attnselect.kernels.capture
        import attnselect.kernels.rollout
        import attnselect.kernels.topk_gather  # noqa: F401
    except ImportError:  # no Triton: the kernel tests skip
        pass


_import_kernel_modules()

_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each device whose tensors take the Triton path here (CPU under ``TRITON_INTERPRET=1``, CUDA when present)."""
    import attnselect.kernels as K

    dev = request.param
    if not K.kernels_enabled(torch.empty(0, device=dev)):
        pytest.skip(f"Triton path off for {dev}: {K.explain(torch.empty(0, device=dev))}")
    return dev


def _force_chain(monkeypatch: pytest.MonkeyPatch, chain: str) -> None:
    """Route the rollout's query-row chains to one implementation, whatever N and B are.

    ``"registers"``: the defaults (one sample's layer in registers up to ``SMALL_N``; above it, on CPU, one program
    per sample); ``"per-sample"``: one program per sample through its workspace row, at any N up to ``SAMPLE_N_MAX``
    and any batch; ``"multipass"``: the multi-pass kernels (pivots, fusion, select, row blocks).
    """
    mod = importlib.import_module("attnselect.kernels.rollout")  # the module (the package attribute is a function)
    if chain not in ("registers", "per-sample", "multipass"):
        raise ValueError(f"unknown chain {chain!r}")
    if chain != "registers":
        monkeypatch.setattr(mod, "SMALL_N", 0)
    if chain == "per-sample":
        monkeypatch.setattr(mod, "SAMPLE_MIN_BATCH", 1)
    if chain == "multipass":
        monkeypatch.setattr(mod, "SAMPLE_N_MAX", 0)


@pytest.fixture(params=["registers", "per-sample", "multipass"])
def query_chain(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every query-row chain of the rollout (see :func:`_force_chain`)."""
    _force_chain(monkeypatch, request.param)
    return request.param


@pytest.fixture
def force_chain(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``force_chain("multipass")`` routes this test's query-row chains to one implementation (undone after it)."""
    return lambda chain: _force_chain(monkeypatch, chain)
