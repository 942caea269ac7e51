"""The task contract: what a kind of segmentation brings to the one engine.

The engine (``seg.engine``: the Trainer's loop, validation, checkpoints, processes) knows no
task. A task object, built from ``configs/task/<name>.yaml``, owns its batch format, how a
batch becomes losses, how outputs are scored and shown. The loop uses it exactly so::

    batch = task.prepare(next(batches), device, memory_format)   # on the device
    losses = task.loss(model, batch, autocast)                    # {name: float32 scalar}
    sum(losses.values()).backward()                               # (scaled, accumulated)
    ...
    predict = task.predictor(model, device, precision, channels_last)
    evaluator = task.evaluator(device, num_pictures)
    for batch, names in split:                                    # engine.evaluation.evaluate
        evaluator.process(batch, predict(batch, names), names)
    result = evaluator.result()                                   # every rank, all ranks' data
    report = task.report(result, "val")                           # scalars, pictures, table
    report.score                                                  # task.metric, for best.pt

Members every task has (``Task``): ``name``, ``metric`` and ``mode`` (the primary metric and
whether higher (``max``) or lower is better: best.pt, early stopping and sweeps follow it),
``compile_auto`` (whether ``trainer.compile=auto`` compiles it), ``collate`` (the
DataLoader's), ``prepare``, ``loss``, ``predictor``, ``evaluator``, ``report`` and, for
``evaluate.py``, ``summary`` and ``write_report``. ``seg.tasks.semantic`` (a class per pixel) and
``seg.tasks.instance`` (a mask per object, Mask R-CNN) are the two tasks; docs/extending.md says
how to add one.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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

    def evaluator(self, device: torch.device, num_pictures: int = 0) -> Evaluator: ...

    def report(self, result: Any, prefix: str) -> Report: ...
