"""Shared benchmark harness: timing, peak memory, GB/s, CSV rows and plots.

Every ``bench_<op>.py`` script builds its inputs, calls :func:`measure` once per provider and shape, and hands the rows
to :func:`write_results`, which appends them to ``benchmarks/results/<op>.csv`` (or ``--csv``) and redraws
``<op>.png`` from the whole CSV. Columns: ``op, provider, shape, dtype, median_ms, gbps, peak_mem_mb, device,
versions, commit``.

Timing: ``warmup`` untimed calls, then ``reps`` timed calls; the median is reported. On CUDA each call is timed with
its own pair of CUDA events; on CPU with ``time.perf_counter``. Peak memory: on CUDA the allocator's peak above the
memory already held before the call; on Linux CPUs the process's peak resident set above its resident set before
the call (the kernel's high-water mark, reset through ``/proc/self/clear_refs``); NaN where neither is available.
GB/s counts the bytes an ideal implementation must move (given by each script: read the inputs once, write the
output once), so providers of one op are compared on the same bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("op", "provider", "shape", "dtype", "median_ms", "gbps", "peak_mem_mb", "device", "versions", "commit")

#: nominal peak memory bandwidth (GB/s) of devices we report against, by a substring of the device name
PEAK_BANDWIDTH_GBPS = {
    "H100 80GB HBM3": 3350.0,  # H100 SXM5
    "H100 PCIe": 2000.0,
    "H200": 4800.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
}


@dataclass
class Row:
    op: str
    provider: str
    shape: str
    dtype: str
    median_ms: float
    gbps: float
    peak_mem_mb: float
    device: str
    versions: str
    commit: str


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags every benchmark script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and only the first shape")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--csv", default=None, help="CSV file to append to (default: benchmarks/results/<op>.csv)")
    parser.add_argument("--plot-dir", default=None, help="folder for the PNG plot (default: next to the CSV)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--reps", type=int, default=None, help="timed calls (the median is reported)")
    parser.add_argument("--no-plot", action="store_true", help="only append to the CSV")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.reps is None:
        args.reps = 3 if args.quick else (20 if args.device == "cuda" else 7)
    return args


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def peak_bandwidth(device: str) -> float | None:
    """Nominal peak memory bandwidth in GB/s of a CUDA device we know, else None."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((bw for key, bw in PEAK_BANDWIDTH_GBPS.items() if key in name), None)


@functools.cache
def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton absent")
    if torch.version.cuda:
        parts.append(f"cuda {torch.version.cuda}")
    return "; ".join(parts)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def commit() -> str:
    """Short HEAD commit, with ``+working-tree`` when tracked files differ from it (the figures are of that tree)."""
    if os.environ.get("ATTNSELECT_BENCH_COMMIT"):  # a copy of the tree without .git (a remote benchmark machine)
        return os.environ["ATTNSELECT_BENCH_COMMIT"]
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("+working-tree" if dirty else "")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = [_one_call_ms(fn, device) for _ in range(reps)]
    return statistics.median(times)


