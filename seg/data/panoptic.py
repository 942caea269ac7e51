"""Panoptic ground truth: every segment of an image, stuff and things, with its class.

A decoded sample's annotation is the int32 map of ``seg.data.instance_layouts`` (segment
number k + 1 in the low 16 bits, 0 void; ``class * 2 + iscrowd`` above), here holding every
segment: one per stuff class present and one per thing. One such map gives the three targets
(``target``), so the same files evaluate the panoptic task and train its two models:

- ``panoptic``: ``(image, ids, table)`` as ``seg.tasks.panoptic`` scores it: the (H, W) int16
  segment-ID map (0 void) and the (K, 2) int64 [class, iscrowd] table, classes indexing
  ``data.class_names``;
- ``semantic``: ``(image, mask)``, each pixel its segment's class, void ``ignore_index``;
- ``instance``: ``(image, ids, table)`` of the thing segments alone, classes renumbered 1..T in
  the order of the thing classes (0 the background), as ``seg.tasks.instance`` trains on them.
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
from seg.data.coco import read_annotations
from seg.data.folder import list_files
from seg.data.instance_layouts import (
    ID_MAP_SUFFIXES,
    PixelInstances,
    decode,
    encode,
    read_id_map,
)
from seg.data.transforms import apply, to_tensors

TARGETS = ("panoptic", "semantic", "instance")
COCO_PANOPTIC_TREE = """expected (the keys annotation_file, panoptic_dir, image_dir change it):
  <root>/annotations/panoptic_<split>.json   COCO panoptic annotations
  <root>/annotations/panoptic_<split>/       their PNGs (id = R + 256 G + 256^2 B)
  <root>/<split>/<file_name>                 the images its "images" list names"""
CITYSCAPES_PANOPTIC_TREE = """expected (cityscapesscripts' createPanopticImgs writes the gtFine files):
  <root>/gtFine/cityscapes_panoptic_<split>.json  its annotations
  <root>/gtFine/cityscapes_panoptic_<split>/      their PNGs
  <root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png   the images"""
PANOPTIC_FOLDER_TREE = """expected:
  <root>/images/<split>/<name>.png|.jpg     RGB images
  <root>/masks/<split>/<name>.png|.tif|.npy class-index PNGs or label rasters, ignore_index = void
  <root>/instances/<split>/<name>.png|.tif  instance-ID images of the things, 0 = none"""


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours -> (H, W) int64 segment ids, id = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 colours of the COCO panoptic PNG (``rgb_to_id``'s
    inverse)."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def panoptic_categories(path: str, field: str) -> list | int:
    """The config's view of a COCO panoptic JSON's categories, in id order (OmegaConf resolver
    ``coco_panoptic``): ``names``, ``ids``, ``things`` (indices of the things), ``count``,
    ``palette`` (the JSON's ``color``s, else fixed random ones), and for the instance target
    ``instance_names`` (the background and the things), ``instance_count``, ``instance_palette``."""
    listed = sorted(read_annotations(Path(path)).get("categories", []), key=lambda c: c["id"])
    if not listed:
        raise DataError(f'{path}: no "categories"; a COCO panoptic JSON lists them with isthing')
    rng = np.random.default_rng(0)  # fixed colours, the same on every run
    palette = [list(c.get("color") or rng.integers(40, 256, 3).tolist()) for c in listed]
    things = [k for k, c in enumerate(listed) if c.get("isthing") == 1]
    values = {
        "names": [str(c["name"]) for c in listed],
        "ids": [int(c["id"]) for c in listed],
        "things": things,
        "count": len(listed),
        "palette": palette,
        "instance_names": ["background", *(str(listed[k]["name"]) for k in things)],
        "instance_count": len(things) + 1,
        "instance_palette": [[0, 0, 0], *(palette[k] for k in things)],
    }
    if field not in values:
        raise ValueError(f"${{coco_panoptic:...,{field}}}: fields are {', '.join(values)}")
    return values[field]


def semantic_mask(code: np.ndarray, ignore_index: int) -> np.ndarray:
    """The (H, W) uint8 class mask of an annotation map, void pixels ``ignore_index``."""
    return np.where(code > 0, code >> 17, ignore_index).astype(np.uint8)


def thing_code(code: np.ndarray, thing_index: np.ndarray, dataset, index: int) -> np.ndarray:
    """The annotation map of the thing segments alone, numbered again from 1, their classes
    through ``thing_index`` (class -> 1..T, 0 for stuff); stuff and void become background."""
    thing = thing_index[code >> 17]
    keys = np.where((code > 0) & (thing > 0), code & 0xFFFF, 0)
    return encode(keys, thing, (code >> 16) & 1, dataset, index)


class PanopticDataset(PixelInstances):
    """Base of the panoptic layouts: ``load`` returns the image and the annotation map of all
    segments; ``thing_classes`` are the class indices that are things (the others stuff)."""

    def __init__(
        self,
        num_classes: int,
        thing_classes: Sequence[int],
        target: str,
        ignore_index: int,
        max_instances: int,
        transform,
        skip_bad_samples: float,
    ):
        if target not in TARGETS:
            raise ValueError(f"data.dataset.target={target!r}: give one of {', '.join(TARGETS)}")
        wrong = [c for c in thing_classes if not 0 <= c < num_classes]
        if wrong:
            raise ValueError(
                f"data.thing_classes {wrong}: not class indices of data.num_classes={num_classes}"
            )
        super().__init__(num_classes, max_instances, transform, skip_bad_samples)
        self.target = target
        self.thing_index = np.zeros(num_classes, np.int64)
        self.thing_index[sorted(thing_classes)] = np.arange(1, len(thing_classes) + 1)
        self.semantic_ignore = ignore_index  # the semantic target's void (the ID maps pad with 0)

    def prepare(self, index: int, seed: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
        image, code = self.decoded(index)
        if self.target == "semantic":
            mask = semantic_mask(code, self.semantic_ignore)
            if self.transform is None:
                return to_tensors(image, mask)
            return apply(self.transform, image, mask, seed)
        if self.target == "instance":
            code = thing_code(code, self.thing_index, self, index)
        ids, table = decode(code)
        if self.transform is None:
            return (*to_tensors(image, ids), table)
        return (*apply(self.transform, image, ids, seed), table)


class CocoPanoptic(PanopticDataset):
    """COCO panoptic files: a JSON of ``images``, ``annotations`` (``file_name`` of the PNG,
    ``segments_info``: ``id``, ``category_id``, ``iscrowd``) and ``categories``, the PNGs whose
    colours encode segment ids (0 void) and the images. Class k is the k-th category in id order
    (``category_ids[k]`` its id); ``thing_classes`` the indices of those with ``isthing`` 1.
    A PNG id missing from its ``segments_info`` or an unknown category is a DataError naming
    the file."""

    tree = COCO_PANOPTIC_TREE

    def __init__(
        self,
        root: str,
        split: str,
        category_ids: Sequence[int],
        thing_classes: Sequence[int],
        target: str = "panoptic",
        ignore_index: int = 255,
        annotation_file: str | None = None,
        panoptic_dir: str | None = None,
        image_dir: str | None = None,
        max_instances: int = 1000,
        transform=None,
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
    ):
        super().__init__(len(category_ids), thing_classes, target, ignore_index, max_instances,
                         transform, skip_bad_samples)  # fmt: skip
        root_path = Path(root)
        self.annotations = Path(annotation_file or self.default_annotations(root_path, split))
        coco = read_annotations(self.annotations)
        png_dir = Path(panoptic_dir) if panoptic_dir else self.annotations.with_suffix("")
        images_dir = Path(image_dir) if image_dir else self.default_images(root_path, split)
        self.labels = {int(c): k for k, c in enumerate(category_ids)}
        images = {image["id"]: image for image in coco.get("images", [])}
        if not coco.get("annotations"):
            raise DataError(f'{self.annotations}: no "annotations".\n{self.tree}')
        self.samples = []
        for annotation in coco["annotations"]:
            image = images.get(annotation["image_id"])
            if image is None:
                raise DataError(f"{self.annotations}: annotation of image_id "
                                f"{annotation['image_id']} has no entry in \"images\"")  # fmt: skip
            unknown = {s["category_id"] for s in annotation["segments_info"]} - set(self.labels)
            if unknown:
                raise DataError(
                    f"{self.annotations}: {annotation['file_name']} has category ids "
                    f"{sorted(unknown)}, not among data.category_ids {sorted(self.labels)}"
                )
            self.samples.append((self.image_path(images_dir, image["file_name"]),
                                 png_dir / annotation["file_name"], annotation["segments_info"]))  # fmt: skip
        missing = [
            str(path) for sample in self.samples for path in sample[:2] if not path.is_file()
        ]
        if missing:
            raise DataError(f"{self.annotations}: {len(missing)} files it names are missing, e.g. "
                            f"{missing[:3]}.\n{self.tree}")  # fmt: skip
        self.use_cache(cache_dir)  # data.cache_dir: decode each image and PNG once

    def default_annotations(self, root: Path, split: str) -> Path:
        return root / "annotations" / f"panoptic_{split}.json"

    def default_images(self, root: Path, split: str) -> Path:
        return root / split

    def image_path(self, images_dir: Path, file_name: str) -> Path:
        return images_dir / file_name

    def source_files(self, index: int) -> tuple[Path, ...]:
        return self.samples[index][0], self.samples[index][1], self.annotations

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, png_path, segments = self.samples[index]
        data = read_file(png_path, "panoptic PNG")
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DataError(f"{png_path}: cannot decode the panoptic PNG")
        ids = rgb_to_id(bgr[..., ::-1])
        kinds = {int(s["id"]): (self.labels[s["category_id"]], int(s.get("iscrowd", 0)))
                 for s in segments}  # fmt: skip
        present, inverse = np.unique(ids, return_inverse=True)
        unlisted = [int(i) for i in present if i and i not in kinds]
        if unlisted:
            raise DataError(f"{png_path}: segment ids {unlisted[:10]} are not in its "
                            f"segments_info ({self.annotations})")  # fmt: skip
        table = np.array([kinds.get(int(i), (0, 0)) for i in present], np.int64).reshape(-1, 2)
        classes, crowd = (table[inverse.reshape(ids.shape), column] for column in (0, 1))
        return read_image(image_path), encode(ids, classes, crowd, self, index)


class CityscapesPanoptic(CocoPanoptic):
    """What cityscapesscripts' ``createPanopticImgs`` writes from gtFine:
    ``<root>/gtFine/cityscapes_panoptic_<split>.json`` and its PNG folder, with the images in
    ``<root>/leftImg8bit/<split>/<city>/``. Its category ids are labelIds (trainIds with
    ``--use-train-id``: give that JSON as ``annotation_file``)."""

    tree = CITYSCAPES_PANOPTIC_TREE

    def default_annotations(self, root: Path, split: str) -> Path:
        return root / "gtFine" / f"cityscapes_panoptic_{split}.json"

    def default_images(self, root: Path, split: str) -> Path:
        return root / "leftImg8bit" / split

    def image_path(self, images_dir: Path, file_name: str) -> Path:
        # createPanopticImgs names the image <city>_<seq>_<frame>_gtFine_leftImg8bit.png; the
        # file is <city>/<city>_<seq>_<frame>_leftImg8bit.png
        name = file_name.replace("_gtFine_leftImg8bit", "_leftImg8bit")
        return images_dir / name.split("_", 1)[0] / name


class PanopticFolder(PanopticDataset):
    """seg's folder layout: ``images/<split>/x``, ``masks/<split>/x.png`` (each pixel's class,
    ``ignore_index`` void) and ``instances/<split>/x.png|.tif`` (an id per thing, 0 none). Each
    stuff class present is one segment; each instance id on thing pixels one thing; thing
    pixels without an id are a crowd region of their class (as Cityscapes marks them)."""

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int,
        thing_classes: Sequence[int],
        target: str = "panoptic",
        ignore_index: int = 255,
        max_instances: int = 1000,
        transform=None,
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
    ):
        super().__init__(num_classes, thing_classes, target, ignore_index, max_instances,
                         transform, skip_bad_samples)  # fmt: skip
        root_path = Path(root)
        folders = [root_path / kind / split for kind in ("images", "masks", "instances")]
        for folder in folders:
            if not folder.is_dir():
                raise DataError(f"{folder}: not found (data.root={root}).\n{PANOPTIC_FOLDER_TREE}")
        images = list_files(folders[0], IMAGE_SUFFIXES)
        masks = list_files(folders[1], CLASS_MASK_SUFFIXES)
        maps = list_files(folders[2], ID_MAP_SUFFIXES)
        lonely = sorted(
            (images.keys() | masks.keys() | maps.keys())
            - (images.keys() & masks.keys() & maps.keys())
        )
        if lonely or not images:
            raise DataError(f"{root_path}: split '{split}': {len(lonely)} names lack an image, a "
                            f"mask or an instance map, e.g. {lonely[:3]} (or no images)."
                            f"\n{PANOPTIC_FOLDER_TREE}")  # fmt: skip
        self.samples = [(images[s], masks[s], maps[s]) for s in sorted(images)]
        self.use_cache(cache_dir)  # data.cache_dir: decode each image and annotation map once

    def describe(self, index: int) -> str:
        return str(self.samples[index][1])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path, map_path = self.samples[index]
        classes, instances = read_mask(mask_path).astype(np.int64), read_id_map(map_path)
        if classes.shape != instances.shape:
            raise DataError(f"{mask_path}: mask is {classes.shape[::-1]}, the instance map "
                            f"{map_path} {instances.shape[::-1]} (width, height)")  # fmt: skip
        void = classes == self.semantic_ignore
        wrong = ~void & (classes >= self.num_classes)
        if wrong.any():
            raise DataError(f"{mask_path}: classes {np.unique(classes[wrong]).tolist()[:10]} "
                            f"beyond data.num_classes={self.num_classes} (void: "
                            f"ignore_index={self.semantic_ignore})")  # fmt: skip
        classes = np.where(void, 0, classes)
        thing = ~void & (self.thing_index[classes] > 0)
        crowd = thing & (instances == 0)
        # a thing: its instance id; stuff and crowds: one key per class, past every 16-bit id
        keys = np.where(void, 0, np.where(thing & ~crowd, instances, 65536 + classes))
        return read_image(image_path), encode(keys, classes, crowd.astype(np.int64), self, index)
