"""Where each Triton op's time goes: device time per kernel, the host's time to issue a call, and the wall time.

The benchmark scripts give one number per provider; this one splits it. For every Triton provider at the CUDA
benchmark shapes of ``bench_rollout.py``, ``bench_topk_gather.py`` and ``bench_capture.py`` (plus the PyTorch
baseline the target is stated against: ``torch.topk`` + ``torch.gather``, the host's SDPA) it records, per call:

- ``wall``: the median time of one call timed with CUDA events, as in the benchmarks;
- ``host``: the median time until the Python call returns, the device idle at the start of each call (the
  launches, checks and allocations on the host); when ``host`` comes close to ``wall``, the call is bound by the host;
- ``device``: the sum of the device time of every kernel (and memset/memcpy) the call runs, from ``torch.profiler``
  over ``--calls`` calls; when it comes close to ``wall``, the call is bound by its kernels;
- ``kernel <name>``: each of them on its own.

Rows go to ``benchmarks/results/profile.csv`` (appended; columns ``op, provider, shape, dtype, part, us_per_call,
calls, device, versions, commit``) and ``profile.png`` shows the latest run: per shape and provider, the wall, host
and device times, the device time split by kernel. On a CPU (the tests, under ``TRITON_INTERPRET=1``) the shapes are
tiny and only ``wall`` and ``host`` are recorded: nothing runs on a device.

Usage: ``python benchmarks/profile_kernels.py [--quick] [--device cuda|cpu] [--ops rollout,topk_gather,capture]
[--calls 20] [--csv FILE] [--no-plot]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_capture
import bench_rollout
import bench_topk_gather
from baselines import topk_gather_torch
from harness import (
    RESULTS,
    append_csv,
    commit,
    device_name,
    finish_figure,
    kernels_available,
    pyplot,
    time_ms,
    versions,
)

OPS = ("rollout", "topk_gather", "capture")
COLUMNS = ("op", "provider", "shape", "dtype", "part", "us_per_call", "calls", "device", "versions", "commit")
#: tiny shapes for a run on the CPU (the Triton interpreter): the code paths, not the times
CPU_SHAPES = {
    "rollout": [(2, 2, 17, torch.float32, False, "tiny"), (2, 2, 150, torch.float32, False, "tiny")],
    "topk_gather": [(2, 17, 8, 5, "tiny")],
    "capture": [(2, 2, 17, 16, False, "tiny")],
}


@dataclass
class Part:
    op: str
    provider: str
    shape: str
    dtype: str
    part: str
    us_per_call: float
    calls: int
    device: str
    versions: str
    commit: str


@dataclass
class Case:
    """One provider at one shape: ``fn`` is one call (forward, or forward + backward)."""

    op: str
    provider: str
    shape: str
    dtype: str
    fn: Callable[[], object]
    grad: bool = False  # the call runs a backward pass (else it runs under torch.no_grad)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def host_us(fn: Callable[[], object], device: str, calls: int) -> float:
    """Median microseconds until ``fn()`` returns, the device idle at the start of each call."""
    fn()
    times = []
    for _ in range(calls):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    _sync(device)
    return statistics.median(times)


def device_us(fn: Callable[[], object], calls: int) -> dict[str, float]:
    """Device microseconds per call of every kernel (and memset/memcpy) ``fn()`` runs, by name (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return kernel_times(prof.events(), calls)


def kernel_times(events: Iterable[Any], calls: int) -> dict[str, float]:
    """Sum the device events of a profile by name: microseconds per call.

    Args:
        events: ``torch.profiler`` function events (``name``, ``device_type``, ``time_range``); only those that ran
            on the device (kernels, memsets, memcopies) count.
        calls: how many calls the profile spans.
    """
    from torch.autograd import DeviceType

    out: dict[str, float] = {}
    for event in events:
        if event.device_type != DeviceType.CUDA:
            continue
        out[event.name] = out.get(event.name, 0.0) + event.time_range.elapsed_us() / calls
    return out


def _rollout_cases(spec: tuple, device: str) -> list[Case]:
    import attnselect.kernels as K

    b, h, n, dtype, causal, name = spec
    maps = bench_rollout._maps(b, h, n, dtype, device, causal)
    mod = importlib.import_module("attnselect.kernels.rollout")
    shape = f"{name} L={bench_rollout.LAYERS} B={b} H={h} N={n}"
    dt = str(dtype).replace("torch.", "")
    chain = mod.query_chain(b, n, torch.device(device)).replace("-", "_")
    cases = [
        Case("rollout", f"triton_query ({chain})", shape, dt, lambda: K.rollout(maps, discard_ratio=0.25, query=0)),
        Case("rollout", "triton_full", shape, dt, lambda: K.rollout(maps, discard_ratio=0.25)),
    ]
    for other in bench_rollout._other_chains(mod, b, n, device):
        cases.append(
            Case("rollout", f"triton_query_{other}", shape, dt, lambda c=other: bench_rollout._forced(mod, c, maps))
        )
    return cases


def _topk_cases(spec: tuple, device: str) -> list[Case]:
    import attnselect.kernels as K

    b, n, d, k, name = spec
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(b, n, device=device, generator=g)
    tokens = torch.randn(b, n, d, device=device, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(b, k, d, device=device, generator=g).to(dtype)
    shape = f"{name} B={b} N={n} D={d} k={k}"
    dt = str(dtype).replace("torch.", "")

    def fwd() -> None:
        with torch.no_grad():
            K.select_topk_gather(scores, k, tokens)

    def fwdbwd(call: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            tokens.grad = None
            call().backward(grad_out)

        return run

    return [
        Case("topk_gather", "triton_fwd", shape, dt, fwd),
        Case(
            "topk_gather",
            "triton_fwdbwd",
            shape,
            dt,
            fwdbwd(lambda: K.select_topk_gather(scores, k, tokens)[2]),
            True,
        ),
        Case(
            "topk_gather",
            "torch_topk_gather_fwdbwd",
            shape,
            dt,
            fwdbwd(lambda: topk_gather_torch(scores, k, tokens)[1]),
            True,
        ),
    ]


def _capture_cases(spec: tuple, device: str) -> list[Case]:
    import attnselect.kernels as K

    b, h, n, d, causal, name = spec
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, generator=g).to(dtype) for _ in range(3))
    scale = d**-0.5
    rows0 = torch.zeros(1, dtype=torch.long, device=device)
    shape = f"{name} B={b} H={h} N={n} d={d}" + (" causal" if causal else "")
    dt = str(dtype).replace("torch.", "")
    return [
        Case("capture", "triton", shape, dt, lambda: K.attention_probs(q, k, scale=scale, causal=causal)),
        Case(
            "capture",
            "triton_query_row",
            shape,
            dt,
            lambda: K.attention_probs(q, k, scale=scale, causal=causal, query_rows=rows0),
        ),
        Case(
            "capture",
            "host_sdpa",
            shape,
            dt,
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
        ),
    ]


BUILDERS = {"rollout": _rollout_cases, "topk_gather": _topk_cases, "capture": _capture_cases}
CUDA_SHAPES = {
    "rollout": bench_rollout.CUDA_SHAPES,
    "topk_gather": bench_topk_gather.SHAPES,
    "capture": bench_capture.CUDA_SHAPES,
}


def profile_case(case: Case, device: str, calls: int) -> list[Part]:
    """The parts of one case's time (see the module docstring)."""
    info = {"calls": calls, "device": device_name(device), "versions": versions(), "commit": commit()}

    def part(name: str, us: float) -> Part:
        return Part(case.op, case.provider, case.shape, case.dtype, name, round(us, 2), **info)

    with contextlib.nullcontext() if case.grad else torch.no_grad():
        parts = [part("wall", time_ms(case.fn, device, warmup=1, reps=calls) * 1e3)]
        parts.append(part("host", host_us(case.fn, device, calls)))
        if device.startswith("cuda"):
            kernels = device_us(case.fn, calls)
            parts.append(part("device", sum(kernels.values())))
            parts += [part(f"kernel {name[:80]}", us) for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])]
    return parts


