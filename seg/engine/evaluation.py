"""One pass over a split: the confusion matrix, per-image counts and pictures to look at."""

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from seg.inference import Predictor, explain_out_of_memory
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

    ``progress`` is called with each batch's number of images (e.g. a bar's ``update``).
    With ``memory_advice``, running out of memory raises a MemoryError naming the batch's
    images, their size and the advice; without, the allocator's own error passes (the
    trainer adds its own advice).
    """
    model = predictor.model
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index, predictor.device)
    image_counts, examples, worst, names = [], [], [], []
    seen = 0
    try:
        for images, masks in loader:
            if stop is not None and stop():
                return None
            masks = masks.to(predictor.device, non_blocking=True)
            batch_names = [sample_name(loader.dataset, seen + i) for i in range(len(images))]
            with explain_out_of_memory(images, batch_names, memory_advice):
                predictions = predictor.predict(images)
            names += batch_names
            confusion.update(predictions, masks)
            counts = per_image_counts(predictions, masks, num_classes, ignore_index)
            image_counts.append(counts)
            if len(examples) < num_examples:
                take = num_examples - len(examples)
                examples += zip(
                    images[:take], masks[:take].cpu(), predictions[:take].cpu(), strict=True
                )
            if num_worst:
                image_mious = iou_from_counts(counts.cpu().double()).nanmean(1).tolist()
                for i, miou in enumerate(image_mious):
                    if miou != miou:
                        continue  # nothing labelled in this image: no mIoU to rank
                    # max-heap of the num_worst lowest: keys negated; seen + i breaks ties
                    entry = (-miou, seen + i, (images[i], masks[i].cpu(), predictions[i].cpu()))
                    if len(worst) < num_worst:
                        heapq.heappush(worst, entry)
                    elif -miou > worst[0][0]:
                        heapq.heapreplace(worst, entry)
            seen += len(images)
            if progress is not None:
                progress(len(images))
    finally:
        model.train(was_training)
    return Evaluation(
        metrics=confusion.compute(),
        confusion=confusion.matrix.cpu(),
        image_counts=torch.cat(image_counts).cpu()
        if image_counts
        else torch.zeros(0, 3, num_classes),
        image_names=names,
        examples=examples,
        worst=[
            (-key, names[index], example) for key, index, example in sorted(worst, reverse=True)
        ],
    )


def figures(
    result: Evaluation,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, np.ndarray]:
    """The pictures of an evaluation as (H, W, 3) uint8 arrays: ``confusion``, ``iou``,
    ``worst`` (image | truth | prediction of the lowest-mIoU images) and ``example_<i>``."""

    def picture(example: Example) -> torch.Tensor:
        return comparison(*example, palette, mean, std)

    pictures = {
        "confusion": confusion_figure(result.confusion, class_names),
        "iou": iou_figure(result.metrics["IoU"], class_names),
    }
    if result.worst:
        pictures["worst"] = gallery([picture(example) for _, _, example in result.worst])
    for i, example in enumerate(result.examples):
        pictures[f"example_{i}"] = picture(example).permute(1, 2, 0).numpy()
    return pictures
