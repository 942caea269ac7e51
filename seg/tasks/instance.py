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
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision.ops import masks_to_boxes

from seg.data.instance_layouts import read_id_map
from seg.data.instances import CocoSplit
from seg.engine import dist
from seg.engine.task import PredictSettings, Report
from seg.inference import DeviceNormalize
from seg.tasks.cityscapes_ap import ImageMatches, cityscapes_metrics, image_matches
from seg.visualize import (
    caption_boxes,
    gallery,
    instance_colors,
    instance_comparison,
    instance_overlay,
    save_png,
)

log = logging.getLogger(__name__)

# COCOeval's ``stats`` order, for "segm" and "bbox": AP over IoU 0.5:0.95, at 0.5, at 0.75, and
# over small, medium, large objects (maxDets 100).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = {"mask": "segm", "box": "bbox"}


class InstanceTask:
    """Instance segmentation with a torchvision detection model taking ``(images, targets)``.

    ``num_classes`` counts the background (class 0, never an instance); ``mean``/``std``
    normalize pixels divided by ``scale`` (``data.scale``) once, on the device (the model's own transform neither resizes
    nor normalizes). Evaluation keeps detections' masks above ``mask_threshold`` (on the pasted
    probabilities, as COCO results are made); pictures show those scored at least
    ``picture_score_threshold``, over the input's ``rgb_bands`` (1-based; images other than
    3-band uint8 are stretched, one band is grey: ``seg.visualize.display_rgb``).
    """

    name = "instance"
    metric = "mask_AP"
    mode = "max"
    compile_auto = False  # data-dependent shapes (proposals, detections): compile=auto stays off
    predict_formats = ("overlay", "instances", "coco")  # what predict.py writes
    default_predict_formats = ("overlay", "instances", "coco")

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        mean: Sequence[float],
        std: Sequence[float],
        mask_threshold: float = 0.5,
        picture_score_threshold: float = 0.5,
        scale: float | str = "auto",
        rgb_bands: Sequence[int] | None = None,
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
        self.rgb_bands = list(rgb_bands) if rgb_bands is not None else None  # 1-based, pictures
        self.normalize = DeviceNormalize(self.mean, self.std, scale)  # data.scale: auto for uint8

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

    def writer(self, predict: "InstancePredict", settings: PredictSettings) -> "InstanceWriter":
        """predict.py's files (``settings.formats``: overlay, instances, coco)."""
        return InstanceWriter(predict, settings, self)

    def evaluator(
        self,
        device: torch.device,
        num_pictures: int = 0,
        num_worst: int | None = None,
        dataset: Dataset | None = None,
    ) -> "CocoEvaluator":
        """COCOeval over the split; ``num_pictures`` examples (``num_worst``: unused, the
        semantic task's lowest-mIoU images have no instance counterpart). A ``dataset`` with
        an annotation file of its own (COCO's, ``coco_split``) is scored against that file;
        a Cityscapes one (``cityscapes_ground_truth``) also gets the official Cityscapes AP."""
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        reference = getattr(dataset, "coco_split", lambda: None)()
        cityscapes = getattr(dataset, "cityscapes_ground_truth", lambda: None)()
        return CocoEvaluator(self.num_classes, self.mask_threshold, self.picture_score_threshold,
                             num_pictures, reference, cityscapes)  # fmt: skip

    def report(self, result: "InstanceEvaluation", prefix: str) -> Report:
        metrics = result.metrics
        names = self.class_names[1:]  # the background is no instance class
        scalars = {f"{prefix}/{kind}_{stat}": metrics[f"{kind}_{stat}"]
                   for kind in IOU_TYPES for stat in STAT_NAMES}  # fmt: skip
        if "cityscapes_AP" in metrics:  # Cityscapes splits: also the official figures
            scalars |= {f"{prefix}/cityscapes_{stat}": metrics[f"cityscapes_{stat}"]
                        for stat in ("AP", "AP50")}  # fmt: skip
        for kind in (*IOU_TYPES, "cityscapes"):
            for name, value in zip(names, metrics.get(f"{kind}_AP_class", []), strict=False):
                scalars[f"{prefix}_class/{kind}_AP/{name}"] = value
        pictures = {}
        for i, (image, truth, prediction) in enumerate(result.examples):
            panel = instance_comparison(image, truth, prediction, self.palette, self.rgb_bands)
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

    @torch.inference_mode()  # predict.py calls it outside evaluate()'s inference mode
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
    image_id: int | None  # the annotation file's; None: the split position + 1
    height: int
    width: int
    truths: list[dict]  # category_id, segmentation, area, bbox, iscrowd
    detections: list[dict]  # category_id, segmentation, bbox, score
    confident: int  # detections scored at least the picture threshold
    picture: tuple | None = None  # (image, (masks, labels), (masks, labels)) for the examples
    cityscapes: ImageMatches | None = None  # against the instanceIds PNG (Cityscapes splits)


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


