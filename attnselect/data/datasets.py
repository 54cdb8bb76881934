"""Torch datasets over :class:`~attnselect.data.pedes.PedesData`: paired training samples, and separate image and
caption sets for evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .pedes import TrainSample
from .text import augment_tokens, tokenize

__all__ = ["ImageDataset", "PedesTrainDataset", "TextDataset", "load_image"]

logger = logging.getLogger(__name__)


def load_image(path: str):
    """Open an image file as an RGB ``PIL.Image`` (the file is closed before returning).

    Args:
        path: the image file.

    Returns:
        The RGB image, loaded into memory.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Image.new("L", (4, 8)).save(os.path.join(tmp, "grey.png"))
        ...     image = load_image(os.path.join(tmp, "grey.png"))
        >>> image.mode, image.size
        ('RGB', (4, 8))
    """
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


class PedesTrainDataset(Dataset):
    """Image-caption pairs for training.

    ``dataset[i]`` is a dict ``{"images": transformed image (a ``[3, H, W]`` tensor with the usual transforms),
    "caption_ids": [text_length] int64, "pids": int64 scalar, "image_ids": int64 scalar}``; the default collate
    stacks them into a batch.

    Args:
        samples: training samples ``(pid, image_id, img_path, caption)`` (``PedesData.train``).
        transform: image transform (e.g. :func:`~attnselect.data.transforms.build_train_transform`); None returns
            the PIL image.
        text_length: token context length.
        text_augment: apply :func:`~attnselect.data.text.augment_tokens` to every caption (uses the global torch
            RNG, which the DataLoader seeds per worker).
        tokenizer: object with ``encode(str) -> list[int]``; default open_clip's ``SimpleTokenizer``.
        cache_tokens: tokenise each caption once and keep the ids (cheap: 77 int64 per caption).

    Examples:
        >>> from attnselect.data import build_train_transform
        >>> import tempfile
        >>> from attnselect.data import generate_synthetic_pedes, read_cuhk_pedes
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     data = read_cuhk_pedes(generate_synthetic_pedes(tmp, num_ids=6, images_per_id=2, image_size=(32, 16)))
        ...     train = PedesTrainDataset(data.train, build_train_transform((32, 16)), text_length=16)
        ...     sample = train[0]
        >>> len(train), sample["images"].shape, sample["caption_ids"].shape  # [3,H,W], [text_length]
        (16, torch.Size([3, 32, 16]), torch.Size([16]))
    """

    def __init__(
        self,
        samples: Sequence[TrainSample],
        transform: Callable | None = None,
        *,
        text_length: int = 77,
        text_augment: bool = False,
        tokenizer=None,
        cache_tokens: bool = True,
    ) -> None:
        self.samples = [TrainSample(*s) for s in samples]
        self.transform = transform
        self.text_length = text_length
        self.text_augment = text_augment
        self.tokenizer = tokenizer
        self._cache: dict[int, Tensor] | None = {} if cache_tokens else None

    @property
    def pids(self) -> list[int]:
        """Identity of every index (what :class:`~attnselect.data.sampler.RandomIdentitySampler` groups by)."""
        return [s.pid for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _tokens(self, index: int) -> Tensor:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        ids = tokenize(self.samples[index].caption, self.text_length, tokenizer=self.tokenizer)
        if self._cache is not None:
            self._cache[index] = ids
        return ids

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        image = load_image(s.img_path)
        if self.transform is not None:
            image = self.transform(image)
        ids = self._tokens(index)
        if self.text_augment:
            ids = augment_tokens(ids)
        return {
            "images": image,
            "caption_ids": ids,
            "pids": torch.tensor(s.pid, dtype=torch.long),
            "image_ids": torch.tensor(s.image_id, dtype=torch.long),
        }


class ImageDataset(Dataset):
    """Evaluation gallery: ``dataset[i] = (pid, image)``.

    Args:
        image_pids: identity per image (``PedesData.test["image_pids"]``).
        img_paths: path per image.
        transform: image transform (e.g. :func:`~attnselect.data.transforms.build_test_transform`).

    Examples:
        >>> from attnselect.data import build_test_transform
        >>> import tempfile
        >>> from attnselect.data import generate_synthetic_pedes, read_cuhk_pedes
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     data = read_cuhk_pedes(generate_synthetic_pedes(tmp, num_ids=6, images_per_id=2, image_size=(32, 16)))
        ...     gallery = ImageDataset(data.test["image_pids"], data.test["img_paths"], build_test_transform((32, 16)))
        ...     pid, image = gallery[0]
        >>> len(gallery), image.shape  # [3,H,W]
        (2, torch.Size([3, 32, 16]))
    """

    def __init__(self, image_pids: Sequence[int], img_paths: Sequence[str], transform: Callable | None = None):
        if len(image_pids) != len(img_paths):
            raise ValueError(
                f"ImageDataset: image_pids and img_paths must have the same length, got "
                f"{len(image_pids)} and {len(img_paths)}"
            )
        self.image_pids = list(image_pids)
        self.img_paths = list(img_paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.img_paths)

    def __getitem__(self, index: int):
        image = load_image(self.img_paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return torch.tensor(self.image_pids[index], dtype=torch.long), image


class TextDataset(Dataset):
    """Evaluation queries: ``dataset[i] = (pid, caption_ids [text_length])``.

    Args:
        caption_pids: identity per caption (``PedesData.test["caption_pids"]``).
        captions: caption strings.
        text_length: token context length.
        tokenizer: object with ``encode(str) -> list[int]``; default open_clip's ``SimpleTokenizer``.

    Examples:
        >>> queries = TextDataset([7, 9], ["a man in a red coat", "a woman with a bag"], text_length=16)
        >>> pid, ids = queries[1]
        >>> int(pid), ids.shape  # ids: [text_length] int64
        (9, torch.Size([16]))
    """

    def __init__(
        self, caption_pids: Sequence[int], captions: Sequence[str], *, text_length: int = 77, tokenizer=None
    ) -> None:
        if len(caption_pids) != len(captions):
            raise ValueError(
                f"TextDataset: caption_pids and captions must have the same length, got "
                f"{len(caption_pids)} and {len(captions)}"
            )
        self.caption_pids = list(caption_pids)
        self.captions = list(captions)
        self.text_length = text_length
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        ids = tokenize(self.captions[index], self.text_length, tokenizer=self.tokenizer)
        return torch.tensor(self.caption_pids[index], dtype=torch.long), ids
