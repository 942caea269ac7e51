"""GeoTIFFs a window at a time: windows read from strips and tiles, chips that keep their place
on the earth, label rasters checked against the image's grid."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seg.data.base import DataError, read_image, read_mask
from seg.data.geotiff import (
    GDAL_NODATA,
    GEO_KEYS,
    MODEL_PIXEL_SCALE,
    MODEL_TIEPOINT,
    MODEL_TRANSFORMATION,
    GeoRaster,
    positions,
    tile,
)

tifffile = pytest.importorskip("tifffile")
LANDSAT = (
    Path(os.environ.get("SEG_SHARED_DATA", "/work/shared/data")) / "landsat_geotiff/RGB.byte.tif"
)


def model_xy(raster: GeoRaster, row: float, column: float) -> tuple[float, float]:
    """Where a pixel corner lies on the earth, from a tie point and pixel scale."""
    i, j, _, x, y, _ = raster.tag(MODEL_TIEPOINT)[:6]
    scale_x, scale_y = raster.tag(MODEL_PIXEL_SCALE)[:2]
    return x + (column - i) * scale_x, y - (row - j) * scale_y


@pytest.mark.parametrize(
    "layout",
    [
        dict(tile=(32, 48), compression="zlib", planarconfig="contig"),
        dict(tile=(32, 48), compression="lzw", planarconfig="separate"),
        dict(rowsperstrip=7, compression="zlib", predictor=True, planarconfig="contig"),
        dict(rowsperstrip=9, planarconfig="separate"),
    ],
)
def test_windows_are_read_from_strips_and_tiles_of_any_layout(tmp_path, layout):
    image = np.random.default_rng(0).integers(0, 60000, (100, 130, 4)).astype(np.uint16)
    data = image.transpose(2, 0, 1) if layout["planarconfig"] == "separate" else image
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack", **layout)
    raster = GeoRaster(tmp_path / "a.tif")
    assert (raster.height, raster.width, raster.bands) == (100, 130, 4)
    for top, left, height, width in [(0, 0, 100, 130), (31, 47, 40, 50), (99, 129, 1, 1)]:
        window = raster.read(top, left, height, width)
        np.testing.assert_array_equal(window, image[top : top + height, left : left + width])
    with pytest.raises(ValueError, match="outside the 100x130 raster"):
        raster.read(90, 0, 20, 10)


def test_chip_positions_cover_the_raster_and_end_at_its_edge():
    assert positions(100, 48, 48) == [0, 48, 52]
    assert positions(96, 48, 48) == [0, 48]
    assert positions(30, 48, 48) == [0]


def geo_scene(path: Path, image: np.ndarray, scale=(30.0, 30.0, 0.0)):
    tags = [
        (MODEL_PIXEL_SCALE, 12, 3, scale, True),
        (MODEL_TIEPOINT, 12, 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), True),
        (GEO_KEYS[0], 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True),
        (GDAL_NODATA, 2, 0, "0", True),
    ]
    layout = {"planarconfig": "contig"} if image.ndim == 3 else {}
    tifffile.imwrite(path, image, photometric="minisblack", extratags=tags, **layout)


def test_tiles_keep_their_place_on_the_earth_and_their_labels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(1, 4000, (100, 130, 2)).astype(np.uint16)
    image[:48, :48] = 0  # a corner of no data: its chip is skipped
    labels = rng.integers(0, 3, (100, 130)).astype(np.uint8)
    geo_scene(tmp_path / "scene.tif", image)
    geo_scene(tmp_path / "labels.tif", labels)
    assert (
        tile(tmp_path / "scene.tif", tmp_path / "chips", 48, label_path=tmp_path / "labels.tif")
        == 8
    )
    scene = GeoRaster(tmp_path / "scene.tif")
    chips = sorted((tmp_path / "chips" / "images" / "train").iterdir())
    assert len(chips) == 8 and not (tmp_path / "chips/images/train/scene_r0_c0.tif").exists()
    chip_path = tmp_path / "chips" / "images" / "train" / "scene_r52_c82.tif"
    chip = GeoRaster(chip_path)
    assert model_xy(chip, 0, 0) == model_xy(scene, 52, 82)
    assert chip.tag(GEO_KEYS[0]) == scene.tag(GEO_KEYS[0]) and chip.nodata == 0
    np.testing.assert_array_equal(read_image(chip_path), image[52:, 82:])  # seg reads the chips
    mask = read_mask(tmp_path / "chips" / "masks" / "train" / "scene_r52_c82.tif")
    np.testing.assert_array_equal(mask, labels[52:, 82:])


def test_a_label_raster_on_another_grid_is_refused_and_nothing_is_written(tmp_path):
    image = np.ones((64, 64), np.uint16)
    geo_scene(tmp_path / "scene.tif", image)
    geo_scene(tmp_path / "labels.tif", np.zeros((64, 64), np.uint8), scale=(10.0, 10.0, 0.0))
    with pytest.raises(DataError, match=r"labels.tif: the label raster is not on the grid .*33550"):
        tile(tmp_path / "scene.tif", tmp_path / "chips", 32, label_path=tmp_path / "labels.tif")
    geo_scene(tmp_path / "labels.tif", np.zeros((60, 64), np.uint8))
    with pytest.raises(DataError, match="64x64 pixels against 60x64"):
        tile(tmp_path / "scene.tif", tmp_path / "chips", 32, label_path=tmp_path / "labels.tif")
    assert not (tmp_path / "chips").exists()


def test_a_model_transformation_is_translated(tmp_path):
    matrix = (2.0, 0.5, 0.0, 100.0, 0.25, -3.0, 0.0, 900.0, 0, 0, 0, 0, 0, 0, 0, 1.0)
    tifffile.imwrite(tmp_path / "s.tif", np.ones((40, 40), np.uint8), photometric="minisblack",
                     extratags=[(MODEL_TRANSFORMATION, 12, 16, matrix, True)])  # fmt: skip
    tile(tmp_path / "s.tif", tmp_path / "chips", 20)
    moved = GeoRaster(tmp_path / "chips/images/train/s_r20_c0.tif").tag(MODEL_TRANSFORMATION)
    m = np.array(matrix).reshape(4, 4)
    np.testing.assert_allclose(np.array(moved).reshape(4, 4) @ [0, 0, 0, 1], m @ [0, 20, 0, 1])


@pytest.mark.skipif(not LANDSAT.is_file(), reason="needs ../shared/data/landsat_geotiff")
def test_landsat_scene_tiles_from_the_command_line(tmp_path):
    command = [sys.executable, "scripts/tile.py", str(LANDSAT), str(tmp_path), "--size", "256"]
    subprocess.run(command, check=True, capture_output=True)
    scene, full = GeoRaster(LANDSAT), tifffile.imread(LANDSAT)
    chip = GeoRaster(tmp_path / "images" / "train" / "RGB.byte_r256_c512.tif")
    assert chip.height == chip.width == 256
    np.testing.assert_allclose(model_xy(chip, 0, 0), model_xy(scene, 256, 512))
    for code in (*GEO_KEYS, GDAL_NODATA):
        assert chip.tag(code) == scene.tag(code)
    np.testing.assert_array_equal(chip.read(0, 0, 256, 256), full[256:512, 512:768])
