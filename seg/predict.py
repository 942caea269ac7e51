"""``python predict.py checkpoint=<path> input=<file|dir|glob> output=<dir>``: label images
with a checkpoint alone (no run directory, no dataset)."""

import glob
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from seg import restore
from seg.config import report_user_errors, run_command
from seg.data.base import IMAGE_SUFFIXES, DataError, read_image, select_bands
from seg.data.cityscapes import LABEL_TO_TRAIN_ID
from seg.data.geotiff import GeoRaster, Tag, write_geotiff, write_tiled
from seg.device import resolve_device
from seg.engine import dist
from seg.inference import (
    Predictor,
    memory_advice,
    progress,
    warn_nonfinite,
)
from seg.visualize import colorize, display_rgb, overlay

log = logging.getLogger(__name__)

# trainId (0-18) -> labelId, the inverse of the mapping the Cityscapes dataset applies
TRAIN_ID_TO_LABEL_ID = np.zeros(len(LABEL_TO_TRAIN_ID), np.uint8)
for _label_id, _train_id in LABEL_TO_TRAIN_ID.items():
    TRAIN_ID_TO_LABEL_ID[_train_id] = _label_id

FORMATS = ("index", "color", "overlay", "cityscapes")
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


def output_paths(files: list[Path], base: Path) -> tuple[list[Path], list[Path]]:
    """Each input's output path inside a format folder: its path under ``base`` with the suffix
    .png. Inputs that would share one (``img.jpg`` and ``img.png``) keep their own suffix
    (``img.jpg.png``, ``img.png.png``), so that no output replaces another. Returns the paths
    and the inputs so renamed."""
    plain = [file.relative_to(base).with_suffix(".png") for file in files]
    uses = Counter(plain)
    paths, renamed = [], []
    for file, path in zip(files, plain, strict=True):
        if uses[path] > 1:
            path = path.with_name(file.name + ".png")
            renamed.append(file)
        paths.append(path)
    refuse_clashes(files, paths, "")
    return paths, renamed


def refuse_clashes(files: list[Path], paths: list[Path], why: str) -> None:
    """Refuse inputs whose output ``paths`` are one file, naming them (``why``: which format)."""
    inputs: dict[Path, list[str]] = {}
    for file, path in zip(files, paths, strict=True):
        inputs.setdefault(path, []).append(str(file))
    clashes = [
        f"{' and '.join(names)} -> {path}" for path, names in inputs.items() if len(names) > 1
    ]
    if clashes:
        more = f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
        raise ValueError(
            f"inputs written to the same output file{why}: {'; '.join(clashes[:5])}{more}; "
            "rename them or predict them in separate runs"
        )


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


