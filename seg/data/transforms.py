"""Paired (image, mask) transforms built on albumentations, on uint8 throughout.

Samples leave the CPU small: the image as uint8 (3, H, W), the mask as uint8 or int16 (H, W).
Normalization (``(x / 255 - mean) / std`` with ``data.mean``/``data.std``) and the float
conversion happen on the device, after the copy (issue 11: a float32 image is 4x the bytes).

Masks are always resized with nearest-neighbour and padded with ``ignore_index``, so no
transform can invent a label value.
"""

import logging
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

log = logging.getLogger(__name__)

# Augmentations defined on RGB colour (albumentations' ColorJitter fails on uint16, and hue or
# saturation mean nothing for 4 or 13 bands): run on 3-band uint8 images only.
COLOR_TRANSFORMS = (A.ColorJitter,)

# ImageNet statistics: the default of data.mean/data.std, which the consumers apply on the device.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomScaleCrop(A.DualTransform):
    """Random scale, pad bottom/right + random crop to (height, width), computed crop-first.

    Draws what ``A.RandomScale`` -> ``A.PadIfNeeded(position="top_left")`` -> ``A.RandomCrop``
    draw, in the same order from the same random stream: a scale ``s`` uniform in
    ``scale_range``, then a crop position uniform over the padded scaled image. So the crops
    have that pipeline's distribution (a seed even gives the same crop window), but only the
    source region under the crop, about (height / s, width / s), is resized: at Cityscapes size
    (scale 0.5-2, 1024x2048 -> 512x1024) that is 0.5 MP of output instead of 3.5 MP on average.
    The region's edges are rounded to whole source pixels, which moves the crop by under one
    source pixel and changes its scale by under 1 / (crop side in source pixels).
    The image resizes bilinearly, the mask nearest; where the scaled image would be smaller
    than the crop the image is padded with ``fill_image`` (``data.nodata``, else 0: one value,
    one per band, or NaN) and the mask with ``fill_mask``.

    ``cat_max_ratio`` < 1 is mmsegmentation's ``RandomCrop(cat_max_ratio=...)`` for small
    structures: while one class covers ``cat_max_ratio`` or more of the crop's labelled pixels
    (``fill_mask``, the ignore index, left out), or the crop holds one class only, another
    position is drawn at the same scale, up to 10 times; the last one drawn is kept. Drawn
    from the same seeded stream, so a sample's crop stays reproducible; at 1 nothing more is
    drawn, and the crops are those of before.
    """

    def __init__(
        self,
        height: int,
        width: int,
        scale_range: Sequence[float],
        fill_mask: int,
        p: float = 1.0,
        fill_image: float | Sequence[float] = 0,
        cat_max_ratio: float = 1.0,
    ):
        super().__init__(p=p)
        self.height, self.width = height, width
        self.scale_range = tuple(scale_range)
        self.fill_mask = fill_mask
        self.fill_image = fill_image
        self.cat_max_ratio = cat_max_ratio

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "scale_range", "fill_mask", "fill_image", "cat_max_ratio")

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict[str, Any]:
        height, width = params["shape"][:2]
        low, high = self.scale_range
        # As A.RandomScale(scale_limit=(low - 1, high - 1)) draws it, and not at all for (1, 1),
        # where that pipeline switched it off: the same stream gives the same crops.
        scale = 1.0 if (low, high) == (1.0, 1.0) else self.py_random.uniform(low - 1, high - 1) + 1
        # A.RandomScale's rounding (at least one pixel, where it would fail on tiny images)
        scaled_h, scaled_w = max(1, int(height * scale)), max(1, int(width * scale))
        window = self._window(height, width, scaled_h, scaled_w)
        if self.cat_max_ratio < 1:
            for _ in range(10):  # mmsegmentation's number of retries
                if self._balanced(self.apply_to_mask(data["mask"], **window)):
                    break
                window = self._window(height, width, scaled_h, scaled_w)
        return {**window, "scale": scale}

    def _window(self, height: int, width: int, scaled_h: int, scaled_w: int) -> dict[str, tuple]:
        """A random crop position on the scaled image, as a source region and its valid size."""
        # A.RandomCrop's position on the image padded (bottom/right) to at least the crop size
        top = int((max(scaled_h, self.height) - self.height + 1) * self.py_random.random())
        left = int((max(scaled_w, self.width) - self.width + 1) * self.py_random.random())
        # The part of the crop inside the scaled image; the rest is padding.
        valid_h, valid_w = min(self.height, scaled_h - top), min(self.width, scaled_w - left)
        # Its source region, in whole source pixels (at least one).
        y0, x0 = round(top * height / scaled_h), round(left * width / scaled_w)
        y1 = max(y0 + 1, min(height, round((top + valid_h) * height / scaled_h)))
        x1 = max(x0 + 1, min(width, round((left + valid_w) * width / scaled_w)))
        return {"region": (y0, y1, x0, x1), "valid": (valid_h, valid_w)}

    def _balanced(self, mask: np.ndarray) -> bool:
        """Whether no class covers ``cat_max_ratio`` or more of the labelled pixels of a mask
        crop holding two classes or more (mmsegmentation's test)."""
        labels, counts = np.unique(mask, return_counts=True)
        counts = counts[labels != self.fill_mask]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def apply(self, img: np.ndarray, region, valid, **params) -> np.ndarray:
        return self._crop_resize(img, region, valid, cv2.INTER_LINEAR, self.fill_image)

    def apply_to_mask(self, mask: np.ndarray, region, valid, **params) -> np.ndarray:
        return self._crop_resize(mask, region, valid, cv2.INTER_NEAREST, self.fill_mask)

    def _crop_resize(self, array, region, valid, interpolation: int, fill) -> np.ndarray:
        if array.ndim == 3 and array.shape[2] == 1:  # cv2 returns (H, W) for one band: keep C
            return self._crop_resize(array[..., 0], region, valid, interpolation, fill)[..., None]
        y0, y1, x0, x1 = region
        valid_h, valid_w = valid
        source = array[y0:y1, x0:x1]
        if (valid_h, valid_w) == (self.height, self.width):
            return cv2.resize(source, (valid_w, valid_h), interpolation=interpolation)
        out = np.empty((self.height, self.width, *array.shape[2:]), array.dtype)
        out[...] = fill  # one value, or one per band
        # cv2 writes into the top-left view: the padding stays bottom/right, as before.
        cv2.resize(
            source, (valid_w, valid_h), dst=out[:valid_h, :valid_w], interpolation=interpolation
        )
        return out


