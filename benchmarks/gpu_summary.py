"""Each GPU target against its measured figure, from the benchmark CSVs of one run.

Reads ``benchmarks/results/{rollout,topk_gather,capture,train_step}.csv``, keeps the rows of one device and commit
(default: this CUDA device and this tree's commit, as the benchmark scripts wrote them), prints a table of every
target (measured figure, goal, met or by how much it is missed) and appends it to
``benchmarks/results/gpu_summary.csv``.
On a CUDA device it also measures the device-to-device copy bandwidth, the practical ceiling quoted beside the
nominal one.

Usage: ``python benchmarks/gpu_summary.py [--device-name NAME] [--commit SHA] [--results DIR] [--no-csv]``
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PEAK_BANDWIDTH_GBPS, RESULTS, append_csv, commit, versions

COLUMNS = ("target", "shape", "measured", "goal", "met", "detail", "device", "versions", "commit")

#: ops of the rollout target's "100x the published code" (all four documented CUDA shapes)
ROLLOUT_SHAPES = ("itself-image", "itself-text", "vit-l14-336")


@dataclass
class Target:
    target: str
    shape: str
    measured: str
    goal: str
    met: str  # "yes", "no (by ...)", or "not measured"
    detail: str
    device: str = ""
    versions: str = ""
    commit: str = ""


def _rows(results: Path, op: str, device: str, sha: str) -> list[dict[str, str]]:
    path = results / f"{op}.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["device"] == device and r["commit"] == sha]


def _latest(rows: list[dict[str, str]]) -> dict[tuple[str, str, str], float]:
    """(shape, dtype, provider) -> median ms of the last row written for it."""
    return {(r["shape"], r["dtype"], r["provider"]): float(r["median_ms"]) for r in rows}


def _find(table: dict[tuple[str, str, str], float], prefix: str, dtype: str, provider: str) -> tuple[str, float] | None:
    for (shape, dt, prov), ms in table.items():
        if shape.startswith(prefix) and dt == dtype and prov == provider:
            return shape, ms
    return None


def _peak(device: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH_GBPS.items() if key in device), None)


def _missing(target: str, shape: str, goal: str, what: str) -> Target:
    return Target(target, shape, "", goal, "not measured", f"no {what} rows for this device and commit")


def _ratio_target(
    table: dict, target: str, prefix: str, dtype: str, num: str, den: str, goal: float, at_most: bool, what: str
) -> Target:
    """``num / den`` (median ms) at the shape starting with ``prefix``, against ``goal`` (at most or at least)."""
    a, b = _find(table, prefix, dtype, num), _find(table, prefix, dtype, den)
    sign = "<=" if at_most else ">="
    if a is None or b is None:
        return _missing(target, prefix, f"{sign} {goal}x", what)
    ratio = a[1] / b[1]
    ok = ratio <= goal if at_most else ratio >= goal
    miss = ratio / goal if at_most else goal / ratio
    return Target(
        target,
        a[0],
        f"{ratio:.3f}x",
        f"{sign} {goal}x",
        "yes" if ok else f"no (off by {miss:.2f}x)",
        f"{num} {a[1]:.4g} ms / {den} {b[1]:.4g} ms",
    )


def targets(results: Path, device: str, sha: str, copy_gbps: float | None = None) -> list[Target]:
    """Every GPU target of the benchmarks against the rows of ``device`` at ``sha``."""
    out: list[Target] = []
    topk = _latest(_rows(results, "topk_gather", device, sha))
    out.append(
        _ratio_target(
            topk, "top-k + gather fwd+bwd speed-up over torch.topk + gather", "itself-image", "float16",
            "torch_topk_gather_fwdbwd", "triton_fwdbwd", 1.5, False, "topk_gather",
        )
    )  # fmt: skip
    cap = _latest(_rows(results, "capture", device, sha))
    out.append(
        _ratio_target(
            cap, "fused capture time / host SDPA time (ViT-B/16 layer)", "itself-image", "float16",
            "triton", "host_sdpa", 1.3, True, "capture",
        )
    )  # fmt: skip
    roll_rows = _rows(results, "rollout", device, sha)
    roll = _latest(roll_rows)
    peak = _peak(device)
    hit = _find(roll, "itself-image", "float16", "triton_query")
    if hit is None or peak is None:
        target = "rollout query row bandwidth / peak HBM"
        out.append(_missing(target, "itself-image", ">= 50%", "rollout (or unknown peak)"))
    else:
        gbps = next(
            float(r["gbps"]) for r in reversed(roll_rows)
            if r["shape"] == hit[0] and r["dtype"] == "float16" and r["provider"] == "triton_query"
        )  # fmt: skip
        frac = gbps / peak
        copy = f"; {gbps / copy_gbps:.1%} of the measured copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else ""
        out.append(
            Target(
                "rollout query row bandwidth / peak HBM",
                hit[0],
                f"{frac:.1%}",
                ">= 50%",
                "yes" if frac >= 0.5 else f"no (off by {0.5 / frac:.2f}x)",
                f"{gbps:.0f} GB/s of nominal {peak:.0f} GB/s{copy}",
            )
        )
    for prefix, dtype in (("itself-image", "float16"), ("itself-image", "float32"), ("itself-text", "float16"),
                          ("vit-l14-336", "float16")):  # fmt: skip
        out.append(
            _ratio_target(
                roll, f"rollout query row speed-up over the published code ({dtype})", prefix, dtype,
                "published", "triton_query", 100.0, False, "rollout",
            )
        )  # fmt: skip
    step = _latest(_rows(results, "train_step", device, sha))
    out.append(
        _ratio_target(
            step, "ITSELF train step / global-only step", "itself-vit-b16", "bf16", "itself", "global_only", 1.2,
            True, "train_step",
        )
    )  # fmt: skip
    for t in out:
        t.device, t.versions, t.commit = device, versions(), sha
    return out


def copy_bandwidth_gbps(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, GB/s): median of 10 copies of ``gib`` GiB."""
    import statistics

    import torch

    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() / (statistics.median(times) * 1e-3) / 1e9


def format_table(rows: list[Target]) -> str:
    head = ("target", "shape", "measured", "goal", "met", "detail")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in rows:
        lines.append("| " + " | ".join(str(getattr(t, c)) for c in head) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Target]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-name", default=None, help="the device column to read (default: this CUDA device)")
    parser.add_argument("--commit", default=None, help="the commit column to read (default: this tree's)")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the benchmark CSVs")
    parser.add_argument("--no-csv", action="store_true", help="print only; do not append to gpu_summary.csv")
    args = parser.parse_args(argv)
    copy = None
    device = args.device_name
    if device is None:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: pass --device-name to summarise rows written elsewhere")
        device = torch.cuda.get_device_name()
    if args.device_name is None:
        copy = copy_bandwidth_gbps()
        print(f"device-to-device copy: {copy:.0f} GB/s (read + write)", file=sys.stderr)
    sha = args.commit or commit()
    rows = targets(Path(args.results), device, sha, copy)
    if copy is not None:
        rows.append(Target("device-to-device copy bandwidth", "2 GiB uint8", f"{copy:.0f} GB/s", "", "", "ceiling",
                           device, versions(), sha))  # fmt: skip
    print(f"GPU targets on {device} at {sha}")
    print(format_table(rows))
    if not args.no_csv:
        append_csv(Path(args.results) / "gpu_summary.csv", COLUMNS, (asdict(t) for t in rows))
    return rows


if __name__ == "__main__":
    main()
