"""Attach an AttentiveBank to an unmodified timm ViT: after each forward, `bank.last` holds the kept tokens.

Runs offline in seconds on a tiny random model; for real work build the host with
`timm.create_model("vit_base_patch16_224", pretrained=True)` instead.
"""

import torch
from timm.models.vision_transformer import VisionTransformer

import attnselect as asel

vit = VisionTransformer(img_size=(64, 32), patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=0).eval()
images = torch.randn(2, 3, 64, 32)

bank = asel.AttentiveBank(ratio=0.4)  # rollout over the "middle" and "late" layers, keep 40 %, max-pool
with bank.attach(vit):  # hooks on the two chosen attention layers only; removed on exit
    with torch.no_grad():
        vit(images)  # the ViT keeps its fused attention; its output is unchanged
    out = bank.last

print("k =", out.k)
print("kept token indices:", out.indices.tolist())
print("local embedding shape:", tuple(out.embedding.shape))
