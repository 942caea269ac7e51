"""One pass over a split: the confusion matrix, per-image counts and pictures to look at."""

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from seg.engine import dist
from seg.inference import Predictor, explain_out_of_memory, warn_nonfinite
from seg.metrics import ConfusionMatrix, iou_from_counts, per_image_counts
from seg.visualize import comparison, confusion_figure, gallery, iou_figure

# (image, mask, prediction) on the CPU, for pictures
Example = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Evaluation:
    metrics: dict  # mIoU, mDice, aAcc, mAcc and per-class lists (seg.metrics)
    confusion: torch.Tensor  # (C, C) pixel counts [target, prediction], on the CPU
    image_counts: torch.Tensor  # (N, 3, C): true positives, target and predicted pixels
    image_names: list[str]  # the N samples, as their datasets describe them
    examples: list[Example] = field(default_factory=list)  # the first samples
    worst: list[tuple[float, str, Example]] = field(default_factory=list)  # lowest image mIoU


def sample_name(dataset, index: int) -> str:
    """The dataset's own name for sample ``index`` (a file path, usually), through Subsets."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return dataset.describe(index) if hasattr(dataset, "describe") else str(index)


@torch.inference_mode()
def evaluate(
    predictor: Predictor,
    loader: DataLoader,
    num_classes: int,
    ignore_index: int,
    num_examples: int = 0,
    num_worst: int = 0,
    stop: Callable[[], bool] | None = None,
    progress: Callable[[int], object] | None = None,
    memory_advice: str | None = None,
) -> Evaluation | None:
    """Run ``predictor`` over ``loader``; None as soon as ``stop()`` is true (a stop signal).

    Under torchrun each rank passes its share of the split (``loader.val_loader`` shards it):
    the confusion matrices are summed and the per-image results and pictures gathered, so
    that every rank returns the Evaluation one process would have computed over the whole
    split, images in the split's order. A stop on any rank stops them all at the same batch.
    ``progress`` is called with each batch's number of images (e.g. a bar's ``update``).
    With ``memory_advice``, running out of memory raises a MemoryError naming the batch's
    images, their size and the advice; without, the allocator's own error passes (the
    trainer adds its own advice).
    """
    model = predictor.model
    predictor.nonfinite_images.zero_()
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index, predictor.device)
    names, image_counts = [], []
    # Pictures of this rank's candidates, by position in its share: its first num_examples
    # images and its num_worst lowest (mIoU, position), kept in a heap of negated keys. The
    # split's first and worst images are among the ranks' candidates.
    pictures: dict[int, Example] = {}
    worst: list[tuple[float, int]] = []
    # Shares differ by up to one sample, so batch counts may too: every rank runs the largest
    # count of steps, so that the per-step stop decisions (a collective) always pair up.
    steps = max(dist.gather(len(loader)))
    batches = iter(loader)
    try:
        for _ in range(steps):
            batch = next(batches, None)
            if stop is not None and stop_on_any_rank(stop, predictor.device):
                return None
            if batch is None:
                continue  # this rank's share is done: it only joins the stop decisions
            images, masks = batch
            seen = len(names)
            masks = masks.to(predictor.device, non_blocking=True).long()  # uint8/int16 in transit
            batch_names = [sample_name(loader.dataset, seen + i) for i in range(len(images))]
            with explain_out_of_memory(images, batch_names, memory_advice):
                predictions = predictor.predict(images)
            names += batch_names
            confusion.update(predictions, masks)
            counts = per_image_counts(predictions, masks, num_classes, ignore_index)
            image_counts.append(counts)
            for i in range(min(num_examples - seen, len(images))):
                pictures[seen + i] = example(images, masks, predictions, i)
            if num_worst:
                image_mious = iou_from_counts(counts.cpu().double()).nanmean(1).tolist()
                for i, miou in enumerate(image_mious):
                    if miou != miou:
                        continue  # nothing labelled in this image: no mIoU to rank
                    key = (-miou, -(seen + i))
                    if len(worst) == num_worst and key < worst[0]:
                        continue  # not below the num_worst kept (ties: the earlier stays)
                    if len(worst) < num_worst:
                        heapq.heappush(worst, key)
                    else:
                        dropped = -heapq.heapreplace(worst, key)[1]
                        if dropped >= num_examples:
                            del pictures[dropped]
                    pictures[seen + i] = example(images, masks, predictions, i)
            if progress is not None:
                progress(len(images))
    finally:
        model.train(was_training)
    dist.sum_over_ranks(confusion.matrix)  # integer pixel counts: the sum is exact
    nonfinite = dist.sum_over_ranks(predictor.nonfinite_images.clone()).item()
    worst_miou = {-at: -miou for miou, at in worst}
    empty = torch.zeros(0, 3, num_classes, dtype=torch.int64)  # (0, 3, C): no images
    rows = torch.cat(image_counts).cpu() if image_counts else empty
    samples = [
        # clone: a row (a view) would carry the whole matrix along to the other ranks
        Sample(name, row.clone(), pictures.get(at), worst_miou.get(at))
        for at, (name, row) in enumerate(zip(names, rows, strict=True))
    ]
    samples = dist.unshard(dist.gather(samples))
    names = [sample.name for sample in samples]
    # lowest mIoU first; ties: the earlier image first
    ranked = sorted((s.worst_miou, at) for at, s in enumerate(samples) if s.worst_miou is not None)
    if dist.is_main():
        warn_nonfinite(nonfinite, len(samples), predictor.precision)
    return Evaluation(
        metrics=confusion.compute(),
        confusion=confusion.matrix.cpu(),
        image_counts=torch.stack([sample.counts for sample in samples]) if samples else empty,
        image_names=names,
        examples=[sample.picture for sample in samples[:num_examples]],
        worst=[(miou, names[at], samples[at].picture) for miou, at in ranked[:num_worst]],
    )


def example(
    images: torch.Tensor, masks: torch.Tensor, predictions: torch.Tensor, i: int
) -> Example:
    """Image ``i`` of a batch for pictures, copied to the CPU: a view would keep (and carry
    along to the other ranks) the whole batch."""
    return tuple(batch[i].to("cpu", copy=True) for batch in (images, masks, predictions))


class Sample(NamedTuple):
    """One image's results, as the ranks exchange them."""

    name: str
    counts: torch.Tensor  # (3, C): true positives, target and predicted pixels
    picture: Example | None  # for the examples and worst candidates only
    worst_miou: float | None  # its mIoU, where it is among its rank's num_worst lowest