def run(cfg: DictConfig, overrides: list[str]) -> dict:
    """Write the requested formats for every input image; returns counts of written/skipped.

    Under torchrun each process predicts its share of the images; all return the counts of
    the whole input, and rank 0 alone logs them."""
    formats = [cfg.format] if isinstance(cfg.format, str) else list(cfg.format)
    formats = [f.strip() for name in formats for f in name.split(",")]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(
            f"format={unknown} unknown; options: {list(FORMATS)} (e.g. format=[index,color])"
        )
    if cfg.window < 16 or cfg.window % 16 or cfg.overlap < 0:
        raise ValueError(
            f"window={cfg.window}, overlap={cfg.overlap}: the window is a multiple of 16 (the "
            "TIFF tiles it is written as), the overlap >= 0"
        )
    files, base = find_inputs(str(cfg.input))
    if not files:
        raise FileNotFoundError(f"input={cfg.input}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    checkpoint, train_cfg = restore.load(cfg, overrides, OWN_KEYS)
    task = restore.task_from(train_cfg)
    if not set(formats) <= set(task.predict_formats):
        writes = list(task.predict_formats) or "nothing yet (evaluate.py scores such checkpoints)"
        raise ValueError(
            f"format={formats}: predict.py writes {writes} for a checkpoint of the "
            f"{task.name} task ({cfg.checkpoint})"
        )
    if "cityscapes" in formats and len(checkpoint["class_names"]) != len(LABEL_TO_TRAIN_ID):
        raise ValueError(
            f"format=cityscapes writes the 19 Cityscapes classes as labelIds, but checkpoint "
            f"{cfg.checkpoint} has {len(checkpoint['class_names'])} classes"
        )
    relatives, renamed = output_paths(files, base)
    if "cityscapes" in formats:  # one flat folder: names from different folders may meet
        refuse_clashes(files, [Path(path.name) for path in relatives], " by format=cityscapes")
    device = dist.init(resolve_device(train_cfg.trainer.device))  # this rank's, under torchrun
    try:
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
        predictor = restore.predictor_from(cfg, train_cfg, checkpoint, device)
        share = predict_share(cfg, predictor, files, relatives, formats, checkpoint, train_cfg)
        shares = dist.gather(share)
        written = sum(count for count, _, _ in shares)
        # (index, error) of every rank, in the inputs' order
        skipped = [error for _, error in sorted(item for _, errors, _ in shares for item in errors)]
        if dist.is_main():
            log.info("Wrote predictions for %d images to %s", written, cfg.output)
            warn_nonfinite(sum(count for _, _, count in shares), written)
            if skipped:
                log.warning(
                    "Skipped %d unreadable files:\n%s",
                    len(skipped), "\n".join(f"  {error}" for error in skipped),
                )  # fmt: skip
    finally:
        dist.shutdown()
    return {"written": written, "skipped": len(skipped)}


def predict_share(
    cfg: DictConfig,
    predictor: Predictor,
    files: list[Path],
    relatives: list[Path],
    formats: list[str],
    checkpoint: dict,
    train_cfg: DictConfig,
) -> tuple[int, list[tuple[int, str]], int]:
    """Predict this rank's share of ``files`` (all of them in one process) and write their
    outputs; returns how many were written, the (index, error) of those skipped and how many
    had non-finite class scores."""
    predictor.advice = memory_advice(predictor.predictor, "batch_size")
    nonfinite_count = 0
    palette = checkpoint["palette"]
    output = Path(cfg.output)
    data = train_cfg.data
    bands = OmegaConf.select(data, "bands")
    dataset = ImageFiles(files, list(bands) if bands is not None else None,
                         OmegaConf.select(data, "in_channels", default=3))  # fmt: skip
    rgb_bands = OmegaConf.select(data, "rgb_bands")  # 1-based input bands for overlays
    share = dist.shard(range(len(files)))
    # TIFF inputs: their georeferencing goes to the index and colour outputs (GeoTIFFs); those
    # larger than cfg.window are predicted window by window, never read whole.
    rasters = tiff_headers(files, share)
    large = {i for i, raster in rasters.items() if max(raster.height, raster.width) > cfg.window}
    loader = DataLoader(
        Subset(dataset, [i for i in share if i not in large]),  # items keep their file index
        batch_size=1,
        num_workers=train_cfg.data.num_workers,
        collate_fn=list,  # sizes may differ: batches are formed below
    )
    written, skipped = 0, []
    # One progress display, rank 0's over its share: the ranks' would garble one another.
    bar = progress("predict", len(loader.dataset) + len(large)) if dist.is_main() else nullcontext()
    with bar:
        for index in sorted(large):
            try:
                nonfinite_count += predict_raster(
                    predictor, rasters[index], dataset.bands, dataset.in_channels, cfg.window,
                    cfg.overlap, formats, output, relatives[index], palette,
                )  # fmt: skip
                written += 1
            except DataError as error:
                skipped.append((index, str(error)))
            if dist.is_main():
                bar.update(1)
        for batch in same_size_batches(loader, cfg.batch_size):
            index, _, error = batch[0]
            if error is not None:
                skipped.append((index, error))  # listed once, at the end
            else:
                images = torch.stack([item[1] for item in batch])  # (N, C, H, W), stored dtype
                names = [str(files[item[0]]) for item in batch]
                labels, nonfinite = predictor.labels(images, names)
                labels, nonfinite_count = labels.cpu(), nonfinite_count + nonfinite
                for (index, image, _), label in zip(batch, labels, strict=True):
                    picture = display_rgb(image, rgb_bands) if "overlay" in formats else None
                    tags = rasters[index].tags if index in rasters else []
                    write_outputs(label, picture, formats, output, relatives[index], palette,
                                  cfg.alpha, tags)  # fmt: skip
                    written += 1
            if dist.is_main():
                bar.update(len(batch))
    return written, skipped, int(nonfinite_count)


def tiff_headers(files: list[Path], indices: Iterable[int]) -> dict[int, GeoRaster]:
    """The TIFF inputs among ``files[indices]`` opened for windowed reading (their headers
    alone); one tifffile cannot read as a raster is left to the reader, which names why."""
    rasters = {}
    for index in indices:
        if files[index].suffix.lower() in (".tif", ".tiff"):
            try:
                rasters[index] = GeoRaster(files[index])
            except DataError:
                continue
    return rasters


def predict_raster(
    predictor,
    raster: GeoRaster,
    bands: list[int] | None,
    in_channels: int | None,
    window: int,
    overlap: int,
    formats: list[str],
    output: Path,
    relative: Path,
    palette: list,
) -> int:
    """Predict a raster larger than ``window`` window by window: each ``window`` x ``window``
    tile is predicted with ``overlap`` pixels of context on every side (cropped away), read
    from one band of rows at a time, and written as it comes into a tiled GeoTIFF with the
    raster's tags (``index``; ``color`` is made from it the same way). Returns how many
    windows had non-finite class scores."""
    if in_channels is not None and len(bands or range(raster.bands)) != in_channels:
        raise DataError(
            f"{raster.path}: {raster.bands} bands but the model takes {in_channels} "
            f"(data.in_channels, data.bands={bands} of its training)"
        )
    nonfinite = torch.zeros((), dtype=torch.int64)

    def tiles() -> Iterator[np.ndarray]:
        nonlocal nonfinite
        for top in range(0, raster.height, window):
            first = max(0, top - overlap)  # the rows of this band of tiles, with context
            last = min(raster.height, top + window + overlap)
            rows = raster.read(first, 0, last - first, raster.width)
            if bands is not None:
                rows = select_bands(rows, bands, raster.path)
            for left in range(0, raster.width, window):
                start = max(0, left - overlap)
                part = rows[:, start : min(raster.width, left + window + overlap)]
                image = torch.from_numpy(np.ascontiguousarray(part)).permute(2, 0, 1)[None]
                labels, count = predictor.labels(image, [str(raster.path)])
                nonfinite = nonfinite + count.cpu()
                label = labels[0, top - first : top - first + window,
                               left - start : left - start + window].cpu().numpy()  # fmt: skip
                tile = np.zeros((window, window), index_dtype(palette))  # edges: padded
                tile[: label.shape[0], : label.shape[1]] = label
                yield tile

    index_path = output / "index" / relative.with_suffix(".tif")
    index_path.parent.mkdir(parents=True, exist_ok=True)
    write_tiled(index_path, tiles(), raster.height, raster.width, index_dtype(palette), window,
                raster.tags)  # fmt: skip
    if "color" in formats:  # from the index raster, a window at a time
        indices = GeoRaster(index_path)
        colours = np.asarray(palette, np.uint8)

        def coloured() -> Iterator[np.ndarray]:
            for top in range(0, raster.height, window):
                for left in range(0, raster.width, window):
                    height = min(window, raster.height - top)
                    width = min(window, raster.width - left)
                    tile = np.zeros((window, window, 3), np.uint8)
                    tile[:height, :width] = colours[indices.read(top, left, height, width)[..., 0]]
                    yield tile

        color_path = output / "color" / relative.with_suffix(".tif")
        color_path.parent.mkdir(parents=True, exist_ok=True)
        write_tiled(color_path, coloured(), raster.height, raster.width, np.uint8, window,
                    raster.tags, bands=3)  # fmt: skip
    if "index" not in formats:
        index_path.unlink()
    return int(nonfinite)


def index_dtype(palette: list) -> type:
    """Class indices in 8 bits, 16 past 256 classes."""
    return np.uint8 if len(palette) <= 256 else np.uint16


def write_outputs(
    label, image, formats, output: Path, relative: Path, palette, alpha: float, tags: list[Tag]
):
    """One PNG per format under ``output/<format>/``: ``index`` holds class indices (8-bit,
    one channel), ``color`` the palette colours, ``overlay`` the colours blended on ``image``
    (the input as ``display_rgb`` shows it, (3, H, W) uint8), ``cityscapes`` the official
    labelIds, in one flat folder as the evaluation server wants. With the georeferencing
    ``tags`` of a GeoTIFF input, ``index`` and ``color`` are GeoTIFFs (.tif) carrying them."""
    for name in formats:
        # cityscapes: <city>_<seq>_<frame>_leftImg8bit.png, the name the official tools match
        path = output / name / (relative.name if name == "cityscapes" else relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "cityscapes":
            Image.fromarray(TRAIN_ID_TO_LABEL_ID[label.numpy()]).save(path)
        elif name in ("index", "color") and tags:
            array = (label.numpy().astype(index_dtype(palette)) if name == "index"
                     else colorize(label, palette).permute(1, 2, 0).numpy())  # fmt: skip
            write_geotiff(path.with_suffix(".tif"), array, tags)
        elif name == "index":
            # 16-bit PNG past 256 classes
            Image.fromarray(label.numpy().astype(index_dtype(palette))).save(path)
        elif name == "color":
            Image.fromarray(colorize(label, palette).permute(1, 2, 0).numpy()).save(path)
        else:
            blended = overlay(image, colorize(label, palette), alpha)
            Image.fromarray(blended.permute(1, 2, 0).numpy()).save(path)
