"""Fixtures shared by the kernel test files."""

from __future__ import annotations

import importlib

import pytest
import torch

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


@pytest.fixture(params=["registers", "multipass"])
def query_chain(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both query-row chains: one sample's layer in registers (N <= SMALL_N), and the multi-pass kernels."""
    if request.param == "multipass":
        # import_module returns the kernel module (the package attribute of that name is the entry point)
        monkeypatch.setattr(importlib.import_module("attnselect.kernels.rollout"), "SMALL_N", 0)
    return request.param
