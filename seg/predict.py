"""``python predict.py checkpoint=<path> input=<file|dir|glob> output=<dir>``: label images
with a checkpoint alone (no run directory, no dataset)."""

import glob
import logging
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from seg import restore
from seg.config import report_user_errors, run_command
from seg.data.base import IMAGE_SUFFIXES, DataError, read_image
from seg.data.nifti import case_name, image_slices, slice_channels, write_label_volume
from seg.device import resolve_device
from seg.engine import dist
from seg.engine.task import PredictionWriter, PredictSettings
from seg.inference import progress
from seg.prediction import output_paths

log = logging.getLogger(__name__)

# predict.yaml's own keys: everything else on the command line edits the checkpoint's config.
OWN_KEYS = restore.own_keys("predict")


def main() -> None:
    """``python predict.py`` and ``seg-predict``: check the command line, then predict."""
    run_command("predict", hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://seg.configs", config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    report_user_errors(lambda: run(cfg, overrides), cfg)


def find_inputs(pattern: str) -> tuple[list[Path], Path]:
    """The image files named by ``pattern`` (a file, a directory searched recursively, or a
    glob) and the folder that output paths are made relative to."""
    path = Path(pattern)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES or case_name(p)
        )
        return files, path
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    base = Path(glob.escape(pattern).split("*")[0].split("?")[0] or ".")
    return files, base if base.is_dir() else base.parent


class ImageFiles(Dataset):
    """``(index, image, error)``: the decoded image as (C, H, W) at its stored dtype, ``bands``
    selected (the Predictor normalizes it on its device; overlays show it as ``display_rgb``
    does), or ``(index, None, error)`` for an unreadable file, or one without the model's
    ``in_channels``, instead of failing."""

    def __init__(
        self, files: list[Path], bands: list[int] | None = None, in_channels: int | None = None
    ):
        self.files = files
        self.bands, self.in_channels = bands, in_channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            image = read_image(self.files[index], self.bands)
        except DataError as error:
            return index, None, str(error)
        if self.in_channels is not None and image.shape[2] != self.in_channels:
            return (
                index,
                None,
                (
                    f"{self.files[index]}: {image.shape[2]} bands but the model takes "
                    f"{self.in_channels} (data.in_channels, data.bands={self.bands} of its training)"
                ),
            )
        return index, torch.from_numpy(image).permute(2, 0, 1), None


def same_size_batches(loader: DataLoader, batch_size: int) -> Iterator[list]:
    """Group consecutive readable images of equal size into batches; unreadable ones pass alone."""
    batch = []
    for item in loader:
        index, image, error = item[0]
        if error is not None:
            yield [item[0]]
            continue
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((index, image, None))
    if batch:
        yield batch


def requested_formats(value, task) -> list[str]:
    """``format=``'s list (``[index,color]``, ``index,color`` or one name); null: the task's
    default formats."""
    if value is None:
        return list(task.default_predict_formats)
    formats = [value] if isinstance(value, str) else list(value)
    formats = [f.strip() for name in formats for f in name.split(",")]
    unknown = sorted(set(formats) - set(task.predict_formats))
    if unknown:
        raise ValueError(
            f"format={unknown} unknown for a checkpoint of the {task.name} task; options: "
            f"{list(task.predict_formats)} (e.g. format=[{','.join(task.default_predict_formats)}])"
        )
    return formats


def run(cfg: DictConfig, overrides: list[str]) -> dict:
    """Write the requested formats for every input image; returns counts of written/skipped.

    The task's writer (``task.writer``) predicts and writes each batch. Under torchrun each
    process predicts its share of the images; all return the counts of the whole input, and
    rank 0 alone logs them."""
    if cfg.window < 16 or cfg.window % 16 or cfg.overlap < 0:
        raise ValueError(
            f"window={cfg.window}, overlap={cfg.overlap}: the window is a multiple of 16 (the "
            "TIFF tiles it is written as), the overlap >= 0"
        )
    checkpoint, train_cfg = restore.load(cfg, overrides, OWN_KEYS)
    task = restore.task_from(train_cfg)
    formats = requested_formats(cfg.format, task)
    files, base = find_inputs(str(cfg.input))
    if not files:
        raise FileNotFoundError(
            f"input={cfg.input}: no image files ({', '.join(IMAGE_SUFFIXES)}) nor volumes (.nii.gz)"
        )
    # NIfTI volumes are sliced as the checkpoint's data=nifti was and written back as volumes.
    volumes = [file for file in files if case_name(file)]
    files = [file for file in files if not case_name(file)]
    slicing = volume_slicing(train_cfg, cfg.checkpoint) if volumes else None
    relatives, renamed = output_paths(files, base)
    bands = OmegaConf.select(train_cfg.data, "bands")
    settings = PredictSettings(
        checkpoint=str(restore.checkpoint_path(cfg, checkpoint)),
        output=Path(cfg.output),
        formats=formats,
        inputs=files,
        base=base,
        relatives=relatives,
        alpha=cfg.alpha,
        score_threshold=cfg.score_threshold,
        mask_threshold=cfg.mask_threshold,
        # the dataset's own category ids (COCO's have gaps), kept in the checkpoint's config
        category_ids=OmegaConf.select(train_cfg, "data.category_ids", default=None),
        annotations=None if cfg.annotations is None else Path(cfg.annotations),
        window=cfg.window,
        overlap=cfg.overlap,
        bands=None if bands is None else list(bands),  # as trained: selected, checked
        in_channels=OmegaConf.select(train_cfg.data, "in_channels", default=3),
    )
    device = dist.init(resolve_device(train_cfg.trainer.device))  # this rank's, under torchrun
    try:
        predictor = restore.predictor_from(cfg, train_cfg, checkpoint, device)
        writer = task.writer(predictor, settings)  # refuses what it cannot write, before any
        if dist.is_main():
            log.info(
                "Predicting %d images from %s into %s (%s)%s",
                len(files), cfg.input, cfg.output, ", ".join(formats),
                f" and {len(volumes)} volumes into {Path(cfg.output) / 'volumes'}" if volumes else "",
            )  # fmt: skip
            if renamed:
                shown = ", ".join(map(str, renamed[:6])) + (" ..." if len(renamed) > 6 else "")
                log.warning(
                    "%d inputs differ only in their suffix (e.g. img.jpg and img.png): their "
                    "outputs keep it (img.jpg.png, img.png.png) so that none replaces another: %s",
                    len(renamed), shown,
                )  # fmt: skip
        share = predict_share(writer, files, cfg.batch_size, train_cfg.data.num_workers,
                              settings.bands, settings.in_channels)  # fmt: skip
        if volumes:
            share = (share[0] + predict_volumes(predictor, volumes, base, Path(cfg.output),
                                                slicing, cfg.batch_size), share[1])  # fmt: skip
        writer.finish()
        shares = dist.gather(share)
        written = sum(count for count, _ in shares)
        # (index, error) of every rank, in the inputs' order
        skipped = [error for _, error in sorted(item for _, errors in shares for item in errors)]
        if dist.is_main():
            log.info("Wrote predictions for %d images to %s", written, cfg.output)
            if skipped:
                log.warning(
                    "Skipped %d unreadable files:\n%s",
                    len(skipped), "\n".join(f"  {error}" for error in skipped),
                )  # fmt: skip
    finally:
        dist.shutdown()
    return {"written": written, "skipped": len(skipped)}


