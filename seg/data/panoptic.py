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

import numpy as np
import torch

from seg.data.instance_layouts import PixelInstances, decode, encode
from seg.data.transforms import apply, to_tensors

TARGETS = ("panoptic", "semantic", "instance")


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
