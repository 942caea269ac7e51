"""``python scripts/check_data.py data=<name> data.root=<dir>``: the dataset doctor.

Scans every image/mask pair of the splits and reports what would break training or silently
skew it, with a diagnosis and the fix; training runs the same checks on a sample at start-up.
"""

import hashlib
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from hydra.utils import get_class
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from seg.config import build, report_user_errors, run_command
from seg.data.base import IMAGE_SUFFIXES, DataError, SegmentationDataset
from seg.data.cityscapes import LABEL_TO_TRAIN_ID, Cityscapes
from seg.data.instances import InstanceDataset
from seg.data.nifti import NiftiDataset, canonical_voxels, class_labels, open_pair, volume_pairs

log = logging.getLogger(__name__)

CITYSCAPES_LABEL_IDS = set(range(34))
CITYSCAPES_TRAIN_IDS = set(range(len(LABEL_TO_TRAIN_ID))) | {255}


@dataclass
class SampleReport:
    """What one image/mask pair tells: errors break training, warnings skew it."""

    file: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    size: str = ""
    image_hash: str = ""
    counts: np.ndarray | None = None  # pixels per class after mapping, ignored pixels last
    intensity: list[float] | None = None  # a volume's [min, 0.5th, 99.5th percentile, max]
    pixels: "BandStats | None" = None  # the image's values per band, nodata left out


@dataclass
class BandStats:
    """Per-band pixel statistics that merge across files (Chan et al.'s pairwise update of the
    mean and the sum of squared deviations, in float64): counts, means, squared deviations,
    minima and maxima, each (C,); and the dtypes seen with their file counts."""

    count: np.ndarray
    mean: np.ndarray
    deviations: np.ndarray
    low: np.ndarray
    high: np.ndarray
    dtypes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, image: np.ndarray, nodata: float | str | list[float] | None) -> "BandStats":
        """Statistics of an (H, W, C) image, leaving out each band's ``nodata`` value (one
        number, one per band, or "nan") and NaNs."""
        values = image.reshape(-1, image.shape[-1]).astype(np.float64)
        valid = ~np.isnan(values)
        if nodata is not None and nodata != "nan":
            valid &= values != np.broadcast_to(np.asarray(nodata, np.float64), values.shape[1:])
        count = valid.sum(0)
        total = np.where(valid, values, 0).sum(0)
        mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        deviations = np.where(valid, (values - mean) ** 2, 0).sum(0)
        low = np.where(valid, values, np.inf).min(0)
        high = np.where(valid, values, -np.inf).max(0)
        return cls(count, mean, deviations, low, high, {str(image.dtype): 1})

    def merge(self, other: "BandStats") -> "BandStats":
        if len(other.count) != len(self.count):  # the data checks report the band counts
            return self
        count = self.count + other.count
        delta = other.mean - self.mean
        share = np.divide(other.count, count, out=np.zeros_like(delta), where=count > 0)
        return BandStats(
            count,
            self.mean + delta * share,
            self.deviations + other.deviations + delta**2 * self.count * share,
            np.minimum(self.low, other.low),
            np.maximum(self.high, other.high),
            dict(Counter(self.dtypes) + Counter(other.dtypes)),
        )

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.divide(self.deviations, self.count, out=np.zeros_like(self.mean),
                                 where=self.count > 0))  # fmt: skip


