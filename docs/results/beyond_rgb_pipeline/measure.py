"""Data pipeline per core: 13-band uint16 GeoTIFF crops against 8-bit RGB PNG of the same pixel
grid, with and without data.cache_dir (issue 22). One process (num_workers=0: one core),
data=folder's FolderDataset with debug-free training augmentation (random scale 0.5-2, 512x512
crop, flip).

    python docs/results/beyond_rgb_pipeline/measure.py <work dir> [--json out.json]

The images: Sentinel-2 scene 2 of ../shared/data/sentinel2_eolearn (101x100, 13 bands),
mirror-tiled to 1024x1024; as 13-band uint16 (reflectance x 10000, DEFLATE-compressed GeoTIFF
as GDAL writes them: bands as samples) and as 8-bit RGB PNG (bands 4, 3, 2, x 255 / 3000).
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile

from seg.data.folder import FolderDataset
from seg.data.transforms import train_transform

SHARED = Path(os.environ.get("SEG_SHARED_DATA", "/work/shared/data")) / "sentinel2_eolearn"
IMAGES, SIZE, ROUNDS = 6, 1024, 3


def write_datasets(work: Path) -> dict[str, Path]:
    scene = np.load(SHARED / "REFERENCE_SCENES.npy")[2]  # (101, 100, 13) float32
    labels = np.load(SHARED / "LULC.npy")[..., 0]
    reps = (SIZE // 100 + 2, SIZE // 100 + 2)
    mirror = lambda a: np.concatenate([a, a[::-1]], 0)  # noqa: E731
    tiled = np.tile(mirror(np.concatenate([scene, scene[:, ::-1]], 1)), (*reps, 1))
    tiled_labels = np.tile(mirror(np.concatenate([labels, labels[:, ::-1]], 1)), reps)
    roots = {"rgb_png": work / "rgb", "s2_13band_tiff": work / "s2"}
    for i in range(IMAGES):
        window = (slice(i * 7, i * 7 + SIZE), slice(i * 5, i * 5 + SIZE))
        image = np.round(tiled[window] * 10000).astype(np.uint16)
        mask = tiled_labels[window].astype(np.uint8)
        rgb = np.clip(image[..., [3, 2, 1]] * (255 / 3000), 0, 255).astype(np.uint8)
        for root in roots.values():
            for kind in ("images", "masks"):
                (root / kind / "train").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "masks" / "train" / f"{i}.png"), mask)
        cv2.imwrite(str(roots["rgb_png"] / "images" / "train" / f"{i}.png"), rgb[..., ::-1])
        tifffile.imwrite(
            roots["s2_13band_tiff"] / "images" / "train" / f"{i}.tif",
            image,
            photometric="minisblack",
            planarconfig="contig",
            compression="deflate",
        )
    return roots


def samples_per_second(root: Path, scale, cache: Path | None) -> float:
    transform = train_transform([512, 512], 0, scale_range=(0.5, 2.0), hflip=0.5)
    dataset = FolderDataset(
        str(root),
        "train",
        num_classes=11,
        ignore_index=0,
        transform=transform,
        scale=scale,
        cache_dir=str(cache) if cache else None,
    )
    for i in range(len(dataset)):  # warm: the page cache, and data.cache_dir's entries
        dataset[(i, 0, i)]
    start = time.perf_counter()
    for r in range(ROUNDS):
        for i in range(len(dataset)):
            dataset[(i, r + 1, i)]
    return ROUNDS * len(dataset) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    roots = write_datasets(args.work)
    result = {"load_before": os.getloadavg()[0], "images": IMAGES, "size": SIZE}
    for name, root in roots.items():
        scale = "auto" if name == "rgb_png" else 10000
        for cached in (False, True):
            cache = args.work / f"cache_{name}" if cached else None
            key = f"{name}{'_cached' if cached else ''}_samples_s"
            result[key] = round(samples_per_second(root, scale, cache), 2)
            print(key, result[key], flush=True)
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
