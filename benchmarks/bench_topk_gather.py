"""Top-k + gather benchmark, forward and forward+backward.

Providers on the same scores ``[B,N]`` and tokens ``[B,N,D]``:

- ``torch_topk_gather``: ``torch.topk`` + ``torch.gather`` (two calls, no tie-break guarantee);
- ``reference``: :func:`attnselect.functional.select_topk` + :func:`attnselect.functional.gather_tokens`
  (stable sort, ties to the lower index, valid mask support);
- ``triton``: :func:`attnselect.kernels.select_topk_gather` on CUDA (one launch; backward scatter-adds).

Each provider is timed forward only (``*_fwd``) and forward + backward into the tokens (``*_fwdbwd``).
Shapes: ITSELF image ``B=256, N=193, D=512, k=96``, ITSELF text ``B=256, N=77, D=512, k=37``,
ViT-L/14-336 ``B=64, N=577, D=768, k=288``; fp16 tokens on CUDA, fp32 on CPU.

Usage: ``python benchmarks/bench_topk_gather.py [--quick] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import topk_gather_torch
from harness import Row, check, exit_on_mismatch, kernels_available, measure, parse_args, peak_bandwidth, write_results

from attnselect import functional as F

OP = "topk_gather"
#: (B, N, D, k, name)
SHAPES = [
    (256, 193, 512, 96, "itself-image"),
    (256, 77, 512, 37, "itself-text"),
    (64, 577, 768, 288, "vit-l14-336"),
]


def _reference(scores: torch.Tensor, k: int, tokens: torch.Tensor) -> torch.Tensor:
    indices, _ = F.select_topk(scores, k)
    return F.gather_tokens(tokens, indices)


def _bench_shape(args: argparse.Namespace, spec: tuple, triton_ok: bool) -> list[Row]:
    b, n, d, k, name = spec
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(b, n, device=device, generator=g)
    tokens = torch.randn(b, n, d, device=device, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(b, k, d, device=device, generator=g).to(dtype)
    paths: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("torch_topk_gather", lambda: topk_gather_torch(scores, k, tokens)[1]),
        ("reference", lambda: _reference(scores, k, tokens)),
    ]
    if triton_ok:
        import attnselect.kernels as K

        paths.append(("triton", lambda: K.select_topk_gather(scores, k, tokens)[2]))
        ref = _reference(scores, k, tokens)
        check("triton (gathered tokens)", (K.select_topk_gather(scores, k, tokens)[2] - ref).abs().max().item(), 0.0)
    shape = f"{name} B={b} N={n} D={d} k={k}"
    elem = tokens.element_size()
    fwd_bytes = b * n * scores.element_size() + b * k * (d * elem + 8)
    bwd_bytes = fwd_bytes + b * k * d * elem + b * n * d * elem  # read grad_out, write the token gradient
    rows = []
    for provider, fn in paths:

        def fwd(fn: Callable[[], torch.Tensor] = fn) -> None:
            with torch.no_grad():
                fn()

        def fwdbwd(fn: Callable[[], torch.Tensor] = fn) -> None:
            tokens.grad = None
            fn().backward(grad_out)

        for suffix, call, nbytes in (("fwd", fwd, fwd_bytes), ("fwdbwd", fwdbwd, bwd_bytes)):
            rows.append(
                measure(
                    OP,
                    f"{provider}_{suffix}",
                    call,
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
    shapes = SHAPES
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