def inspect(
    dataset: SegmentationDataset,
    index: int,
    statistics: bool = False,
    nodata: float | str | list[float] | None = None,
) -> SampleReport:
    """Check sample ``index`` as training would read it, and diagnose likely mistakes; with
    ``statistics`` its pixel statistics too, leaving out ``nodata`` (``data.nodata``)."""
    report = SampleReport(dataset.describe(index))
    try:
        image, raw = dataset.load(index)
    except DataError as error:
        report.errors.append(_without_file(str(error), report.file))
        return report
    report.size = f"{image.shape[1]}x{image.shape[0]}"
    if statistics:  # the doctor's scan; not the start-up check, which should stay quick
        report.pixels = BandStats.of(image if image.ndim == 3 else image[..., None], nodata)
    report.image_hash = hashlib.md5(np.ascontiguousarray(image).tobytes()).hexdigest()
    if image.shape[:2] != raw.shape:
        report.errors.append(
            f"image is {image.shape[1]}x{image.shape[0]} but mask is {raw.shape[1]}x{raw.shape[0]}"
        )
        return report
    if isinstance(dataset, InstanceDataset):
        return inspect_instances(dataset, index, raw, report)
    classes, ignore = dataset.num_classes, dataset.ignore_index
    raw_values = set(np.unique(raw).tolist())
    try:
        mask = dataset.map_labels(raw, index)
        dataset.check_labels(mask, index)
    except DataError as error:
        message = _without_file(str(error), report.file)
        unmapped = dataset.label_map is None
        stray = (raw >= classes) & (raw != ignore) if unmapped else np.zeros_like(raw, bool)
        # A few pixels (an annotation tool's stray value, a resampled edge) are no other label
        # scheme: 1% of a 2048x1024 mask is 21k pixels, any class of Cityscapes' covers more.
        if stray.any() and stray.mean() < 0.01:
            message += (
                f" They cover only {stray.sum()} pixels ({100 * stray.mean():.2g}% of the mask): "
                f"stray values; set those pixels to a class or to ignore_index={ignore}."
            )
        elif unmapped and raw_values <= CITYSCAPES_LABEL_IDS and max(raw_values) >= classes:
            message += (
                " These values look like Cityscapes labelIds (0-33): use data=cityscapes, which "
                "maps them to the 19 trainIds, or convert the masks to trainIds."
            )
        report.errors.append(message)
        return report
    valid = mask != ignore
    report.counts = np.bincount(np.where(valid, mask, classes).ravel(), minlength=classes + 1)
    if not valid.any():
        report.warnings.append("every pixel of the mask is ignore_index: nothing to learn here")
    if (
        isinstance(dataset, Cityscapes)
        and raw_values <= CITYSCAPES_TRAIN_IDS
        and valid.mean() < 0.5
    ):
        report.warnings.append(
            "after the labelId -> trainId mapping most pixels are ignored, and the stored values "
            f"{sorted(raw_values)[:8]}... are all trainIds: these look like *_labelTrainIds.png "
            "files where *_gtFine_labelIds.png are expected; point data.root at the labelIds"
        )
    return report


def inspect_instances(
    dataset: InstanceDataset, index: int, ids: np.ndarray, report: SampleReport
) -> SampleReport:
    """An instance sample's checks: the ID map against its [class, iscrowd] table. Its counts
    are pixels per class, crowd regions counted as ignored (they are not trained on)."""
    ids, table = dataset.instances(ids, index)
    table = table.numpy()
    classes = dataset.num_classes
    if ids.max(initial=0) > len(table) or ids.min(initial=0) < 0:
        report.errors.append(f"instance ids up to {ids.max()} but {len(table)} instances listed")
        return report
    if not len(table):
        report.warnings.append("no instances annotated (kept: an image of background only)")
    # id -> class, the background 0, crowds to the ignored count (last)
    lookup = np.concatenate([[0], np.where(table[:, 1] == 1, classes, table[:, 0])])
    report.counts = np.bincount(lookup[ids].ravel(), minlength=classes + 1)
    hidden = sorted(set(range(1, len(table) + 1)) - set(np.unique(ids).tolist()))
    if hidden:
        report.warnings.append(
            f"instances {hidden[:10]} (table rows from 1) cover no pixels: a degenerate shape, "
            "or hidden under the instances drawn over it"
        )
    return report


def inspect_volume(
    image_path: Path, label_path: Path, num_classes: int, ignore_index: int
) -> SampleReport:
    """Check an image/label volume pair (data=nifti): one grid and affine, label values among
    the classes, some foreground; and the image's intensity range, for choosing a window."""
    report = SampleReport(str(label_path))
    try:
        image, labels = open_pair(image_path, label_path)
        voxels = canonical_voxels(image, image_path, "image")
        classes = canonical_voxels(labels, label_path, "label")
        classes = class_labels(classes, label_path, num_classes, ignore_index)
    except DataError as error:
        report.errors.append(_without_file(str(error), report.file))
        return report
    report.size = "x".join(map(str, image.shape))
    report.image_hash = hashlib.md5(np.ascontiguousarray(voxels).tobytes()).hexdigest()
    valid = classes != ignore_index
    report.counts = np.bincount(np.where(valid, classes, num_classes).ravel(),
                                minlength=num_classes + 1)  # fmt: skip
    if not (classes[valid] > 0).any():
        report.warnings.append("no foreground: every labelled voxel is class 0 (background)")
    low, high = np.percentile(voxels, [0.5, 99.5])
    report.intensity = [float(voxels.min()), float(low), float(high), float(voxels.max())]
    return report


def _without_file(message: str, file: str) -> str:
    return message.removeprefix(f"{file}: ")


