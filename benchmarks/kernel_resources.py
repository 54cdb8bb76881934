"""Offline kernel-resource report: registers, spills, stack and shared memory of every Triton kernel the launchers
launch, at the benchmark shapes, compiled for a GPU target without a GPU.

How the numbers are obtained:

1. Triton's active driver is replaced, for the duration of the report only, by an offline stand-in that names the
   target (``sm_90`` by default) and never touches a device, and ``JITFunction.run`` is patched so that every
   ``kernel[grid](...)`` launch compiles (``warmup=True``) instead of launching. Each launch is recorded: kernel,
   grid, constexprs, ``num_warps`` and the compiled kernel. Both are restored afterwards, as are the kernels'
   in-memory compile caches (nothing compiled for the offline target stays behind).
2. The launchers themselves run (:func:`attnselect.kernels.rollout.rollout_forward`,
   :func:`attnselect.kernels.topk_gather.topk_gather_forward`, :func:`~attnselect.kernels.topk_gather.gather_backward`,
   :func:`attnselect.kernels.capture.attention_probs_forward`), so the report follows whatever they launch today
   (a kernel module imported under ``TRITON_INTERPRET=1`` earlier in the process is replaced, for the report only, by
   a private copy executed from the same source: interpreted kernels compile nothing).
   Their inputs are ``meta`` tensors at the real batch size: no memory, no arithmetic, and Triton sees the same
   specialisation (dtypes, 16-byte alignment of every pointer including offset views, integer arguments) and the
   launchers compute the same grids as on the GPU. Should a launcher ever need real data on the host, that case falls
   back to zero-filled CPU tensors at ``B = 4`` (a multiple of 4 keeps offset views of int32 buffers 16-byte aligned
   as at the real B) and says so in its ``shape``; its grid is then the one at ``B = 4``.
3. Each distinct compiled kernel (Triton's own cache key: kernel, specialisation, options) is analysed once:
   ``cuobjdump --dump-resource-usage`` on Triton's cubin gives registers, stack and static shared memory; the PTX is
   assembled again with Triton's ``ptxas`` flags plus ``-v`` for the spill stores/loads (its register and stack counts
   are checked against the cubin's). Shared memory is the static amount plus the dynamic amount Triton requests at
   launch.
4. ``blocks_per_sm`` is the occupancy calculator's estimate: registers allocated per warp in units of 256, out of
   four 16K-register sub-partitions; per-block shared memory plus the 1 KB the driver reserves per block, rounded up
   to 128 bytes; the SM's thread and block limits. ``limited_by`` names the binding limit. ``waves`` is the grid's
   blocks over ``SMs x blocks_per_sm`` on the reference device of the target (H100 SXM, 132 SMs, for sm_90).

Usage: ``python benchmarks/kernel_resources.py [--target sm_90] [--csv FILE] [--quick] [--inputs meta|cpu]``.
The CSV (default ``benchmarks/results/kernel_resources.csv``) is overwritten: it is a snapshot. ``--quick`` keeps the
first shape of each op. Do not run it with ``TRITON_INTERPRET=1`` (the interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import inspect
import math
import re
import subprocess
import sys
import tempfile
import types
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rollout import CHAIN_KNOBS
from harness import RESULTS, commit, patched

DEFAULT_CSV = RESULTS / "kernel_resources.csv"
COLUMNS = (
    "op",
    "shape",
    "dtype",
    "kernel",
    "num_warps",
    "constexprs",
    "grid",
    "launches",
    "registers",
    "spill_stores_bytes",
    "spill_loads_bytes",
    "stack_bytes",
    "shared_bytes",
    "blocks_per_sm",
    "limited_by",
    "waves",
    "target",
    "ptxas",
    "triton",
    "commit",
)
#: batch of the CPU fallback (a multiple of 4: int32 offset views stay 16-byte aligned, as at the real batch sizes)
FALLBACK_BATCH = 4


# ----------------------------------------------------------------------------------------------------------------------
# targets and occupancy
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of one compute capability (CUDA programming guide, table of technical specifications)."""

    capability: int
    device: str  # the reference device for ``waves``
    sm_count: int
    regs_per_sm: int = 65536
    reg_sub_partitions: int = 4
    reg_alloc_unit: int = 256  # registers, per warp
    max_regs_per_thread: int = 255
    max_regs_per_block: int = 65536
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024  # the opt-in maximum for one block (static + dynamic)
    smem_reserved_per_block: int = 1024
    smem_alloc_unit: int = 128
    max_threads_per_sm: int = 2048
    max_threads_per_block: int = 1024
    max_blocks_per_sm: int = 32