def train_transform(
    crop_size: Sequence[int],
    ignore_index: int,
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    fill: float | str | Sequence[float] | None = None,
    cat_max_ratio: float = 1.0,
) -> A.Compose:
    """Random scale + crop to ``crop_size`` (height, width) (``RandomScaleCrop``), flip, jitter.

    ``fill``: the image's padding, ``data.nodata`` (None: 0; ``"nan"``: NaN), so that padded
    pixels are no data, not a valid value such as 0 (water in CT, a valid reflectance).

    ``color_jitter`` is the probability of a brightness/contrast/saturation/hue jitter (0 = off).
    ``cat_max_ratio`` < 1 redraws crops that one class dominates (``RandomScaleCrop``).
    ``mean``/``std`` are accepted and unused: the configs stored in checkpoints written before
    normalization moved to the device pass them (issue 11).
    """
    crop_height, crop_width = crop_size
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be 0 < low <= high, got {list(scale_range)}")
    if not 0 < cat_max_ratio <= 1:
        raise ValueError(
            f"data.train_transform.cat_max_ratio={cat_max_ratio}: give the largest share of a "
            "crop one class may cover, in (0, 1] (1: off; mmsegmentation's configs use 0.75)"
        )
    return A.Compose(
        [
            # padded mask pixels are ignored by loss and metrics
            RandomScaleCrop(
                crop_height,
                crop_width,
                (low, high),
                fill_mask=ignore_index,
                fill_image=pad_value(fill),
                cat_max_ratio=cat_max_ratio,
            ),
            A.HorizontalFlip(p=hflip),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=color_jitter),
        ]
    )


def without_color(transform: A.Compose | None, images: str) -> A.Compose | None:
    """``transform`` without its colour augmentations (``COLOR_TRANSFORMS``), logged as skipped
    for ``images`` (what the images are, e.g. "13 bands of uint16")."""
    if transform is None:
        return None
    kept = [t for t in transform.transforms if not isinstance(t, COLOR_TRANSFORMS)]
    skipped = [type(t).__name__ for t in transform.transforms if isinstance(t, COLOR_TRANSFORMS)]
    if not any(t.p > 0 for t in transform.transforms if isinstance(t, COLOR_TRANSFORMS)):
        return transform
    log.info("Colour augmentation %s skipped: it runs on 3-band uint8 images, these are %s",
             ", ".join(skipped), images)  # fmt: skip
    return A.Compose(kept)


def pad_value(nodata: float | str | Sequence[float] | None) -> float | list[float]:
    """``data.nodata`` as the image's padding value: 0 without one."""
    if nodata is None:
        return 0
    if isinstance(nodata, str):
        return float(nodata)  # "nan"
    return nodata if isinstance(nodata, int | float) else [float(v) for v in nodata]


def val_transform(
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> A.Compose:
    """Nothing to do: validation runs on whole uint8 images at their original resolution.

    ``mean``/``std``: accepted and unused, as in ``train_transform``.
    """
    return A.Compose([])


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) uint8 and (H, W) arrays -> (3, H, W) uint8 and (H, W) tensors, no copy: the
    image is a channels-first view, which the DataLoader's collate copies into the batch.

    Read-only arrays (the cache's memory maps, passed through by an empty transform) are copied:
    a tensor must not write into, nor keep open, a mapped cache file."""
    # from_numpy takes no negative strides (flips) and warns on read-only arrays
    image, mask = (np.require(array, requirements="CWE") for array in (image, mask))
    return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask)


def apply(
    transform: A.Compose, image: np.ndarray, mask: np.ndarray, seed: tuple[int, ...] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``transform`` on an (H, W, 3) uint8 image and (H, W) mask, seeded when ``seed`` is set;
    returns ``to_tensors`` of the result: image (3, h, w) uint8, mask (h, w) of the mask's dtype.

    One numpy and one Python generator are shared by all transforms of the pipeline
    (``Compose.set_random_seed`` would give every transform the same stream and so correlate,
    e.g., the flip with the crop offset).
    """
    if seed is not None:
        transform.set_random_state(np.random.default_rng(seed), random.Random(hash(seed)))
    out = transform(image=image, mask=mask)  # mask by keyword: albumentations resizes it nearest
    return to_tensors(out["image"], out["mask"])
