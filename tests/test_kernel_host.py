"""Host-side cost of the kernel entry points, and the asynchronous error queue.

On a GPU the small ITSELF shapes are bound by what the host does per call (tensor allocations, PyTorch op dispatch,
Triton launches), so the number of ATen ops and Triton launches each eager path issues is pinned here. The launches are
recorded instead of run (the Triton kernels themselves are checked against the reference in ``test_kernels.py``), and
the gate is opened for CPU tensors with ``TRITON_INTERPRET=1``. The error queue that reads CUDA error summaries without
a synchronisation is checked with a plain host ring whose slots the test writes, in the order a device would.
"""

from __future__ import annotations

import collections
import importlib
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnselect.kernels as K
from attnselect import functional as F

pytestmark = pytest.mark.kernels

triton = pytest.importorskip("triton")


class _Ops(TorchDispatchMode):
    """Counts the ATen ops dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _Launches(list):
    """Names of the recorded launches, with their grids in ``grids``."""

    def __init__(self) -> None:
        super().__init__()
        self.grids: list[tuple[int, ...]] = []


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> _Launches:
    """Replace every Triton kernel of the three kernel modules by a recorder; returns the list of launched names."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("ATTNSELECT_KERNELS", raising=False)
    import attnselect.kernels.capture
    import attnselect.kernels.rollout
    import attnselect.kernels.topk_gather  # noqa: F401

    seen = _Launches()

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs) -> None:
                seen.append(self.name)
                seen.grids.append(tuple(grid))

            return launch

    for mod in ("capture", "rollout", "topk_gather"):
        module = sys.modules[f"attnselect.kernels.{mod}"]
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, Recorder(name))
    return seen


def _count(fn) -> collections.Counter[str]:
    with _Ops() as mode:
        fn()
    return mode.ops


# CPU-only ops of the error check (on CUDA the summary is one asynchronous copy instead of a read)
_CPU_READ = {"select", "_local_scalar_dense"}


def _device_ops(ops: collections.Counter[str]) -> int:
    return sum(v for k, v in ops.items() if k not in _CPU_READ)


def test_topk_gather_forward_is_one_launch_and_four_allocations(launches: list[str]) -> None:
    scores, tokens = torch.rand(3, 50), torch.randn(3, 50, 8)
    with torch.no_grad():
        ops = _count(lambda: K.select_topk_gather(scores, 7, tokens))
    assert launches == ["_topk_gather_kernel"]
    assert ops["empty"] == 3 and ops["zeros"] == 1, ops  # indices, mask, gathered; the error codes
    assert _device_ops(ops) <= 5, ops  # the allocations and the summary view; no casts, no copies, no fills


def test_topk_gather_backward_is_one_launch_without_zero_fills(launches: list[str]) -> None:
    scores = torch.rand(3, 50)
    tokens = torch.randn(3, 50, 8, requires_grad=True)
    grad_out = torch.randn(3, 7, 8)
    out = K.select_topk_gather(scores, 7, tokens)[2]
    launches.clear()
    ops = _count(lambda: out.backward(grad_out))
    assert launches == ["_gather_backward_kernel"]
    # one allocation for the token gradient; no gradients materialised for indices/mask, no zero-filled [B,N,D]
    assert ops["empty"] == 1 and ops["zeros"] == 0 and ops["zero_"] == 0 and ops["fill_"] == 0, ops
    assert tokens.grad is not None and tokens.grad.shape == tokens.shape


