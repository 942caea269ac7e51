"""What every dataset shares: reading, label mapping and checking, seeded transforms."""

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from seg.data.transforms import apply

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A problem with the data on disk; the message names the file and how to fix it."""


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # OpenCV decodes PNG/JPEG faster than PIL
    if image is None:
        raise DataError(f"{path}: cannot read image (missing, truncated or not an image file)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    """Decode a label PNG to (H, W) integer class indices.

    PIL keeps palette ("P") PNGs as their indices, where OpenCV would expand them to colours.
    """
    try:
        with Image.open(path) as mask:
            mode = mask.mode
            array = np.array(mask)  # a writable copy, as torch.from_numpy expects
    except (OSError, SyntaxError) as error:
        raise DataError(f"{path}: cannot read mask ({error})") from error
    if array.ndim != 2:
        raise DataError(
            f"{path}: mask has mode {mode} with {array.shape[-1]} channels; expected a "
            "single-channel index PNG (mode L or P) whose pixel values are class indices"
        )
    return array


class SegmentationDataset(Dataset):
    """Base class: subclasses fill ``load(index)`` and ``describe(index)``.

    ``__getitem__`` accepts a plain index or the ``(index, seed, position)`` tuples of
    ``InfiniteSampler`` and returns ``image`` (3, H, W) float32 and ``mask`` (H, W) int64.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        transform: A.Compose | None = None,
        label_map: np.ndarray | None = None,
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform
        self.label_map = label_map  # lookup table from stored label values to train ids

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the raw (H, W, 3) uint8 RGB image and (H, W) integer mask."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Name the sample in error messages (usually the mask's path)."""
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = (key[0], key[1:]) if isinstance(key, tuple) else (key, None)
        image, mask = self.load(index)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{self.describe(index)}: image is {image.shape[1]}x{image.shape[0]} but mask is "
                f"{mask.shape[1]}x{mask.shape[0]} (width x height); they must be the same size"
            )
        if self.label_map is not None:
            mask = self.label_map[mask]
        self.check_labels(mask, index)
        if self.transform is not None:
            image, mask = apply(self.transform, image, mask, seed)
        else:
            image = torch.from_numpy(image).permute(2, 0, 1).float()
        return image, torch.as_tensor(np.asarray(mask), dtype=torch.int64)

    def check_labels(self, mask: np.ndarray, index: int) -> None:
        invalid = (mask >= self.num_classes) & (mask != self.ignore_index)
        if invalid.any():
            values = np.unique(mask[invalid]).tolist()
            shown = values[:10] + (["..."] if len(values) > 10 else [])
            raise DataError(
                f"{self.describe(index)}: label values {shown} are not class indices in "
                f"[0, {self.num_classes}) nor ignore_index={self.ignore_index}. Check "
                "data.num_classes and the mask format (index PNG with one value per class)."
            )