TARGETS = {
    "sm_80": SmLimits(80, "A100 SXM", 108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "sm_86": SmLimits(
        86,
        "RTX 3090",
        82,
        smem_per_sm=100 * 1024,
        smem_per_block=99 * 1024,
        max_threads_per_sm=1536,
        max_blocks_per_sm=16,
    ),
    "sm_89": SmLimits(
        89,
        "L40S",
        142,
        smem_per_sm=100 * 1024,
        smem_per_block=99 * 1024,
        max_threads_per_sm=1536,
        max_blocks_per_sm=24,
    ),
    "sm_90": SmLimits(90, "H100 SXM", 132),
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(registers: int, num_warps: int, shared_bytes: int, limits: SmLimits) -> tuple[int, str]:
    """Resident blocks per SM of a kernel and the limit that binds, as the CUDA occupancy calculator estimates them.

    Args:
        registers: registers per thread.
        num_warps: warps per block.
        shared_bytes: static + dynamic shared memory per block, in bytes.
        limits: the SM's limits.

    Returns:
        ``(blocks, limited_by)`` with ``limited_by`` one of ``"registers"``, ``"shared"``, ``"threads"``,
        ``"blocks"`` (on a tie the thread and block limits are named first); ``blocks`` is 0 when one block does
        not fit (the launch would fail).
    """
    if registers < 0 or num_warps < 1 or shared_bytes < 0:
        raise ValueError(
            f"need registers >= 0, num_warps >= 1, shared_bytes >= 0; got {registers}, {num_warps}, {shared_bytes}"
        )
    threads = 32 * num_warps
    regs_per_warp = _round_up(max(registers, 1) * 32, limits.reg_alloc_unit)
    warps_per_partition = (limits.regs_per_sm // limits.reg_sub_partitions) // regs_per_warp
    if registers > limits.max_regs_per_thread or regs_per_warp * num_warps > limits.max_regs_per_block:
        by_regs = 0
    else:
        by_regs = warps_per_partition * limits.reg_sub_partitions // num_warps
    if shared_bytes > limits.smem_per_block:
        by_smem = 0
    else:
        by_smem = limits.smem_per_sm // _round_up(shared_bytes + limits.smem_reserved_per_block, limits.smem_alloc_unit)
    by_threads = limits.max_threads_per_sm // threads if threads <= limits.max_threads_per_block else 0
    candidates = [  # on a tie the fixed limits are named first: the kernel's resources do not lower occupancy
        (by_threads, "threads"),
        (limits.max_blocks_per_sm, "blocks"),
        (by_smem, "shared"),
        (by_regs, "registers"),
    ]
    blocks, why = min(candidates, key=lambda c: c[0])
    return blocks, why


# ----------------------------------------------------------------------------------------------------------------------
# compiling launches offline
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One intercepted ``kernel[grid](...)`` call and the kernel Triton compiled for it."""

    kernel: str
    grid: tuple[int, ...]
    num_warps: int
    constexprs: dict[str, Any]
    compiled: Any  # triton.compiler.CompiledKernel

    @property
    def key(self) -> str:
        """Triton's hash of the compiled kernel: equal for the same kernel, specialisation and options."""
        return str(self.compiled.metadata.hash)


class CompileError(RuntimeError):
    """Triton could not compile an intercepted launch (other inputs would not help)."""


def _check_compilable() -> None:
    """Raise RuntimeError when this process cannot compile Triton kernels (interpreter mode)."""
    import triton
    from triton.runtime.jit import JITFunction

    if triton.knobs.runtime.interpret:
        raise RuntimeError("kernel resources need compiled kernels: unset TRITON_INTERPRET")
    if not isinstance(triton.language.standard.cdiv, JITFunction):
        raise RuntimeError(
            "Triton was imported under TRITON_INTERPRET=1 in this process (its own library functions are interpreted "
            "and cannot be compiled): run the report in a fresh process without it"
        )


class _OfflineDriver:
    """Stands in for Triton's CUDA driver: names the target, touches no device."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_device_interface(self) -> Any:
        return torch.cuda

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self) -> Any:
        raise NotImplementedError("the offline driver compiles only: nothing can be timed")


def parse_target(target: str) -> tuple[int, SmLimits]:
    """``"sm_90"`` (or ``"90"``, ``"sm_90a"``) -> ``(90, limits)``; ValueError for a target without limits here."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", target.strip().lower())
    name = f"sm_{m.group(1)}" if m else target
    if name not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    return TARGETS[name].capability, TARGETS[name]


@contextlib.contextmanager
def offline_compile(target: str = "sm_90") -> Iterator[list[Launch]]:
    """Compile, never launch, every Triton launch made inside the block; yields the list the launches are added to.

    Triton's active driver becomes an offline stand-in for ``target`` and ``JITFunction.run`` compiles with
    ``warmup=True``. On exit (also on error) the driver, ``JITFunction.run`` and the in-memory compile caches of
    every kernel launched inside are restored, so later launches in the process behave as before.

    Raises:
        RuntimeError: ``TRITON_INTERPRET=1`` is set, or was when Triton was imported (the interpreter compiles
            nothing).
        CompileError: Triton could not compile a launch made inside the block.
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    _check_compilable()
    capability, _ = parse_target(target)
    launches: list[Launch] = []
    saved_driver = driver.__dict__.get("_active")
    saved_run = JITFunction.__dict__["run"]
    saved_caches: dict[int, tuple[Any, Any]] = {}

    def compile_only(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if id(fn) not in saved_caches:  # a private cache for the offline target, dropped on exit
            saved_caches[id(fn)] = (fn, fn.device_caches)
            fn.device_caches = defaultdict(fn.create_binder)
        try:
            compiled = saved_run(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:
            raise CompileError(f"{fn.fn.__name__} did not compile for sm_{capability}: {err}") from err
        names = {p.name for p in fn.params}
        bound = inspect.signature(fn.fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        if callable(grid):
            grid = grid(dict(bound.arguments))
        constexprs = {p.name: bound.arguments.get(p.name) for p in fn.params if p.is_constexpr}
        launches.append(
            Launch(
                kernel=fn.fn.__name__,
                grid=tuple(int(g) for g in grid) if grid is not None else (),
                num_warps=int(compiled.metadata.num_warps),
                constexprs=constexprs,
                compiled=compiled,
            )
        )
        return compiled

    driver.set_active(_OfflineDriver(GPUTarget("cuda", capability, 32)))
    try:
        JITFunction.run = compile_only
        yield launches
    finally:
        JITFunction.run = saved_run
        for fn, caches in saved_caches.values():
            fn.device_caches = caches
        driver.set_active(saved_driver)


# ----------------------------------------------------------------------------------------------------------------------
# resource usage of a compiled kernel
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Resources:
    """Resource usage of one compiled kernel (bytes are per thread for stack and spills, per block for shared)."""

    registers: int
    stack_bytes: int
    spill_stores_bytes: int
    spill_loads_bytes: int
    static_shared_bytes: int
    dynamic_shared_bytes: int
    checked: bool = True  # the re-assembled PTX agrees with Triton's cubin on registers and stack

    @property
    def shared_bytes(self) -> int:
        return self.static_shared_bytes + self.dynamic_shared_bytes


def parse_ptxas_log(log: str, kernel: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes of entry ``kernel`` from ``ptxas -v`` output.

    Returns:
        ``{"registers", "stack_bytes", "spill_stores_bytes", "spill_loads_bytes"}``.

    Raises:
        ValueError: the log has no such entry function.
    """
    start = log.find(f"Function properties for {kernel}\n")
    if start < 0:
        raise ValueError(f"ptxas output has no function properties for {kernel!r}")
    section = log[start:]
    props = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", section)
    regs = re.search(r"Used (\d+) registers", section)
    if props is None or regs is None:
        raise ValueError(f"ptxas output for {kernel!r} lacks the stack/spill line or the register count")
    return {
        "registers": int(regs.group(1)),
        "stack_bytes": int(props.group(1)),
        "spill_stores_bytes": int(props.group(2)),
        "spill_loads_bytes": int(props.group(3)),
    }


def parse_resource_usage(text: str, kernel: str) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of ``kernel`` from ``cuobjdump --dump-resource-usage`` output."""
    m = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(REG:.*)", text)
    if m is None:
        raise ValueError(f"cuobjdump output has no resource usage for {kernel!r}")
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", m.group(1))}


def _tools(capability: int) -> tuple[str, str, str]:
    """Paths of the ptxas and cuobjdump Triton uses for ``capability``, and the ptxas arch name."""
    from triton import knobs

    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        ptxas = get_ptxas(capability).path
        arch = sm_arch_from_capability(capability)
    except ImportError:  # older layouts: the same defaults
        ptxas = knobs.nvidia.ptxas.path
        arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    return ptxas, knobs.nvidia.cuobjdump.path, arch


def ptxas_version(capability: int) -> str:
    ptxas, _, _ = _tools(capability)
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\S+),", out)
    return m.group(1) if m else "unknown"


def analyse(compiled: Any, capability: int) -> Resources:
    """Resource usage of one compiled kernel (see the module docstring for the method)."""
    md = compiled.metadata
    name = md.name
    ptxas, cuobjdump, arch = _tools(capability)
    with tempfile.TemporaryDirectory(prefix="kernel_resources_") as tmp:
        cubin = Path(tmp, "triton.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
        if dump.returncode:
            raise RuntimeError(f"cuobjdump failed on {name}: {dump.stderr.strip()}")
        usage = parse_resource_usage(dump.stdout, name)
        ptx = Path(tmp, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        cmd = [ptxas, "-lineinfo", "-v"]  # the flags Triton's make_cubin passes, plus -v
        if not md.enable_fp_fusion:
            cmd.append("--fmad=false")
        cmd.append("--regAllocOptLevel=2")
        if md.ptx_options:
            cmd += str(md.ptx_options).split()
        cmd += [f"--gpu-name={arch}", str(ptx), "-o", str(Path(tmp, "again.cubin"))]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"ptxas failed on {name}: {run.stderr.strip()[:2000]}")
        log = parse_ptxas_log(run.stderr + run.stdout, name)
    checked = log["registers"] == usage["REG"] and log["stack_bytes"] == usage["STACK"]
    if not checked:
        print(
            f"warning: {name}: ptxas -v says {log['registers']} registers / {log['stack_bytes']} B stack, "
            f"Triton's cubin {usage['REG']} / {usage['STACK']}: spill figures may not match the cubin",
            file=sys.stderr,
        )
    return Resources(
        registers=usage["REG"],
        stack_bytes=usage["STACK"],
        spill_stores_bytes=log["spill_stores_bytes"],
        spill_loads_bytes=log["spill_loads_bytes"],
        static_shared_bytes=usage.get("SHARED", 0),
        dynamic_shared_bytes=int(md.shared),
        checked=checked,
    )


# ----------------------------------------------------------------------------------------------------------------------
# the cases: the benchmark shapes, through the launchers
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One launcher call: ``run(device, batch)`` builds inputs on ``device`` and calls the launcher."""

    op: str
    shape: str  # without the batch: ``B=<batch>`` is inserted after its first word
    dtype: str
    batch: int
    run: Callable[[str, int], object]
    group: str = field(default="")  # the benchmark shape (``--quick`` keeps the first of each op)


_private_copies: dict[str, types.ModuleType] = {}


def launcher_module(name: str) -> types.ModuleType:
    """The kernel module ``name`` (e.g. ``"attnselect.kernels.rollout"``) with compilable kernels.

    That is the imported module (``sys.modules``; for ``rollout`` the package attribute of that name is the entry
    point, not the module) unless it was imported under ``TRITON_INTERPRET=1``, whose kernels the interpreter runs
    and nothing compiles; then a private copy executed from the same source file, never entered in ``sys.modules``.
    """
    from triton.runtime.interpreter import InterpretedFunction

    module = sys.modules.get(name) or importlib.import_module(name)
    if not any(isinstance(v, InterpretedFunction) for v in vars(module).values()):
        return module
    if name not in _private_copies:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load a fresh copy of {name}")
        copy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copy)
        _private_copies[name] = copy
    return _private_copies[name]


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rollout_case(name: str, b: int, h: int, n: int, dtype: torch.dtype, query: str, chain: str | None = None) -> Case:
    def run(device: str, batch: int) -> object:
        mod = launcher_module("attnselect.kernels.rollout")
        maps = [torch.zeros(batch, h, n, n, dtype=dtype, device=device) for _ in range(2)]
        if query == "full":
            rows = None
        elif query == "row0":
            rows = torch.zeros(batch, dtype=torch.long, device=device)
        else:  # per-sample EOS positions, as the text encoder's rollout asks for
            rows = torch.arange(batch, device=device) % (n // 2) + n // 2
        # the chain the gate takes on a GPU (whatever the inputs' device), or another one (`chain`), to compare
        gpu = {"SAMPLE_MIN_BATCH": mod._sample_min_batch(torch.device("cuda"))}
        with patched(mod, **(CHAIN_KNOBS[chain] if chain else gpu)):
            return mod.rollout_forward(maps, [0.25, 0.25], "mean", "entry0", rows)

    label = {"full": "full", "row0": "query row 0", "eos": "query rows EOS"}[query]
    label += f" {chain.replace('_', '-')}" if chain else ""
    return Case("rollout", f"{name} H={h} N={n} L=2 {label}", _dt(dtype), b, run, group=f"{name} {_dt(dtype)}")


def _topk_case(name: str, b: int, n: int, d: int, k: int, valid: bool, tokens_dtype: torch.dtype) -> Case:
    def run(device: str, batch: int) -> object:
        topk_gather_forward = launcher_module("attnselect.kernels.topk_gather").topk_gather_forward
        scores = torch.zeros(batch, n, dtype=torch.float32, device=device)
        tokens = torch.zeros(batch, n, d, dtype=tokens_dtype, device=device)
        mask = torch.ones(batch, n, dtype=torch.bool, device=device) if valid else None
        return topk_gather_forward(scores, k, tokens, mask)

    label = "valid mask" if valid else "no mask"
    dtype = f"scores float32, tokens {_dt(tokens_dtype)}"
    return Case("topk_gather", f"{name} N={n} D={d} k={k} {label}", dtype, b, run, name)


def _gather_backward_case(name: str, b: int, n: int, d: int, k: int) -> Case:
    def run(device: str, batch: int) -> object:
        gather_backward = launcher_module("attnselect.kernels.topk_gather").gather_backward
        grad_out = torch.zeros(batch, k, d, dtype=torch.float16, device=device)
        indices = torch.arange(k, device=device).expand(batch, k).contiguous()
        mask = torch.ones(batch, k, dtype=torch.bool, device=device)
        return gather_backward(grad_out, indices, mask, n)

    return Case("gather_backward", f"{name} N={n} D={d} k={k}", "float16", b, run, name)


def _capture_case(name: str, b: int, h: int, n: int, d: int, causal: bool, row0: bool) -> Case:
    def run(device: str, batch: int) -> object:
        attention_probs_forward = launcher_module("attnselect.kernels.capture").attention_probs_forward
        q = torch.zeros(batch, h, n, d, dtype=torch.float16, device=device)
        k = torch.zeros_like(q)
        rows = torch.zeros(1, dtype=torch.long, device=device) if row0 else None
        return attention_probs_forward(q, k, d**-0.5, None, causal, "mean", rows)

    label = f"H={h} N={n} d={d}" + (" causal" if causal else "") + (" query row 0" if row0 else " full")
    return Case("capture", f"{name} {label}", "float16", b, run, name)


def cases(quick: bool = False) -> list[Case]:
    """The benchmark shapes of ``bench_rollout.py``, ``bench_topk_gather.py`` and ``bench_capture.py`` (CUDA)."""
    out: list[Case] = []
    fp16, fp32 = torch.float16, torch.float32
    for name, b, h, n, dtype, queries in (
        ("itself-image", 256, 12, 193, torch.float16, ("full", "row0")),
        ("itself-image", 256, 12, 193, torch.float32, ("full", "row0")),
        ("itself-text", 256, 8, 77, torch.float16, ("full", "eos")),
        ("vit-l14-336", 64, 16, 577, torch.float16, ("full", "row0")),
    ):
        out += [_rollout_case(name, b, h, n, dtype, q) for q in queries]
        if name == "itself-image":  # the chain the gate takes (multi-pass) and the per-sample one beside it
            out.append(_rollout_case(name, b, h, n, dtype, "row0", chain="per_sample"))
    for name, b, n, d, k in (
        ("itself-image", 256, 193, 512, 96),
        ("itself-text", 256, 77, 512, 37),
        ("vit-l14-336", 64, 577, 768, 288),
    ):
        # no mask: the benchmark's call; valid mask: the selection bank's call (it always passes one); fp32 tokens:
        # a model run without autocast
        out += [_topk_case(name, b, n, d, k, valid, dt) for valid, dt in ((False, fp16), (True, fp16), (False, fp32))]
        out.append(_gather_backward_case(name, b, n, d, k))
    for name, b, h, n, causal in (
        ("itself-image", 256, 12, 193, False),
        ("itself-text", 256, 8, 77, True),
        ("vit-l14-336", 64, 16, 577, False),
    ):
        out += [_capture_case(name, b, h, n, 64, causal, False), _capture_case(name, b, h, n, 64, causal, True)]
    if quick:
        first: dict[str, str] = {}
        for c in out:
            first.setdefault(c.op, c.group)
        out = [c for c in out if c.group == first[c.op]]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------------------
def _compact(values: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return str(int(v)) if isinstance(v, bool) else str(v)

    return ";".join(f"{k}={fmt(v)}" for k, v in values.items())


def _launch_case(case: Case, target: str, inputs: str) -> tuple[list[Launch], str]:
    """Run one case's launcher under :func:`offline_compile`; falls back to CPU inputs when meta ones fail."""
    attempts = [("meta", case.batch), ("cpu", FALLBACK_BATCH)] if inputs == "meta" else [("cpu", FALLBACK_BATCH)]
    for i, (device, batch) in enumerate(attempts):
        try:
            with offline_compile(target) as launches, torch.no_grad():
                case.run(device, batch)
        except CompileError:
            raise
        except Exception as err:
            if i + 1 == len(attempts):
                raise
            print(
                f"note: {case.op} {case.shape}: meta inputs failed ({err!r:.200}); retrying on CPU at "
                f"B={FALLBACK_BATCH}",
                file=sys.stderr,
            )
            continue
        if not launches:
            raise RuntimeError(f"{case.op} {case.shape}: the launcher launched no Triton kernel")
        name, _, rest = case.shape.partition(" ")
        shape = f"{name} B={batch}" + (f" {rest}" if rest else "")
        if device == "cpu":
            shape += f" (compiled and grid at B={batch})"
        return launches, shape
    raise AssertionError("unreachable")


def collect(
    target: str = "sm_90",
    quick: bool = False,
    *,
    case_list: list[Case] | None = None,
    inputs: str = "meta",
    strict: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Compile every kernel the launchers launch for the benchmark shapes and report their resource usage.

    Args:
        target: GPU target, ``"sm_90"`` (H100) by default; one of :data:`TARGETS`.
        quick: only the first shape of each op.
        case_list: the cases to run instead of :func:`cases`.
        inputs: ``"meta"`` (real batch sizes, no memory) or ``"cpu"`` (zero-filled tensors at ``B = 4``).
        strict: raise on the first case that fails; otherwise report it on stderr and go on.
        progress: show a progress bar on stderr.

    Returns:
        One dict per (case, kernel, specialisation, grid) with the keys of :data:`COLUMNS`; ``launches`` counts the
        identical launches it stands for.

    Raises:
        ValueError: unknown ``target`` or ``inputs``.
        RuntimeError: this process cannot compile Triton kernels (interpreter mode); with ``strict``, a case that
            failed (compile, ptxas, or a launcher error).
    """
    import triton

    capability, limits = parse_target(target)
    if inputs not in ("meta", "cpu"):
        raise ValueError(f"inputs must be 'meta' or 'cpu', got {inputs!r}")
    _check_compilable()
    todo = cases(quick) if case_list is None else case_list
    ptxas = ptxas_version(capability)
    info = {"target": f"sm_{capability}", "ptxas": ptxas, "triton": triton.__version__, "commit": commit()}
    analysed: dict[str, Resources] = {}
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    bar: Any = todo
    if progress:
        from tqdm import tqdm

        bar = tqdm(todo, desc=f"compiling for sm_{capability}", unit="case", file=sys.stderr)
    for case in bar:
        try:
            launches, shape = _launch_case(case, target, inputs)
            groups: dict[tuple[str, tuple[int, ...]], list[Launch]] = {}
            for launch in launches:
                groups.setdefault((launch.key, launch.grid), []).append(launch)
            for (key, grid), same in groups.items():
                launch = same[0]
                if key not in analysed:
                    analysed[key] = analyse(launch.compiled, capability)
                res = analysed[key]
                blocks, why = occupancy(res.registers, launch.num_warps, res.shared_bytes, limits)
                total = math.prod(grid) if grid else 0
                rows.append(
                    {
                        "op": case.op,
                        "shape": shape,
                        "dtype": case.dtype,
                        "kernel": launch.kernel,
                        "num_warps": launch.num_warps,
                        "constexprs": _compact(launch.constexprs),
                        "grid": "x".join(str(g) for g in grid),
                        "launches": len(same),
                        "registers": res.registers,
                        "spill_stores_bytes": res.spill_stores_bytes,
                        "spill_loads_bytes": res.spill_loads_bytes,
                        "stack_bytes": res.stack_bytes,
                        "shared_bytes": res.shared_bytes,
                        "blocks_per_sm": blocks,
                        "limited_by": why,
                        "waves": round(total / (limits.sm_count * blocks), 2) if blocks else math.inf,
                        **info,
                    }
                )
        except Exception as err:
            if strict:
                raise RuntimeError(f"{case.op} {case.shape}: {err}") from err
            failures.append(f"{case.op} {case.shape}: {err!r}")
            print(f"FAILED {failures[-1]}"[:2000], file=sys.stderr)
    if failures:
        print(f"{len(failures)} case(s) failed", file=sys.stderr)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` to ``path`` (overwritten: the report is a snapshot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _varying_constexprs(rows: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Per kernel, the constexprs whose values differ between its rows (what tells those rows apart)."""
    values: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        for item in filter(None, r["constexprs"].split(";")):
            name, _, value = item.partition("=")
            values[r["kernel"]][name].add(value)
    return {k: {n for n, v in names.items() if len(v) > 1} for k, names in values.items()}


def table(rows: list[dict[str, Any]]) -> str:
    """A readable table of ``rows``; rows that spill are marked ``<< SPILLS``.

    The ``varying`` column shows the constexprs that differ between rows of the same kernel (all of them are in the
    CSV).
    """
    head = (
        "op",
        "shape",
        "dtype",
        "kernel",
        "varying",
        "warps",
        "grid",
        "regs",
        "spill st/ld",
        "stack",
        "smem",
        "blk/SM",
        "limit",
        "waves",
    )
    varying = _varying_constexprs(rows)
    body = []
    for r in rows:
        dtype = re.sub(r"float(\d+)", r"f\1", r["dtype"]).replace("scores ", "").replace(", tokens ", "/")
        shown = [i for i in r["constexprs"].split(";") if i.partition("=")[0] in varying.get(r["kernel"], ())]
        body.append(
            (
                r["op"],
                r["shape"],
                dtype,
                r["kernel"] + (f" x{r['launches']}" if r["launches"] > 1 else ""),
                ",".join(shown),
                str(r["num_warps"]),
                r["grid"],
                str(r["registers"]),
                f"{r['spill_stores_bytes']}/{r['spill_loads_bytes']}",
                str(r["stack_bytes"]),
                str(r["shared_bytes"]),
                str(r["blocks_per_sm"]),
                r["limited_by"],
                str(r["waves"]),
            )
        )
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r, b in zip(rows, body):
        flag = "  << SPILLS" if r["spill_stores_bytes"] or r["spill_loads_bytes"] else ""
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() + flag)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="sm_90", help=f"GPU target, one of {sorted(TARGETS)} (default sm_90)")
    parser.add_argument("--csv", default=None, help=f"CSV to overwrite (default {DEFAULT_CSV})")
    parser.add_argument("--quick", action="store_true", help="only the first shape of each op")
    parser.add_argument(
        "--inputs",
        choices=("meta", "cpu"),
        default="meta",
        help="meta: real batch sizes, no memory (default); cpu: zero-filled tensors at B=4",
    )
    args = parser.parse_args(argv)
    rows = collect(args.target, args.quick, inputs=args.inputs, strict=False)
    path = write_csv(rows, Path(args.csv) if args.csv else DEFAULT_CSV)
    print(table(rows))
    spilling = sum(1 for r in rows if r["spill_stores_bytes"] or r["spill_loads_bytes"])
    limits = TARGETS[f"sm_{parse_target(args.target)[0]}"]
    configs = len({(r["kernel"], r["constexprs"], r["num_warps"]) for r in rows})
    print(
        f"\n{len(rows)} rows, {configs} distinct kernel/constexprs/warps configurations, {spilling} rows spill; "
        f"waves on {limits.device} ({limits.sm_count} SMs); wrote {path}"
    )
    expected = len(cases(args.quick))
    done = len({(r["op"], r["shape"], r["dtype"]) for r in rows})
    return 0 if done == expected else 1


if __name__ == "__main__":
    sys.exit(main())
