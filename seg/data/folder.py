"""A generic layout: ``<root>/images/<split>/*`` and ``<root>/masks/<split>/*.png`` matched by stem."""

from pathlib import Path

import numpy as np

from seg.data.base import IMAGE_SUFFIXES, DataError, SegmentationDataset, read_image, read_mask

FOLDER_TREE = """expected:
  <root>/images/<split>/<name>.png|.jpg   RGB images
  <root>/masks/<split>/<name>.png         single-channel index PNGs (mode L or P), same <name>"""


MASK_FORMATS = ("index", "binary")


def list_files(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Map file stem -> path for the files in ``directory`` with one of ``suffixes``."""
    return {p.stem: p for p in sorted(directory.iterdir()) if p.suffix.lower() in suffixes}


class FolderDataset(SegmentationDataset):
    """Images and index-PNG masks paired by file name (without extension)."""

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int,
        ignore_index: int = 255,
        transform=None,
        mask_format: str = "index",
        skip_bad_samples: float = 0.0,
    ):
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"data.dataset.mask_format={mask_format!r}; options: {MASK_FORMATS}")
        # binary: 0/255 (or any 8-bit) masks thresholded at 128 into classes 0 and 1.
        label_map = (np.arange(256) >= 128).astype(np.uint8) if mask_format == "binary" else None
        super().__init__(num_classes, ignore_index, transform, label_map, skip_bad_samples)
        root_path = Path(root)
        image_dir, mask_dir = root_path / "images" / split, root_path / "masks" / split
        for directory in (image_dir, mask_dir):
            if not directory.is_dir():
                raise DataError(
                    f"{directory}: directory not found (data.root={root}).\n{FOLDER_TREE}"
                )
        images = list_files(image_dir, IMAGE_SUFFIXES)
        masks = list_files(mask_dir, (".png",))
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

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return str(self.samples[index][1])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.samples[index]
        return read_image(image_path), read_mask(mask_path)
