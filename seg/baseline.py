"""``python scripts/baseline.py method=otsu|kmeans data=<name> [split=val]``: classical baselines
scored as ``evaluate.py`` scores a model, to answer "what does learning buy here?".

- ``otsu``: each image is thresholded at its own Otsu threshold (on one band, or the mean of
  the bands; any bit depth: one histogram bin per integer value), pixels above and below it
  form two groups.
- ``kmeans``: the pixels' band values (standardized) are clustered into ``clusters`` groups by
  k-means (scipy), the centres fitted on pixels sampled from the training split.

Each group then takes the class most of its training pixels have (``ignore_index`` left
out): the threshold's polarity, the clusters' classes. Everything is fitted on the training
split alone and frozen before the evaluated split is read.
"""

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from scipy.cluster.vq import kmeans2
from torch import nn

from seg import restore
from seg.config import report_user_errors, run_command
from seg.data import loader
from seg.engine.evaluation import evaluate

log = logging.getLogger(__name__)

METHODS = ("otsu", "kmeans")


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of 1-D ``values``: the one that maximises the variance between the
    pixels at or below it and those above it. Integers get one histogram bin per value (16-bit
    data is not binned down to 8 bits), floats 1024 bins."""
    low, high = values.min(), values.max()
    if low == high:
        return float(low)
    if values.dtype.kind in "iub":
        counts = np.bincount((values.astype(np.int64) - int(low)).ravel()).astype(np.float64)
        levels = np.arange(int(low), int(high) + 1, dtype=np.float64)
    else:
        counts, edges = np.histogram(values, bins=1024, range=(float(low), float(high)))
        counts, levels = counts.astype(np.float64), (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)[:-1]  # pixels at or below each candidate threshold
    above = counts.sum() - below
    below_sum = np.cumsum(counts * levels)[:-1]
    mean_below = below_sum / below
    mean_above = ((counts * levels).sum() - below_sum) / np.maximum(above, 1)
    between = below * above * (mean_below - mean_above) ** 2
    return float(levels[int(np.argmax(np.where(below > 0, between, -1)))])


class Otsu:
    """Per-image Otsu thresholding of ``band`` (1-based; None: the mean of the bands); group 0
    is at or below the threshold, group 1 above."""

    groups = 2

    def __init__(self, band: int | None = None):
        self.band = band

    def fit(self, images: Iterable[np.ndarray]) -> None:
        """Nothing to fit: each image has its own threshold."""

    def assign(self, image: np.ndarray) -> np.ndarray:
        """(H, W) groups of an (H, W, C) image."""
        if self.band is not None and not 1 <= self.band <= image.shape[-1]:
            raise ValueError(f"band={self.band}: the images have bands 1..{image.shape[-1]}")
        values = image.mean(-1) if self.band is None else image[..., self.band - 1]
        return (values > otsu_threshold(values)).astype(np.int64)


class KMeans:
    """k-means on the pixels' standardized band values; up to ``pixels`` sampled per training
    image fit the centres (seeded: the same fit every time)."""

    def __init__(self, clusters: int, pixels: int = 5000, seed: int = 0):
        self.groups = clusters
        self.pixels = pixels
        self.seed = seed

    def fit(self, images: Iterable[np.ndarray]) -> None:
        rng = np.random.default_rng(self.seed)
        flats = (image.reshape(-1, image.shape[-1]).astype(np.float64) for image in images)
        sample = np.concatenate(
            [flat[rng.choice(len(flat), min(self.pixels, len(flat)), replace=False)]
             for flat in flats]
        )  # fmt: skip
        self.mean, self.std = sample.mean(0), np.maximum(sample.std(0), 1e-12)
        self.centres, _ = kmeans2((sample - self.mean) / self.std, self.groups, minit="++",
                                  seed=self.seed)  # fmt: skip

    def assign(self, image: np.ndarray) -> np.ndarray:
        """(H, W) nearest centres of an (H, W, C) image."""
        features = (image.reshape(-1, image.shape[-1]) - self.mean) / self.std
        # |x - c|^2 without its |x|^2, the same for every centre: (H * W, k), not (H * W, k, C)
        distances = (self.centres**2).sum(1) - 2 * features @ self.centres.T
        return distances.argmin(1).reshape(image.shape[:2])


def class_of_groups(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    groups: int,
    num_classes: int,
    ignore_index: int,
) -> np.ndarray:
    """(groups,) the class most training pixels of each group have, from (group map, mask)
    ``pairs`` (ignored pixels left out; a group no labelled pixel fell into gets the most
    frequent class overall)."""
    counts = np.zeros((groups, num_classes), np.int64)
    for group, mask in pairs:
        labelled = mask != ignore_index
        np.add.at(counts, (group[labelled], mask[labelled].astype(np.int64)), 1)
    classes = counts.argmax(1)
    classes[counts.sum(1) == 0] = counts.sum(0).argmax()
    return classes


class Baseline:
    """A fitted, frozen method: ``predict(images (N, C, H, W)) -> classes (N, H, W)``."""

    def __init__(self, method: Otsu | KMeans, classes: np.ndarray):
        self.method = method
        self.classes = classes

    def __call__(self, batch: tuple, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``engine.evaluation.evaluate``'s ``predict``: class indices and no non-finite score."""
        images = batch[0].numpy().transpose(0, 2, 3, 1)  # (N, H, W, C)
        labels = np.stack([self.classes[self.method.assign(image)] for image in images])
        return torch.from_numpy(labels), torch.zeros((), dtype=torch.int64)

    def describe(self) -> str:
        return (
            f"{type(self.method).__name__} baseline, classes of its groups {self.classes.tolist()}"
        )