def write_csv(parts: list[Part], path: Path) -> Path:
    """Append ``parts`` to the CSV at ``path``."""
    return append_csv(path, COLUMNS, (asdict(p) for p in parts))


def plot(parts: list[Part], png: Path) -> Path | None:
    """One panel per (op, shape): per provider, bars for wall and host time and the device time split by kernel."""
    plt = pyplot()
    if plt is None:
        return None
    panels: dict[tuple[str, str, str], dict[str, dict[str, float]]] = {}
    for p in parts:
        panels.setdefault((p.op, p.shape, p.dtype), {}).setdefault(p.provider, {})[p.part] = p.us_per_call
    if not panels:
        return None
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 3.8 * rows_n), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, ((op, shape, dtype), providers) in zip(axes.flat, panels.items()):
        labels, y = [], 0
        colours: dict[str, object] = {}
        for provider, values in providers.items():
            ax.barh(y, values.get("wall", 0.0), color="0.75", height=0.8)
            ax.barh(y - 1, values.get("host", 0.0), color="tab:orange", height=0.8)
            left = 0.0
            for name, us in values.items():
                if name.startswith("kernel "):
                    label = None if name in colours else name[len("kernel ") :][:40]
                    colour = colours.setdefault(name, cmap(len(colours) % 20))
                    ax.barh(y - 2, us, left=left, color=colour, height=0.8, label=label)
                    left += us
            labels += [(y, f"{provider}: wall"), (y - 1, "host"), (y - 2, "device by kernel")]
            y -= 4
        ax.set_yticks([t for t, _ in labels], [s for _, s in labels], fontsize=6)
        ax.set_xlabel("microseconds per call")
        if colours:
            ax.legend(fontsize=5, loc="lower right")
        ax.set_title(f"{op}: {shape} {dtype}", fontsize=8)
    title = f"where the time goes ({parts[0].device[:60]}, commit {parts[0].commit})"
    return finish_figure(fig, axes, len(panels), title, png)


