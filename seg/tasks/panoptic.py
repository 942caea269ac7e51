"""Panoptic segmentation: every pixel a class and, for things, an object id; scored by PQ
(``seg.panoptic``, the official PQ core's rules).

The task does not train: it merges the predictions of a semantic checkpoint (stuff and thing
classes) and an instance checkpoint (thing classes) as Panoptic FPN does (``seg.panoptic.merge``).
Its batch is the panoptic ground truth of ``seg.data.panoptic``: lists of images (3, H, W)
uint8, segment-ID maps (H, W) int16 (0 void) and tables (K, 2) of [class, iscrowd], classes
indexing ``class_names``. Its predictor is built from the two parts' predictors
(``seg.restore.predictor_from``), matched to ``class_names`` by name.
"""

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from seg.engine import dist
from seg.engine.task import PredictSettings, Report
from seg.panoptic import (
    Category,
    encode_ids,
    format_table,
    match_image,
    merge,
    pq_from_stats,
)
from seg.visualize import gallery, panoptic_picture, save_png

GROUPS = {"All": "", "Things": "_things", "Stuff": "_stuff"}  # pq_from_stats' -> metric suffix


class Part(NamedTuple):
    """One checkpoint's share of the panoptic prediction: its task's predictor and classes
    (``seg.restore`` passes plain tuples)."""

    predict: Callable  # the task's predictor (``Task.predictor``)
    class_names: list[str]  # its classes, in its own order


