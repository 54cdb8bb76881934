"""The offline kernel-resource report (benchmarks/kernel_resources.py): compile-only interception, ptxas/cuobjdump
parsing, the occupancy estimate, and one real launcher."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y"):
    pytest.skip("the report compiles kernels; the interpreter compiles nothing", allow_module_level=True)

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
_spec = importlib.util.spec_from_file_location("kernel_resources", _PATH)
kr = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("kernel_resources", kr)
_spec.loader.exec_module(kr)

try:
    _TOOLS = kr._tools(90)
except Exception:  # a Triton without the NVIDIA backend
    _TOOLS = None
if _TOOLS is None or not all(os.access(p, os.X_OK) for p in _TOOLS[:2]):
    pytest.skip("Triton's bundled ptxas/cuobjdump are missing", allow_module_level=True)

from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import attnselect.kernels as K  # noqa: E402
from attnselect import functional as F  # noqa: E402

H100 = kr.TARGETS["sm_90"]


@triton.jit
def _scale_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    tl.store(Y + offs, tl.load(X + offs, mask=m) * 2.0, mask=m)


@triton.jit
def _heavy_kernel(X, Y, STEPS, BM: tl.constexpr, BN: tl.constexpr):
    # a [BM, BN] fp32 tile held across a run-time loop: with one warp it cannot stay in registers
    r = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    acc = tl.load(X + r)
    for i in range(STEPS):
        acc = acc * tl.load(X + i + r) + 1.0
    tl.store(Y + r, acc)


@triton.jit
def _broken_kernel(X, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), 1.0)  # BLOCK = 3 is not a power of two: does not compile


# ----------------------------------------------------------------------------------------------------------------------
# no compilation
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "regs, warps, smem, blocks, why",
    [
        (255, 4, 0, 2, "registers"),  # 255*32 -> 8192 per warp, 2 warps per 16K partition, 8 warps per SM
        (168, 4, 1152, 3, "registers"),  # 5376 per warp, 3 per partition, 12 warps
        (48, 8, 2048, 5, "registers"),  # 1536 per warp, 10 per partition, 40 warps
        (32, 4, 0, 16, "threads"),  # registers also allow 16: the thread limit is named
        (16, 1, 0, 32, "blocks"),  # 64 by threads, 128 by registers, 32 blocks at most
        (64, 4, 100 * 1024, 2, "shared"),  # 228 KB // (100 KB + 1 KB reserved)
        (64, 4, 228 * 1024, 0, "shared"),  # over the 227 KB a block may have
        (256, 1, 0, 0, "registers"),  # over 255 registers per thread
    ],
)
def test_occupancy_by_hand(regs, warps, smem, blocks, why):
    assert kr.occupancy(regs, warps, smem, H100) == (blocks, why)


def test_occupancy_other_target_and_bad_input():
    assert kr.occupancy(64, 4, 100 * 1024, kr.TARGETS["sm_80"]) == (1, "shared")  # 164 KB per SM
    assert kr.occupancy(32, 4, 0, kr.TARGETS["sm_86"]) == (12, "threads")  # 1536 threads per SM
    with pytest.raises(ValueError, match="num_warps"):
        kr.occupancy(32, 0, 0, H100)


def test_parse_target():
    assert kr.parse_target("sm_90")[0] == kr.parse_target("90")[0] == kr.parse_target("SM_90a")[0] == 90
    with pytest.raises(ValueError, match="target must be one of"):
        kr.parse_target("sm_70")


def test_parse_tool_output():
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function 'other' for 'sm_90a'\n"
        "ptxas info    : Function properties for other\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 12 registers, used 0 barriers\n"
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    800 bytes stack frame, 784 bytes spill stores, 780 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 800 bytes cumulative stack size\n"
    )
    assert kr.parse_ptxas_log(log, "k") == {
        "registers": 255,
        "stack_bytes": 800,
        "spill_stores_bytes": 784,
        "spill_loads_bytes": 780,
    }
    assert kr.parse_ptxas_log(log, "other")["registers"] == 12
    with pytest.raises(ValueError, match="no function properties"):
        kr.parse_ptxas_log(log, "missing")
    dump = "Resource usage:\n Common:\n  GLOBAL:0\n Function k:\n  REG:40 STACK:16 SHARED:1024 LOCAL:0 TEXTURE:0\n"
    assert kr.parse_resource_usage(dump, "k") == {"REG": 40, "STACK": 16, "SHARED": 1024, "LOCAL": 0, "TEXTURE": 0}
    with pytest.raises(ValueError, match="no resource usage"):
        kr.parse_resource_usage(dump, "other")


def test_case_without_launch_is_an_error():
    idle = kr.Case("none", "idle", "float32", 1, lambda device, batch: None)
    with pytest.raises(RuntimeError, match="launched no Triton kernel"):
        kr.collect(case_list=[idle], progress=False)
    assert kr.collect(case_list=[idle], progress=False, strict=False) == []


def test_module_imported_under_the_interpreter_is_replaced_by_a_compilable_copy(monkeypatch):
    name = "attnselect.kernels.topk_gather"
    real = kr.launcher_module(name)
    spec = importlib.util.find_spec(name)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interpreted)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not isinstance(interpreted._topk_gather_kernel, JITFunction)
    monkeypatch.setitem(sys.modules, name, interpreted)
    copy = kr.launcher_module(name)
    assert copy is not interpreted and isinstance(copy._topk_gather_kernel, JITFunction)
    assert sys.modules[name] is interpreted  # the process's module is left alone
    monkeypatch.undo()
    assert kr.launcher_module(name) is real


def test_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"), kr.offline_compile():
        pass
    monkeypatch.undo()
    # Triton itself imported under the interpreter: its library functions (tl.cdiv, tl.sum, ...) are interpreted
    monkeypatch.setattr(triton.language.standard, "cdiv", object())
    with pytest.raises(RuntimeError, match="fresh process"), kr.offline_compile():
        pass
    assert JITFunction.__dict__["run"] is not None and not isinstance(driver.__dict__.get("_active"), kr._OfflineDriver)


def test_state_restored_after_an_error():
    saved_driver, saved_run = driver.__dict__.get("_active"), JITFunction.__dict__["run"]
    caches = _scale_kernel.device_caches
    with pytest.raises(ZeroDivisionError), kr.offline_compile() as launches:
        assert isinstance(driver.active, kr._OfflineDriver)
        assert JITFunction.__dict__["run"] is not saved_run
        1 / 0  # noqa: B018
    assert launches == []
    assert driver.__dict__.get("_active") is saved_driver
    assert JITFunction.__dict__["run"] is saved_run
    assert _scale_kernel.device_caches is caches


# ----------------------------------------------------------------------------------------------------------------------
# compiling (each about 1-3 s on a cold Triton cache)
# ----------------------------------------------------------------------------------------------------------------------
def test_launch_compiles_without_running_and_everything_is_restored():
    saved_driver, saved_run = driver.__dict__.get("_active"), JITFunction.__dict__["run"]
    caches = _scale_kernel.device_caches
    g = torch.Generator().manual_seed(0)
    scores, tokens = torch.rand(3, 20, generator=g), torch.randn(3, 20, 8, generator=g)
    before = K.select_topk_gather(scores, 5, tokens)  # the gate on CPU: the reference path
    x = torch.arange(1000, dtype=torch.float32)
    y = torch.zeros(1000)
    with kr.offline_compile("sm_90") as launches:
        _scale_kernel[(8,)](x, y, 1000, BLOCK=128)
    assert torch.equal(y, torch.zeros(1000))  # compiled, not run
    (launch,) = launches
    assert (launch.kernel, launch.grid, launch.num_warps, launch.constexprs) == (
        "_scale_kernel",
        (8,),
        4,
        {"BLOCK": 128},
    )
    assert launch.compiled.metadata.target.arch == 90
    res = kr.analyse(launch.compiled, 90)
    assert res.checked  # ptxas -v on the PTX agrees with Triton's cubin
    assert 1 <= res.registers <= 32
    assert (res.spill_stores_bytes, res.spill_loads_bytes, res.stack_bytes) == (0, 0, 0)
    # the process is as before: driver, JITFunction.run, the kernel's own compile cache, the gate's CPU path
    assert driver.__dict__.get("_active") is saved_driver
    assert JITFunction.__dict__["run"] is saved_run
    assert _scale_kernel.device_caches is caches
    after = K.select_topk_gather(scores, 5, tokens)
    indices, mask = F.select_topk(scores, 5)
    for b, a in zip(before, after):
        assert torch.equal(b, a)
    assert torch.equal(after[0], indices) and torch.equal(after[1], mask)
    assert torch.equal(after[2], F.gather_tokens(tokens, indices))


def test_compile_error_is_reported_not_retried():
    devices = []

    def run(device: str, batch: int) -> None:
        devices.append(device)
        _broken_kernel[(batch,)](torch.empty(4, device=device), BLOCK=3)

    with pytest.raises(RuntimeError, match="_broken_kernel did not compile for sm_90"):
        kr.collect(case_list=[kr.Case("broken", "broken", "float32", 2, run)], progress=False)
    assert devices == ["meta"]  # other inputs would not help: no CPU retry


def test_launcher_needing_host_data_falls_back_to_cpu():
    def run(device: str, batch: int) -> None:
        x = torch.zeros(batch * 100, device=device)
        n = int(x.sum().item()) + x.numel()  # reads data on the host: impossible with meta tensors
        _scale_kernel[(triton.cdiv(n, 128),)](x, x, n, BLOCK=128)

    (row,) = kr.collect(case_list=[kr.Case("scale", "toy N=100", "float32", 64, run)], progress=False)
    assert row["shape"] == f"toy B={kr.FALLBACK_BATCH} N=100 (compiled and grid at B={kr.FALLBACK_BATCH})"
    assert row["grid"] == str(triton.cdiv(kr.FALLBACK_BATCH * 100, 128))
    assert row["constexprs"] == "BLOCK=128" and row["spill_stores_bytes"] == 0


@pytest.mark.slow
def test_register_heavy_kernel_spills():
    x = torch.empty(128 * 64 + 64, device="meta")
    with kr.offline_compile() as launches:
        _heavy_kernel[(1,)](x, x, 16, BM=128, BN=64, num_warps=1)
    res = kr.analyse(launches[0].compiled, 90)
    assert res.checked
    assert res.spill_stores_bytes > 0 and res.spill_loads_bytes > 0 and res.stack_bytes > 0
    assert res.registers <= 255


def _topk_cases(batch: int) -> list:
    n, d, k = 50, 48, 12

    def forward(device: str, b: int) -> object:
        scores = torch.zeros(b, n, device=device)
        return kr.launcher_module("attnselect.kernels.topk_gather").topk_gather_forward(
            scores, k, torch.zeros(b, n, d, dtype=torch.float16, device=device)
        )

    def backward(device: str, b: int) -> object:
        gather_backward = kr.launcher_module("attnselect.kernels.topk_gather").gather_backward
        idx = torch.zeros(b, k, dtype=torch.long, device=device)
        mask = torch.ones(b, k, dtype=torch.bool, device=device)
        return gather_backward(torch.zeros(b, k, d, dtype=torch.float16, device=device), idx, mask, n)

    return [
        kr.Case("topk_gather", f"small N={n} D={d} k={k}", "float16", batch, forward),
        kr.Case("gather_backward", f"small N={n} D={d} k={k}", "float16", batch, backward),
    ]


def test_real_launcher_rows_and_csv(tmp_path):
    rows = kr.collect(case_list=_topk_cases(6), progress=False)
    assert [r["kernel"] for r in rows] == ["_topk_gather_kernel", "_gather_backward_kernel"]
    for r in rows:
        assert set(r) == set(kr.COLUMNS)
        assert r["grid"].split("x")[0] == "6"  # the launcher's grid at the requested batch (meta inputs)
        assert r["shape"] == "small B=6 N=50 D=48 k=12"
        assert 0 < r["registers"] <= 255 and r["blocks_per_sm"] >= 1
        assert r["launches"] == 1 and r["target"] == "sm_90"
    assert "BLOCK_N=64" in rows[0]["constexprs"]  # next power of two of N = 50
    # meta inputs at B=6 compile exactly what zero-filled CPU inputs at B=4 compile (same Triton key)
    keys = []
    for device, batch in (("meta", 6), ("cpu", 4)):
        with kr.offline_compile() as launches:
            _topk_cases(batch)[0].run(device, batch)
        keys.append([launch.key for launch in launches])
    assert keys[0] == keys[1] and len(keys[0]) == 1
    path = kr.write_csv(rows, tmp_path / "r.csv")
    kr.write_csv(rows, path)  # overwritten, not appended
    with path.open() as f:
        back = list(csv.DictReader(f))
    assert [r["kernel"] for r in back] == [r["kernel"] for r in rows]
    spilling = dict(rows[0], spill_stores_bytes=8, spill_loads_bytes=4)
    lines = kr.table([*rows, spilling]).splitlines()[2:]
    assert [line.endswith("<< SPILLS") for line in lines] == [bool(r["spill_stores_bytes"]) for r in rows] + [True]
    assert " 8/4 " in lines[-1]
