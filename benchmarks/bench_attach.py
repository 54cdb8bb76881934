"""Cost of attention capture on host models: forward time and peak memory with and without hooks.

Hosts (random init, eval, ``no_grad``, batch 8):

- ``vit_b16``: timm ``VisionTransformer()``, the default ViT-B/16 at 224 (SDPA attention);
- ``eva02_s14``: timm ``eva02_small_patch14_224``, rotary attention (``EvaAttention``) at 224;
- ``naflex_b16``: timm ``naflexvit_base_patch16_gap`` with axial RoPE on NaFlex dict inputs: eight images of
  different sizes padded to 256 patches;
- ``siglip2_naflex``: HF ``Siglip2VisionModel`` (ViT-B width, 12 layers, MAP head), NaFlex inputs padded to 256 patches.

Providers: ``plain`` (no hooks) and ``capture2`` (``capture_attention`` of the ``("middle", "late")`` layers,
head-averaged ``[B,N,N]`` maps, plus the final tokens). Times are medians over interleaved runs of the two; peak
memory is what one forward adds on top of what is held before it (:func:`harness.peak_memory_mb`); ``gbps`` is NaN.

Usage:
    python benchmarks/bench_attach.py [--quick] [--device cpu|cuda] [--reps 7] [--hosts vit_b16,eva02_s14]

Appends rows to ``benchmarks/results/attach.csv`` through the shared harness.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Row, commit, device_name, parse_args, peak_memory_mb, versions, write_results

from attnselect.hooks import capture_attention

OP = "attach"
LAYERS = ("middle", "late")
BATCH = 8
HOSTS = ("vit_b16", "eva02_s14", "naflex_b16", "siglip2_naflex")


def _naflex_sizes(batch: int) -> list[tuple[int, int]]:
    sizes = [(224, 224), (160, 288), (256, 192), (128, 320), (208, 240), (176, 176), (96, 384), (240, 256)]
    return [sizes[i % len(sizes)] for i in range(batch)]


def build_host(name: str, device: str) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], object], str]:
    """The host, a call running one forward on a fixed batch, and the CSV shape label."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "vit_b16":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer().eval().to(device)  # ViT-B/16, 224 x 224, 12 layers, 12 heads, SDPA attention
        x = torch.randn(BATCH, 3, 224, 224, generator=g).to(device)
        return model, lambda m: m(x), f"vit_b16 {BATCH}x3x224x224"
    if name == "eva02_s14":
        import timm

        model = timm.create_model("eva02_small_patch14_224", pretrained=False).eval().to(device)
        x = torch.randn(BATCH, 3, 224, 224, generator=g).to(device)
        return model, lambda m: m(x), f"eva02_s14 rope {BATCH}x3x224x224"
    if name == "naflex_b16":
        import timm
        from timm.data.naflex_dataset import NaFlexCollator
        from timm.data.naflex_transforms import patchify_image

        model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, rope_type="axial").eval().to(device)
        items = []
        for h, w in _naflex_sizes(BATCH):
            patches, coord, valid = patchify_image(torch.randn(3, h, w, generator=g), (16, 16))
            items.append(({"patches": patches, "patch_coord": coord, "patch_valid": valid}, 0))
        batch, _ = NaFlexCollator(max_seq_len=256)(items)
        batch.pop("seq_len")
        batch = {k: v.to(device) for k, v in batch.items()}
        return model, lambda m: m(batch), f"naflex_b16 rope {BATCH}x256 patches"
    if name == "siglip2_naflex":
        import transformers

        cfg = transformers.Siglip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, patch_size=16, num_patches=256)  # fmt: skip
        model = transformers.Siglip2VisionModel(cfg).eval().to(device)
        shapes = torch.tensor([[h // 16, w // 16] for h, w in _naflex_sizes(BATCH)])
        shapes = torch.where(shapes.prod(-1, keepdim=True) > 256, torch.tensor([16, 16]), shapes)
        length = 256
        valid = torch.arange(length)[None] < shapes.prod(-1)[:, None]
        pixels = torch.randn(BATCH, length, 3 * 16 * 16, generator=g) * valid[..., None]
        inputs = {"pixel_values": pixels, "pixel_attention_mask": valid.long(), "spatial_shapes": shapes}
        inputs = {k: v.to(device) for k, v in inputs.items()}
        return model, lambda m: m(**inputs), f"siglip2_naflex {BATCH}x256 patches"
    raise ValueError(f"unknown host {name!r}; one of {HOSTS}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _forward_ms(model: torch.nn.Module, run: Callable, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        run(model)
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def bench_host(name: str, args) -> list[Row]:
    device = args.device
    model, run, shape = build_host(name, device)

    def forward() -> None:
        with torch.no_grad():
            run(model)

    for _ in range(args.warmup):
        forward()
    # interleaved runs, so that load from other processes affects both configurations alike
    times: dict[str, list[float]] = {"plain": [], "capture2": []}
    for _ in range(args.reps):
        times["plain"].append(_forward_ms(model, run, device))
        cap = capture_attention(model, LAYERS)
        times["capture2"].append(_forward_ms(model, run, device))
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
                shape=shape,
                dtype="float32",
                median_ms=round(statistics.median(times[provider]), 2),
                gbps=math.nan,  # not a bandwidth-bound op
                peak_mem_mb=round(peak[provider], 1),
                device=device_name(device),
                versions=versions(),
                commit=commit(),
            )
        )
    ratios = sorted(c / p for c, p in zip(times["capture2"], times["plain"]))
    print(
        f"[{device}] {shape}: plain {rows[0].median_ms:.1f} ms, capture of 2 layers {rows[1].median_ms:.1f} ms = "
        f"{rows[1].median_ms / rows[0].median_ms:.3f}x (paired runs {ratios[0]:.3f}-{ratios[-1]:.3f}); peak "
        f"+{rows[0].peak_mem_mb} -> +{rows[1].peak_mem_mb} MB; maps kept {kept_mb:.2f} MiB"
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    hosts = list(HOSTS)
    if "--hosts" in argv:
        i = argv.index("--hosts")
        hosts = argv[i + 1].split(",")
        del argv[i : i + 2]
    args = parse_args(__doc__.splitlines()[0], argv)
    if args.quick:
        hosts = hosts[:1]
    for name in hosts:  # each host's rows are saved as soon as they exist
        write_results(OP, bench_host(name, args), args)


if __name__ == "__main__":
    main()