def test_rollout_query_path_launches(launches: list[str], force_chain) -> None:
    maps = [torch.softmax(torch.randn(2, 4, 17, 17), -1) for _ in range(2)]
    query = torch.tensor([3, 16])
    ops = _count(lambda: K.rollout(maps, query=query))
    # N <= SMALL_N: one launch per layer; the result, its double buffer and the error flag
    assert launches == ["_small_query_kernel"] * 2
    assert ops["empty"] == 2 and ops["zeros"] == 1, ops
    assert ops["_to_copy"] == 0 and ops["copy_"] == 0, ops  # int64 query rows are read as they are
    launches.clear()
    force_chain("per-sample")
    ops = _count(lambda: K.rollout(maps, query=query))
    # one program per sample: one launch per layer; the workspace, the result, its double buffer and the error flag
    assert launches == ["_sample_query_kernel"] * 2
    assert ops["empty"] == 3 and ops["zeros"] == 1, ops
    assert ops["_to_copy"] == 0 and ops["copy_"] == 0, ops
    launches.clear()
    force_chain("multipass")
    ops = _count(lambda: K.rollout(maps, query=query))
    # the multi-pass chain, per layer: pivots, fusion, select; the earlier layer adds its row-block pass and the sum
    assert sorted(launches) == sorted(
        ["_pivot_kernel", "_fuse_kernel", "_select_kernel"] * 2 + ["_rowblock_kernel", "_reduce_kernel"]
    ), launches
    assert ops["_to_copy"] == 0 and ops["copy_"] == 0, ops


def test_capture_query_rows_are_read_in_place(launches: list[str]) -> None:
    q, k = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    rows = torch.tensor([0, 4])
    ops = _count(lambda: K.attention_probs(q, k, scale=0.25, query_rows=rows))
    assert len(launches) == 1
    # the output and the flag; a shared [R] row list is not expanded, int64 rows are not cast
    assert ops["empty"] == 1 and ops["zeros"] == 1, ops
    assert ops["expand"] == 0 and ops["_to_copy"] == 0, ops


def test_capture_grid_puts_a_samples_row_blocks_side_by_side(launches: _Launches) -> None:
    q, k = torch.randn(5, 2, 100, 16), torch.randn(5, 2, 100, 16)
    K.attention_probs(q, k, scale=0.25)
    (grid,) = launches.grids
    assert grid[1] == 5 and grid[0] > 1, grid  # row blocks on the fast axis, the batch on the slow one


