"""COCO instance annotations as COCO distributes them: ``<root>/annotations/instances_<split>.json``
and the images under ``<root>/<split>/``.

Segmentations are polygons, uncompressed RLE (``counts`` a list) or compressed RLE (``counts`` a
string), decoded with pycocotools. Category ids have gaps (COCO's 80 classes use ids 1-90): class
k (from 1) is the k-th category in id order, and ``category_ids[k]`` its id, which the config
carries (``data.category_ids``) and so the checkpoint too.
"""

import functools
import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from seg.data.base import DataError, read_image
from seg.data.instances import CocoSplit, InstanceDataset

COCO_TREE = """expected:
  <root>/annotations/instances_<split>.json   COCO instance annotations
  <root>/<split>/<file_name>                  the images its "images" list names"""


def annotation_file(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def read_annotations(path: Path) -> dict:
    """The parsed JSON, read once per process and version of the file (the config's class list
    and the splits' datasets share it)."""
    try:
        stat = path.stat()
        return _parsed(path, stat.st_size, stat.st_mtime_ns)
    except OSError as error:
        raise DataError(
            f"{path}: cannot read annotations ({error.strerror or error}).\n{COCO_TREE}"
        ) from error
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error


@functools.lru_cache(maxsize=4)
def _parsed(path: Path, size: int, mtime_ns: int) -> dict:
    with open(path) as file:
        return json.load(file)


def categories(root: str, split: str, field: str) -> list:
    """The config's view of the categories (OmegaConf resolver ``coco``), background first:
    ``names``, ``ids`` (0 for the background), ``count`` (classes, background included) or
    ``palette`` (a colour per class)."""
    path = annotation_file(root, split)
    listed = sorted(read_annotations(path).get("categories", []), key=lambda c: c["id"])
    if not listed:
        raise DataError(f'{path}: no "categories"; COCO annotations list them with ids and names')
    if field == "names":
        return ["background", *(str(c["name"]) for c in listed)]
    if field == "ids":
        return [0, *(int(c["id"]) for c in listed)]
    if field == "count":
        return len(listed) + 1
    if field == "palette":
        rng = np.random.default_rng(0)  # fixed colours, the same on every run
        return [[0, 0, 0], *rng.integers(40, 256, (len(listed), 3)).tolist()]
    raise ValueError(f"${{coco:...,{field}}}: fields are names, ids, count, palette")


class CocoInstances(InstanceDataset):
    """The images of one COCO split with their instances; crowd annotations (``iscrowd`` 1) are
    rows with iscrowd 1, left out of training targets and kept in the evaluation's ground truth.

    Instances are painted into one ID map, crowds first, then the others from the largest to the
    smallest, so that an overlapped small object keeps its visible pixels. Images without
    annotations are kept (no instances). Bad annotations fail when the dataset is built, all in
    one DataError naming the JSON file and each annotation's id.
    """

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int,
        category_ids: list[int],
        max_instances: int = 1000,
        transform=None,
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
    ):
        super().__init__(num_classes, max_instances, transform, skip_bad_samples)
        self.annotations = annotation_file(root, split)
        coco = read_annotations(self.annotations)
        self.category_ids = [int(c) for c in category_ids]  # class index -> category id
        if len(self.category_ids) != num_classes:
            raise ValueError(
                f"data.category_ids has {len(self.category_ids)} entries for data.num_classes="
                f"{num_classes} (one per class, 0 for the background)"
            )
        labels = {category: label for label, category in enumerate(self.category_ids) if label}
        images = {image["id"]: image for image in coco.get("images", [])}
        per_image: dict = {image_id: [] for image_id in images}
        problems = []  # every bad annotation, so that one pass over the file finds them all
        for annotation in coco.get("annotations", []):
            problem = annotation_problem(annotation, images, labels)
            if problem:
                problems.append(f"annotation id {annotation.get('id')} {problem}")
            else:
                per_image[annotation["image_id"]].append(annotation)
        if problems:
            listed = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
            raise DataError(f"{self.annotations}: {len(problems)} bad annotations:\n  {listed}")
        image_dir = Path(root) / split
        # (image path, height, width, annotations) in the JSON's image order
        self.samples = [(image_dir / images[i]["file_name"], images[i]["height"],
                         images[i]["width"], per_image[i]) for i in images]  # fmt: skip
        self.labels = labels
        self.image_ids = list(images)  # the samples' ids in the file
        for index, (*_, annotations) in enumerate(self.samples):  # before any training step
            self.check_instances(len(annotations), index)
        missing = [str(path) for path, *_ in self.samples if not path.is_file()]
        if missing:
            raise DataError(
                f"{self.annotations}: {len(missing)} images it lists are missing, e.g. "
                f"{missing[:3]}.\n{COCO_TREE}"
            )
        if not self.samples:
            raise DataError(f'{self.annotations}: no "images".\n{COCO_TREE}')
        self.use_cache(cache_dir)  # data.cache_dir: decode each image and ID map once

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])

    def source_files(self, index: int) -> tuple[Path, ...]:
        return self.samples[index][0], self.annotations

    def coco_split(self) -> CocoSplit:
        names = {self.describe(index): image_id for index, image_id in enumerate(self.image_ids)}
        return CocoSplit(self.annotations, names, self.category_ids)

    def table(self, index: int) -> np.ndarray:
        return np.array([[self.labels[a["category_id"]], int(bool(a.get("iscrowd", 0)))]
                         for a in self.samples[index][3]], np.int64)  # fmt: skip

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path, height, width, annotations = self.samples[index]
        image = read_image(path)
        if image.shape[:2] != (height, width):
            raise DataError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]} but {self.annotations} "
                f"says {width}x{height} (width x height)"
            )
        masks = [decode(a["segmentation"], height, width) for a in annotations]
        ids = np.zeros((height, width), np.int16)
        # crowds first, then the largest first: later ones are painted over earlier ones
        order = sorted(range(len(masks)), key=lambda k: (-int(bool(annotations[k].get("iscrowd", 0))),
                                                        -int(masks[k].sum())))  # fmt: skip
        for k in order:
            ids[masks[k] > 0] = k + 1
        return image, ids


