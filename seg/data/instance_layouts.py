"""Instance layouts stored as pixel maps, whose ground truth seg builds from the pixels (area =
pixel count): a folder of instance-ID images and Cityscapes' ``*_gtFine_instanceIds.png``.

A decoded sample's annotation is one int32 map, what ``data.cache_dir`` keeps: the instance
number k + 1 (0 background) in the low 16 bits and ``class * 2 + iscrowd`` above them. The
ID map and the [class, iscrowd] table of ``seg.tasks.instance`` come from it in one pass.
"""

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from seg.data.base import (
    CLASS_MASK_SUFFIXES,
    IMAGE_SUFFIXES,
    DataError,
    read_file,
    read_image,
    read_mask,
)
from seg.data.cityscapes import cityscapes_pairs
from seg.data.folder import list_files
from seg.data.instances import InstanceDataset

INSTANCE_FOLDER_TREE = """expected:
  <root>/images/<split>/<name>.png|.jpg     RGB images
  <root>/instances/<split>/<name>.png|.tif  instance-ID images, 8 or 16 bit, 0 = background
  <root>/masks/<split>/<name>.png|.tif|.npy optional: each pixel's class (without: one class)"""

# Cityscapes' 8 thing classes, label id -> class (from 1, in label id order; cityscapesscripts'
# labels.py). Caravan (29) and trailer (30) carry instance ids but are not evaluated: background.
THING_LABELS = {24: 1, 25: 2, 26: 3, 27: 4, 28: 5, 31: 6, 32: 7, 33: 8}


# Instance-ID maps (read_id_map): 8- or 16-bit single-channel PNG or TIFF.
ID_MAP_SUFFIXES = (".png", ".tif", ".tiff")


def read_id_map(path: Path) -> np.ndarray:
    """An 8- or 16-bit single-channel PNG or TIFF at its depth (cv2.IMREAD_UNCHANGED: never an
    8-bit colour decode, which would turn 16-bit values black)."""
    data = read_file(path, "instance map")
    try:
        ids = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        ids = None
    if ids is None:
        raise DataError(f"{path}: cannot decode instance map (not a PNG/TIFF, or corrupted)")
    if ids.ndim != 2 or ids.dtype not in (np.uint8, np.uint16):
        raise DataError(
            f"{path}: instance map is {ids.dtype} with shape {ids.shape}; expected one channel "
            "of 8 or 16 bits, each instance one value, 0 the background"
        )
    return ids


def encode(
    keys: np.ndarray, classes: np.ndarray, crowd: np.ndarray, dataset: InstanceDataset, index: int
) -> np.ndarray:
    """The int32 annotation map (module docstring) of per-pixel instance ``keys`` (0: none),
    ``classes`` and ``crowd`` flags. Instances are numbered in key order; a non-crowd key on
    pixels of two classes is a DataError naming it, as are more than ``max_instances``."""
    pair = (keys.astype(np.int64) << 16) | (classes.astype(np.int64) << 1) | crowd
    pairs, inverse = np.unique(np.where(keys > 0, pair, 0), return_inverse=True)
    instances = pairs[pairs > 0]
    keys_of = instances >> 16
    split = np.unique(keys_of[(instances & 1) == 0], return_counts=True)
    if (split[1] > 1).any():
        key = int(split[0][split[1] > 1][0])
        shown = sorted(int(p >> 1 & 0x7FFF) for p in instances if p >> 16 == key)
        raise DataError(
            f"{dataset.describe(index)}: instance id {key} spans classes {shown}; each instance "
            "must lie on one class of the class mask"
        )
    dataset.check_instances(len(instances), index)
    number = np.arange(len(pairs)) - (len(pairs) - len(instances)) + 1  # background first
    code = np.where(pairs > 0, (number | ((pairs & 0xFFFF) << 16)), 0).astype(np.int32)
    return code[inverse.reshape(keys.shape)]