def volume_slicing(train_cfg: DictConfig, checkpoint: str) -> dict:
    """How the checkpoint's data=nifti sliced its volumes (``image_slices``' and the channels'
    settings); a ValueError for a checkpoint trained on images."""
    dataset = train_cfg.data.dataset
    if not str(dataset.get("_target_", "")).endswith("NiftiDataset"):
        raise ValueError(
            f"input holds NIfTI volumes but checkpoint {checkpoint} was trained on "
            f"{dataset.get('_target_')}: volumes need a checkpoint trained with data=nifti (its "
            "slicing axis, window and context), or pass images instead"
        )
    window = None if dataset.window is None else list(dataset.window)
    return {"axis": dataset.axis, "window": window, "percentiles": list(dataset.percentiles),
            "context": dataset.context}  # fmt: skip


def predict_volumes(
    predict, volumes: list[Path], base: Path, output: Path, slicing: dict, batch_size: int
) -> int:
    """This rank's share of ``volumes`` predicted slice by slice (``batch_size`` per pass) and
    written to ``<output>/volumes/<path under base>`` as label volumes in the input's
    orientation, affine and header; returns how many were written."""
    axis, context = slicing["axis"], slicing["context"]
    for path in (volumes[i] for i in dist.shard(range(len(volumes)))):
        image, stack = image_slices(path, axis, slicing["window"], slicing["percentiles"])
        labels = np.empty(stack.shape, np.int16)
        for start in range(0, len(stack), batch_size):
            depths = range(start, min(start + batch_size, len(stack)))
            batch = np.stack([slice_channels(stack, z, context) for z in depths])
            names = [f"{path} (slice {z})" for z in depths]
            predicted, _ = predict.labels(torch.from_numpy(batch).permute(0, 3, 1, 2), names)
            labels[start : depths.stop] = predicted.cpu().numpy()
        write_label_volume(labels, axis, image, output / "volumes" / path.relative_to(base))
    return len(dist.shard(range(len(volumes))))


def predict_share(
    writer: PredictionWriter,
    files: list[Path],
    batch_size: int,
    num_workers: int,
    bands: list[int] | None = None,
    in_channels: int | None = None,
) -> tuple[int, list[tuple[int, str]]]:
    """Predict this rank's share of ``files`` (all of them in one process) and write their
    outputs; returns how many were written and the (index, error) of those skipped."""
    dataset = ImageFiles(files, bands, in_channels)
    share = dist.shard(range(len(files)))
    windowed = writer.windowed(list(share))  # read by the writer, window by window
    loader = DataLoader(
        Subset(dataset, [i for i in share if i not in windowed]),  # items keep their file index
        batch_size=1,
        num_workers=num_workers,
        collate_fn=list,  # sizes may differ: batches are formed below
    )
    written, skipped = 0, []
    # One progress display, of all the files, fed by rank 0's share.
    bar = progress("predict", len(files), share=len(share)) if dist.is_main() else nullcontext()
    with bar:
        for index in windowed:
            try:
                writer.write_windowed(index)
                written += 1
            except DataError as error:
                skipped.append((index, str(error)))
            if dist.is_main():
                bar.update(1)
        for batch in same_size_batches(loader, batch_size):
            index, _, error = batch[0]
            if error is not None:
                skipped.append((index, error))  # listed once, at the end
            else:
                writer.write(torch.stack([item[1] for item in batch]), [item[0] for item in batch])
                written += len(batch)
            if dist.is_main():
                bar.update(len(batch))
    return written, skipped
