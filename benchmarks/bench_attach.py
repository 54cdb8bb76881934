"""Cost of attention capture on a ViT-B/16 host: forward time and peak memory with and without hooks.

Host: timm ``VisionTransformer()`` (the default ViT-B/16 at 224, random init, SDPA attention), batch 8, no_grad.
Providers: ``plain`` (no hooks) and ``capture2`` (``capture_attention`` of the ``("middle", "late")`` layers,
head-averaged ``[B,N,N]`` maps, plus the final tokens). Times are medians over interleaved runs of the two; peak
memory is what one forward adds on top of what is held before it (:func:`harness.peak_memory_mb`); ``gbps`` is NaN.

Usage:
    python benchmarks/bench_attach.py [--quick] [--device cpu|cuda] [--reps 7]

Appends rows to ``benchmarks/results/attach.csv`` through the shared harness.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Row, commit, device_name, parse_args, peak_memory_mb, versions, write_results

from attnselect.hooks import capture_attention

OP = "attach"
LAYERS = ("middle", "late")


def build_host(device: str) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer().eval().to(device)  # ViT-B/16, 224 x 224, 12 layers, 12 heads, SDPA attention


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _forward_ms(model: torch.nn.Module, x: torch.Tensor, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device, batch = args.device, 8
    model = build_host(device)
    x = torch.randn(batch, 3, 224, 224, device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    for _ in range(args.warmup):
        forward()
    # interleaved runs, so that load from other processes affects both configurations alike
    times: dict[str, list[float]] = {"plain": [], "capture2": []}
    for _ in range(args.reps):
        times["plain"].append(_forward_ms(model, x, device))
        cap = capture_attention(model, LAYERS)
        times["capture2"].append(_forward_ms(model, x, device))
        cap.remove()
    peak = {"plain": peak_memory_mb(forward, device)}
    cap = capture_attention(model, LAYERS)
    peak["capture2"] = peak_memory_mb(forward, device)
    kept_mb = sum(m.numel() * m.element_size() for m in cap.maps.values()) / 2**20
    cap.remove()

    rows = []
    for provider in ("plain", "capture2"):
        rows.append(
            Row(
                op=OP,
                provider=provider,
                shape=f"vit_b16 {batch}x3x224x224",
                dtype="float32",
                median_ms=round(statistics.median(times[provider]), 2),
                gbps=math.nan,  # not a bandwidth-bound op
                peak_mem_mb=round(peak[provider], 1),
                device=device_name(device),
                versions=versions(),
                commit=commit(),
            )
        )
        print(f"{provider:9s} {rows[-1].median_ms:10.1f} ms  peak +{rows[-1].peak_mem_mb} MB")
    ratio = rows[1].median_ms / rows[0].median_ms
    print(f"[{device}] capture of 2 layers / plain forward = {ratio:.3f}x; maps kept: {kept_mb:.2f} MiB")
    write_results(OP, rows, args)


if __name__ == "__main__":
    main()
