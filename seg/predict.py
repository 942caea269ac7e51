"""``python predict.py checkpoint=<path> input=<file|dir|glob> output=<dir>``: label images
with a checkpoint alone (no run directory, no dataset)."""

import glob
import logging
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from seg import restore
from seg.config import report_user_errors, run_command
from seg.data.base import IMAGE_SUFFIXES, DataError, read_image
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
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return files, path
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    base = Path(glob.escape(pattern).split("*")[0].split("?")[0] or ".")
    return files, base if base.is_dir() else base.parent


class ImageFiles(Dataset):
    """``(index, image, error)``: the decoded image as (3, H, W) uint8 RGB (the Predictor
    normalizes it on its device; overlays use it as it is), or ``(index, None, error)`` for an
    unreadable file instead of failing."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            image = read_image(self.files[index])
        except DataError as error:
            return index, None, str(error)
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
    checkpoint, train_cfg = restore.load(cfg, overrides, OWN_KEYS)
    task = restore.task_from(train_cfg)
    formats = requested_formats(cfg.format, task)
    files, base = find_inputs(str(cfg.input))
    if not files:
        raise FileNotFoundError(f"input={cfg.input}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    relatives, renamed = output_paths(files, base)
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
    )
    device = dist.init(resolve_device(train_cfg.trainer.device))  # this rank's, under torchrun
    try:
        predictor = restore.predictor_from(cfg, train_cfg, checkpoint, device)
        writer = task.writer(predictor, settings)  # refuses what it cannot write, before any
        if dist.is_main():
            log.info(
                "Predicting %d images from %s into %s (%s)",
                len(files), cfg.input, cfg.output, ", ".join(formats),
            )  # fmt: skip
            if renamed:
                shown = ", ".join(map(str, renamed[:6])) + (" ..." if len(renamed) > 6 else "")
                log.warning(
                    "%d inputs differ only in their suffix (e.g. img.jpg and img.png): their "
                    "outputs keep it (img.jpg.png, img.png.png) so that none replaces another: %s",
                    len(renamed), shown,
                )  # fmt: skip
        share = predict_share(writer, files, cfg.batch_size, train_cfg.data.num_workers)
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


def predict_share(
    writer: PredictionWriter, files: list[Path], batch_size: int, num_workers: int
) -> tuple[int, list[tuple[int, str]]]:
    """Predict this rank's share of ``files`` (all of them in one process) and write their
    outputs; returns how many were written and the (index, error) of those skipped."""
    dataset = ImageFiles(files)
    loader = DataLoader(
        Subset(dataset, dist.shard(range(len(files)))),  # items keep their index into files
        batch_size=1,
        num_workers=num_workers,
        collate_fn=list,  # sizes may differ: batches are formed below
    )
    written, skipped = 0, []
    # One progress display, rank 0's over its share: the ranks' would garble one another.
    bar = progress("predict", len(loader.dataset)) if dist.is_main() else nullcontext()
    with bar:
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
