"""Quickstart: attention-guided token selection on an unmodified timm ViT.

A small randomly initialised ViT (24 x 8 patches of a 384 x 128 person crop, as in ITSELF) runs unchanged; the bank
attached to it captures two layers' attention (middle and late), rolls them out (MARS), asks the scheduler (ATS) how
many tokens to keep at each step, keeps the top-k patches and pools them. The script prints k and the kept indices per
step and saves a PNG of the saliency and the kept tokens.

    python examples/quickstart.py --out outputs/quickstart
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

import attnselect as asel
from attnselect import viz
from attnselect.data.synthetic import render_person, sample_identities

IMAGE_SIZE = (384, 128)
GRID = (IMAGE_SIZE[0] // 16, IMAGE_SIZE[1] // 16)  # 24 x 8 patches


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/quickstart", help="folder for the PNG")
    parser.add_argument("--steps", type=int, default=5, help="training steps to simulate")
    parser.add_argument("--depth", type=int, default=6, help="transformer layers of the toy ViT")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    # an unmodified host: timm keeps its fused attention; nothing in the model is edited
    vit = VisionTransformer(
        img_size=IMAGE_SIZE, patch_size=16, embed_dim=96, depth=args.depth, num_heads=3, num_classes=0
    ).eval()

    # one synthetic person (the same generator as the built-in dataset), normalised like CLIP inputs
    rng = np.random.default_rng(args.seed)
    _, person = sample_identities(1, rng)[0]
    image = render_person(person, rng, image_size=IMAGE_SIZE)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    pixels = (pixels - 0.45) / 0.27

    rollout = asel.MultiLayerRollout(layers=("middle", "late"), discard_ratio=0.25)
    scheduler = asel.AdaptiveTokenScheduler(rho_start=0.65, rho_end=0.5, total_steps=args.steps)
    bank = asel.AttentiveBank(rollout=rollout, scheduler=scheduler, pool="gpo")
    layers = rollout.resolve_layers(args.depth)
    print(f"host: {args.depth}-layer ViT, {GRID[0]}x{GRID[1]} patches + CLS; rollout layers {layers}")

    with bank.attach(vit), torch.no_grad():
        for _ in range(args.steps):
            step = scheduler.step()
            vit(pixels.unsqueeze(0))
            out = bank.last
            print(f"step {step}: k = {out.k:3d} of 192  kept (most salient first): {out.indices[0, :10].tolist()} ...")
    print(f"local embedding: {tuple(out.embedding.shape)} (GPO over the kept tokens)")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(6.6, 6.2))
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    axes[0].axis("off")
    viz.plot_saliency(image, out.saliency, grid=GRID, colorbar=False, ax=axes[1], title="rollout saliency")
    viz.plot_kept_tokens(image, out.indices, grid=GRID, mask=out.mask, ax=axes[2])
    fig.suptitle("attnselect quickstart (random ViT)", fontsize=10)
    fig.tight_layout()
    path = out_dir / "quickstart.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main()