def annotation_problem(annotation: dict, images: dict, labels: dict) -> str | None:
    """What is wrong with one annotation (to follow "annotation id N"), or None: an image or a
    category not listed, a missing, empty or degenerate (under 3 points) segmentation."""
    if annotation.get("image_id") not in images:
        return (f"is for image_id {annotation.get('image_id')}, which is not in \"images\"; add "
                "the image or remove the annotation")  # fmt: skip
    if annotation.get("category_id") not in labels:
        return (f"has category_id {annotation.get('category_id')}, not one of the categories "
                f"{sorted(labels)}; fix the id or add the category")  # fmt: skip
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            return "has an RLE segmentation without 'counts' and 'size'"
        image = images[annotation["image_id"]]
        if list(segmentation["size"]) != [image["height"], image["width"]]:
            return (f"has an RLE of size {segmentation['size']} (height, width) on an image of "
                    f"{[image['height'], image['width']]}; they must match")  # fmt: skip
        return None
    if not isinstance(segmentation, list) or not segmentation:
        return f"has an empty segmentation ({segmentation!r}); give polygons or RLE, or remove it"
    for polygon in segmentation:
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            return (f"has a degenerate polygon {str(polygon)[:60]} (a polygon is x, y pairs of "
                    "at least 3 points); fix or remove it")  # fmt: skip
    return None


def decode(segmentation, height: int, width: int) -> np.ndarray:
    """A polygon list, uncompressed or compressed RLE -> (H, W) uint8 mask (pycocotools'
    ``annToRLE``)."""
    if isinstance(segmentation, list):  # polygons: one RLE each, merged
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, *segmentation["size"])
    else:
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"],
               "counts": counts.encode("ascii") if isinstance(counts, str) else counts}  # fmt: skip
    return mask_utils.decode(rle)
