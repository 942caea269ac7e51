"""Paired (image, mask) transforms built on albumentations.

Masks are always resized with nearest-neighbour and padded with ``ignore_index``, so no
transform can invent a label value.
"""

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    crop_size: Sequence[int],
    ignore_index: int,
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Random scale, pad + random crop to ``crop_size`` (height, width), flip, jitter, normalize.

    ``color_jitter`` is the probability of a brightness/contrast/saturation/hue jitter (0 = off).
    """
    crop_height, crop_width = crop_size
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be 0 < low <= high, got {list(scale_range)}")
    return A.Compose(
        [
            # scale_limit is relative to 1 in albumentations: (0.5, 2.0) -> (-0.5, 1.0).
            A.RandomScale(
                scale_limit=(low - 1.0, high - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0 if (low, high) != (1.0, 1.0) else 0.0,
            ),
            A.PadIfNeeded(
                min_height=crop_height,
                min_width=crop_width,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,  # padded pixels are ignored by loss and metrics
            ),
            A.RandomCrop(height=crop_height, width=crop_width),
            A.HorizontalFlip(p=hflip),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=color_jitter),
            A.Normalize(mean=mean, std=std),
            ToTensorV2(),
        ]
    )


def val_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> A.Compose:
    """Normalize only: validation runs on whole images at their original resolution."""
    return A.Compose([A.Normalize(mean=mean, std=std), ToTensorV2()])


def apply(
    transform: A.Compose, image: np.ndarray, mask: np.ndarray, seed: tuple[int, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``transform`` on an (H, W, 3) uint8 image and (H, W) mask, seeded when ``seed`` is set.

    One numpy and one Python generator are shared by all transforms of the pipeline
    (``Compose.set_random_seed`` would give every transform the same stream and so correlate,
    e.g., the flip with the crop offset).
    """
    if seed is not None:
        transform.set_random_state(np.random.default_rng(seed), random.Random(hash(seed)))
    out = transform(image=image, mask=mask)  # mask by keyword: albumentations resizes it nearest
    return out["image"], out["mask"]
