"""Rollout (MARS) benchmark: published loop-based code vs the vectorised reference vs Triton vs the memory floor.

Providers, all on the same per-head maps ``[B,H,N,N]`` of two layers, discard ratio 0.25, mean head fusion:

- ``published``: :func:`baselines.published_rollout`, the published ITSELF rollout method step for step (identity
  start, full N x N products, one batched ``topk`` per layer and a Python loop over the batch for the zeroing), on
  the maps stacked once outside the timed call as the published forward stacks them;
- ``reference_full`` / ``reference_query``: :func:`attnselect.functional.rollout` (full product / query row 0);
- ``reference_query_compiled``: the query-row reference under ``torch.compile`` (default inductor backend);
- ``triton_full`` / ``triton_query``: :func:`attnselect.kernels.rollout` on CUDA;
- ``triton_query_per_sample`` / ``triton_query_multipass``: the same query row through each query-row chain the gate
  does not pick at that shape but could run it (``per_sample``: ``N <= SAMPLE_N_MAX``), so one run compares them
  (which chain ``triton_query`` takes is printed);
- ``floor``: one ``torch.mean`` over heads of the same maps, the least any rollout must do (read every map once).

Shapes: CPU ``B=64, H=12, N=193``; CUDA ITSELF image ``B=256, H=12, N=193``, ITSELF text ``B=256, H=8, N=77``,
ViT-L/14-336 ``B=64, H=16, N=577``. ``--quick`` runs the first shape only, with fewer repetitions.

Usage: ``python benchmarks/bench_rollout.py [--quick] [--device cpu|cuda] [--skip-compiled] [--interleave |
--no-interleave]`` (``--skip-compiled`` leaves out the ``torch.compile`` provider, whose compilation takes most of a
GPU run). On a CPU the providers are timed in interleaved rounds (one call of each per round) and the spread of the
per-round ratios to ``reference_query`` is printed; ``--interleave`` does the same on a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import published_rollout
from harness import (
    Row,
    check,
    exit_on_mismatch,
    kernels_available,
    make_row,
    measure,
    parse_args,
    patched,
    peak_bandwidth,
    peak_memory_mb,
    spread,
    time_interleaved_ms,
    write_results,
)

from attnselect import functional as F

OP = "rollout"
LAYERS = 2
#: (B, H, N, dtype, causal, name)
CUDA_SHAPES = [
    (256, 12, 193, torch.float16, False, "itself-image"),
    (256, 12, 193, torch.float32, False, "itself-image"),
    (256, 8, 77, torch.float16, True, "itself-text"),
    (64, 16, 577, torch.float16, False, "vit-l14-336"),
]
CPU_SHAPES = [(64, 12, 193, torch.float32, False, "itself-image")]


def _maps(b: int, h: int, n: int, dtype: torch.dtype, device: str, causal: bool) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(LAYERS):
        logits = torch.randn(b, h, n, n, device=device, generator=g)
        if causal:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), float("-inf"))
        out.append(torch.softmax(logits, dim=-1).to(dtype))
    return out


#: what routes the query-row chain to each implementation, whatever the gate would pick at that shape
CHAIN_KNOBS = {
    "per_sample": {"SMALL_N": 0, "SAMPLE_MIN_BATCH": 1},
    "multipass": {"SMALL_N": 0, "SAMPLE_N_MAX": 0},
}


def _forced(kernel_module, chain: str, maps: list[torch.Tensor]) -> torch.Tensor:
    import attnselect.kernels as K

    with patched(kernel_module, **CHAIN_KNOBS[chain]):
        return K.rollout(maps, discard_ratio=0.25, query=0)


def _other_chains(kernel_module, b: int, n: int, device: str) -> list[str]:
    """The query-row chains the gate does not pick at this shape but could run it (compared side by side)."""
    picked = kernel_module.query_chain(b, n, torch.device(device)).replace("-", "_")
    possible = ["multipass"]  # N <= SMALL_N always takes the registers chain: it is never the other one
    if n <= kernel_module.SAMPLE_N_MAX:
        possible.append("per_sample")
    return [c for c in possible if c != picked]


def _bench_shape(args: argparse.Namespace, spec: tuple, triton_ok: bool) -> list[Row]:
    b, h, n, dtype, causal, name = spec
    device = args.device
    rows: list[Row] = []
    if triton_ok:
        import attnselect.kernels as K
    maps = _maps(b, h, n, dtype, device, causal)
    stacked = torch.stack(maps)  # the published forward passes the layer maps stacked: its caller's copy, not timed
    shape = f"{name} L={LAYERS} B={b} H={h} N={n}"
    in_bytes = sum(m.numel() * m.element_size() for m in maps)
    full_bytes = in_bytes + b * n * n * 4
    query_bytes = in_bytes + b * n * 4
    providers = [
        ("published", lambda: published_rollout(stacked, 0.25), full_bytes),
        ("reference_full", lambda: F.rollout(maps, discard_ratio=0.25), full_bytes),
        ("reference_query", lambda: F.rollout(maps, discard_ratio=0.25, query=0), query_bytes),
    ]
    if not args.skip_compiled:
        try:
            compiled = torch.compile(lambda m: F.rollout(m, discard_ratio=0.25, query=0))
            compiled(maps)
            providers.append(("reference_query_compiled", lambda: compiled(maps), query_bytes))
        except Exception as err:  # report and go on: the other providers still mean something
            print(f"torch.compile of the reference failed, skipped: {err!r}"[:300], file=sys.stderr)
    if triton_ok:
        providers += [
            ("triton_full", lambda: K.rollout(maps, discard_ratio=0.25), full_bytes),
            ("triton_query", lambda: K.rollout(maps, discard_ratio=0.25, query=0), query_bytes),
        ]
        kernel_module = importlib.import_module("attnselect.kernels.rollout")
        print(f"triton_query takes the {kernel_module.query_chain(b, n, torch.device(device))} chain", file=sys.stderr)
        for chain in _other_chains(kernel_module, b, n, device):
            providers.append(
                (f"triton_query_{chain}", lambda chain=chain: _forced(kernel_module, chain, maps), query_bytes)
            )
    providers.append(("floor", lambda: [m.mean(dim=1) for m in maps], in_bytes + in_bytes // h))
    # the paths must agree before their times mean anything
    ref = F.rollout(maps, discard_ratio=0.25)
    pub = published_rollout(stacked, 0.25).float()
    print(f"check: published vs reference max abs diff {(pub - ref).abs().max().item():.2e}", file=sys.stderr)
    if triton_ok:
        for provider, fn, _ in providers:
            if provider.startswith("triton_query"):
                check(provider, (fn() - ref[:, 0]).abs().max().item(), 1e-4)
            elif provider == "triton_full":
                check(provider, (fn() - ref).abs().max().item(), 1e-4)
    if args.interleave:  # one call of each provider per round: load from other processes falls on all of them alike
        fns = {provider: fn for provider, fn, _ in providers}
        times = time_interleaved_ms(fns, device, min(args.warmup, 1), args.reps)
        for provider, fn, nbytes in providers:
            median = statistics.median(times[provider])
            rows.append(make_row(OP, provider, median, peak_memory_mb(fn, device), shape=shape, dtype=dtype,
                                 nbytes=nbytes, device=device))  # fmt: skip
        for other in ("published", "floor"):
            mid, lo, hi = spread(times[other], times["reference_query"])
            print(f"spread {shape}: {other} / reference_query per round {mid:.2f}x (range {lo:.2f}-{hi:.2f}, "
                  f"{args.reps} rounds)", file=sys.stderr)  # fmt: skip
    else:
        for provider, fn, nbytes in providers:
            reps = max(1, args.reps // 3) if provider == "published" and device == "cpu" else args.reps
            rows.append(
                measure(
                    OP,
                    provider,
                    fn,
                    shape=shape,
                    dtype=dtype,
                    nbytes=nbytes,
                    device=device,
                    warmup=min(args.warmup, 1) if provider == "published" else args.warmup,
                    reps=reps,
                )
            )
    by = {r.provider: r.median_ms for r in rows if r.shape == shape}
    print(
        f"summary {shape}: reference_query is {by['published'] / by['reference_query']:.1f}x faster than "
        f"published and {by['reference_query'] / by['floor']:.2f}x the memory floor",
        file=sys.stderr,
    )
    if "triton_query" in by:
        print(
            f"summary {shape}: triton_query {by['published'] / by['triton_query']:.1f}x faster than published, "
            f"{by['triton_query'] / by['floor']:.2f}x the floor",
            file=sys.stderr,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    flags = {flag: flag in argv for flag in ("--skip-compiled", "--interleave", "--no-interleave")}
    argv = [a for a in argv if a not in flags]
    args = parse_args(__doc__.splitlines()[0], argv)
    args.skip_compiled = flags["--skip-compiled"]
    # interleaved rounds by default on a CPU (shared and noisy); on a GPU each provider's calls run back to back
    args.interleave = flags["--interleave"] or (args.device == "cpu" and not flags["--no-interleave"])
    device = args.device
    shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[:1]
    triton_ok = kernels_available(device)
    for spec in shapes:  # each shape's rows are saved as soon as they exist
        write_results(OP, _bench_shape(args, spec, triton_ok), args)
    bw = peak_bandwidth(device)
    if bw:
        print(f"device peak bandwidth (nominal): {bw:.0f} GB/s", file=sys.stderr)
    exit_on_mismatch()


if __name__ == "__main__":
    main()