class _Inspect(Dataset):
    """Runs ``inspect`` in DataLoader workers, so that decoding is parallel."""

    def __init__(self, dataset: SegmentationDataset, indices: list[int], nodata):
        self.dataset = dataset
        self.indices = indices
        self.nodata = nodata

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> SampleReport:
        return inspect(self.dataset, self.indices[i], statistics=True, nodata=self.nodata)


def inspect_split(
    dataset: SegmentationDataset, indices: list[int], workers: int, nodata=None
) -> list[SampleReport]:
    loader = DataLoader(_Inspect(dataset, indices, nodata), batch_size=None, num_workers=workers)
    return list(loader)


@dataclass
class SplitSummary:
    split: str
    files: int = 0
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    class_pixels: dict[str, int] = field(default_factory=dict)
    ignore_ratio: float = float("nan")
    sizes: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    intensity: dict[str, list[float]] = field(default_factory=dict)  # volume -> its range
    pixels: BandStats | None = None
    file_pixels: dict[str, dict] = field(default_factory=dict)  # dtype and range per file


def summarize(split: str, reports: list[SampleReport], class_names: list[str]) -> SplitSummary:
    summary = SplitSummary(split, files=len(reports))
    counts = np.zeros(len(class_names) + 1, np.int64)
    for report in reports:
        if report.pixels is not None:
            stats = report.pixels
            summary.pixels = stats if summary.pixels is None else summary.pixels.merge(stats)
            summary.file_pixels[report.file] = {
                "dtype": next(iter(stats.dtypes)),
                "bands": len(stats.count),
                "min": _number(stats.low.min()),
                "max": _number(stats.high.max()),
            }
        summary.errors += [{"file": report.file, "message": m} for m in report.errors]
        summary.warnings += [{"file": report.file, "message": m} for m in report.warnings]
        if report.counts is not None:
            counts += report.counts
        if report.size:
            summary.sizes[report.size] = summary.sizes.get(report.size, 0) + 1
        if report.image_hash:
            summary.hashes.setdefault(report.image_hash, report.file)
        if report.intensity is not None:
            summary.intensity[report.file] = report.intensity
    summary.class_pixels = {name: int(c) for name, c in zip(class_names, counts[:-1], strict=True)}
    summary.ignore_ratio = float(counts[-1] / counts.sum()) if counts.sum() else float("nan")
    # Files with errors are not counted: a class may be in them alone.
    uncounted = sum(report.counts is None for report in reports)
    where = f" in the files without errors (the {uncounted} with errors are not counted)"
    for name, pixels in summary.class_pixels.items():
        if pixels == 0 and reports:
            message = f"class '{name}' never appears{where * bool(uncounted)}"
            summary.warnings.append({"file": split, "message": message})
    return summary


def _number(value: float) -> float | int | None:
    """A JSON-friendly statistic: integers as ints, no infinities (a band of nodata only)."""
    if not np.isfinite(value):
        return None
    return int(value) if float(value).is_integer() else float(value)


def pixel_statistics(stats: BandStats, scale: float | str) -> tuple[dict, list[str]]:
    """The per-band report of a split (raw values and, scaled by ``scale``, the mean and std
    ready to paste as ``data.mean``/``data.std``), and warnings about ``data.scale``."""
    dtypes = sorted(stats.dtypes)
    divisor = scale
    if scale == "auto":  # data.scale=auto's divisors; other dtypes need a number
        divisor = {"uint8": 255, "uint16": 65535}.get(dtypes[0]) if len(dtypes) == 1 else None
    report = {
        "dtypes": stats.dtypes,
        "min": [_number(v) for v in stats.low],
        "max": [_number(v) for v in stats.high],
        "mean": [float(v) for v in stats.mean],
        "std": [float(v) for v in stats.std],
        "scale": divisor,
    }
    warnings = []
    if divisor is None:
        warnings.append(
            f"pixels are {'/'.join(dtypes)}: data.scale=auto is defined for uint8 (255) and "
            "uint16 (65535) only; set data.scale to the data's range (e.g. 10000 for Sentinel-2 "
            "reflectance), then data.mean/data.std are printed scaled"
        )
        return report, warnings
    divisor = float(divisor)
    # four significant digits: 12-bit data under data.scale=65535 has means near 0.0005
    report["data.mean"] = [float(f"{v / divisor:.4g}") for v in stats.mean]
    report["data.std"] = [float(f"{v / divisor:.4g}") for v in stats.std]
    highest = np.max(stats.high)
    if highest > divisor:
        warnings.append(
            f"values up to {_number(highest)} exceed data.scale={scale} ({divisor:g}): inputs go "
            f"up to {highest / divisor:.2f} after scaling; set data.scale to the data's range "
            "(e.g. 10000 for Sentinel-2 reflectance)"
        )
    elif highest < divisor / 4:
        warnings.append(
            f"the largest value, {_number(highest)}, is under a quarter of data.scale={scale} "
            f"({divisor:g}): scaled inputs use [0, {highest / divisor:.3f}] only. 12-bit data "
            "in 16-bit files wants data.scale=4095, Sentinel-2 reflectance 10000; or keep the "
            "scale and paste the printed data.mean/data.std"
        )
    return report, warnings


