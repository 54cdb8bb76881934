"""Text-based person search data: PEDES readers, tokenisation, transforms, sampler and a synthetic dataset.

Importing this package needs only torch and numpy: open_clip (tokenizer), torchvision (transforms) and PIL
(images) are imported when first used. Layouts and usage: ``docs/data.md``.
"""

from .datasets import ImageDataset, PedesTrainDataset, TextDataset, load_image
from .pedes import (
    DATASETS,
    PedesData,
    TrainSample,
    load_pedes,
    read_cuhk_pedes,
    read_icfg_pedes,
    read_rstpreid,
)
from .sampler import RandomIdentitySampler
from .synthetic import (
    PersonAttributes,
    describe_person,
    generate_synthetic_pedes,
    render_person,
    sample_identities,
    synthetic_pedes_root,
)
from .text import EOS_ID, MASK_ID, SOS_ID, VOCAB_SIZE, augment_tokens, get_tokenizer, tokenize
from .transforms import CLIP_MEAN, CLIP_STD, build_test_transform, build_train_transform

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "EOS_ID",
    "MASK_ID",
    "SOS_ID",
    "VOCAB_SIZE",
    "ImageDataset",
    "PedesData",
    "PedesTrainDataset",
    "PersonAttributes",
    "RandomIdentitySampler",
    "TextDataset",
    "TrainSample",
    "augment_tokens",
    "build_test_transform",
    "build_train_transform",
    "describe_person",
    "generate_synthetic_pedes",
    "get_tokenizer",
    "load_image",
    "load_pedes",
    "read_cuhk_pedes",
    "read_icfg_pedes",
    "read_rstpreid",
    "render_person",
    "sample_identities",
    "synthetic_pedes_root",
    "tokenize",
]
