"""Procedural scenes: the embedded default dataset, generated on the fly with no download.

Each class is a shape with its own texture family (stripes, checks, dots, speckle, lattice), drawn
in two random colours from one distribution shared by all classes, over a textured background,
with occlusion, varied scale and pixel noise: colour alone does not separate the classes, shape
and texture do. A sample is a pure function of (seed, split, index).
"""

import zlib
from collections.abc import Mapping

import cv2
import numpy as np
import torch

from seg.data.base import SegmentationDataset
from seg.data.instance_layouts import encode
from seg.data.panoptic import PanopticDataset
from seg.data.transforms import apply, to_tensors

CLASS_NAMES = ("background", "disc", "box", "triangle", "ring", "cross")
PALETTE = (
    (40, 40, 40),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
)


class SyntheticScenes(SegmentationDataset):
    """``num_samples[split]`` scenes of ``image_size`` x ``image_size`` pixels, 2-6 classes."""

    def __init__(
        self,
        split: str,
        num_classes: int = len(CLASS_NAMES),
        ignore_index: int = 255,
        image_size: int = 128,
        num_samples: Mapping[str, int] | None = None,
        max_objects: int = 6,
        seed: int = 0,
        transform=None,
    ):
        if not 2 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(
                f"synthetic data has 2 to {len(CLASS_NAMES)} classes, got num_classes={num_classes}"
            )
        num_samples = dict(num_samples or {"train": 2000, "val": 200, "test": 200})
        if split not in num_samples:
            raise ValueError(
                f"synthetic data has no split {split!r}; data.dataset.num_samples defines "
                f"{sorted(num_samples)}"
            )
        super().__init__(num_classes, ignore_index, transform)
        self.split = split
        self.image_size = image_size
        self.num_samples = num_samples[split]
        self.max_objects = max_objects
        # Splits draw from disjoint streams: zlib.crc32 is stable across processes (hash() is not).
        self.split_key = zlib.crc32(split.encode())
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> str:
        return f"synthetic/{self.split}/{index}"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask, _, _ = self.scene(index)
        return image, mask

    def canvas(self, index: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray, np.ndarray]:
        """Scene ``index``'s random stream, its (H, W) coordinates x and y in [0, 1) and its
        (H, W, 3) float32 background."""
        rng = np.random.default_rng((self.seed, self.split_key, index))
        size = self.image_size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        return rng, xx, yy, _background(rng, size, xx, yy)

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """Scene ``index``: the (H, W, 3) uint8 image, the (H, W) class mask, the (H, W) int16
        instance-ID map (shape k drawn is id k + 1; 0 background) and each shape's class. Later
        shapes occlude earlier ones: an id may cover fewer pixels than its shape, or none."""
        rng, xx, yy, image = self.canvas(index)
        size = self.image_size
        mask = np.zeros((size, size), np.uint8)
        ids = np.zeros((size, size), np.int16)
        labels = []
        for _ in range(rng.integers(2, self.max_objects + 1)):
            label = int(rng.integers(1, self.num_classes))
            shape = _shape(rng, label, size)
            colors = _contrasting_colors(rng)
            texture = _TEXTURES[label](rng, xx, yy)
            pixels = shape > 0
            image[pixels] = np.where(texture[pixels, None], colors[0], colors[1])
            mask[pixels] = label
            labels.append(label)
            ids[pixels] = len(labels)
        image += rng.uniform(2.0, 8.0) * rng.standard_normal(image.shape, np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), mask, ids, labels


