"""Pascal VOC 2012 segmentation (and the SBD-augmented train list) in the devkit layout."""

from pathlib import Path

from seg.data.base import DataError, PairedFiles

VOC_TREE = """expected (VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/,
the folder VOCdevkit/VOC2012):
  <root>/JPEGImages/<id>.jpg
  <root>/SegmentationClass/<id>.png                 palette PNGs: 0-20 classes, 255 boundary
  <root>/ImageSets/Segmentation/{train,val}.txt      one <id> per line
SBD-augmented training (10582 images): add <root>/SegmentationClassAug/<id>.png and
<root>/ImageSets/Segmentation/trainaug.txt, then data.train_split=trainaug"""


class VOC(PairedFiles):
    """The images listed in ``ImageSets/Segmentation/<split>.txt``.

    Labels come from ``SegmentationClass/`` (read as palette indices), or from
    ``aug_mask_dir`` for ``split=trainaug`` (the SBD-augmented list).
    """

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int = 21,
        ignore_index: int = 255,
        transform=None,
        mask_dir: str = "SegmentationClass",
        aug_mask_dir: str = "SegmentationClassAug",
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
    ):
        super().__init__(num_classes, ignore_index, transform, None, skip_bad_samples)
        root_path = Path(root)
        split_file = root_path / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise DataError(f"{split_file}: split list not found (data.root={root}).\n{VOC_TREE}")
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"{split_file}: the split list is empty")
        masks = root_path / (aug_mask_dir if split == "trainaug" else mask_dir)
        self.samples = [(root_path / "JPEGImages" / f"{i}.jpg", masks / f"{i}.png") for i in ids]
        missing = [str(p) for sample in self.samples for p in sample if not p.is_file()]
        if missing:
            raise DataError(
                f"{split_file}: {len(missing)} listed files do not exist, e.g. {missing[:3]}.\n{VOC_TREE}"
            )
        self.use_cache(cache_dir)  # data.cache_dir: decode each sample once