def decode(code: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """The int32 annotation map -> the (H, W) int16 ID map and the (K, 2) [class, iscrowd]."""
    ids = (code & 0xFFFF).astype(np.int16)
    kinds = np.zeros(int(ids.max(initial=0)) + 1, np.int64)
    kinds[ids] = code >> 16
    kinds = torch.from_numpy(kinds[1:])
    return ids, torch.stack([kinds >> 1, kinds & 1], 1)


class PixelInstances(InstanceDataset):
    """Base of the pixel-map layouts: ``load`` returns the image and the int32 annotation map."""

    def __init__(self, num_classes: int, max_instances: int, transform, skip_bad_samples: float):
        super().__init__(num_classes, max_instances, transform, skip_bad_samples)
        self.mask_dtype = np.int32  # the annotation map's: the ID map and the table in one

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return str(self.samples[index][1])

    def source_files(self, index: int) -> tuple[Path, ...]:
        return tuple(path for path in self.samples[index] if path is not None)

    def instances(self, decoded: np.ndarray, index: int) -> tuple[np.ndarray, torch.Tensor]:
        return decode(decoded)


class InstanceFolder(PixelInstances):
    """``<root>/images/<split>/x`` with ``<root>/instances/<split>/x.png|.tif`` (8 or 16 bit,
    each value an instance, 0 the background) and, when ``<root>/masks/<split>`` exists, the
    class of each instance from ``masks/<split>/x.png`` (one class per instance); without it
    every instance is class 1. Pixels of value ``crowd_value`` in the instance map are crowd
    regions (one per class they cover): scored as ``iscrowd``, never trained on. Images may
    have any band count and depth, as in ``data=folder``: ``bands``, ``in_channels`` and
    ``scale`` are its data keys (``SegmentationDataset.expect_pixels``)."""

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int,
        max_instances: int = 1000,
        crowd_value: int | None = None,
        transform=None,
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
        bands: Sequence[int] | None = None,
        in_channels: int | None = None,
        scale: float | str = "auto",
    ):
        super().__init__(num_classes, max_instances, transform, skip_bad_samples)
        self.crowd_value = crowd_value
        root_path = Path(root)
        image_dir, instance_dir = root_path / "images" / split, root_path / "instances" / split
        class_dir = root_path / "masks" / split
        for directory in (image_dir, instance_dir):
            if not directory.is_dir():
                raise DataError(
                    f"{directory}: not found (data.root={root}).\n{INSTANCE_FOLDER_TREE}"
                )
        self.with_classes = class_dir.is_dir()
        if not self.with_classes and num_classes != 2:
            raise ValueError(
                f"data.num_classes={num_classes} but {class_dir} does not exist: without class "
                "masks every instance is class 1 (num_classes=2, the background included)"
            )
        images = list_files(image_dir, IMAGE_SUFFIXES)
        maps = list_files(instance_dir, ID_MAP_SUFFIXES)
        classes = list_files(class_dir, CLASS_MASK_SUFFIXES) if self.with_classes else {}
        lonely = sorted(images.keys() ^ maps.keys()) + sorted(maps.keys() - classes.keys()
                                                              if self.with_classes else [])  # fmt: skip
        if lonely:
            raise DataError(
                f"{root_path}: split '{split}': {len(lonely)} names lack an image, an instance map "
                f"or a class mask, e.g. {lonely[:3]}; pair them by file name.\n{INSTANCE_FOLDER_TREE}"
            )
        if not images:
            raise DataError(f"{image_dir}: no images.\n{INSTANCE_FOLDER_TREE}")
        self.samples = [(images[s], maps[s], classes.get(s)) for s in sorted(images)]
        self.expect_pixels([image for image, _, _ in self.samples], bands, in_channels, None, scale)
        self.use_cache(cache_dir)  # data.cache_dir: decode each image and annotation map once

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, map_path, class_path = self.samples[index]
        image, keys = self.read_pixels(image_path), read_id_map(map_path)
        if class_path is None:
            classes = np.ones(keys.shape, np.uint8)
        else:
            classes = read_mask(class_path)
            if classes.shape != keys.shape:
                raise DataError(f"{class_path}: class mask is {classes.shape[::-1]}, the instance "
                                f"map {map_path} {keys.shape[::-1]} (width, height)")  # fmt: skip
            wrong = (keys > 0) & ((classes < 1) | (classes >= self.num_classes))
            if wrong.any():
                raise DataError(
                    f"{class_path}: instance pixels of {map_path} have classes "
                    f"{np.unique(classes[wrong]).tolist()[:10]}, not 1 to {self.num_classes - 1}; "
                    "an instance lies on a foreground class (check data.num_classes)"
                )
        crowd = (
            keys == self.crowd_value if self.crowd_value is not None else np.zeros_like(keys, bool)
        )
        return image, encode(keys, classes, crowd, self, index)


class CityscapesInstances(PixelInstances):
    """Cityscapes' instance annotations (``gtFine/<split>/<city>/*_gtFine_instanceIds.png``):
    an id of 1000 or more is ``label id * 1000 + n``, one instance; an id below 1000 is a label
    id, on a thing class a crowd region. The 8 thing classes (``THING_LABELS``) are the classes;
    every other label, caravan and trailer included, is background."""

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int = 9,
        max_instances: int = 1000,
        transform=None,
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
    ):
        if num_classes != len(THING_LABELS) + 1:
            raise ValueError(f"Cityscapes instances have {len(THING_LABELS) + 1} classes "
                             f"(8 things and the background), got {num_classes}")  # fmt: skip
        super().__init__(num_classes, max_instances, transform, skip_bad_samples)
        self.samples = cityscapes_pairs(root, split, "instanceIds", "instance")
        self.use_cache(cache_dir)  # data.cache_dir: decode each image and annotation map once

    def cityscapes_ground_truth(self) -> dict[str, Path]:
        """Each sample's name -> its instanceIds PNG, which Cityscapes' official AP reads."""
        return {self.describe(index): label for index, (_, label) in enumerate(self.samples)}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.samples[index]
        ids = read_id_map(label_path).astype(np.int64)
        labels = np.where(ids >= 1000, ids // 1000, ids)
        lookup = np.zeros(max(int(labels.max()), 33) + 1, np.int64)
        lookup[list(THING_LABELS)] = list(THING_LABELS.values())
        classes = lookup[labels]
        return read_image(image_path), encode(np.where(classes > 0, ids, 0), classes, ids < 1000,
                                              self, index)  # fmt: skip
