"""Attention-capture benchmark: the fused head-averaged capture vs the host's own attention and the eager capture.

Providers on the same ``q, k, v`` ``[B,H,N,d]`` of one layer:

- ``host_sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, k, v)``, the host's own (flash/efficient)
  attention for that layer: the cost the host pays anyway, for scale;
- ``eager_capture``: :func:`baselines.eager_attention_probs`, the fp32 ``[B,H,N,N]`` softmax materialised, then
  averaged over heads;
- ``reference``: :func:`attnselect.functional.attention_probs` (what the capture hooks call);
- ``triton``: :func:`attnselect.kernels.attention_probs` on CUDA (no ``[B,H,N,N]`` intermediate);
- ``triton_query_row``: the same kernel keeping only query row 0 (what a CLS-row selector needs);
- ``triton_rows32`` / ``triton_rows64``: the one-pass kernel with the other row block than its default at that key
  width (32 or 64 query rows per program: more rows mean tensor-core ``wgmma`` tiles on Hopper and more row
  padding), at shapes the one-pass kernel takes, so one GPU run compares the two configurations.

Shapes: ITSELF image ``B=256, H=12, N=193, d=64``, ITSELF text (causal) ``B=256, H=8, N=77, d=64``,
ViT-L/14-336 ``B=64, H=16, N=577, d=64``; fp16 on CUDA, fp32 on CPU.

Usage: ``python benchmarks/bench_capture.py [--quick] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import eager_attention_probs
from harness import (
    Row,
    check,
    exit_on_mismatch,
    kernels_available,
    measure,
    parse_args,
    patched,
    peak_bandwidth,
    write_results,
)

from attnselect import functional as F

OP = "capture"
#: (B, H, N, d, causal, name)
CUDA_SHAPES = [
    (256, 12, 193, 64, False, "itself-image"),
    (256, 8, 77, 64, True, "itself-text"),
    (64, 16, 577, 64, False, "vit-l14-336"),
]
CPU_SHAPES = [(16, 12, 193, 64, False, "itself-image"), (16, 8, 77, 64, True, "itself-text")]


#: (query rows per program, warps) of the one-pass kernel's two row blocks at the benchmark shapes' key tile widths
#: (128: text, 256: image); the one its ONEPASS_CONFIG does not take is timed beside the default
ROW_BLOCKS = {128: [(32, 4), (64, 8)], 256: [(32, 8), (64, 16)]}


def _with_config(kernel_module, keys: int, config: tuple[int, int], fn):
    """Run ``fn()`` with the one-pass kernel's configuration for ``keys``-wide tiles set to ``config``."""
    with patched(kernel_module, ONEPASS_CONFIG={**kernel_module.ONEPASS_CONFIG, keys: config}):
        return fn()


def _bench_shape(args: argparse.Namespace, spec: tuple, triton_ok: bool) -> list[Row]:
    b, h, n, d, causal, name = spec
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, generator=g).to(dtype) for _ in range(3))
    scale = d**-0.5
    in_bytes = 2 * q.numel() * q.element_size()
    out_bytes = b * n * n * 4
    providers = [
        (
            "host_sdpa",
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
            3 * q.numel() * q.element_size() + q.numel() * q.element_size(),
        ),
        ("eager_capture", lambda: eager_attention_probs(q, k, scale, causal), in_bytes + out_bytes),
        ("reference", lambda: F.attention_probs(q, k, scale=scale, causal=causal), in_bytes + out_bytes),
    ]
    if triton_ok:
        import attnselect.kernels as K

        rows0 = torch.zeros(1, dtype=torch.long, device=device)
        providers += [
            ("triton", lambda: K.attention_probs(q, k, scale=scale, causal=causal), in_bytes + out_bytes),
            (
                "triton_query_row",
                lambda: K.attention_probs(q, k, scale=scale, causal=causal, query_rows=rows0),
                in_bytes + b * n * 4,
            ),
        ]
        kernel_module = importlib.import_module("attnselect.kernels.capture")
        keys = max(16, 1 << (n - 1).bit_length())
        if keys in ROW_BLOCKS and keys * max(16, 1 << (d - 1).bit_length()) <= kernel_module.ONEPASS_MAX_TILE:
            # the one-pass kernel with the other row block (compared here so a GPU run can choose the configuration)
            for config in ROW_BLOCKS[keys]:
                if config == kernel_module.ONEPASS_CONFIG[keys]:
                    continue
                providers.append(
                    (
                        f"triton_rows{config[0]}",
                        lambda config=config: _with_config(
                            kernel_module, keys, config, lambda: K.attention_probs(q, k, scale=scale, causal=causal)
                        ),
                        in_bytes + out_bytes,
                    )
                )
        ref = F.attention_probs(q, k, scale=scale, causal=causal)
        for provider, fn, _ in providers:
            if provider == "triton" or provider.startswith("triton_rows"):
                check(provider, (fn() - ref).abs().max().item(), 1e-4)
    shape = f"{name} B={b} H={h} N={n} d={d}" + (" causal" if causal else "")
    rows = []
    with torch.no_grad():
        for provider, fn, nbytes in providers:
            rows.append(
                measure(
                    OP,
                    provider,
                    fn,
                    shape=shape,
                    dtype=dtype,
                    nbytes=nbytes,
                    device=device,
                    warmup=args.warmup,
                    reps=args.reps,
                )
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    shapes = CPU_SHAPES if args.device == "cpu" else CUDA_SHAPES
    if args.quick:
        shapes = shapes[:1]
    triton_ok = kernels_available(args.device)
    for spec in shapes:  # each shape's rows are saved as soon as they exist
        write_results(OP, _bench_shape(args, spec, triton_ok), args)
    bw = peak_bandwidth(args.device)
    if bw:
        print(f"device peak bandwidth (nominal): {bw:.0f} GB/s", file=sys.stderr)
    exit_on_mismatch()


if __name__ == "__main__":
    main()
