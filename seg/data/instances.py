"""What instance datasets on disk share: a sample is ``(image, ids, table)`` as
``seg.tasks.instance`` takes it, the image (3, H, W) uint8, the instance-ID map (H, W) int16
(0 background, k + 1 row k of the table) and the table (K, 2) int64 of [class, iscrowd].

A subclass lists its samples and fills ``load`` (the image and the ID map) and ``table``. The
ID map goes through ``data.cache_dir`` like a semantic mask; the table is rebuilt from the
annotations each time (a few numbers per instance). A layout whose table comes from the same
pixels (``seg.data.instance_layouts``) has ``load`` return one map holding both, and splits it
in ``instances``.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seg.data.base import DataError, SegmentationDataset
from seg.data.transforms import apply, to_tensors


@dataclass
class CocoSplit:
    """A split whose ground truth is a COCO annotation file, which evaluation scores against
    as it is (its areas, crowd regions and image ids) rather than the painted ID maps."""

    annotations: Path  # the JSON file
    image_ids: dict[str, int]  # a sample's name (``describe``) -> its image id in the file
    category_ids: list[int]  # class -> category id (0 for the background)


class InstanceDataset(SegmentationDataset):
    """Base class of the instance layouts; ``max_instances`` bounds the distinct instances of one
    image (``data.max_instances``): the ID map is int16, and Mask R-CNN's targets hold a full-size
    mask per instance."""

    def __init__(self, num_classes: int, max_instances: int, transform=None,
                 skip_bad_samples: float = 0.0):  # fmt: skip
        # ignore_index 0: the transforms pad the ID map with 0, which no instance owns
        super().__init__(num_classes, 0, transform, None, skip_bad_samples)
        self.mask_dtype = np.int16  # the ID map's, whatever the classes
        if not 1 <= max_instances <= np.iinfo(np.int16).max:
            raise ValueError(
                f"data.max_instances={max_instances}: give 1 to {np.iinfo(np.int16).max} "
                "(the instance-ID map is int16)"
            )
        self.max_instances = max_instances

    def table(self, index: int) -> np.ndarray:
        """Sample ``index``'s (K, 2) [class, iscrowd] rows, row k for id k + 1 of its map."""
        raise NotImplementedError

    def instances(self, decoded: np.ndarray, index: int) -> tuple[np.ndarray, torch.Tensor]:
        """The ID map and the table of sample ``index`` from what ``load`` returned (and the
        cache keeps) beside the image: here the ID map itself, the table from ``table``."""
        table = torch.from_numpy(np.asarray(self.table(index), np.int64).reshape(-1, 2))
        return decoded, table

    def coco_split(self) -> CocoSplit | None:
        """The annotation file evaluation scores against; None: seg builds the ground truth
        from the ID maps (area = pixel count)."""
        return None

    def check_instances(self, count: int, index: int) -> None:
        if count > self.max_instances:
            raise DataError(
                f"{self.describe(index)}: {count} instances, more than data.max_instances="
                f"{self.max_instances}; raise data.max_instances if the image really has that many"
            )

    def check_labels(self, mask: np.ndarray, index: int) -> None:
        pass  # an ID map, checked where it is built (check_instances)

    def prepare(self, index: int, seed: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
        image, decoded = self.decoded(index)
        ids, table = self.instances(decoded, index)
        if self.transform is None:
            return (*to_tensors(image, ids), table)
        return (*apply(self.transform, image, ids, seed), table)