def pairs(dataset) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A dataset's (H, W, C) images and (H, W) masks as numpy arrays, one at a time."""
    for index in range(len(dataset)):
        image, mask = dataset[index]
        yield image.numpy().transpose(1, 2, 0), mask.numpy()


def fit(cfg: DictConfig) -> Baseline:
    """The method of ``cfg.method`` fitted on the training split, with its groups' classes."""
    data = cfg.data
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r}; options: {list(METHODS)}")
    if cfg.method == "otsu":
        method = Otsu(cfg.band)
    else:
        method = KMeans(cfg.clusters or data.num_classes, cfg.fit_pixels, cfg.seed)
    train = restore.split_dataset(cfg, data.train_split)
    method.fit(image for image, _ in pairs(train))
    groups = ((method.assign(image), mask) for image, mask in pairs(train))
    classes = class_of_groups(groups, method.groups, data.num_classes, data.ignore_index)
    log.info("Fitted on split '%s' (%d images): the groups' classes %s", data.train_split,
             len(train), [data.class_names[c] for c in classes.tolist()])  # fmt: skip
    return Baseline(method, classes)


def main() -> None:
    """``python scripts/baseline.py``."""
    run_command("baseline", hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="baseline")
def hydra_main(cfg: DictConfig) -> None:
    report_user_errors(lambda: run(cfg), cfg)


def run(cfg: DictConfig) -> dict:
    """Fit on the training split, score ``cfg.split``: evaluate.py's table, report folder
    (per-image CSV, figures) and ``out=`` JSON; returns the metrics by class name."""
    baseline = fit(cfg)  # before the evaluated split is read: nothing of it can leak in
    task = restore.task_from(cfg)
    dataset = restore.split_dataset(cfg, cfg.split)
    data_loader = loader.val_loader(dataset, batch_size=1, num_workers=cfg.data.num_workers,
                                    collate_fn=task.collate)  # fmt: skip
    evaluator = task.evaluator(torch.device("cpu"), num_pictures=0, num_worst=cfg.num_worst)
    log.info("Scoring %s on split '%s' (%d images)", baseline.describe(), cfg.split, len(dataset))
    # No network: evaluate() only switches the (empty) model to eval mode and back.
    result = evaluate(nn.Module(), baseline, data_loader, evaluator, torch.device("cpu"))
    summary = task.summary(result, cfg.bootstrap)
    report_dir = Path(
        cfg.report_dir or Path(cfg.output_root) / f"baseline_{cfg.method}_{cfg.split}"
    )
    report = task.report(result, report_dir.name)
    log.info("\n%s", report.table)
    report_dir.mkdir(parents=True, exist_ok=True)
    task.write_report(result, report_dir, report)
    log.info("Per-image metrics and figures in %s", report_dir)
    if cfg.out is not None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"method": cfg.method, "fitted_on": cfg.data.train_split, "split": cfg.split,
                  **summary}  # fmt: skip
        out.write_text(json.dumps(record, indent=2) + "\n")
        log.info("Metrics written to %s", out)
    return summary
