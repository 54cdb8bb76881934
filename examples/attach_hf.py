"""Capture attention from an unmodified HuggingFace CLIPModel and attach an AttentiveBank to its vision tower.

`get_image_features` (or `model(...)`) triggers the bank. Runs offline in seconds on a tiny random model; for
real work use `CLIPModel.from_pretrained("openai/clip-vit-base-patch16")`.
"""

import torch
from transformers import CLIPConfig, CLIPModel

import attnselect as asel

small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4)
config = CLIPConfig(
    vision_config=dict(**small, image_size=64, patch_size=16),
    text_config=dict(**small, vocab_size=1000, max_position_embeddings=16, bos_token_id=998, eos_token_id=999),
    projection_dim=32,
)
model = CLIPModel(config).eval()
pixels = torch.randn(2, 3, 64, 64)

# 1. Raw maps: the CLS row of two layers, head-averaged, plus the projected tokens
with asel.hooks.capture_attention(model, ("middle", "late"), query_rows="cls") as cap, torch.no_grad():
    model.get_image_features(pixel_values=pixels)
    print("captured layers:", {layer: tuple(m.shape) for layer, m in cap.maps.items()}, "grid:", cap.grid)
    print("projected tokens:", tuple(cap.tokens.shape))

# 2. A bank on the vision tower
bank = asel.AttentiveBank(ratio=0.4)
handle = bank.attach(model, tower="vision")
with torch.no_grad():
    model.get_image_features(pixel_values=pixels)
handle.remove()
print("k =", bank.last.k)
print("kept token indices:", bank.last.indices.tolist())
