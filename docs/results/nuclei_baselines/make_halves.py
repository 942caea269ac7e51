"""The nuclei image (../shared/data/nuclei_stardist, uint16 with values 0-235) split into a
data=folder dataset: the left half to train on, the right half to score.

python docs/results/nuclei_baselines/make_halves.py /work/shared/data/nuclei_stardist /tmp/nuclei
"""

import sys
from pathlib import Path

import numpy as np
import tifffile


def main(source: Path, root: Path) -> None:
    image = tifffile.imread(source / "img2d.tif")  # (512, 512) uint16
    foreground = (tifffile.imread(source / "mask2d.tif") > 0).astype(np.uint8)  # instance ids
    middle = image.shape[1] // 2
    for split, columns in (("train", slice(None, middle)), ("val", slice(middle, None))):
        for folder, array in (("images", image), ("masks", foreground)):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / folder / split / "nuclei.tif", array[:, columns])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