class InstanceWriter:
    """predict.py's files of an instance model, per input image (its path under ``input``,
    suffix .png): ``overlay/`` the detections scored at least ``score_threshold`` on the image,
    each instance in a colour of its own with its outline, class and score; ``instances/`` a
    16-bit instance-ID PNG of the same detections (1 the highest scored, 0 background; where
    masks overlap, the higher score wins) with ``masks/`` their classes (8-bit), the layout
    ``data=instance_folder`` reads; and ``coco`` one COCO results file,
    ``coco_results.json``, of every detection the model returns (AP ranks them all): RLE
    masks, [x, y, w, h] boxes, scores, the dataset's category ids and, with
    ``annotations``, its image ids (else 1, 2, ... in input order)."""

    def __init__(self, predict: "InstancePredict", settings: PredictSettings, task: "InstanceTask"):
        self.predict, self.settings = predict, settings
        self.class_names, self.rgb_bands = task.class_names, task.rgb_bands
        self.mask_threshold = (task.mask_threshold if settings.mask_threshold is None
                               else settings.mask_threshold)  # fmt: skip
        self.category_ids = settings.category_ids or list(range(task.num_classes))
        if len(self.category_ids) != task.num_classes:
            raise ValueError(
                f"data.category_ids has {len(self.category_ids)} entries for the "
                f"{task.num_classes} classes of checkpoint {settings.checkpoint}"
            )
        self.image_ids = list(range(1, len(settings.inputs) + 1))
        if "coco" in settings.formats and settings.annotations is not None:
            self.image_ids = annotation_image_ids(settings.annotations, settings.inputs,
                                                  settings.base)  # fmt: skip
        self.results: list[tuple[int, list[dict]]] = []  # (input index, its COCO results)

    def write(self, images: torch.Tensor, indices: list[int]) -> None:
        names = [str(self.settings.inputs[index]) for index in indices]
        for index, image, detections in zip(indices, images, self.predict((images,), names),
                                            strict=True):  # fmt: skip
            masks = detections["masks"][:, 0] > self.mask_threshold  # (N, H, W)
            if "coco" in self.settings.formats:
                results = detection_results(detections, masks, self.category_ids)
                self.results.append((index, [{"image_id": self.image_ids[index], **result}
                                             for result in results]))  # fmt: skip
            # the shown ones, lowest score first: higher scores are drawn (and mapped) over them
            shown = (detections["scores"] >= self.settings.score_threshold).nonzero()[:, 0]
            shown = shown[detections["scores"][shown].argsort(stable=True)]
            self.write_pictures(image, masks[shown], {key: detections[key][shown]
                                for key in ("boxes", "labels", "scores")}, index)  # fmt: skip

    def write_pictures(self, image: torch.Tensor, masks: torch.Tensor, shown: dict,
                       index: int) -> None:  # fmt: skip
        relative, output = self.settings.relatives[index], self.settings.output
        labels = shown["labels"].tolist()
        if "instances" in self.settings.formats:
            ids = np.zeros(image.shape[1:], np.uint16)
            classes = np.zeros(
                image.shape[1:], np.uint8 if len(self.class_names) <= 256 else np.uint16
            )
            for number, (mask, label) in enumerate(zip(masks.numpy(), labels, strict=True)):
                ids[mask] = len(labels) - number  # 1: the highest score, drawn last
                classes[mask] = label
            for folder, array in (("instances", ids), ("masks", classes)):
                path = output / folder / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(path), array):  # 16-bit PNG: PIL would write 8 bits
                    raise OSError(f"{path}: could not write the PNG")
        if "overlay" in self.settings.formats:
            colors = instance_colors(len(labels))[::-1]  # the highest score: the first colour
            picture = instance_overlay(
                image, masks, range(len(labels)), colors, self.settings.alpha, self.rgb_bands
            )
            texts = [f"{self.class_names[label]} {score:.2f}"
                     for label, score in zip(labels, shown["scores"].tolist(), strict=True)]  # fmt: skip
            save_png(caption_boxes(picture, shown["boxes"].tolist(), texts, colors),
                     output / "overlay" / relative)  # fmt: skip

    def windowed(self, indices: list[int]) -> list[int]:
        return []  # every image whole: detections are not cut at window edges

    def finish(self) -> None:
        """Rank 0 writes ``coco_results.json`` of every rank's results, in input order."""
        if "coco" not in self.settings.formats:
            return
        shares = dist.gather_to_main(self.results)
        if shares is None:
            return
        results = [result for _, image in sorted(item for share in shares for item in share)
                   for result in image]  # fmt: skip
        path = self.settings.output / "coco_results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results))
        log.info("%d detections in COCO's results format written to %s", len(results), path)


