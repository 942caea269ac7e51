"""Semantic segmentation: a class per pixel. Batches are ``(images, masks)``: uint8 RGB
(N, 3, H, W) and masks (N, H, W) of class indices with ``ignore_index``; models return logits
(N, C, H, W); scored by one confusion matrix over the split (mIoU, mDice, aAcc, mAcc)."""

import csv
import heapq
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, default_collate

from seg.data.cityscapes import LABEL_TO_TRAIN_ID, TRAIN_ID_TO_LABEL_ID
from seg.engine import dist
from seg.engine.evaluation import evaluate as run_evaluation
from seg.engine.task import PredictSettings, Report
from seg.inference import (
    DeviceNormalize,
    Predictor,
    explain_out_of_memory,
    memory_advice,
    warn_nonfinite,
)
from seg.metrics import (
    ConfusionMatrix,
    bootstrap_miou,
    format_table,
    iou_from_counts,
    named,
    per_image_counts,
)
from seg.prediction import refuse_clashes
from seg.visualize import (
    colorize,
    comparison,
    confusion_figure,
    gallery,
    iou_figure,
    overlay,
    save_png,
)

log = logging.getLogger(__name__)

# (image, mask, prediction) on the CPU, for pictures
Example = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def loss_input(logits: torch.Tensor) -> torch.Tensor:
    """The logits in float32 and the contiguous layout, in one copy: the losses' log_softmax
    would copy channels_last logits a second time (about 4% of a U-Net step on the CPU)."""
    return logits.to(torch.float32, memory_format=torch.contiguous_format)


