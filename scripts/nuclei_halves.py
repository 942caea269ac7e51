"""Cut the StarDist nuclei image into a train half (left) and a val half (right), as a
data=instance_folder tree, for the instance measurement in docs/results/instance_nuclei:

    python scripts/nuclei_halves.py ../shared/data/nuclei_stardist /tmp/nuclei

writes <out>/images/{train,val}/nuclei.tif (the image's columns, uint16 as stored) and
<out>/instances/{train,val}/nuclei.tif (uint16 instance ids, 0 background). Nuclei crossing
the split line belong to neither half: their pixels get the id CROWD in both, which
data.dataset.crowd_value=65535 makes crowd regions (never trained on; detections on them are
neither hits nor misses in COCOeval).
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
    parts = {"train": (image[:, :middle], left_ids), "val": (image[:, middle:], right_ids)}
    for split, (pixels, instance_map) in parts.items():
        for folder, array in (("images", pixels), ("instances", instance_map)):
            path = args.out / folder / split / "nuclei.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, np.ascontiguousarray(array))
        count = len(set(np.unique(instance_map)) - {0, CROWD})
        print(f"{split}: {pixels.shape[1]}x{pixels.shape[0]} px, {count} nuclei")
    print(f"{len(crossing)} nuclei cross the split line: crowd (id {CROWD}) in both halves")


if __name__ == "__main__":
    main()