def check_splits(data: DictConfig, splits: list[str], max_files: int | None = None) -> dict:
    """Inspect every pair of ``splits`` (or the first ``max_files``); the report as a dict."""
    summaries, errors = [], []
    nodata, scale = data.get("nodata"), data.get("scale", "auto")
    for split in splits:
        # Volumes are checked whole, pair by pair: one bad pair must not hide the others.
        volumes = issubclass(get_class(data.dataset._target_), NiftiDataset)
        try:
            dataset = volume_pairs(Path(data.dataset.root), split) if volumes else build(
                data.dataset, split=split)  # fmt: skip
        except (DataError, ValueError, FileNotFoundError) as error:
            errors.append({"file": f"{split} split", "message": str(error)})
            continue
        count = len(dataset) if max_files is None else min(len(dataset), max_files)
        log.info("Checking %d %s of split '%s'", count, "volumes" if volumes else "samples", split)
        if volumes:
            reports = [inspect_volume(*pair, data.num_classes, data.ignore_index)
                       for pair in dataset[:count]]  # fmt: skip
        else:
            reports = inspect_split(dataset, list(range(count)), data.num_workers, nodata)
        summaries.append(summarize(split, reports, list(data.class_names)))
    pixels = {}
    for summary in summaries:
        if summary.pixels is not None:
            pixels[summary.split], warnings = pixel_statistics(summary.pixels, scale)
            summary.warnings += [{"file": summary.split, "message": m} for m in warnings]
    for i, first in enumerate(summaries):  # the same image in two splits leaks the evaluation
        for second in summaries[i + 1 :]:
            for image_hash in first.hashes.keys() & second.hashes.keys():
                second.warnings.append({
                    "file": second.hashes[image_hash],
                    "message": f"identical image in split '{first.split}': {first.hashes[image_hash]}",
                })  # fmt: skip
    return {
        "errors": errors + [e | {"split": s.split} for s in summaries for e in s.errors],
        "warnings": [w | {"split": s.split} for s in summaries for w in s.warnings],
        "files": {s.split: s.files for s in summaries},
        "class_pixels": {s.split: s.class_pixels for s in summaries},
        "ignore_ratio": {
            s.split: None if s.ignore_ratio != s.ignore_ratio else s.ignore_ratio for s in summaries
        },
        "image_sizes": {s.split: dict(Counter(s.sizes).most_common()) for s in summaries},
        # volumes: [min, 0.5th, 99.5th percentile, max] of each image volume
        "intensity": {s.split: s.intensity for s in summaries if s.intensity},
        "pixels": pixels,  # per band: dtypes, min, max, mean, std; data.mean/std scaled
        "file_pixels": {s.split: s.file_pixels for s in summaries},
    }


def format_report(report: dict) -> str:
    lines = []
    for split, files in report["files"].items():
        sizes = ", ".join(
            f"{size} ({n})" for size, n in list(report["image_sizes"][split].items())[:3]
        )
        ratio = report["ignore_ratio"][split]
        ignored = "n/a" if ratio is None else f"{100 * ratio:.1f}%"
        lines.append(f"split {split}: {files} files, ignored pixels {ignored}, sizes {sizes}")
        ranges = np.array(list(report["intensity"].get(split, {}).values())).reshape(-1, 4)
        if len(ranges):  # what a window (data.dataset.window) would cut
            lines.append(
                f"  intensity: {ranges[:, 0].min():g} to {ranges[:, 3].max():g}; per volume, "
                f"0.5th percentile {ranges[:, 1].min():g} to {ranges[:, 1].max():g}, 99.5th "
                f"{ranges[:, 2].min():g} to {ranges[:, 2].max():g}"
            )
        pixels = report["class_pixels"][split]
        total = sum(pixels.values()) or 1
        width = max(map(len, pixels), default=5)
        for name, count in pixels.items():
            lines.append(f"  {name:<{width}} {count:>14,d} {100 * count / total:6.2f}%")
        lines += _format_pixels(report["pixels"].get(split))
    for kind in ("errors", "warnings"):
        entries = report[kind]
        lines.append(f"{len(entries)} {kind}")
        # One line per problem, not per file: 500 empty masks are one line with a count.
        files_by_message: dict[str, list[str]] = {}
        for entry in entries:
            file, message = entry["file"], entry["message"]
            named, _, rest = message.partition(": ")  # a message about a pair's image names it
            if rest and Path(named).suffix.lower() in IMAGE_SUFFIXES:
                file, message = named, rest
            files_by_message.setdefault(message, []).append(file)
        for message, files in list(files_by_message.items())[:50]:
            examples = ", ".join(files[:3]) + ", ..." * (len(files) > 3)
            lines.append(f"  {files[0]}: {message}" if len(files) == 1
                         else f"  {len(files)} files: {message} (e.g. {examples})")  # fmt: skip
        if len(files_by_message) > 50:
            lines.append(f"  ... and {len(files_by_message) - 50} more problems (see the JSON "
                         "report)")  # fmt: skip
    return "\n".join(lines)


