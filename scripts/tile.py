"""python scripts/tile.py scene.tif out_dir [--label labels.tif] [--size 512] [--stride 512]
[--split train]: cut a GeoTIFF (and its label raster) into chips that keep their
georeferencing, in data=folder's layout (docs/beyond-rgb.md). No reprojection: the label
raster must be on the image's grid."""

import argparse
import logging
import sys
from pathlib import Path

from seg.data.base import DataError
from seg.data.geotiff import tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("image", type=Path, help="the GeoTIFF to cut")
    parser.add_argument("out", type=Path, help="dataset root: chips go to images/<split>/")
    parser.add_argument("--label", type=Path, help="its label raster (masks/<split>/)")
    parser.add_argument("--size", type=int, default=512, help="chip side in pixels")
    parser.add_argument("--stride", type=int, help="step between chips (default: --size)")
    parser.add_argument("--split", default="train", help="the split folder to write")
    parser.add_argument("--keep-empty", action="store_true", help="keep chips of nodata only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tile(args.image, args.out, args.size, args.stride, args.label, args.split,
             args.keep_empty)  # fmt: skip
    except (DataError, ValueError) as error:
        sys.exit(f"tile.py: {error}")


if __name__ == "__main__":
    main()
