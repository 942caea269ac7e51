"""A generic layout: ``<root>/images/<split>/*`` and ``<root>/masks/<split>/*`` matched by stem."""

from pathlib import Path

import numpy as np
from PIL import Image

from seg.data.base import IMAGE_SUFFIXES, DataError, PairedFiles, read_image, read_mask

FOLDER_TREE = """expected:
  <root>/images/<split>/<name>.png|.jpg   RGB images
  <root>/masks/<split>/<name>.png         masks with the same <name> (data.dataset.mask_format)"""

MASK_FORMATS = ("index", "binary", "rgb")
JPEG_SUFFIXES = (".jpg", ".jpeg")


def list_files(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Map file stem -> path for the files in ``directory`` with one of ``suffixes``."""
    return {p.stem: p for p in sorted(directory.iterdir()) if p.suffix.lower() in suffixes}


class FolderDataset(PairedFiles):
    """Images and masks paired by file name (without extension).

    ``mask_format``: ``index`` (pixel value = class; palette PNGs are read as their indices),
    ``binary`` (0/255 masks: >= 128 is class 1), ``rgb`` (colour-coded masks, each colour one of
    ``palette``'s). JPEG masks are refused (lossy compression changes labels at edges) unless
    ``jpeg_threshold`` is set: they are then read as binary masks, >= the threshold is class 1.
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
    ):
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"data.dataset.mask_format={mask_format!r}; options: {MASK_FORMATS}")
        if mask_format == "rgb" and (palette is None or len(palette) != num_classes):
            raise ValueError(
                "mask_format=rgb maps colours to classes by data.palette: give one per class"
            )
        threshold = jpeg_threshold if jpeg_threshold is not None else 128
        # binary: a lookup table thresholds 8-bit values into classes 0 and 1
        binary = mask_format == "binary" or jpeg_threshold is not None
        label_map = (np.arange(256) >= threshold).astype(np.uint8) if binary else None
        super().__init__(num_classes, ignore_index, transform, label_map, skip_bad_samples)
        self.mask_format = mask_format
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
        masks = list_files(mask_dir, (".png", *JPEG_SUFFIXES))
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

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.samples[index]
        image = read_image(image_path)
        if self.mask_format == "rgb":
            return image, self.rgb_to_index(mask_path)
        if mask_path.suffix.lower() in JPEG_SUFFIXES:  # allowed only with a threshold
            with Image.open(mask_path) as mask:
                return image, np.array(mask.convert("L"))
        return image, read_mask(mask_path)

    def rgb_to_index(self, path: Path) -> np.ndarray:
        """Colour-coded mask -> class indices; a colour outside the palette is an error."""
        with Image.open(path) as mask:
            rgb = np.asarray(mask.convert("RGB")).astype(np.int64)
        keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        unique, inverse = np.unique(keys, return_inverse=True)
        unknown = [int(k) for k in unique if int(k) not in self.colors]
        if unknown:
            shown = [[k >> 16, (k >> 8) & 255, k & 255] for k in unknown[:5]]
            raise DataError(
                f"{path}: colours {shown} are not in data.palette (mask_format=rgb maps each "
                "palette colour to its class); add them to the palette or fix the mask"
            )
        lookup = np.array([self.colors[int(k)] for k in unique], np.uint8)
        return lookup[inverse].reshape(keys.shape)
