"""Write the eo-learn Sentinel-2 patch (../shared/data/sentinel2_eolearn) as a data=folder tree
with a spatial split, for the 13-band measurements in docs/results/sentinel2_bands:

    python scripts/sentinel2_split.py ../shared/data/sentinel2_eolearn /tmp/s2 --scenes 2 3 4

Each chosen acquisition (0-4; 0 and 1 are cloudy) gives images/<split>/scene<i>.tif, its 13
bands B01..B12 as uint16 reflectance x 10000 (what Sentinel-2 L1C products store; DEFLATE, the
bands as samples, as GDAL writes them) and masks/<split>/scene<i>.tif, the land-cover classes
(uint16, 0 = no data). Rows TRAIN_ROWS train and VAL_ROWS validate: the five rows between
them belong to neither, so no pixel's label is seen on both sides. Every acquisition shares
the one land-cover map: the splits differ in place, the acquisitions in date.
"""

import argparse
from pathlib import Path

import numpy as np

TRAIN_ROWS, VAL_ROWS = slice(0, 48), slice(53, 101)
CLASS_NAMES = ["nodata", "cultivated", "forest", "grassland", "shrubland", "water", "wetlands",
               "tundra", "artificial", "bareland", "snow"]  # fmt: skip
# The keys a run on this tree needs (the stored scale is reflectance x 10000; 0 = no data).
DATA_KEYS = [
    "data=folder", f"data.num_classes={len(CLASS_NAMES)}", "data.ignore_index=0",
    f"data.class_names=[{','.join(CLASS_NAMES)}]", "data.scale=10000", "data.rgb_bands=[4,3,2]",
]  # fmt: skip


def write_split(source: Path, root: Path, scenes: list[int]) -> None:
    """The chosen acquisitions of ``source`` as ``root``/{images,masks}/{train,val}/scene<i>.tif."""
    import tifffile  # the geo extra: pip install -e ".[geo]"

    reflectance = np.load(source / "REFERENCE_SCENES.npy")  # (time, H, W, 13) float32
    labels = np.load(source / "LULC.npy")[..., 0]  # (H, W) uint16
    for scene in scenes:
        image = np.round(reflectance[scene] * 10000).astype(np.uint16)
        for split, rows in (("train", TRAIN_ROWS), ("val", VAL_ROWS)):
            for folder, array in (("images", image[rows]), ("masks", labels[rows])):
                path = root / folder / split / f"scene{scene}.tif"
                path.parent.mkdir(parents=True, exist_ok=True)
                bands = array.ndim == 3  # bands as samples of one page, as GDAL writes them
                tifffile.imwrite(path, np.ascontiguousarray(array), photometric="minisblack",
                                 compression="deflate", planarconfig="contig" if bands else None)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the sentinel2_eolearn folder")
    parser.add_argument("out", type=Path, help="the data.root to write")
    parser.add_argument("--scenes", type=int, nargs="+", default=[2, 3, 4],
                        help="acquisitions to write (default: the clear ones)")  # fmt: skip
    args = parser.parse_args()
    write_split(args.source, args.out, args.scenes)
    print(f"wrote {len(args.scenes)} acquisitions per split to {args.out}; train with:")
    print(" ".join([*DATA_KEYS, f"data.root={args.out}"]))


if __name__ == "__main__":
    main()