def test_gate_decision_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("ATTNSELECT_KERNELS", raising=False)
    assert K.kernels_enabled(torch.empty(1)) == K.triton_available()
    monkeypatch.setenv("ATTNSELECT_KERNELS", "0")  # remembered decisions are keyed by the switches' values
    assert not K.kernels_enabled(torch.empty(1))
    assert not K._enabled_for("cpu")
    monkeypatch.setenv("ATTNSELECT_KERNELS", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not K._enabled_for("cpu")


# --------------------------------------------------------------------------------------------------------------------
# the error queue
# --------------------------------------------------------------------------------------------------------------------
def _describe(code: int, detail: torch.Tensor) -> str | None:
    return f"bad input {code} in call {int(detail)}" if code else None


def _queue(slots: int = 8) -> K._ErrorQueue:
    return K._ErrorQueue(torch.full((slots,), -1, dtype=torch.int32), device=None)


def _push(queue: K._ErrorQueue, code: int, call: int, written: bool = True) -> None:
    queue.push(torch.tensor([code], dtype=torch.int32), torch.tensor(call), _describe)
    if not written:  # the device has not copied it yet
        queue.view[queue.pending[-1][0]] = -1


def test_error_queue_raises_the_first_written_error_in_issue_order() -> None:
    queue = _queue()
    _push(queue, 0, 0)
    _push(queue, 2, 1)
    _push(queue, 1, 2)
    assert queue.pop_ready(wait=False) == "bad input 2 in call 1"
    assert len(queue.pending) == 1  # the later call keeps its own error
    assert queue.pop_ready(wait=False) == "bad input 1 in call 2"
    assert not queue.pending and queue.pop_ready(wait=False) is None


def test_error_queue_stops_at_the_first_unwritten_slot() -> None:
    queue = _queue()
    _push(queue, 0, 0)
    _push(queue, 0, 1, written=False)
    _push(queue, 4, 2)  # written, but behind a call the device has not finished
    assert queue.pop_ready(wait=False) is None
    assert [p[1].item() for p in queue.pending] == [1, 2]
    queue.view[queue.pending[0][0]] = 0  # the device catches up
    assert queue.pop_ready(wait=False) == "bad input 4 in call 2"


def test_error_queue_reuses_slots_and_waits_when_half_full() -> None:
    queue = _queue(slots=4)
    for call in range(10):  # wraps around the ring twice; every summary is read before its slot is reused
        _push(queue, 0, call)
    assert len(queue.pending) <= 2
    _push(queue, 0, 10)
    _push(queue, 3, 11)
    with pytest.raises(ValueError, match="bad input 3 in call 11"):
        _push(queue, 0, 12)  # half the ring in flight: the push reads what is written and raises it
    assert [p[1].item() for p in queue.pending] == [12]  # the raising call's own summary is still queued
    assert queue.pop_ready(wait=False) is None


def test_check_errors_drains_every_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    queue = _queue()
    monkeypatch.setitem(K._queues, -1, queue)
    _push(queue, 0, 0)
    _push(queue, 1, 1)
    _push(queue, 2, 2)
    with pytest.raises(ValueError, match="call 1"):
        K.check_errors()
    with pytest.raises(ValueError, match="call 2"):
        K.check_errors()
    K.check_errors()
    assert not queue.pending


def test_query_chain_choice_follows_n_batch_and_sm_count(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = sys.modules.get("attnselect.kernels.rollout") or importlib.import_module("attnselect.kernels.rollout")
    cuda = torch.device("cuda")
    assert mod.query_chain(256, 77, cuda) == "registers"  # the text tower, whatever the batch
    assert mod.query_chain(1, 128, cuda) == "registers"
    # on a GPU the multi-pass chain measured faster than one program per sample at the image shape
    assert mod.query_chain(256, 193, cuda) == "multipass"
    assert mod.query_chain(4096, 193, torch.device("cuda", 0)) == "multipass"
    assert mod.query_chain(64, 577, cuda) == "multipass"
    assert mod.query_chain(512, 1025, cuda) == "multipass"
    assert mod.query_chain(8, 193, torch.device("cpu")) == "per-sample"  # the interpreter's default
    monkeypatch.setattr(mod, "SAMPLE_MIN_BATCH", 132)  # switched on for batches of 132 samples or more
    assert mod.query_chain(256, 193, cuda) == "per-sample"
    assert mod.query_chain(131, 193, cuda) == "multipass"
    assert mod.query_chain(512, 257, cuda) == "multipass"  # beyond SAMPLE_N_MAX
    assert mod.query_chain(256, 193, torch.device("cpu")) == "per-sample"


def test_gate_checks_once_and_routes_long_maps_to_the_reference(
    launches: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rollout_mod = importlib.import_module("attnselect.kernels.rollout")
    topk_mod = importlib.import_module("attnselect.kernels.topk_gather")
    assert (K._ROLLOUT_MAX_N, K._TOPK_MAX_N) == (rollout_mod.MAX_TOKENS, topk_mod.MAX_TOKENS)  # one limit each

    def no_second_check(*args: object) -> None:
        raise AssertionError("the launcher validated inputs the gate had already checked")

    monkeypatch.setattr(rollout_mod, "_check_inputs", no_second_check)
    maps = [torch.softmax(torch.randn(2, 4, 17, 17), -1) for _ in range(2)]
    K.rollout(maps, query=torch.tensor([3, 16]))
    K.rollout(maps)
    assert launches and "_fuse_kernel" in launches
    launches.clear()
    monkeypatch.setattr(K, "_ROLLOUT_MAX_N", 16)  # N = 17 is now beyond the kernels' limit: the reference runs
    torch.testing.assert_close(K.rollout(maps, query=0), F.rollout(maps, query=0))
    assert launches == []