def _one_call_ms(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved_ms(
    fns: dict[str, Callable[[], object]], device: str, warmup: int, reps: int
) -> dict[str, list[float]]:
    """Times of ``reps`` rounds, each calling every provider once in turn (after ``warmup`` such rounds), so that load
    from other processes falls on all providers alike; returns each provider's list of times in ms."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_one_call_ms(fn, device))
    return times


def spread(times_a: Sequence[float], times_b: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios ``a / b`` of two interleaved providers."""
    ratios = sorted(a / b for a, b in zip(times_a, times_b))
    return statistics.median(ratios), ratios[0], ratios[-1]


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory one call of ``fn()`` adds on top of what is held before it (MB), NaN if unknown."""
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
    except OSError:
        return math.nan
    before = _rss_kb("VmRSS")
    fn()
    peak = _rss_kb("VmHWM")
    if before is None or peak is None:
        return math.nan
    return max(peak - before, 0) / 1024


def measure(
    op: str,
    provider: str,
    fn: Callable[[], object],
    *,
    shape: str,
    dtype: torch.dtype | str,
    nbytes: int,
    device: str,
    warmup: int,
    reps: int,
) -> Row:
    """Time one provider on one input and return its CSV row (also printed)."""
    return make_row(op, provider, time_ms(fn, device, warmup, reps), peak_memory_mb(fn, device), shape=shape,
                    dtype=dtype, nbytes=nbytes, device=device)  # fmt: skip


def make_row(
    op: str, provider: str, ms: float, mem: float, *, shape: str, dtype: torch.dtype | str, nbytes: int, device: str
) -> Row:
    """The CSV row of one provider's median time ``ms`` and peak memory ``mem`` (also printed)."""
    row = Row(
        op=op,
        provider=provider,
        shape=shape,
        dtype=str(dtype).replace("torch.", ""),
        median_ms=round(ms, 4),
        gbps=round(nbytes / (ms * 1e-3) / 1e9, 2),
        peak_mem_mb=round(mem, 1) if not math.isnan(mem) else math.nan,
        device=device_name(device),
        versions=versions(),
        commit=commit(),
    )
    print(f"{op:12s} {provider:26s} {shape:28s} {row.dtype:9s} {row.median_ms:10.3f} ms {row.gbps:9.1f} GB/s "
          f"peak {row.peak_mem_mb} MB", flush=True)  # fmt: skip
    return row


def append_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, object]]) -> Path:
    """Append ``rows`` to the CSV at ``path`` (its header first when the file is new or empty); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (said on stderr) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return None
    return plt


def write_results(op: str, rows: Sequence[Row], args: argparse.Namespace) -> Path:
    """Append ``rows`` to the CSV and redraw the op's plot from the whole CSV; returns the CSV path."""
    path = append_csv(Path(args.csv) if args.csv else RESULTS / f"{op}.csv", COLUMNS, (asdict(r) for r in rows))
    if not args.no_plot:
        plot_dir = Path(args.plot_dir) if args.plot_dir else path.parent
        plot(path, plot_dir / f"{op}.png", op)
    print(f"appended {len(rows)} rows to {path}", file=sys.stderr)
    return path


def read_rows(path: Path, op: str | None = None) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return [r for r in csv.DictReader(f) if op is None or r["op"] == op]


def plot(csv_path: Path, png_path: Path, op: str) -> Path | None:
    """One panel per (device, shape, dtype), one bar per provider (its latest row), median ms on a log axis."""
    plt = pyplot()
    if plt is None:
        return None
    latest: dict[tuple[str, str, str], dict[str, dict[str, str]]] = {}
    for r in read_rows(csv_path, op):
        latest.setdefault((r["device"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    if not latest:
        return None
    panels = list(latest.items())
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 3.6 * rows_n), squeeze=False)
    for ax, ((dev, shape, dtype), provs) in zip(axes.flat, panels):
        names = list(provs)
        ms = [float(provs[p]["median_ms"]) for p in names]
        bars = ax.barh(names, ms, color="tab:blue")
        for bar, p in zip(bars, names):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {float(provs[p]['median_ms']):.3g} ms, "
                    f"{float(provs[p]['gbps']):.0f} GB/s", va="center", fontsize=7)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("median ms (log)")
        ax.set_title(f"{shape} {dtype}\n{dev[:48]}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlim(right=max(ms) * 30)
    return finish_figure(fig, axes, len(panels), f"{op}: latest row per provider from {Path(csv_path).name}", png_path)


def finish_figure(fig: Any, axes: Any, used: int, title: str, png_path: Path) -> Path:
    """Blank the panels past the first ``used``, title the figure, save it as ``png_path`` and close it."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


@contextlib.contextmanager
def patched(module: Any, **values: Any) -> Iterator[None]:
    """Set module attributes (a kernel module's tuning constants) for the duration of the block, then put them back."""
    saved = {name: getattr(module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


#: providers whose results differed from the reference in this run (see :func:`check`)
MISMATCHES: list[str] = []


def check(name: str, error: float, tol: float) -> bool:
    """Report how far a provider's result is from the reference; remember it when beyond ``tol``.

    The rows of a provider that disagrees are still written (its time is what it is), but :func:`exit_on_mismatch`
    then ends the script with an error, so a wrong kernel is never quoted as a fast one.
    """
    ok = error <= tol
    print(f"check: {name}: max abs diff {error:.2e} ({'ok' if ok else f'MISMATCH, tolerance {tol:.0e}'})",
          file=sys.stderr)  # fmt: skip
    if not ok:
        MISMATCHES.append(f"{name} ({error:.2e})")
    return ok


def exit_on_mismatch() -> None:
    """End the script with an error naming every provider :func:`check` found wrong."""
    if MISMATCHES:
        raise SystemExit("results differ from the reference: " + ", ".join(MISMATCHES))


def kernels_available(device: str) -> bool:
    """Whether the Triton path runs for tensors on ``device`` (CUDA only: interpreter timings mean nothing)."""
    import attnselect.kernels as K

    return device.startswith("cuda") and K.kernels_enabled(torch.empty(0, device=device))
