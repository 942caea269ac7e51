"""Instance segmentation: a mask per object, with torchvision's Mask R-CNN (``seg.models.maskrcnn``),
scored by pycocotools' COCOeval (box and mask AP).

The mask representation, decided once: a sample is ``(image, ids, table)``, the image
(3, H, W) uint8, an instance-ID map (H, W) int16 (0 background; id k + 1 is row k of the table,
padded with 0 by the transforms, so that padding is never an instance) and the table (K, 2)
int64 of [class, iscrowd]. Binary masks and boxes are built from the map on the device, after
augmentation: instances a crop emptied are dropped, crowd regions stay out of the training
targets (torchvision has no ignore) and are kept as ``iscrowd`` in the evaluation's ground
truth. Boxes follow COCO's convention: [x0, y0, x1, y1) with exclusive maxima (a mask's
inclusive maxima + 1, as pycocotools' ``toBbox`` computes them).
"""

import contextlib
import csv
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.ops import masks_to_boxes

from seg.engine import dist
from seg.engine.task import Report
from seg.inference import DeviceNormalize
from seg.visualize import gallery, instance_comparison, save_png

log = logging.getLogger(__name__)

# COCOeval's ``stats`` order, for "segm" and "bbox": AP over IoU 0.5:0.95, at 0.5, at 0.75, and
# over small, medium, large objects (maxDets 100).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = {"mask": "segm", "box": "bbox"}


