"""Train and evaluate the reference ITSELF model (a thin wrapper around :mod:`attnselect.train`).

Examples::

    # two-minute CPU demo on freshly generated synthetic data (metrics table + kept-token figure)
    python examples/train_itself.py --demo --out outputs/demo

    # the published recipe on CUHK-PEDES, one GPU, from local OpenAI CLIP ViT-B/16 weights
    python examples/train_itself.py --config configs/itself_cuhk.yaml --root /data --pretrained /weights/ViT-B-16.pt

    # four GPUs (global batch 256 split over the ranks)
    torchrun --nproc_per_node=4 examples/train_itself.py --config configs/itself_cuhk.yaml --root /data \\
        --pretrained /weights/ViT-B-16.pt

    # resume, evaluate a checkpoint
    python examples/train_itself.py --config configs/itself_cuhk.yaml --root /data --resume auto
    python examples/train_itself.py --eval-only --dataset cuhk --root /data --resume outputs/itself/checkpoints/best

Every configuration field is also a flag (``--help`` lists them); flags override the ``--config`` file.
"""

import sys

from attnselect.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
