"""A generic layout: ``<root>/images/<split>/*`` and ``<root>/masks/<split>/*`` matched by stem."""

from pathlib import Path

import numpy as np

from seg.data.base import (
    IMAGE_SUFFIXES,
    RASTER_SUFFIXES,
    DataError,
    PairedFiles,
    read_mask,
)

FOLDER_TREE = """expected:
  <root>/images/<split>/<name>.png|.jpg|.tif|.npy   images (TIFF/.npy: any band count and depth)
  <root>/masks/<split>/<name>.png|.tif|.npy         masks with the same <name> (data.dataset.mask_format)"""

MASK_FORMATS = ("index", "binary", "rgb")
JPEG_SUFFIXES = (".jpg", ".jpeg")


def list_files(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Map file stem -> path for the files in ``directory`` with one of ``suffixes``.

    Two files of one stem (``a.png`` and ``a.jpg``) are a DataError listing them: pairing by
    stem would silently keep one of them.
    """
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() in suffixes:
            by_stem.setdefault(path.stem, []).append(path)
    clashes = [[str(p) for p in paths] for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        raise DataError(
            f"{directory}: {len(clashes)} names have more than one file, e.g. {clashes[:3]}; "
            "images and masks are paired by name without the extension: remove or rename one "
            "file of each"
        )
    return {stem: paths[0] for stem, paths in by_stem.items()}


def binary_threshold(mask: np.ndarray, threshold: int) -> int:
    """``threshold`` (on the 8-bit scale, 0-255) scaled to the bit depth of ``mask``: 128 is half
    the range, i.e. 128 for uint8, 32768 for uint16 and 1 for a 1-bit (bool) mask."""
    # PNG stores at most 16 bits per sample; older Pillow releases open 16-bit PNGs as int32.
    bits = 1 if mask.dtype == bool else 8 if mask.dtype == np.uint8 else 16
    return -(-threshold * 2**bits // 256)  # rounded up, so that it stays >= 1


class FolderDataset(PairedFiles):
    """Images and masks paired by file name (without extension).

    ``mask_format``: ``index`` (pixel value = class; palette PNGs are read as their indices),
    ``binary`` (0/max masks of any bit depth: a value in the upper half of the range is class 1,
    i.e. >= 128 for 8-bit, >= 32768 for 16-bit, 1 for 1-bit PNGs), ``rgb`` (colour-coded masks,
    each colour one of ``palette``'s). JPEG masks are refused (lossy compression changes labels
    at edges) unless ``jpeg_threshold`` is set: they are then read as binary masks, >= the
    threshold (on the 8-bit scale, scaled like 128 for other depths) is class 1.

    Images may have any band count and depth (``seg.data.base.read_image``): ``bands``,
    ``in_channels``, ``nodata`` and ``scale`` are the data keys of ``expect_pixels``. Colour
    augmentations run on 3-band uint8 images only: for others they are left out, with a log line.
    """

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int,
        ignore_index: int = 255,
        transform=None,
        mask_format: str = "index",
        palette: list[list[int]] | None = None,
        jpeg_threshold: int | None = None,
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
        bands: list[int] | None = None,
        in_channels: int | None = None,
        nodata: float | str | list[float] | None = None,
        scale: float | str = "auto",
    ):
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"data.dataset.mask_format={mask_format!r}; options: {MASK_FORMATS}")
        if mask_format == "rgb" and (palette is None or len(palette) != num_classes):
            raise ValueError(
                "mask_format=rgb maps colours to classes by data.palette: give one per class"
            )
        super().__init__(num_classes, ignore_index, transform, None, skip_bad_samples)
        self.mask_format = mask_format
        # binary masks are thresholded into classes 0 and 1 as they are read (8-bit scale)
        self.binary = mask_format == "binary" or jpeg_threshold is not None
        self.threshold = jpeg_threshold if jpeg_threshold is not None else 128
        # colour (as 0xRRGGBB) -> class index, for rgb masks
        self.colors = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(palette or [])}
        root_path = Path(root)
        image_dir, mask_dir = root_path / "images" / split, root_path / "masks" / split
        for directory in (image_dir, mask_dir):
            if not directory.is_dir():
                raise DataError(
                    f"{directory}: directory not found (data.root={root}).\n{FOLDER_TREE}"
                )
        images = list_files(image_dir, IMAGE_SUFFIXES)
        masks = list_files(mask_dir, (".png", *RASTER_SUFFIXES, *JPEG_SUFFIXES))
        jpegs = [str(p) for p in masks.values() if p.suffix.lower() in JPEG_SUFFIXES]
        if jpegs and jpeg_threshold is None:
            raise DataError(
                f"{mask_dir}: {len(jpegs)} masks are JPEG (e.g. {jpegs[0]}). JPEG is lossy: it "
                "changes label values along every edge, so they cannot be read as class indices. "
                "Save masks as PNG, or, for binary masks, set data.dataset.jpeg_threshold=128."
            )
        unmatched_images = sorted(images.keys() - masks.keys())
        unmatched_masks = sorted(masks.keys() - images.keys())
        if unmatched_images or unmatched_masks:
            raise DataError(
                f"{root_path}: split '{split}' has {len(unmatched_images)} images without a mask "
                f"(e.g. {[str(images[s]) for s in unmatched_images[:3]]}) and "
                f"{len(unmatched_masks)} masks without an image "
                f"(e.g. {[str(masks[s]) for s in unmatched_masks[:3]]}); pair them by file name."
            )
        if not images:
            raise DataError(f"{image_dir}: split '{split}' has no images.\n{FOLDER_TREE}")
        self.samples = [(images[stem], masks[stem]) for stem in sorted(images)]
        self.expect_pixels([image for image, _ in self.samples], bands, in_channels, nodata, scale)
        self.use_cache(cache_dir)  # data.cache_dir: decode each sample once

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.samples[index]
        image = self.read_pixels(image_path)
        if self.mask_format == "rgb":
            return image, self.rgb_to_index(mask_path)
        # JPEG masks are allowed only with a threshold; any of their modes reads as 8-bit grey.
        is_jpeg = mask_path.suffix.lower() in JPEG_SUFFIXES
        mask = read_mask(mask_path, mode="L" if is_jpeg else None)
        if self.binary:
            mask = (mask >= binary_threshold(mask, self.threshold)).astype(np.uint8)
        return image, mask

    def rgb_to_index(self, path: Path) -> np.ndarray:
        """Colour-coded mask -> class indices; a colour outside the palette is an error."""
        rgb = read_mask(path, mode="RGB").astype(np.int64)
        keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        unique, inverse = np.unique(keys, return_inverse=True)
        unknown = [int(k) for k in unique if int(k) not in self.colors]
        if unknown:
            shown = [[k >> 16, (k >> 8) & 255, k & 255] for k in unknown[:5]]
            raise DataError(
                f"{path}: colours {shown} are not in data.palette (mask_format=rgb maps each "
                "palette colour to its class); add them to the palette or fix the mask"
            )
        lookup = np.array([self.colors[int(k)] for k in unique], self.mask_dtype)
        return lookup[inverse].reshape(keys.shape)