def _format_pixels(pixels: dict | None) -> list[str]:
    """A split's band statistics as lines, ending with the keys to paste."""
    if pixels is None:
        return []
    dtypes = ", ".join(f"{dtype} ({n} files)" for dtype, n in pixels["dtypes"].items())
    lines = [f"  pixels: {dtypes}, {len(pixels['min'])} bands (nodata left out)"]
    columns = (pixels[key] for key in ("min", "max", "mean", "std"))
    for band, (low, high, mean, std) in enumerate(zip(*columns, strict=True), 1):
        lines.append(f"    band {band}: min {low} max {high} mean {mean:.6g} std {std:.6g}")
    if "data.mean" in pixels:
        lines.append(f"  scaled by {pixels['scale']:g}: data.mean={pixels['data.mean']} "
                     f"data.std={pixels['data.std']}")  # fmt: skip
    return lines


def quick_check(dataset: SegmentationDataset, samples: int = 8) -> None:
    """The doctor's per-file checks on a few samples spread over ``dataset``; raises a DataError
    naming every failing file, so that training stops here instead of deep inside a worker."""
    indices = sorted(
        set(np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).astype(int).tolist())
    )
    failures = [(r.file, m) for r in (inspect(dataset, i) for i in indices) for m in r.errors]
    if not failures:
        return
    listed = "\n".join(f"  {file}: {message}" for file, message in failures)
    found = (f"data check: {len(failures)} problems in {len(indices)} sampled files:\n{listed}\n"
             "python scripts/check_data.py data=<name> data.root=<dir> checks every file.")  # fmt: skip
    # Within data.skip_bad_samples the run skips such files as it meets them: report, go on.
    bad_share = len({file for file, _ in failures}) / len(indices)
    if bad_share <= dataset.skip_bad_samples:
        log.warning("%s\nTraining skips them (data.skip_bad_samples=%s)", found,
                    dataset.skip_bad_samples)  # fmt: skip
        return
    raise DataError(found)


def main() -> None:
    """``python scripts/check_data.py`` and ``seg-doctor``."""
    # `split=train,val` is what people type; Hydra would read it as a sweep.
    arguments = [
        f"split=[{a.split('=', 1)[1]}]" if a.startswith("split=") and "[" not in a else a
        for a in sys.argv[1:]
    ]
    run_command("check_data", hydra_main, arguments)


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="check_data")
def hydra_main(cfg: DictConfig) -> None:
    report = report_user_errors(lambda: run(cfg), cfg)
    sys.exit(1 if report["errors"] else 0)


def run(cfg: DictConfig) -> dict:
    splits = [cfg.split] if isinstance(cfg.split, str) else list(cfg.split)
    # A check of nothing would report "0 errors": refuse the arguments that select nothing.
    if not splits or not all(splits):
        raise ValueError(f"split={cfg.split} names no split: give split=train, split=val or "
                         "split=train,val")  # fmt: skip
    if cfg.max_files is not None and (isinstance(cfg.max_files, bool) or cfg.max_files < 1):
        raise ValueError(f"max_files={cfg.max_files} checks no file: give a number >= 1, or "
                         "null for all files")  # fmt: skip
    if cfg.out:  # before the scan, which may take long: a report that cannot be written fails now
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        if not os.access(Path(cfg.out).parent, os.W_OK):
            raise PermissionError(f"out={cfg.out}: cannot write in {Path(cfg.out).parent}")
    report = check_splits(cfg.data, splits, cfg.max_files)
    print(format_report(report))
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(report, indent=2) + "\n")
        log.info("Report written to %s", cfg.out)
    return report