class PanopticTask:
    """Panoptic segmentation from a semantic and an instance checkpoint (``parts``).

    ``class_names`` are the panoptic classes (the data's), ``thing_classes`` the indices of the
    things among them. The merge keeps detections scored at least ``score_threshold`` (their
    masks: the pasted probabilities above ``mask_threshold``), drops one when more than
    ``overlap_threshold`` of it lies under higher-scoring ones, and drops a stuff region
    smaller than ``min_stuff_area`` (below 1: a fraction of the image's pixels; else pixels).
    """

    name = "panoptic"
    metric = "PQ"
    mode = "max"
    compile_auto = False
    # predict.py: panoptic (COCO panoptic PNGs + panoptic.json), overlay (the picture)
    predict_formats = ("panoptic", "overlay")
    default_predict_formats = ("panoptic", "overlay")

    def __init__(
        self,
        class_names: Sequence[str],
        thing_classes: Sequence[int],
        palette: Sequence[Sequence[int]],
        parts: Sequence[str] = ("semantic", "instance"),
        score_threshold: float = 0.5,
        overlap_threshold: float = 0.5,
        min_stuff_area: float = 0.002,
        mask_threshold: float = 0.5,
    ):
        if tuple(parts) != ("semantic", "instance"):
            raise ValueError(
                f"task.parts={list(parts)}: panoptic is merged from [semantic, instance]"
            )
        wrong = [c for c in thing_classes if not 0 <= c < len(class_names)]
        if wrong:
            raise ValueError(f"data.thing_classes {wrong}: not indices of data.class_names "
                             f"({len(class_names)} classes)")  # fmt: skip
        if min_stuff_area < 0:
            raise ValueError(f"task.min_stuff_area={min_stuff_area}: give a fraction of the "
                             "image (below 1) or pixels (1 or more), not a negative number")  # fmt: skip
        self.class_names = list(class_names)
        self.isthing = np.zeros(len(class_names), bool)
        self.isthing[list(thing_classes)] = True
        self.categories = [Category(i, name, bool(self.isthing[i]))
                           for i, name in enumerate(self.class_names)]  # fmt: skip
        self.palette = [list(color) for color in palette]
        self.parts = list(parts)
        self.score_threshold = score_threshold
        self.overlap_threshold = overlap_threshold
        self.min_stuff_area = min_stuff_area
        self.mask_threshold = mask_threshold

    def to(self, device: torch.device) -> "PanopticTask":
        return self

    def collate(self, samples: list) -> tuple[list, list, list]:
        """Lists, as the instance task's: images may differ in size and tables in length."""
        images, ids, tables = zip(*samples, strict=True)
        return list(images), list(ids), list(tables)

    def prepare(self, batch, device, memory_format):
        raise ValueError(
            "task=panoptic does not train: train task=semantic and task=instance (on the same "
            "data, e.g. data=synthetic_panoptic_semantic and data=synthetic_panoptic_instances), "
            "then evaluate.py task=panoptic semantic=<ckpt> instance=<ckpt> (docs/panoptic.md)"
        )

    loss = prepare

    def lookup(self, part: str, names: Sequence[str], expected: Sequence[str]) -> np.ndarray:
        """The panoptic class index of each of a part's classes, matched by name; a mismatch is
        a ValueError naming the names on either side alone."""
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        if missing or extra:
            raise ValueError(
                f"the {part} checkpoint's classes do not match the data's by name: "
                f"{f'missing {missing}' if missing else ''}"
                f"{'; ' if missing and extra else ''}{f'unknown {extra}' if extra else ''}. "
                f"It must have {sorted(expected)}: train it on this data's "
                f"{'classes' if part == 'semantic' else 'thing classes'}"
            )
        return np.array([self.class_names.index(name) for name in names], np.int64)

    def predictor(
        self,
        parts: Mapping[str, Part],
        device: torch.device,
        precision: str,
        channels_last: bool,
        inference: Mapping | None = None,
    ) -> "PanopticPredict":
        """The merge over the parts' predictors (built by ``seg.restore.predictor_from``, which
        applies ``inference`` to the semantic one); their classes matched by name."""
        (semantic, semantic_names), (instance, instance_names) = (
            parts["semantic"],
            parts["instance"],
        )
        things = [name for name, thing in zip(self.class_names, self.isthing, strict=True) if thing]
        semantic_lookup = self.lookup("semantic", semantic_names, self.class_names)
        # the instance classes from 1: 0 is its background
        instance_lookup = self.lookup("instance", instance_names[1:], things)
        return PanopticPredict(self, semantic, instance, semantic_lookup,
                               np.concatenate([[-1], instance_lookup]))  # fmt: skip

    def writer(self, predict: "PanopticPredict", settings: PredictSettings) -> "PanopticWriter":
        """predict.py's outputs (``settings.formats``: panoptic, overlay)."""
        return PanopticWriter(predict, settings, self)

    def evaluator(
        self,
        device: torch.device,
        num_pictures: int = 0,
        num_worst: int | None = None,
        dataset: object = None,
    ) -> "PanopticEvaluator":
        """PQ over the split, the first ``num_pictures`` images shown (evaluate.py's
        ``num_worst`` when given: it shows the first images, not the worst). ``dataset``: not
        needed, each batch carries its panoptic ground truth."""
        return PanopticEvaluator(self.categories, num_pictures if num_worst is None else num_worst)

    def metrics(self, result: "PanopticEvaluation") -> dict:
        """PQ, SQ, RQ (All), ``_things`` and ``_stuff`` and per-class lists, in [0, 1]."""
        pq = result.pq
        metrics = {f"{k.upper()}{suffix}": pq[group][k]
                   for group, suffix in GROUPS.items() for k in ("pq", "sq", "rq")}  # fmt: skip
        for k in ("pq", "sq", "rq"):
            metrics[f"{k.upper()}_class"] = [pq["per_class"][c.id][k] for c in self.categories]
        return metrics

    def report(self, result: "PanopticEvaluation", prefix: str) -> Report:
        metrics = self.metrics(result)
        scalars = {f"{prefix}/{k}": v for k, v in metrics.items() if not isinstance(v, list)}
        for k in ("PQ", "SQ", "RQ"):
            for name, value in zip(self.class_names, metrics[f"{k}_class"], strict=True):
                scalars[f"{prefix}_class/{k}/{name}"] = value
        pictures = {}
        for i, (image, truth, prediction) in enumerate(result.examples):
            panels = [image, panoptic_picture(image, *truth, self.palette, self.isthing),
                      panoptic_picture(image, *prediction, self.palette, self.isthing)]  # fmt: skip
            pictures[f"example_{i}"] = torch.cat(panels, 2).permute(1, 2, 0).numpy()
        if result.examples:
            pictures["examples"] = gallery(
                [torch.from_numpy(picture).permute(2, 0, 1) for picture in pictures.values()]
            )
        return Report(metric=self.metric, score=metrics[self.metric], record=self.summary(result),
                      scalars=scalars, pictures=pictures,
                      table=format_table(result.pq, self.categories))  # fmt: skip

    def summary(self, result: "PanopticEvaluation", bootstrap: int = 0) -> dict:
        """The metrics by name, per class by class name (NaN -> None: valid JSON), PQ first;
        ``bootstrap``: unused (a semantic evaluate.py option)."""
        summary = {}
        for key, value in self.metrics(result).items():
            if isinstance(value, list):
                summary[key] = {n: _json(v) for n, v in zip(self.class_names, value, strict=True)}
            else:
                summary[key] = _json(value)
        summary["images"] = len(result.images)
        return summary

    def write_report(self, result: "PanopticEvaluation", report_dir: Path, report: Report) -> None:
        """evaluate.py's report folder: per_image.csv, the ground truth and the predictions in
        the COCO panoptic format (``panoptic_{gt,pred}.json`` and ``panoptic_{gt,pred}/``: PQ
        of these files, by ``python -m seg.panoptic`` or the official code, is this report's)
        and the pictures."""
        with open(report_dir / "per_image.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["image", "file_name", "PQ", "segments", "predicted_segments"])
            for at, image in enumerate(result.images):
                pq = pq_from_stats(image.stats, self.categories)["All"]["pq"]
                writer.writerow([image.name, file_name(at), _cell(pq), len(image.truth[1]),
                                 len(image.prediction[1])])  # fmt: skip
        categories = [{"id": c.id, "name": c.name, "isthing": int(c.isthing)}
                      for c in self.categories]  # fmt: skip
        for kind, which in (("gt", 0), ("pred", 1)):
            folder = report_dir / f"panoptic_{kind}"
            folder.mkdir(exist_ok=True)
            annotations = []
            for at, image in enumerate(result.images):
                png, segments = (image.truth, image.prediction)[which]
                (folder / file_name(at)).write_bytes(png)
                annotations.append({"image_id": at, "file_name": file_name(at),
                                    "segments_info": segments})  # fmt: skip
            images = [{"id": at, "file_name": file_name(at), "name": image.name}
                      for at, image in enumerate(result.images)]  # fmt: skip
            coco = {"images": images, "annotations": annotations, "categories": categories}
            (report_dir / f"panoptic_{kind}.json").write_text(json.dumps(coco))
        for name, array in report.pictures.items():
            save_png(array, report_dir / f"{name}.png")


def file_name(at: int) -> str:
    return f"{at:06d}.png"


def _json(value: float) -> float | None:
    return None if value != value else value


def _cell(value: float) -> str:
    return "" if value != value else f"{value:.6f}"


class PanopticPredict:
    """``(batch, names) -> [(ids (H, W) int32, segments_info)]`` for
    ``engine.evaluation.evaluate``: each image through both parts, then ``merge``."""

    def __init__(self, task: PanopticTask, semantic: Callable, instance: Callable,
                 semantic_lookup: np.ndarray, instance_lookup: np.ndarray):  # fmt: skip
        self.task, self.semantic, self.instance = task, semantic, instance
        self.semantic_lookup, self.instance_lookup = semantic_lookup, instance_lookup
        self.model = nn.ModuleDict({"semantic": semantic.model, "instance": instance.model})
        self.precision = semantic.precision

    def describe(self) -> str:
        return f"semantic: {self.semantic.describe()}; instance: {self.instance.describe()}"

    @torch.inference_mode()  # predict.py calls it outside evaluate()'s inference mode
    def __call__(self, batch: tuple, names: list[str]) -> list[tuple[np.ndarray, list[dict]]]:
        outputs = []
        for image, name in zip(batch[0], names, strict=True):
            labels, _ = self.semantic.labels(image[None], [name])
            (detections,) = self.instance(([image],), [name])
            outputs.append(self.merge(labels[0].cpu().numpy(), detections))
        return outputs

    def merge(self, labels: np.ndarray, detections: dict) -> tuple[np.ndarray, list[dict]]:
        """One image's semantic class indices (H, W) and detections -> its panoptic prediction."""
        task = self.task
        area = task.min_stuff_area
        min_area = area * labels.size if area < 1 else area
        return merge(
            self.semantic_lookup[labels],
            (detections["masks"][:, 0] > task.mask_threshold).numpy(),
            self.instance_lookup[detections["labels"].numpy()],
            detections["scores"].numpy(),
            task.isthing, task.score_threshold, task.overlap_threshold, int(np.ceil(min_area)),
        )  # fmt: skip


class PanopticWriter:
    """``output/panoptic/<input>.png``: COCO panoptic PNGs (id = R + 256 G + 256^2 B), with
    ``output/panoptic.json`` (written once, by rank 0: ``annotations`` with each PNG's
    ``segments_info``, ``categories`` with ``isthing``; ``image_id`` is the input's path under
    the input folder without its suffix, category ids the data's ``category_ids`` where it has
    them, else the class indices); ``output/overlay/<input>.png``: each segment in its own
    colour over the image, things outlined."""

    def __init__(self, predict: PanopticPredict, settings: PredictSettings, task: PanopticTask):
        self.predict, self.settings, self.task = predict, settings, task
        self.category_ids = list(settings.category_ids or range(len(task.class_names)))
        if len(self.category_ids) != len(task.class_names):
            raise ValueError(f"data.category_ids has {len(self.category_ids)} entries for "
                             f"{len(task.class_names)} classes")  # fmt: skip
        self.annotations: list[tuple[int, dict]] = []

    def write(self, images: torch.Tensor, indices: list[int]) -> None:
        settings = self.settings
        names = [str(settings.inputs[index]) for index in indices]
        for index, image, (ids, segments) in zip(
            indices, images, self.predict((images,), names), strict=True
        ):
            relative = settings.relatives[index]
            if "panoptic" in settings.formats:
                path = settings.output / "panoptic" / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(encode_ids(ids))
                info = [{"id": s["id"], "category_id": self.category_ids[s["category_id"]],
                         "score": s["score"]} for s in segments]  # fmt: skip
                self.annotations.append((index, {"image_id": str(relative.with_suffix("")),
                                                 "file_name": str(relative),
                                                 "segments_info": info}))  # fmt: skip
            if "overlay" in settings.formats:
                picture = panoptic_picture(image, ids, segments, self.task.palette,
                                           self.task.isthing, settings.alpha)  # fmt: skip
                save_png(picture.permute(1, 2, 0).numpy(), settings.output / "overlay" / relative)

    def windowed(self, indices: list[int]) -> list[int]:
        return []  # every image whole: the instance part's detections are not cut at edges

    def finish(self) -> None:
        """``panoptic.json``, on rank 0, the annotations of every rank in the inputs' order."""
        shares = dist.gather(self.annotations)
        if "panoptic" not in self.settings.formats or not dist.is_main():
            return
        annotations = [annotation for _, annotation in sorted(
            (item for share in shares for item in share), key=lambda item: item[0])]  # fmt: skip
        categories = [{"id": self.category_ids[c.id], "name": c.name, "isthing": int(c.isthing)}
                      for c in self.task.categories]  # fmt: skip
        path = self.settings.output / "panoptic.json"
        path.write_text(json.dumps({"annotations": annotations, "categories": categories}))


@dataclass
class ImageResult:
    """One image's matching and files, as the ranks exchange them."""

    name: str
    stats: np.ndarray  # (C, 4) tp, fp, fn, iou: seg.panoptic.match_image
    truth: tuple[bytes, list[dict]]  # the COCO panoptic PNG and its segments_info
    prediction: tuple[bytes, list[dict]]
    picture: tuple | None = None  # (image, (ids, segments), (ids, segments)) for the examples


@dataclass
class PanopticEvaluation:
    pq: dict  # pq_from_stats' result: All, Things, Stuff, per_class
    stats: np.ndarray  # (C, 4), summed over the split
    images: list[ImageResult]
    examples: list[tuple] = field(default_factory=list)


class PanopticEvaluator:
    """PQ of a split: each rank matches its images as they come (``match_image``: a (C, 4)
    array each), ``result`` gathers them in split order and sums them, and every rank scores
    the sum once (``pq_from_stats``): N processes give exactly what one does."""

    def __init__(self, categories: list[Category], num_pictures: int):
        self.categories = categories
        self.num_pictures = num_pictures
        self.images: list[ImageResult] = []

    def process(self, batch: tuple, outputs: list, names: list[str]) -> None:
        images, ids, tables = batch
        for image, id_map, table, (pred_ids, pred_segments), name in zip(
            images, ids, tables, outputs, names, strict=True
        ):
            id_map, table = id_map.cpu().numpy().astype(np.int32), table.cpu().numpy()
            numbers, areas = np.unique(id_map, return_counts=True)
            area = dict(zip(numbers.tolist(), areas.tolist(), strict=True))
            # the COCO panoptic ground truth's entries (the official code reads "area")
            segments = [{"id": k + 1, "category_id": int(c), "iscrowd": int(crowd),
                         "area": area[k + 1]}
                        for k, (c, crowd) in enumerate(table) if k + 1 in area]  # fmt: skip
            predicted = [{"id": s["id"], "category_id": s["category_id"]} for s in pred_segments]
            stats = match_image(id_map, segments, pred_ids, predicted, self.categories, name)
            picture = None
            if len(self.images) < self.num_pictures:
                picture = (image.cpu().clone(), (id_map, segments), (pred_ids, pred_segments))
            self.images.append(ImageResult(name, stats, (encode_ids(id_map), segments),
                                           (encode_ids(pred_ids), pred_segments), picture))  # fmt: skip

    def result(self) -> PanopticEvaluation:
        images = dist.unshard(dist.gather(self.images))
        stats = sum((image.stats for image in images), np.zeros((len(self.categories), 4)))
        return PanopticEvaluation(
            pq=pq_from_stats(stats, self.categories),
            stats=stats,
            images=images,
            examples=[image.picture for image in images[: self.num_pictures]],
        )
