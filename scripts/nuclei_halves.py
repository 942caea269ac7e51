"""Cut the StarDist nuclei image into a train half (left) and a val half (right), one tree for
data=folder (nucleus vs background, docs/results/nuclei_baselines) and data=instance_folder
(the nuclei, docs/results/instance_nuclei):

    python scripts/nuclei_halves.py ../shared/data/nuclei_stardist /tmp/nuclei

writes <out>/images/{train,val}/nuclei.tif (the image's columns, uint16 as stored),
<out>/masks/{train,val}/nuclei.tif (uint8, 1 on every nucleus pixel, 0 background) and
<out>/instances/{train,val}/nuclei.tif (uint16 instance ids, 0 background). Nuclei crossing
the split line belong to neither half: their pixels get the id CROWD in both instance maps,
which data.dataset.crowd_value=65535 makes crowd regions (never trained on; detections on them
are neither hits nor misses in COCOeval). The masks keep them as nucleus pixels.
"""

import argparse
from pathlib import Path

import numpy as np

CROWD = 65535  # the instance-map value data.dataset.crowd_value names


def halves(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The left and right halves of the instance map ``ids`` (H, W), the ids of nuclei on both
    sides of the middle column replaced by CROWD in each; returns them and those ids."""
    middle = ids.shape[1] // 2
    left, right = ids[:, :middle], ids[:, middle:]
    crossing = sorted(set(np.unique(left[left > 0])) & set(np.unique(right[right > 0])))
    crowd = np.isin(ids, crossing)
    marked = np.where(crowd, CROWD, ids).astype(np.uint16)
    return marked[:, :middle], marked[:, middle:], [int(i) for i in crossing]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", type=Path, help="the nuclei_stardist folder (img2d.tif, mask2d.tif)"
    )
    parser.add_argument("out", type=Path, help="the data.root to write")
    args = parser.parse_args()
    import tifffile  # the geo extra: pip install -e ".[geo]"

    image = tifffile.imread(args.source / "img2d.tif")
    ids = tifffile.imread(args.source / "mask2d.tif")
    if image.shape != ids.shape or ids.ndim != 2:
        raise SystemExit(f"{args.source}: img2d.tif {image.shape} and mask2d.tif {ids.shape} "
                         "must be one 2D grid")  # fmt: skip
    left_ids, right_ids, crossing = halves(ids)
    middle = image.shape[1] // 2
    foreground = (ids > 0).astype(np.uint8)
    parts = {
        "train": (image[:, :middle], foreground[:, :middle], left_ids),
        "val": (image[:, middle:], foreground[:, middle:], right_ids),
    }
    for split, (pixels, mask, instance_map) in parts.items():
        for folder, array in (("images", pixels), ("masks", mask), ("instances", instance_map)):
            path = args.out / folder / split / "nuclei.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, np.ascontiguousarray(array))
        count = len(set(np.unique(instance_map)) - {0, CROWD})
        print(f"{split}: {pixels.shape[1]}x{pixels.shape[0]} px, {count} nuclei")
    print(f"{len(crossing)} nuclei cross the split line: crowd (id {CROWD}) in both halves")


if __name__ == "__main__":
    main()