def _random_colors(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.uniform(0, 255, (count, 3)).astype(np.float32)


def _contrasting_colors(rng: np.random.Generator) -> np.ndarray:
    """Two random colours far enough apart (L1 >= 200 of 765) for the texture to show."""
    while True:
        colors = _random_colors(rng, 2)
        if np.abs(colors[0] - colors[1]).sum() >= 200:
            return colors


def _background(rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Two colours blended by smooth noise, plus faint stripes so texture alone is not enough."""
    cells = int(rng.integers(2, 6))
    grid = rng.random((cells, cells), np.float32)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    field = np.clip(field, 0, 1)[..., None]
    low, high = _random_colors(rng, 2)
    image = low * field + high * (1 - field)
    angle, frequency = rng.uniform(0, np.pi), rng.uniform(4, 12)
    stripes = np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle)))
    return image + rng.uniform(5, 15) * stripes[..., None]


def _rotated(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray):
    angle = rng.uniform(0, np.pi)
    return xx * np.cos(angle) + yy * np.sin(angle), -xx * np.sin(angle) + yy * np.cos(angle)


def _stripes(rng, xx, yy):
    u, _ = _rotated(rng, xx, yy)
    return np.sin(2 * np.pi * rng.uniform(7, 9) * u) > 0


def _checks(rng, xx, yy):
    u, v = _rotated(rng, xx, yy)
    frequency = rng.uniform(5, 7)
    return (np.floor(u * frequency) + np.floor(v * frequency)) % 2 == 0


def _dots(rng, xx, yy):
    u, v = _rotated(rng, xx, yy)
    frequency = rng.uniform(9, 11)
    return np.sin(2 * np.pi * frequency * u) * np.sin(2 * np.pi * frequency * v) > 0.4


def _speckle(rng, xx, yy):
    size = xx.shape[0]
    grain = max(size // int(rng.integers(24, 32)), 1)
    coarse = rng.random((size // grain + 1, size // grain + 1)) > 0.5
    return np.kron(coarse, np.ones((grain, grain), bool))[:size, :size]


def _lattice(rng, xx, yy):
    u, v = _rotated(rng, xx, yy)
    frequency = rng.uniform(7, 9)
    return (np.sin(2 * np.pi * frequency * u) > 0.6) | (np.sin(2 * np.pi * frequency * v) > 0.6)


# Each texture family looks different in any small patch, so the classes are learnable from
# texture and shape, never from colour.
_TEXTURES = {1: _stripes, 2: _checks, 3: _dots, 4: _speckle, 5: _lattice}


def _shape(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A filled shape of class ``label`` at a random place, scale and rotation, as a uint8 mask."""
    canvas = np.zeros((size, size), np.uint8)
    center = rng.uniform(0.1, 0.9, 2) * size
    radius = rng.uniform(0.12, 0.32) * size
    angle = rng.uniform(0, 2 * np.pi)
    if label == 1:  # disc
        cv2.circle(canvas, _point(center), int(radius), 1, -1)
    elif label == 2:  # box with random aspect ratio
        aspect = rng.uniform(0.5, 1.0)
        corners = [(1, aspect), (-1, aspect), (-1, -aspect), (1, -aspect)]
        cv2.fillPoly(canvas, [_polygon(center, radius, angle, corners)], 1)
    elif label == 3:  # triangle
        corners = [(np.cos(a), np.sin(a)) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
        cv2.fillPoly(canvas, [_polygon(center, radius, angle, corners)], 1)
    elif label == 4:  # ring
        cv2.circle(canvas, _point(center), int(radius), 1, max(int(radius * 0.45), 2))
    else:  # cross
        arm = rng.uniform(0.25, 0.4)
        corners = [(1, arm), (-1, arm), (-1, -arm), (1, -arm)]
        cv2.fillPoly(canvas, [_polygon(center, radius, angle, corners)], 1)
        cv2.fillPoly(canvas, [_polygon(center, radius, angle + np.pi / 2, corners)], 1)
    return canvas


def _point(center: np.ndarray) -> tuple[int, int]:
    return int(center[0]), int(center[1])


def _polygon(center, radius, angle, corners) -> np.ndarray:
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = center + radius * (np.asarray(corners, np.float64) @ rotation.T)
    return points.round().astype(np.int32)


class SyntheticInstances(SyntheticScenes):
    """The same scenes with each shape an instance (``seg.tasks.instance``): a sample is the
    image (3, H, W) uint8, the instance-ID map (H, W) int16 (0 background, k + 1 the k-th row
    of the table) and the table (K, 2) int64 of [class, iscrowd] per instance (no crowds here).

    The transform crops and flips the image and the ID map together; it must pad the map with
    0 (``train_transform``'s ``ignore_index: 0``), which no instance owns.
    """

    def prepare(
        self, index: int, seed: tuple[int, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, _, ids, labels = self.scene(index)
        table = torch.tensor([[label, 0] for label in labels], dtype=torch.int64).view(-1, 2)
        if self.transform is None:
            return (*to_tensors(image, ids), table)
        return (*apply(self.transform, image, ids, seed), table)


# data=synthetic_panoptic's classes: stuff bands first, then the things (shapes 1-3 above)
PANOPTIC_CLASS_NAMES = ("sky", "grass", "sand", "disc", "box", "triangle")
PANOPTIC_THINGS = (3, 4, 5)
# Each stuff class's texture, distinct from the things' (stripes, checks, dots)
_STUFF_TEXTURES = {0: None, 1: _speckle, 2: _lattice}


class SyntheticPanoptic(PanopticDataset):
    """Scenes for the panoptic task (``seg.data.panoptic`` gives the targets): 1 to 3 horizontal
    bands of stuff (sky, grass, sand: one segment per class) under 1 to ``max_objects`` shapes
    (disc, box, triangle: one segment each). Every pixel has a class: no void. ``num_classes``
    is the target's: 6, or 4 for ``instance`` (the background and the three things)."""

    def __init__(
        self,
        split: str,
        target: str = "panoptic",
        num_classes: int = len(PANOPTIC_CLASS_NAMES),
        image_size: int = 96,
        num_samples: Mapping[str, int] | None = None,
        max_objects: int = 4,
        ignore_index: int = 255,
        seed: int = 0,
        transform=None,
    ):
        expected = len(PANOPTIC_THINGS) + 1 if target == "instance" else len(PANOPTIC_CLASS_NAMES)
        if num_classes != expected:
            raise ValueError(f"synthetic panoptic scenes have {expected} classes for target "
                             f"{target}, got data.num_classes={num_classes}")  # fmt: skip
        super().__init__(len(PANOPTIC_CLASS_NAMES), PANOPTIC_THINGS, target, ignore_index,
                         max_instances=64, transform=transform, skip_bad_samples=0.0)  # fmt: skip
        # the scenes' splits, sizes and random streams: SyntheticScenes'
        self.scenes = SyntheticScenes(split, image_size=image_size, num_samples=num_samples,
                                      max_objects=max_objects, seed=seed)  # fmt: skip

    def __len__(self) -> int:
        return len(self.scenes)

    def describe(self, index: int) -> str:
        return f"synthetic_panoptic/{self.scenes.split}/{index}"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        scenes = self.scenes
        rng, xx, yy, image = scenes.canvas(index)
        size = scenes.image_size
        keys = np.zeros((size, size), np.int64)
        classes = np.zeros((size, size), np.int64)
        stuff = rng.permutation(len(_STUFF_TEXTURES))[: rng.integers(1, len(_STUFF_TEXTURES) + 1)]
        bounds = np.sort(rng.uniform(0.2, 0.8, len(stuff) - 1)) * size
        band = np.searchsorted(bounds, yy * size + 4 * np.sin(2 * np.pi * rng.uniform(1, 3) * xx))
        for key, label in enumerate(stuff.tolist(), 1):
            pixels = band == key - 1
            if _STUFF_TEXTURES[label] is not None:
                colors = _contrasting_colors(rng)
                texture = _STUFF_TEXTURES[label](rng, xx, yy)
                image[pixels] = np.where(texture[pixels, None], colors[0], colors[1])
            keys[pixels], classes[pixels] = key, label
        for key in range(len(stuff) + 1, len(stuff) + 1 + rng.integers(1, scenes.max_objects + 1)):
            shape = int(rng.integers(1, len(PANOPTIC_THINGS) + 1))
            pixels = _shape(rng, shape, size) > 0
            colors = _contrasting_colors(rng)
            texture = _TEXTURES[shape](rng, xx, yy)
            image[pixels] = np.where(texture[pixels, None], colors[0], colors[1])
            keys[pixels], classes[pixels] = key, PANOPTIC_THINGS[shape - 1]
        image += rng.uniform(2.0, 8.0) * rng.standard_normal(image.shape, np.float32)
        image = np.clip(image, 0, 255).astype(np.uint8)
        return image, encode(keys, classes, np.zeros_like(keys), self, index)
