"""The task contract: what a kind of segmentation brings to the one engine.

The engine (``seg.engine``: the Trainer's loop, validation, checkpoints, processes) knows no
task. A task object, built from ``configs/task/<name>.yaml``, owns its batch format, how a
batch becomes losses, how outputs are scored and shown. The loop uses it exactly so::

    batch = task.prepare(next(batches), device, memory_format)   # on the device
    losses = task.loss(model, batch, autocast)                    # {name: float32 scalar}
    sum(losses.values()).backward()                               # (scaled, accumulated)
    ...
    predict = task.predictor(model, device, precision, channels_last)
    evaluator = task.evaluator(device, num_pictures, dataset=split)  # (its ground truth)
    for batch, names in split:                                    # engine.evaluation.evaluate
        evaluator.process(batch, predict(batch, names), names)
    result = evaluator.result()                                   # every rank, all ranks' data
    report = task.report(result, "val")                           # scalars, pictures, table
    report.score                                                  # task.metric, for best.pt

``predict.py`` hands each batch of input images to the task's writer, which predicts and
writes them in the task's own formats::

    writer = task.writer(predict, settings)                       # PredictSettings
    for images, indices in batches:                               # this rank's share
        writer.write(images, indices)                             # (N, 3, H, W) uint8
    writer.finish()                                               # every rank: whole-input files

Members every task has (``Task``): ``name``, ``metric`` and ``mode`` (the primary metric and
whether higher (``max``) or lower is better: best.pt, early stopping and sweeps follow it),
``compile_auto`` (whether ``trainer.compile=auto`` compiles it), ``collate`` (the
DataLoader's), ``prepare``, ``loss``, ``predictor``, ``evaluator``, ``report``, for
``evaluate.py`` ``summary`` and ``write_report``, and for ``predict.py`` ``predict_formats``,
``default_predict_formats`` and ``writer``. ``seg.tasks.semantic`` (a class per pixel) and
``seg.tasks.instance`` (a mask per object, Mask R-CNN) are the tasks that train;
``seg.tasks.panoptic`` merges their checkpoints' predictions (its ``predictor`` takes the parts'
predictors in place of a model, ``seg.restore.load_parts``); docs/extending.md says how to add one.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


@dataclass
class Report:
    """A validation or evaluation as the run shows it."""

    metric: str  # the task's primary metric (``Task.metric``): mIoU, mask_AP
    score: float  # its value, NaN when undefined
    record: dict[str, Any]  # one metrics.jsonl line (JSON values; per-class dicts by name)
    scalars: dict[str, float]  # tracker tags -> values: ``<prefix>/mIoU``, ...
    pictures: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (H, W, 3) uint8
    table: str = ""  # for the log


class Evaluator(Protocol):
    """Accumulates one pass over a split, on each rank its share."""

    def process(self, batch: Any, outputs: Any, names: list[str]) -> None: ...

    def result(self) -> Any:
        """The whole split's result, on every rank (a collective under torchrun)."""


@dataclass
class PredictSettings:
    """What ``predict.py`` asks of a task's writer: the inputs and where their outputs go."""

    checkpoint: str  # the checkpoint's path, for messages
    output: Path  # the output folder
    formats: list[str]  # among the task's ``predict_formats``
    inputs: list[Path]  # every input image, all ranks' (writers get indices into it)
    base: Path  # the folder the inputs' relative paths start from
    relatives: list[Path]  # each input's path (.png) under a format folder
    alpha: float = 0.5  # opacity of overlays' colours
    score_threshold: float = 0.5  # instances: those scored at least this are drawn and mapped
    mask_threshold: float | None = None  # instances: mask probability cut; None: the task's
    category_ids: list[int] | None = None  # class -> the dataset's category id (COCO's)
    annotations: Path | None = None  # a COCO annotation file: its image ids name the inputs
    window: int = 2048  # semantic: TIFF inputs larger than this are predicted window by window
    overlap: int = 64  # semantic: context pixels on each side of such a window
    bands: list[int] | None = None  # the 1-based input bands the model was trained on (None: all)
    in_channels: int | None = None  # the bands the model takes


class PredictionWriter(Protocol):
    """A task's ``predict.py`` outputs, written as the batches come."""

    def write(self, images: torch.Tensor, indices: list[int]) -> None:
        """Predict uint8 ``images`` (N, 3, H, W), the inputs at ``indices``, and write them."""

    def windowed(self, indices: list[int]) -> list[int]:
        """Those of the inputs at ``indices`` that the writer reads itself, window by window
        (rasters too large for one pass; ``write_windowed``), not through ``write``."""

    def write_windowed(self, index: int) -> None:
        """Read, predict and write the input at ``index``, one of ``windowed``'s, piece by
        piece; a DataError naming it when it cannot."""

    def finish(self) -> None:
        """After this rank's last batch, on every rank (a collective under torchrun): what
        the whole input makes (one results file, the warnings)."""


class Task(Protocol):
    name: str
    metric: str
    mode: str  # "max" or "min"
    compile_auto: bool

    def collate(self, samples: list) -> Any: ...

    def prepare(self, batch: Any, device: torch.device, memory_format: torch.memory_format): ...

    def loss(
        self, model: torch.nn.Module, batch: Any, autocast: Callable
    ) -> Mapping[str, torch.Tensor]: ...

    def predictor(
        self, model: torch.nn.Module, device: torch.device, precision: str, channels_last: bool
    ) -> Callable: ...

    def evaluator(
        self, device: torch.device, num_pictures: int = 0, dataset: Any = None
    ) -> Evaluator: ...

    def report(self, result: Any, prefix: str) -> Report: ...

    predict_formats: tuple[str, ...]  # what predict.py can write (format=...)
    default_predict_formats: tuple[str, ...]  # what it writes when format is not given

    def writer(self, predict: Callable, settings: PredictSettings) -> PredictionWriter: ...
