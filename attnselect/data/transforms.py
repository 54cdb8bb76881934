"""Image transforms of the reference training and evaluation pipelines (torchvision, imported on first use)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CLIP_MEAN", "CLIP_STD", "build_test_transform", "build_train_transform"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (H, W) with positive entries, got {image_size!r}")
    return size  # type: ignore[return-value]


def _tv():
    try:
        import torchvision.transforms as T
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("image transforms need torchvision: pip install 'attnselect[train]'") from exc
    return T


def build_test_transform(image_size: int | Sequence[int] = (384, 128), mean=CLIP_MEAN, std=CLIP_STD):
    """``Resize((H, W)) -> ToTensor -> Normalize(mean, std)`` (bilinear resize).

    Args:
        image_size: ``(H, W)``; the reference uses (384, 128).
        mean: normalisation mean (CLIP's by default).
        std: normalisation std (CLIP's by default).

    Returns:
        A callable ``PIL.Image -> [3,H,W]`` fp32 tensor.

    Examples:
        >>> from PIL import Image
        >>> build_test_transform((32, 16))(Image.new("RGB", (48, 96))).shape  # PIL (W, H) -> [3,H,W]
        torch.Size([3, 32, 16])
    """
    T = _tv()
    return T.Compose([T.Resize(_size(image_size)), T.ToTensor(), T.Normalize(mean, std)])


def build_train_transform(
    image_size: int | Sequence[int] = (384, 128),
    *,
    augment: bool = True,
    padding: int = 10,
    erasing_prob: float = 0.5,
    mean=CLIP_MEAN,
    std=CLIP_STD,
):
    """The published training augmentation.

    ``Resize((H, W)) -> RandomHorizontalFlip(0.5) -> Pad(padding) -> RandomCrop((H, W)) -> ToTensor ->
    Normalize(mean, std) -> RandomErasing(p=erasing_prob, scale=(0.02, 0.4), value=mean)``. The erased area is
    filled with the un-normalised mean triple after normalisation, as the reference code does. With
    ``augment=False`` this is :func:`build_test_transform`.

    Args:
        image_size: ``(H, W)``.
        augment: apply the random augmentations.
        padding: pixels of zero padding before the random crop (10 in the reference, meant for 384 x 128).
        erasing_prob: probability of random erasing.
        mean: normalisation mean and erasing value.
        std: normalisation std.

    Returns:
        A callable ``PIL.Image -> [3,H,W]`` fp32 tensor (random at every call when ``augment``).

    Examples:
        >>> from PIL import Image
        >>> build_train_transform((32, 16), padding=2)(Image.new("RGB", (48, 96))).shape
        torch.Size([3, 32, 16])
    """
    if not augment:
        return build_test_transform(image_size, mean, std)
    T = _tv()
    size = _size(image_size)
    return T.Compose(
        [
            T.Resize(size),
            T.RandomHorizontalFlip(0.5),
            T.Pad(padding),
            T.RandomCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
            T.RandomErasing(p=erasing_prob, scale=(0.02, 0.4), value=tuple(mean)),
        ]
    )
