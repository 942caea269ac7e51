"""Cityscapes in its official layout, labelIds mapped on the fly to the 19 training classes."""

from pathlib import Path

import numpy as np

from seg.data.base import DataError, PairedFiles, mask_dtype

# (labelId, trainId) from cityscapesscripts/helpers/labels.py; every other id maps to ignore.
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
# trainId (0-18) -> labelId, the inverse of the mapping above (predict.py's format=cityscapes)
TRAIN_ID_TO_LABEL_ID = np.zeros(len(LABEL_TO_TRAIN_ID), np.uint8)
TRAIN_ID_TO_LABEL_ID[list(LABEL_TO_TRAIN_ID.values())] = list(LABEL_TO_TRAIN_ID)

CITYSCAPES_TREE = """expected (the official layout; get leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/ and unzip both into root):
  <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png"""


def label_to_train_id_table(ignore_index: int) -> np.ndarray:
    """A 256-entry lookup table from Cityscapes labelIds to trainIds (ignored ids -> ignore_index)."""
    table = np.full(256, ignore_index, mask_dtype(len(LABEL_TO_TRAIN_ID), ignore_index))
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


class Cityscapes(PairedFiles):
    """Fine annotations of one split (train, val or test)."""

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int = 19,
        ignore_index: int = 255,
        transform=None,
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
    ):
        if num_classes != len(LABEL_TO_TRAIN_ID):
            raise ValueError(f"Cityscapes has {len(LABEL_TO_TRAIN_ID)} classes, got {num_classes}")
        label_map = label_to_train_id_table(ignore_index)
        super().__init__(num_classes, ignore_index, transform, label_map, skip_bad_samples)
        self.samples = cityscapes_pairs(root, split, "labelIds", "label")
        self.use_cache(cache_dir)  # data.cache_dir: decode each sample once


def cityscapes_pairs(root: str, split: str, kind: str, noun: str) -> list[tuple[Path, Path]]:
    """(image, ``*_gtFine_<kind>.png``) pairs of a Cityscapes split, each image's file required."""
    image_dir, label_dir = Path(root) / "leftImg8bit" / split, Path(root) / "gtFine" / split
    for directory in (image_dir, label_dir):
        if not directory.is_dir():
            raise DataError(f"{directory}: not found (data.root={root}).\n{CITYSCAPES_TREE}")
    pairs = []
    for image_path in sorted(image_dir.glob("*/*_leftImg8bit.png")):
        name = image_path.name.removesuffix("_leftImg8bit.png")
        label_path = label_dir / image_path.parent.name / f"{name}_gtFine_{kind}.png"
        if not label_path.is_file():
            raise DataError(f"{image_path}: no {noun} file {label_path}.\n{CITYSCAPES_TREE}")
        pairs.append((image_path, label_path))
    if not pairs:
        raise DataError(f"{image_dir}: no *_leftImg8bit.png images.\n{CITYSCAPES_TREE}")
    return pairs