class InstanceTask:
    """Instance segmentation with a torchvision detection model taking ``(images, targets)``.

    ``num_classes`` counts the background (class 0, never an instance); ``mean``/``std``
    normalize pixels in [0, 1] once, on the device (the model's own transform neither resizes
    nor normalizes). Evaluation keeps detections' masks above ``mask_threshold`` (on the pasted
    probabilities, as COCO results are made); pictures show those scored at least
    ``picture_score_threshold``.
    """

    name = "instance"
    metric = "mask_AP"
    mode = "max"
    compile_auto = False  # data-dependent shapes (proposals, detections): compile=auto stays off
    exportable = False
    predict_formats = ()
    default_predict_formats = ()

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        mean: Sequence[float],
        std: Sequence[float],
        mask_threshold: float = 0.5,
        picture_score_threshold: float = 0.5,
    ):
        if len(class_names) != num_classes:
            raise ValueError(
                f"data.class_names has {len(class_names)} entries for data.num_classes="
                f"{num_classes} (the background, class 0, included)"
            )
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.palette = [list(color) for color in palette]
        self.mean, self.std = list(mean), list(std)
        self.mask_threshold = mask_threshold
        self.picture_score_threshold = picture_score_threshold
        self.normalize = DeviceNormalize(self.mean, self.std)

    def to(self, device: torch.device) -> "InstanceTask":
        return self  # nothing of its own on the device

    def collate(self, samples: list) -> tuple[list, list, list]:
        """Lists, not stacked tensors: images may differ in size and tables in length."""
        images, ids, tables = zip(*samples, strict=True)
        return list(images), list(ids), list(tables)

    def normalize_each(
        self, images: list[torch.Tensor], device: torch.device, memory_format: torch.memory_format
    ) -> list[torch.Tensor]:
        """Images of any sizes, each normalized on ``device``."""
        return [self.normalize(image[None], device, memory_format)[0] for image in images]

    def prepare(
        self, batch: tuple, device: torch.device, memory_format: torch.memory_format
    ) -> tuple[list[torch.Tensor], list[dict]]:
        """Normalized float32 images and torchvision's targets (boxes, labels, masks)."""
        images, ids, tables = batch
        targets = [
            training_target(i.to(device), t.to(device)) for i, t in zip(ids, tables, strict=True)
        ]
        return self.normalize_each(images, device, memory_format), targets

    def loss(self, model: nn.Module, batch: tuple, autocast: Callable) -> dict[str, torch.Tensor]:
        """Mask R-CNN's five losses (RPN objectness and boxes, classifier, boxes, masks) under
        autocast; their heads' outputs are float32 (``seg.models.in_float32``)."""
        images, targets = batch
        with autocast():
            losses = model(images, targets)
        return {name: value.float() for name, value in losses.items()}

    def predictor(
        self,
        model: nn.Module,
        device: torch.device,
        precision: str,
        channels_last: bool,
        inference: Mapping | None = None,
    ) -> "InstancePredict":
        unsupported = {key: value for key, value in dict(inference or {}).items()
                       if value not in (None, "whole", 1, [1.0], (1.0,), False, 4)}  # fmt: skip
        if unsupported:
            raise ValueError(
                f"{unsupported}: sliding windows and test-time augmentation are the semantic "
                "task's; an instance model runs on each whole image (drop these keys)"
            )
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return InstancePredict(model, lambda images: self.normalize_each(images, device, memory_format),
                               device, precision)  # fmt: skip

    def writer(self, predict: "InstancePredict", settings) -> None:
        raise ValueError(
            "predict.py writes nothing yet (evaluate.py scores such checkpoints) for a "
            f"checkpoint of the {self.name} task ({settings.checkpoint})"
        )

    def evaluator(
        self, device: torch.device, num_pictures: int = 0, num_worst: int | None = None
    ) -> "CocoEvaluator":
        """COCOeval over the split; ``num_pictures`` examples (``num_worst``: unused, the
        semantic task's lowest-mIoU images have no instance counterpart)."""
        return CocoEvaluator(self.num_classes, self.mask_threshold, self.picture_score_threshold,
                             num_pictures)  # fmt: skip

    def report(self, result: "InstanceEvaluation", prefix: str) -> Report:
        metrics = result.metrics
        names = self.class_names[1:]  # the background is no instance class
        scalars = {f"{prefix}/{kind}_{stat}": metrics[f"{kind}_{stat}"]
                   for kind in IOU_TYPES for stat in STAT_NAMES}  # fmt: skip
        for kind in IOU_TYPES:
            for name, value in zip(names, metrics[f"{kind}_AP_class"], strict=True):
                scalars[f"{prefix}_class/{kind}_AP/{name}"] = value
        pictures = {}
        for i, (image, truth, prediction) in enumerate(result.examples):
            panel = instance_comparison(image, truth, prediction, self.palette)
            pictures[f"example_{i}"] = panel.permute(1, 2, 0).numpy()
        if result.examples:
            pictures["examples"] = gallery(
                [torch.from_numpy(picture).permute(2, 0, 1) for picture in pictures.values()]
            )
        return Report(
            metric=self.metric,
            score=metrics[self.metric],
            record=self.summary(result),
            scalars=scalars,
            pictures=pictures,
            table=format_table(metrics, names),
        )

    def summary(self, result: "InstanceEvaluation", bootstrap: int = 0) -> dict:
        """The metrics by name, per class by class name (NaN -> None: valid JSON), mask_AP
        first; ``bootstrap``: unused (a semantic evaluate.py option)."""
        names = self.class_names[1:]
        summary = {}
        for key, value in result.metrics.items():
            if isinstance(value, list):
                summary[key] = {name: _json(v) for name, v in zip(names, value, strict=True)}
            else:
                summary[key] = _json(value)
        summary["images"] = len(result.image_names)
        return summary

    def write_report(self, result: "InstanceEvaluation", report_dir: Path, report: Report) -> None:
        """evaluate.py's report folder: per_image.csv (instances and detections) and pictures."""
        with open(report_dir / "per_image.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["image", "instances", "detections", "confident_detections"])
            writer.writerows(result.per_image)
        for name, array in report.pictures.items():
            save_png(array, report_dir / f"{name}.png")


def _json(value: float) -> float | None:
    return None if value != value else value


def training_target(ids: torch.Tensor, table: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchvision's target of one image: ``masks`` (K, H, W) uint8, ``boxes`` (K, 4) float32
    (exclusive maxima) and ``labels`` (K,) of the non-crowd instances the ID map still shows."""
    present = ids.unsqueeze(0) == torch.arange(1, len(table) + 1, device=ids.device).view(-1, 1, 1)
    keep = present.flatten(1).any(1) & (table[:, 1] == 0)
    masks = present[keep]
    boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0], device=ids.device)
    return {"boxes": boxes, "labels": table[keep, 0], "masks": masks.to(torch.uint8)}


class InstancePredict:
    """``(batch, names) -> detections`` for ``engine.evaluation.evaluate``: per image a dict of
    ``boxes`` (N, 4), ``labels``, ``scores`` and ``masks`` (N, 1, H, W) probabilities, on the
    CPU. Each image runs alone, so that its detections never depend on the batch it came in
    (batching pads images to the largest): 1 and N processes score exactly alike."""

    def __init__(self, model: nn.Module, normalize: Callable, device: torch.device, precision: str):
        self.model, self.normalize = model, normalize
        self.device, self.precision = device, precision

    def describe(self) -> str:
        return "whole images, one at a time"

    def __call__(self, batch: tuple, names: list[str]) -> list[dict[str, torch.Tensor]]:
        images = self.normalize([image.to(self.device) for image in batch[0]])
        enabled = self.precision != "fp32"
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        outputs = []
        for image in images:
            with torch.autocast(self.device.type, dtype, enabled=enabled):
                (detections,) = self.model([image])
            outputs.append({key: value.float().cpu() if value.is_floating_point() else value.cpu()
                            for key, value in detections.items()})  # fmt: skip
        return outputs


@dataclass
class ImageResult:
    """One image's ground truth and detections in COCO's form (RLE masks), as ranks exchange
    them."""

    name: str
    height: int
    width: int
    truths: list[dict]  # category_id, segmentation, area, bbox, iscrowd
    detections: list[dict]  # category_id, segmentation, bbox, score
    confident: int  # detections scored at least the picture threshold
    picture: tuple | None = None  # (image, (masks, labels), (masks, labels)) for the examples


@dataclass
class InstanceEvaluation:
    metrics: dict  # mask_AP, ..., box_APl and per-class lists mask_AP_class, box_AP_class
    image_names: list[str]
    examples: list[tuple] = field(default_factory=list)
    per_image: list[tuple] = field(default_factory=list)  # (name, instances, detections, confident)


def rle(mask: np.ndarray) -> dict:
    """A binary (H, W) mask as COCO's compressed RLE, its counts a str (JSON-ready)."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


class CocoEvaluator:
    """COCO box and mask AP of a split with pycocotools' COCOeval.

    Each rank encodes its images' ground truth and detections to RLE as they come (no
    full-size masks are kept), ``result`` gathers them in split order and rank 0 runs COCOeval
    once; every rank gets its metrics (best.pt and early stopping use them). Image ids are the
    split positions from 1, annotation ids count from 1 (COCOeval takes id 0 for "unmatched"),
    category ids are the class indices.
    """

    def __init__(self, num_classes: int, mask_threshold: float, picture_score_threshold: float,
                 num_pictures: int):  # fmt: skip
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        self.picture_score_threshold = picture_score_threshold
        self.num_pictures = num_pictures
        self.images: list[ImageResult] = []

    def process(self, batch: tuple, outputs: list[dict], names: list[str]) -> None:
        images, ids, tables = batch
        for image, id_map, table, detections, name in zip(images, ids, tables, outputs, names,
                                                           strict=True):  # fmt: skip
            self.images.append(self.image_result(image, id_map, table, detections, name))

    def image_result(self, image, id_map, table, detections, name) -> ImageResult:
        id_map, table = id_map.cpu().numpy(), table.cpu().numpy()
        truths, truth_masks, truth_labels = [], [], []
        for k, (label, iscrowd) in enumerate(table):
            mask = id_map == k + 1
            if not mask.any():
                continue  # hidden by the others
            encoded = rle(mask)
            truths.append({"category_id": int(label), "segmentation": encoded,
                           "area": float(mask_utils.area(encoded)),
                           "bbox": mask_utils.toBbox(encoded).tolist(), "iscrowd": int(iscrowd)})  # fmt: skip
            truth_masks.append(torch.from_numpy(mask))
            truth_labels.append(int(label))
        masks = detections["masks"][:, 0] > self.mask_threshold  # (N, H, W) on the pasted scores
        boxes = detections["boxes"].tolist()
        results = [
            {"category_id": int(label), "segmentation": rle(mask.numpy()), "score": float(score),
             "bbox": [x0, y0, x1 - x0, y1 - y0]}
            for mask, (x0, y0, x1, y1), label, score in zip(
                masks, boxes, detections["labels"], detections["scores"], strict=True)
        ]  # fmt: skip
        confident = detections["scores"] >= self.picture_score_threshold
        picture = None
        if len(self.images) < self.num_pictures:
            shown = (masks[confident], detections["labels"][confident].tolist())
            truth = (torch.stack(truth_masks) if truth_masks else torch.zeros(0, *id_map.shape, dtype=torch.bool),
                     truth_labels)  # fmt: skip
            picture = (image.cpu().clone(), truth, shown)
        return ImageResult(name, *id_map.shape, truths, results, int(confident.sum()), picture)

    def result(self) -> InstanceEvaluation:
        images = dist.unshard(dist.gather(self.images))
        metrics = dist.decided_by_main(lambda: coco_metrics(images, self.num_classes))
        return InstanceEvaluation(
            metrics=metrics,
            image_names=[image.name for image in images],
            examples=[image.picture for image in images[: self.num_pictures]],
            per_image=[
                (image.name, len(image.truths), len(image.detections), image.confident)
                for image in images
            ],
        )


def coco_ground_truth(images: list[ImageResult], num_classes: int) -> COCO:
    """A pycocotools COCO object of ``images``' ground truth (ids from 1)."""
    dataset = {
        "images": [
            {"id": at + 1, "height": image.height, "width": image.width, "file_name": image.name}
            for at, image in enumerate(images)
        ],
        "categories": [{"id": c} for c in range(1, num_classes)],
        "annotations": [],
    }
    for at, image in enumerate(images):
        for truth in image.truths:
            annotation_id = len(dataset["annotations"]) + 1
            dataset["annotations"].append({"id": annotation_id, "image_id": at + 1, **truth})
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def coco_results(images: list[ImageResult], kind: str) -> list[dict]:
    """COCO results of ``images``' detections for COCOeval's ``kind``: masks ("mask": RLE
    segmentations, their areas and boxes derived by loadRes from the masks) or boxes ("box"),
    as torchvision's references/detection prepare them, one list per IoU type."""
    drop = "bbox" if kind == "mask" else "segmentation"
    return [{"image_id": at + 1, **{k: v for k, v in result.items() if k != drop}}
            for at, image in enumerate(images) for result in image.detections]  # fmt: skip


def coco_metrics(images: list[ImageResult], num_classes: int) -> dict:
    """COCOeval's box and mask AP (0-1) and per-class AP (NaN for a class without ground
    truth). No detections at all: AP 0 (pycocotools' loadRes refuses an empty list)."""
    truth = coco_ground_truth(images, num_classes)
    classes = range(1, num_classes)
    metrics = {}
    for kind, iou_type in IOU_TYPES.items():
        results = coco_results(images, kind)
        has_truth = [bool(truth.getAnnIds(catIds=[c], iscrowd=False)) for c in classes]
        if not results:
            metrics |= {f"{kind}_{stat}": 0.0 for stat in STAT_NAMES}
            metrics[f"{kind}_AP_class"] = [0.0 if seen else math.nan for seen in has_truth]
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(truth, truth.loadRes(results), iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        for stat, value in zip(STAT_NAMES, evaluation.stats, strict=False):
            metrics[f"{kind}_{stat}"] = float(value) if value >= 0 else math.nan
        # precision[T, R, K, A, M]: IoU thresholds, recall points, classes, area "all", 100 dets
        precision = evaluation.eval["precision"][:, :, :, 0, -1]
        per_class = []
        for k in range(len(classes)):
            values = precision[:, :, k]
            values = values[values > -1]
            per_class.append(float(values.mean()) if values.size else math.nan)
        metrics[f"{kind}_AP_class"] = per_class
    return {"mask_AP": metrics.pop("mask_AP"), **metrics}


def format_table(metrics: dict, class_names: Sequence[str]) -> str:
    """Per-class mask and box AP with the overall figures, in percent."""
    width = max(len(name) for name in [*class_names, "all"])
    lines = [f"{'class':<{width}} {'mask AP':>8} {'box AP':>8}"]
    for i, name in enumerate(class_names):
        values = (metrics["mask_AP_class"][i], metrics["box_AP_class"][i])
        lines.append(f"{name:<{width}} " + " ".join(_percent(v) for v in values))
    lines.append(f"{'all':<{width}} {_percent(metrics['mask_AP'])} {_percent(metrics['box_AP'])}")
    lines.append(
        "mask AP50 {:.2f}  AP75 {:.2f}  box AP50 {:.2f}  AP75 {:.2f}".format(
            *(100 * metrics[k] for k in ("mask_AP50", "mask_AP75", "box_AP50", "box_AP75"))
        )
    )
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "     nan" if value != value else f"{100 * value:8.2f}"
