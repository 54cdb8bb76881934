"""One ITSELF training step against the global-only baseline step, interleaved in one process.

Providers, both the same randomly initialised open_clip CLIP ViT-B/16 (image 384x128, text 77) with the same losses,
optimiser (Adam, as published) and precision, each stepped by :func:`attnselect.train.train_step`:

- ``global_only``: ``ITSELFConfig(use_local=False)``, the paper's global-only "Baseline";
- ``itself``: the full model (MARS rollout of the middle and late layers, ATS top-k, adapter, max pooling, local
  losses), as trained by ``attnselect train``.

A step is: ATS advance, forward under autocast, losses, backward, gradient clipping, optimiser step, and the read-back
of the step's losses that the training loop logs. The two models run in alternation (one step each, repeated), so load
from other processes affects both alike; the median step time of each is reported. ``gbps`` is NaN (not a
bandwidth-bound op). The target: an ITSELF step at most 1.2x the global-only step.

Usage: ``python benchmarks/bench_train_step.py [--quick] [--device cpu|cuda] [--batch 256] [--reps 20]``
(on CPU the demo's small model and batch 8 are used unless ``--full`` is given).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Row, commit, device_name, peak_memory_mb, versions, write_results

OP = "train_step"
PROVIDERS = ("global_only", "itself")
#: published ITSELF setting: batch 256, 384x128 images, 77 text positions, CLIP ViT-B/16
CUDA_BATCH = 256
CPU_BATCH = 8


def _model_config(device: str, full: bool, use_local: bool):
    import dataclasses

    from attnselect.models import ITSELFConfig
    from attnselect.train import demo_config

    if device.startswith("cuda") or full:
        return ITSELFConfig(num_classes=3701, use_local=use_local)
    # CPU: the demo's small model, so a step takes a fraction of a second
    return dataclasses.replace(demo_config().model, num_classes=64, use_local=use_local)


def _batch(batch: int, config, device: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    h, w = config.image_size
    ids = torch.randint(1, 49406, (batch, config.context_length), generator=g)
    lengths = torch.randint(8, config.context_length - 1, (batch,), generator=g)
    pos = torch.arange(config.context_length)
    ids = torch.where(pos[None] < lengths[:, None], ids, 0)
    ids[:, 0] = 49406  # SOS
    ids[torch.arange(batch), lengths] = 49407  # EOS: the largest id, where CLIP pools the text
    pids = torch.arange(batch) // 2 % config.num_classes  # 2 per identity, as the published identity sampler draws
    return {
        "images": torch.randn(batch, 3, h, w, generator=g).to(device),
        "caption_ids": ids.to(device),
        "pids": pids.to(device),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=None, help=f"batch size (default {CUDA_BATCH} on CUDA, "
                        f"{CPU_BATCH} on CPU)")  # fmt: skip
    parser.add_argument("--full", action="store_true", help="the ViT-B/16 tower on CPU too")
    parser.add_argument("--precision", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per model")
    parser.add_argument("--csv", default=None, help="CSV to append to (default: benchmarks/results/train_step.csv)")
    parser.add_argument("--plot-dir", default=None, help="folder for the PNG plot (default: next to the CSV)")
    parser.add_argument("--no-plot", action="store_true", help="only append to the CSV")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.batch is None:
        args.batch = CUDA_BATCH if cuda else CPU_BATCH
    if args.precision is None:
        args.precision = "bf16" if cuda else "fp32"
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.reps is None:
        args.reps = 3 if args.quick else (15 if cuda else 5)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    from attnselect.models import ITSELF
    from attnselect.train import TrainConfig, train_step

    args = parse_args(argv)
    device = args.device
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    runs = {}
    for name in PROVIDERS:
        torch.manual_seed(0)
        mcfg = _model_config(device, args.full, use_local=name == "itself")
        model = ITSELF(mcfg).to(dev).train()
        tcfg = TrainConfig(model=mcfg, batch_size=args.batch, precision=args.precision, device=device)
        opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps)  # published optimiser
        scaler = torch.amp.GradScaler(dev.type) if args.precision == "fp16" else None

        batch = _batch(args.batch, mcfg, device, g)

        def step(model=model, opt=opt, scaler=scaler, tcfg=tcfg, batch=batch) -> None:
            train_step(model, batch, opt, scaler, tcfg, dev, args.precision)

        runs[name] = step
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in PROVIDERS}
    for _ in range(args.reps):  # interleaved: one step of each in turn
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            fn()  # ends with the losses read back, so the step is finished when it returns
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    peak = {name: peak_memory_mb(fn, device) for name, fn in runs.items()}
    h, w = mcfg.image_size
    tower = "vit-b16" if device.startswith("cuda") or args.full else "demo"
    shape = f"itself-{tower} B={args.batch} {h}x{w} L={mcfg.context_length}"
    rows = [
        Row(
            op=OP,
            provider=name,
            shape=shape,
            dtype=args.precision,
            median_ms=round(statistics.median(times[name]), 3),
            gbps=math.nan,
            peak_mem_mb=round(peak[name], 1) if not math.isnan(peak[name]) else math.nan,
            device=device_name(device),
            versions=versions(),
            commit=commit(),
        )
        for name in PROVIDERS
    ]
    for r, name in zip(rows, PROVIDERS):
        spread = f"{min(times[name]):.1f}-{max(times[name]):.1f}"
        print(f"{OP} {name:12s} {shape} {r.dtype}: {r.median_ms:.1f} ms (range {spread}) peak +{r.peak_mem_mb} MB")
    ratios = sorted(a / b for a, b in zip(times["itself"], times["global_only"]))
    print(
        f"summary {shape}: itself / global_only = {rows[1].median_ms / rows[0].median_ms:.3f}x "
        f"(paired steps: {ratios[0]:.3f}-{ratios[-1]:.3f})",
        file=sys.stderr,
    )
    write_results(OP, rows, args)
    return rows


if __name__ == "__main__":
    main()