def annotation_image_ids(annotations: Path, inputs: list[Path], base: Path) -> list[int]:
    """Each input's image id in a COCO annotation file, matched by its path under ``base``
    (the ``input`` folder) to the file's ``file_name``s; an input it lacks is an error."""
    try:
        with open(annotations) as file:
            listed = {image["file_name"]: image["id"] for image in json.load(file)["images"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"annotations={annotations}: cannot read its images' file_name and id ({error!r})"
        ) from error
    names = [path.relative_to(base).as_posix() for path in inputs]
    missing = [name for name in names if name not in listed]
    if missing:
        raise ValueError(
            f"annotations={annotations} lists no image with file_name {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of the {len(names)} inputs); "
            "give input=<root>/<split> (file names are matched under it) or annotations=null"
        )
    return [listed[name] for name in names]


def detection_results(
    detections: dict[str, torch.Tensor], masks: torch.Tensor, category_ids: Sequence[int]
) -> list[dict]:
    """COCO results (without ``image_id``) of one image's ``detections``: binary ``masks``
    (N, H, W) as RLE, boxes as [x, y, w, h], each class as its ``category_ids`` entry."""
    boxes = detections["boxes"].tolist()
    return [
        {"category_id": int(category_ids[label]), "segmentation": rle(mask.numpy()),
         "score": float(score), "bbox": [x0, y0, x1 - x0, y1 - y0]}
        for mask, (x0, y0, x1, y1), label, score in zip(
            masks, boxes, detections["labels"].tolist(), detections["scores"], strict=True)
    ]  # fmt: skip


class CocoEvaluator:
    """COCO box and mask AP of a split with pycocotools' COCOeval.

    Each rank encodes its images' ground truth and detections to RLE as they come (no
    full-size masks are kept), ``result`` gathers them in split order and rank 0 runs COCOeval
    once; every rank gets its metrics (best.pt and early stopping use them). With a
    ``reference`` (a COCO split), the ground truth is its annotation file as it is, with its
    image and category ids; else seg builds it from the ID maps: image ids are the split
    positions from 1, category ids the class indices. With ``cityscapes`` (each sample's
    name -> its ``*_gtFine_instanceIds.png``), detections are also matched with those files
    for Cityscapes' official AP (``seg.tasks.cityscapes_ap``).
    """

    def __init__(self, num_classes: int, mask_threshold: float, picture_score_threshold: float,
                 num_pictures: int, reference: CocoSplit | None = None,
                 cityscapes: dict[str, Path] | None = None):  # fmt: skip
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        self.picture_score_threshold = picture_score_threshold
        self.num_pictures = num_pictures
        self.reference, self.cityscapes = reference, cityscapes
        self.category_ids = (
            list(range(num_classes)) if reference is None else reference.category_ids
        )
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
            truths.append({"category_id": self.category_ids[label], "segmentation": encoded,
                           "area": float(mask_utils.area(encoded)),
                           "bbox": mask_utils.toBbox(encoded).tolist(), "iscrowd": int(iscrowd)})  # fmt: skip
            truth_masks.append(torch.from_numpy(mask))
            truth_labels.append(int(label))
        masks = detections["masks"][:, 0] > self.mask_threshold  # (N, H, W) on the pasted scores
        results = detection_results(detections, masks, self.category_ids)
        confident = detections["scores"] >= self.picture_score_threshold
        picture = None
        if len(self.images) < self.num_pictures:
            shown = (masks[confident], detections["labels"][confident].tolist())
            truth = (torch.stack(truth_masks) if truth_masks else torch.zeros(0, *id_map.shape, dtype=torch.bool),
                     truth_labels)  # fmt: skip
            picture = (image.cpu().clone(), truth, shown)
        image_id = None if self.reference is None else self.reference.image_ids[name]
        matches = None
        if self.cityscapes is not None:
            matches = official_matches(self.cityscapes[name], masks, detections)
        return ImageResult(name, image_id, *id_map.shape, truths, results, int(confident.sum()),
                           picture, matches)  # fmt: skip

    def result(self) -> InstanceEvaluation:
        images = dist.unshard(dist.gather(self.images))
        for at, image in enumerate(images):
            image.image_id = at + 1 if image.image_id is None else image.image_id

        def score() -> dict:
            truth = (coco_ground_truth(images, self.category_ids) if self.reference is None
                     else reference_truth(self.reference.annotations))  # fmt: skip
            metrics = coco_metrics(truth, images, self.category_ids)
            if self.cityscapes is not None:
                metrics |= cityscapes_metrics([image.cityscapes for image in images])
            return metrics

        return InstanceEvaluation(
            metrics=dist.decided_by_main(score),
            image_names=[image.name for image in images],
            examples=[image.picture for image in images[: self.num_pictures]],
            per_image=[
                (image.name, len(image.truths), len(image.detections), image.confident)
                for image in images
            ],
        )


def official_matches(path: Path, masks: torch.Tensor, detections: dict) -> ImageMatches:
    """Binary ``masks`` (N, H, W) of ``detections`` matched with the instanceIds PNG ``path``."""
    instance_ids = read_id_map(Path(path)).astype(np.int64)
    if instance_ids.shape != tuple(masks.shape[1:]):
        raise ValueError(
            f"{path}: {instance_ids.shape[::-1]} (width, height), but the image was evaluated at "
            f"{tuple(masks.shape[1:])[::-1]}: Cityscapes' AP needs data.val_transform to keep "
            "the size"
        )
    return image_matches(instance_ids, masks.numpy(), detections["labels"].numpy(),
                         detections["scores"].numpy())  # fmt: skip


def quiet_coco(dataset: dict) -> COCO:
    """A pycocotools COCO object of a parsed annotation ``dataset`` (its progress unprinted)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_ground_truth(images: list[ImageResult], category_ids: Sequence[int]) -> COCO:
    """A pycocotools COCO object of ``images``' ground truth (annotation ids from 1)."""
    listed = [(image.image_id, image.height, image.width, image.name) for image in images]
    dataset = {
        "images": [
            {"id": i, "height": h, "width": w, "file_name": name} for i, h, w, name in listed
        ],
        "categories": [{"id": c} for c in category_ids[1:]],
        "annotations": [],
    }
    for image in images:
        for truth in image.truths:
            annotation_id = len(dataset["annotations"]) + 1
            dataset["annotations"].append(
                {"id": annotation_id, "image_id": image.image_id, **truth}
            )
    return quiet_coco(dataset)


def reference_truth(path: Path) -> COCO:
    """A COCO annotation file as COCOeval's ground truth: its areas, boxes, crowds, image and
    category ids as they are (an annotation without ``area`` or ``bbox``, which labelling
    tools may leave out, gets its segmentation's, as COCO defines them); annotation ids
    renumbered from 1, since COCOeval reads an id of 0 as "unmatched" (files that count from
    0 would score their first object as missed). Read afresh each time: COCOeval writes into
    the annotations it scores."""
    with open(path) as file:
        dataset = json.load(file)
    for number, annotation in enumerate(dataset.get("annotations", []), 1):
        annotation["id"] = number
    coco = quiet_coco(dataset)
    for annotation in dataset.get("annotations", []):
        if "area" not in annotation or "bbox" not in annotation:
            encoded = coco.annToRLE(annotation)
            annotation.setdefault("area", float(mask_utils.area(encoded)))
            annotation.setdefault("bbox", mask_utils.toBbox(encoded).tolist())
    return coco


def coco_results(images: list[ImageResult], kind: str) -> list[dict]:
    """COCO results of ``images``' detections for COCOeval's ``kind``: masks ("mask": RLE
    segmentations, their areas and boxes derived by loadRes from the masks) or boxes ("box"),
    as torchvision's references/detection prepare them, one list per IoU type."""
    drop = "bbox" if kind == "mask" else "segmentation"
    return [{"image_id": image.image_id, **{k: v for k, v in result.items() if k != drop}}
            for image in images for result in image.detections]  # fmt: skip


def coco_metrics(truth: COCO, images: list[ImageResult], category_ids: Sequence[int]) -> dict:
    """COCOeval's box and mask AP (0-1) of ``images``' detections against ``truth`` on those
    images, and per-class AP (class k: ``category_ids[k]``; NaN for a class without ground
    truth). No detections at all: AP 0 (pycocotools' loadRes refuses an empty list)."""
    image_ids = [image.image_id for image in images]
    categories = list(category_ids[1:])
    metrics = {}
    for kind, iou_type in IOU_TYPES.items():
        results = coco_results(images, kind)
        has_truth = [bool(truth.getAnnIds(imgIds=image_ids, catIds=[c], iscrowd=False))
                     for c in categories]  # fmt: skip
        if not results:
            metrics |= {f"{kind}_{stat}": 0.0 for stat in STAT_NAMES}
            metrics[f"{kind}_AP_class"] = [0.0 if seen else math.nan for seen in has_truth]
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(truth, truth.loadRes(results), iou_type)
            evaluation.params.imgIds = image_ids  # those evaluated (max_samples: the first N)
            evaluation.params.catIds = categories  # in class order, for the per-class AP
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        for stat, value in zip(STAT_NAMES, evaluation.stats, strict=False):
            metrics[f"{kind}_{stat}"] = float(value) if value >= 0 else math.nan
        # precision[T, R, K, A, M]: IoU thresholds, recall points, classes, area "all", 100 dets
        precision = evaluation.eval["precision"][:, :, :, 0, -1]
        per_class = []
        for k in range(len(categories)):
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
    if "cityscapes_AP" in metrics:
        lines.append(
            f"Cityscapes (official) AP {_percent(metrics['cityscapes_AP']).strip()}  "
            f"AP50 {_percent(metrics['cityscapes_AP50']).strip()}"
        )
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "     nan" if value != value else f"{100 * value:8.2f}"