class SemanticTask:
    """A class per pixel with any ``seg.models`` segmenter and a ``seg.losses`` loss.

    ``loss`` (a ``loss(logits, masks)`` module) is needed for training only, with
    ``aux_weight`` for the loss of the model's auxiliary head (torchvision's FCN, DeepLabV3);
    ``mean``/``std`` normalize pixels in [0, 1] on the device.
    """

    name = "semantic"
    metric = "mIoU"
    mode = "max"
    compile_auto = True  # fixed crop sizes: one graph
    exportable = True  # scripts/export.py: ONNX and TorchScript of the logits
    predict_formats = ("index", "color", "overlay", "cityscapes")  # what predict.py writes
    default_predict_formats = ("index", "color", "overlay")

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        mean: Sequence[float],
        std: Sequence[float],
        loss: nn.Module | None = None,
        aux_weight: float = 0.0,
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names)
        self.palette = [list(color) for color in palette]
        self.mean, self.std = list(mean), list(std)
        self.loss_fn = loss
        self.aux_weight = aux_weight
        self.normalize = DeviceNormalize(self.mean, self.std)

    def to(self, device: torch.device) -> "SemanticTask":
        """The loss's buffers (class weights) on ``device``."""
        if self.loss_fn is not None:
            self.loss_fn.to(device)
        return self

    def collate(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        return default_collate(samples)

    def prepare(
        self, batch: tuple, device: torch.device, memory_format: torch.memory_format
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images -> normalized float32 in ``memory_format``; masks -> int64 (on the
        device: they travel as uint8 or int16)."""
        images, masks = batch
        return self.normalize(images, device, memory_format), masks.to(device).long()

    def loss(self, model: nn.Module, batch: tuple, autocast: Callable) -> dict[str, torch.Tensor]:
        """``{"loss": main + aux_weight * aux}`` (the auxiliary head's, where the model has
        one), reduced in float32 outside autocast."""
        images, masks = batch
        with autocast():
            logits, aux_logits = model(images, with_aux=True)
        loss = self.loss_fn(loss_input(logits), masks)
        if aux_logits is not None:
            loss = loss + self.aux_weight * self.loss_fn(loss_input(aux_logits), masks)
        return {"loss": loss}

    def predictor(
        self,
        model: nn.Module,
        device: torch.device,
        precision: str,
        channels_last: bool,
        inference: Mapping | None = None,
    ) -> "SemanticPredict":
        """Class indices per pixel through ``Predictor``; ``inference``: its ``mode``, ``crop``,
        ``stride``, ``scales``, ``flip``, ``window_batch`` (evaluate.yaml's keys)."""
        predictor = Predictor(model, device, self.mean, self.std, precision, channels_last,
                              **dict(inference or {}))  # fmt: skip
        return SemanticPredict(predictor, memory_advice(predictor, "data.val_batch_size"))

    def evaluator(
        self, device: torch.device, num_pictures: int = 0, num_worst: int | None = None
    ) -> "SemanticEvaluator":
        """Accumulates on ``device``; keeps ``num_pictures`` examples and as many lowest-mIoU
        images (``num_worst`` apart, for evaluate.py)."""
        worst = num_pictures if num_worst is None else num_worst
        return SemanticEvaluator(self.num_classes, self.ignore_index, device, num_pictures, worst)

    def report(self, result: "Evaluation", prefix: str) -> Report:
        metrics = result.metrics
        return Report(
            metric=self.metric,
            score=metrics[self.metric],
            record=named(metrics, self.class_names),
            scalars=scalars(metrics, self.class_names, prefix),
            pictures=figures(result, self.class_names, self.palette),
            table=format_table(metrics, self.class_names),
        )

    def writer(self, predict: "SemanticPredict", settings: PredictSettings) -> "SemanticWriter":
        """predict.py's PNGs (``settings.formats``: index, color, overlay, cityscapes)."""
        return SemanticWriter(predict, settings, self.palette)

    def summary(self, result: "Evaluation", bootstrap: int) -> dict:
        """evaluate.py's ``out=`` JSON: metrics by class name, the image count and, with
        ``bootstrap`` resamples, the mIoU's 95% interval."""
        summary = named(result.metrics, self.class_names)
        summary["images"] = len(result.image_names)
        if bootstrap:
            low, high = bootstrap_miou(result.image_counts, resamples=bootstrap)
            summary["mIoU_ci95"] = [low, high]
            log.info("mIoU %.4f, 95%% bootstrap interval [%.4f, %.4f]", summary["mIoU"], low, high)
        return summary

    def write_report(self, result: "Evaluation", report_dir: Path, report: Report) -> None:
        """evaluate.py's report folder: per_image.csv and the figures."""
        image_iou = iou_from_counts(result.image_counts.double())
        with open(report_dir / "per_image.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(
                ["image", "mIoU", "aAcc", *[f"IoU/{name}" for name in self.class_names]]
            )
            for name, counts, iou in zip(
                result.image_names, result.image_counts, image_iou, strict=True
            ):
                labelled = counts[1].sum().item()
                accuracy = counts[0].sum().item() / labelled if labelled else float("nan")
                writer.writerow(
                    [name, _cell(iou.nanmean().item()), _cell(accuracy), *map(_cell, iou.tolist())]
                )
        for name, array in report.pictures.items():
            save_png(array, report_dir / f"{name}.png")


class SemanticWriter:
    """One PNG per input and format under ``output/<format>/``: ``index`` holds class indices
    (8-bit, one channel; 16-bit past 256 classes), ``color`` the palette colours, ``overlay``
    the colours blended on the input, ``cityscapes`` the official labelIds, in one flat folder
    as the evaluation server wants."""

    def __init__(
        self, predict: "SemanticPredict", settings: PredictSettings, palette: list[list[int]]
    ):
        if "cityscapes" in settings.formats:
            if len(palette) != len(LABEL_TO_TRAIN_ID):
                raise ValueError(
                    f"format=cityscapes writes the 19 Cityscapes classes as labelIds, but "
                    f"checkpoint {settings.checkpoint} has {len(palette)} classes"
                )
            # one flat folder: names from different folders may meet
            refuse_clashes(settings.inputs, [Path(path.name) for path in settings.relatives],
                           " by format=cityscapes")  # fmt: skip
        self.predict, self.settings, self.palette = predict, settings, palette
        predict.advice = memory_advice(predict.predictor, "batch_size")  # predict.py's key
        self.written, self.nonfinite = 0, 0

    def write(self, images: torch.Tensor, indices: list[int]) -> None:
        names = [str(self.settings.inputs[index]) for index in indices]
        labels, nonfinite = self.predict.labels(images, names)
        self.nonfinite = self.nonfinite + nonfinite  # on the device: read once, at the end
        for index, image, label in zip(indices, images, labels.cpu(), strict=True):
            self.write_one(label, image, self.settings.relatives[index])
        self.written += len(indices)

    def write_one(self, label: torch.Tensor, image: torch.Tensor, relative: Path) -> None:
        output, palette = self.settings.output, self.palette
        for name in self.settings.formats:
            # cityscapes: <city>_<seq>_<frame>_leftImg8bit.png, the name the official tools match
            path = output / name / (relative.name if name == "cityscapes" else relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            if name == "cityscapes":
                Image.fromarray(TRAIN_ID_TO_LABEL_ID[label.numpy()]).save(path)
            elif name == "index":
                dtype = np.uint8 if len(palette) <= 256 else np.uint16  # 16-bit past 256 classes
                Image.fromarray(label.numpy().astype(dtype)).save(path)
            elif name == "color":
                Image.fromarray(colorize(label, palette).permute(1, 2, 0).numpy()).save(path)
            else:
                blended = overlay(image, colorize(label, palette), self.settings.alpha)
                Image.fromarray(blended.permute(1, 2, 0).numpy()).save(path)

    def finish(self) -> None:
        """Warn, on rank 0, of the images whose class scores were not finite."""
        shares = dist.gather((self.written, int(self.nonfinite)))
        if dist.is_main():
            warn_nonfinite(sum(count for _, count in shares), sum(count for count, _ in shares))


def _cell(value: float) -> str:
    return "" if value != value else f"{value:.6f}"


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
) -> "Evaluation | None":
    """``predictor``'s semantic evaluation over ``loader`` (``engine.evaluation.evaluate`` with
    this task's evaluator), for callers that hold a Predictor (export, benchmarks, tests).
    With ``memory_advice``, running out of memory raises a MemoryError naming the batch's
    images, their size and the advice; without, the allocator's own error passes."""
    predict = SemanticPredict(predictor, memory_advice)
    evaluator = SemanticEvaluator(num_classes, ignore_index, predictor.device, num_examples,
                                  num_worst)  # fmt: skip
    return run_evaluation(predictor.model, predict, loader, evaluator, predictor.device, stop,
                          progress)  # fmt: skip


class SemanticPredict:
    """``(batch, names) -> (class indices (N, H, W), images with non-finite scores)`` for
    ``engine.evaluation.evaluate``; with ``advice``, out of memory names the images and what
    to change."""

    def __init__(self, predictor: Predictor, advice: str | None = None):
        self.predictor = predictor
        self.advice = advice

    def __getattr__(self, name: str):
        return getattr(self.predictor, name)  # device, precision, mode, ...: the Predictor's

    def __call__(self, batch: tuple, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.labels(batch[0], names)

    def labels(self, images: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Class indices (N, H, W) of uint8 ``images`` (N, 3, H, W), and how many of them had
        non-finite scores (on the device)."""
        with explain_out_of_memory(images, names, self.advice):
            labels = self.predictor.predict(images)
        return labels, self.predictor.nonfinite

    def describe(self) -> str:
        return f"{self.predictor.mode} inference, {self.predictor.num_passes} pass(es)"


@dataclass
class Evaluation:
    metrics: dict  # mIoU, mDice, aAcc, mAcc and per-class lists (seg.metrics)
    confusion: torch.Tensor  # (C, C) pixel counts [target, prediction], on the CPU
    image_counts: torch.Tensor  # (N, 3, C): true positives, target and predicted pixels
    image_names: list[str]  # the N samples, as their datasets describe them
    examples: list[Example] = field(default_factory=list)  # the first samples
    worst: list[tuple[float, str, Example]] = field(default_factory=list)  # lowest image mIoU


class Sample(NamedTuple):
    """One image's results, as the ranks exchange them (its picture goes to rank 0 apart)."""

    name: str
    counts: torch.Tensor  # (3, C): true positives, target and predicted pixels
    origin: tuple[int, int]  # (rank, position in the rank's share): where its picture is
    worst_miou: float | None  # its mIoU, where it is among its rank's num_worst lowest


class SemanticEvaluator:
    """The confusion matrix of a split, per-image counts, and pictures: the first
    ``num_examples`` images and the ``num_worst`` of lowest mIoU.

    Under torchrun each rank processes its share: the confusion matrices are summed and the
    per-image results and pictures gathered, so that every rank's ``result()`` is the
    Evaluation one process would have computed over the whole split, images in its order.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        device: torch.device,
        num_examples: int,
        num_worst: int,
    ):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.num_examples, self.num_worst = num_examples, num_worst
        self.confusion = ConfusionMatrix(num_classes, ignore_index, device)
        self.names: list[str] = []
        self.image_counts: list[torch.Tensor] = []
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        # Pictures of this rank's candidates, by position in its share: its first num_examples
        # images and its num_worst lowest (mIoU, position), kept in a heap of negated keys.
        # The split's first and worst images are among the ranks' candidates.
        self.pictures: dict[int, Example] = {}
        self.worst: list[tuple[float, int]] = []

    def process(self, batch: tuple, outputs: tuple, names: list[str]) -> None:
        images, masks = batch
        predictions, nonfinite = outputs
        seen = len(self.names)
        masks = masks.to(predictions.device, non_blocking=True).long()  # uint8/int16 in transit
        self.names += names
        self.nonfinite += nonfinite
        self.confusion.update(predictions, masks)
        counts = per_image_counts(predictions, masks, self.num_classes, self.ignore_index)
        self.image_counts.append(counts)
        for i in range(min(self.num_examples - seen, len(images))):
            self.pictures[seen + i] = example(images, masks, predictions, i)
        if self.num_worst:
            self.keep_worst(images, masks, predictions, counts, seen)

    def keep_worst(self, images, masks, predictions, counts, seen: int) -> None:
        image_mious = iou_from_counts(counts.cpu().double()).nanmean(1).tolist()
        for i, miou in enumerate(image_mious):
            if miou != miou:
                continue  # nothing labelled in this image: no mIoU to rank
            key = (-miou, -(seen + i))
            if len(self.worst) == self.num_worst and key < self.worst[0]:
                continue  # not below the num_worst kept (ties: the earlier stays)
            if len(self.worst) < self.num_worst:
                heapq.heappush(self.worst, key)
            else:
                dropped = -heapq.heapreplace(self.worst, key)[1]
                if dropped >= self.num_examples:
                    del self.pictures[dropped]
            self.pictures[seen + i] = example(images, masks, predictions, i)

    def result(self) -> "Evaluation":
        n = self.num_classes
        dist.sum_over_ranks(self.confusion.matrix)  # integer pixel counts: the sum is exact
        nonfinite = int(dist.sum_over_ranks(self.nonfinite).item())
        worst_miou = {-at: -miou for miou, at in self.worst}
        empty = torch.zeros(0, 3, n, dtype=torch.int64)  # (0, 3, C): no images
        rows = torch.cat(self.image_counts).cpu() if self.image_counts else empty
        samples = [
            # clone: a row (a view) would carry the whole matrix along to the other ranks
            Sample(name, row.clone(), (dist.rank(), at), worst_miou.get(at))
            for at, (name, row) in enumerate(zip(self.names, rows, strict=True))
        ]
        samples = dist.unshard(dist.gather(samples))
        names = [sample.name for sample in samples]
        # Pictures are for rank 0 to show: the other ranks' results have none.
        shares = dist.gather_to_main(self.pictures)
        pictures = [] if shares is None else [shares[r].get(at) for r, at in
                                              (s.origin for s in samples)]  # fmt: skip
        # lowest mIoU first; ties: the earlier image first
        ranked = sorted(
            (s.worst_miou, at) for at, s in enumerate(samples) if s.worst_miou is not None
        )
        worst = ranked[: self.num_worst] if pictures else []  # pictures: rank 0's
        if dist.is_main():
            warn_nonfinite(nonfinite, len(samples))
        return Evaluation(
            metrics=self.confusion.compute(),
            confusion=self.confusion.matrix.cpu(),
            image_counts=torch.stack([sample.counts for sample in samples]) if samples else empty,
            image_names=names,
            examples=pictures[: self.num_examples],
            worst=[(miou, names[at], pictures[at]) for miou, at in worst],
        )


def example(
    images: torch.Tensor, masks: torch.Tensor, predictions: torch.Tensor, i: int
) -> Example:
    """Image ``i`` of a batch for pictures, copied to the CPU (a view would keep, and carry
    along to rank 0, the whole batch), in uint8: classes as the palette colours them
    (``colorize`` clamps to [0, 255]), an eighth of int64's bytes to gather."""
    labels = (batch[i].clamp(0, 255).to("cpu", torch.uint8) for batch in (masks, predictions))
    return (images[i].to("cpu", copy=True), *labels)


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
