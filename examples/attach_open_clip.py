"""Attach one AttentiveBank per tower of an unmodified open_clip CLIP (ITSELF's local branch).

The image bank queries the CLS row, the text bank the per-caption EOS row (and never keeps SOS or EOS). Runs
offline in seconds on a tiny random model; for real work use
`open_clip.create_model("ViT-B-16", pretrained="openai", force_image_size=(384, 128))`.
"""

import open_clip
import torch

import attnselect as asel

model = open_clip.CLIP(
    embed_dim=32,
    vision_cfg=dict(layers=6, width=64, head_width=16, patch_size=16, image_size=(96, 32)),
    text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=4, layers=6),
).eval()
tokenizer = open_clip.get_tokenizer("ViT-B-16")  # bundled vocabulary, no download
images = torch.randn(2, 3, 96, 32)
texts = tokenizer(["a woman in a red coat", "a man with a black backpack and jeans"], context_length=16)

image_bank, text_bank = asel.AttentiveBank(ratio=0.5), asel.AttentiveBank(ratio=0.5)
with image_bank.attach(model, tower="vision"), text_bank.attach(model, tower="text"):
    with torch.no_grad():
        model.encode_image(images)
        model.encode_text(texts)

for name, bank in (("image", image_bank), ("text", text_bank)):
    print(f"{name}: k = {bank.last.k}, kept token indices: {bank.last.indices.tolist()}")
