"""ADE20K scene parsing (ADEChallengeData2016): 150 classes, label 0 = "other" is ignored."""

from pathlib import Path

import numpy as np

from seg.data.base import DataError, PairedFiles, mask_dtype

ADE_TREE = """expected (ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/):
  <root>/images/{training,validation}/ADE_*.jpg
  <root>/annotations/{training,validation}/ADE_*.png     0 = other, 1-150 = classes"""

SPLIT_FOLDERS = {"train": "training", "val": "validation"}


def reduce_zero_label_table(ignore_index: int) -> np.ndarray:
    """0 -> ignore_index, k -> k - 1: the 150 classes become 0-149 (mmsegmentation's
    ``reduce_zero_label``)."""
    table = (np.arange(256) - 1).astype(np.int64)
    table[0] = ignore_index
    return table.astype(mask_dtype(255, ignore_index))  # classes 0-254 at most


class ADE20K(PairedFiles):
    """One split (train or val) of ADEChallengeData2016."""

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int = 150,
        ignore_index: int = 255,
        transform=None,
        reduce_zero_label: bool = True,
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
    ):
        label_map = reduce_zero_label_table(ignore_index) if reduce_zero_label else None
        super().__init__(num_classes, ignore_index, transform, label_map, skip_bad_samples)
        folder = SPLIT_FOLDERS.get(split, split)
        image_dir = Path(root) / "images" / folder
        label_dir = Path(root) / "annotations" / folder
        for directory in (image_dir, label_dir):
            if not directory.is_dir():
                raise DataError(
                    f"{directory}: not found (data.root={root}, split={split}).\n{ADE_TREE}"
                )
        images = sorted(image_dir.glob("*.jpg"))
        self.samples = [(path, label_dir / f"{path.stem}.png") for path in images]
        missing = [str(label) for _, label in self.samples if not label.is_file()]
        if missing:
            raise DataError(
                f"{label_dir}: {len(missing)} images have no annotation, e.g. {missing[:3]}"
            )
        if not images:
            raise DataError(f"{image_dir}: no .jpg images.\n{ADE_TREE}")
        self.use_cache(cache_dir)  # data.cache_dir: decode each sample once