def stop_on_any_rank(stop: Callable[[], bool], device: torch.device) -> bool:
    """Whether ``stop()`` is true on any rank: every rank then stops at the same batch, none
    left waiting for the others in a collective."""
    return bool(dist.any_rank(torch.tensor([int(stop())], device=device)).item())


def figures(
    result: Evaluation,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
) -> dict[str, np.ndarray]:
    """The pictures of an evaluation as (H, W, 3) uint8 arrays: ``confusion``, ``iou``,
    ``worst`` (image | truth | prediction of the lowest-mIoU images) and ``example_<i>``."""

    def picture(example: Example) -> torch.Tensor:
        return comparison(*example, palette)

    pictures = {
        "confusion": confusion_figure(result.confusion, class_names),
        "iou": iou_figure(result.metrics["IoU"], class_names),
    }
    if result.worst:
        pictures["worst"] = gallery([picture(example) for _, _, example in result.worst])
    for i, example in enumerate(result.examples):
        pictures[f"example_{i}"] = picture(example).permute(1, 2, 0).numpy()
    return pictures


def scalars(metrics: dict, class_names: Sequence[str], prefix: str) -> dict[str, float]:
    """An evaluation's values for the trackers by tag: ``<prefix>/mIoU`` (and mDice, aAcc,
    mAcc), ``<prefix>_class/IoU/<class>`` and ``<prefix>_class/Dice/<class>``."""
    tagged = {f"{prefix}/{key}": metrics[key] for key in ("mIoU", "mDice", "aAcc", "mAcc")}
    # TensorBoard groups by the first path component: per-class curves in groups of their
    # own leave the headline metrics alone at the top of ``<prefix>``.
    for name, iou, dice in zip(class_names, metrics["IoU"], metrics["Dice"], strict=True):
        tagged[f"{prefix}_class/IoU/{name}"] = iou
        tagged[f"{prefix}_class/Dice/{name}"] = dice
    return tagged