def main(argv: list[str] | None = None) -> list[Part]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (tiny shapes)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--calls", type=int, default=None, help="calls per measurement (default 20, 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the first shape of each op, fewer calls")
    parser.add_argument("--csv", default=None, help="CSV to append to (default: benchmarks/results/profile.csv)")
    parser.add_argument("--no-plot", action="store_true", help="only append to the CSV")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {', '.join(OPS)}")
    calls = args.calls if args.calls is not None else (3 if args.quick else 20)
    if calls < 1:
        parser.error(f"--calls must be at least 1, got {calls}")
    import attnselect.kernels as K

    if not (kernels_available(device) or (device == "cpu" and K.kernels_enabled(torch.empty(0)))):
        parser.error(f"the Triton path is off for {device}: {K.explain(torch.empty(0, device=device))}")
    from tqdm import tqdm

    cases = []
    for op in ops:
        shapes = CUDA_SHAPES[op] if device.startswith("cuda") else CPU_SHAPES[op]
        for spec in shapes[:1] if args.quick else shapes:
            cases += BUILDERS[op](spec, device)
    parts: list[Part] = []
    for case in tqdm(cases, desc="profiling", unit="case", file=sys.stderr):
        new = profile_case(case, device, calls)
        for p in new:
            if p.part in ("wall", "host", "device"):
                print(f"{p.op:12s} {p.provider:28s} {p.shape:34s} {p.dtype:8s} {p.part:6s} {p.us_per_call:10.1f} us")
        parts += new
    path = write_csv(parts, Path(args.csv) if args.csv else RESULTS / "profile.csv")
    if not args.no_plot:
        plot(parts, path.with_suffix(".png"))
    print(f"appended {len(parts)} rows to {path}", file=sys.stderr)
    return parts


if __name__ == "__main__":
    main()
