"""Large GeoTIFFs a window at a time: their georeferencing tags, windows read from the strips or
tiles that hold them (never the whole scene), tiled outputs written as they are computed, and
the tags of chips cut from them. Georeferencing is carried, not interpreted: no reprojection
(use GDAL's ``gdalwarp`` first to bring rasters onto one grid).
"""

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from seg.data.base import GEO_EXTRA, DataError

log = logging.getLogger(__name__)

# The tags that place a raster on the earth, copied verbatim from input to output:
# ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory (with the double and
# ASCII parameters its keys point into) and GDAL's nodata value.
MODEL_PIXEL_SCALE, MODEL_TIEPOINT, MODEL_TRANSFORMATION = 33550, 33922, 34264
GEO_KEYS = (34735, 34736, 34737)
GDAL_NODATA = 42113
GEO_TAGS = (MODEL_PIXEL_SCALE, MODEL_TIEPOINT, MODEL_TRANSFORMATION, *GEO_KEYS, GDAL_NODATA)
# The tags that define the grid: two rasters on the same grid have the same values of these.
GRID_TAGS = (MODEL_PIXEL_SCALE, MODEL_TIEPOINT, MODEL_TRANSFORMATION, *GEO_KEYS)

# One tag as tifffile's ``extratags`` take it: (code, datatype, count, value, write once).
Tag = tuple[int, int, int, object, bool]


def _tifffile():
    try:
        import tifffile
    except ImportError as error:
        raise DataError(f"GeoTIFFs need tifffile and imagecodecs: {GEO_EXTRA}") from error
    return tifffile


def _first_page(tiff, path: Path):
    page = tiff.pages.first
    if len(tiff.series) != 1 or tiff.series[0].axes not in ("YX", "YXS", "SYX"):
        raise DataError(
            f"{path}: axes {tiff.series[0].axes} in {len(tiff.series)} series; a GeoTIFF of "
            "one image (YX, YXS or SYX) is expected"
        )
    return page


class GeoRaster:
    """A TIFF/GeoTIFF opened for windowed reading: ``height``, ``width``, ``bands``, ``dtype``
    and ``tags`` (its georeferencing, as ``extratags``), read from its header alone."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        tifffile = _tifffile()
        try:
            with tifffile.TiffFile(self.path) as tiff:
                page = _first_page(tiff, self.path)
                self.height, self.width = page.imagelength, page.imagewidth
                self.bands, self.dtype = page.samplesperpixel, np.dtype(page.dtype)
                self.tags: list[Tag] = [
                    (tag.code, int(tag.dtype), 0 if tag.dtype == 2 else tag.count, tag.value, True)
                    for tag in page.tags.values()
                    if tag.code in GEO_TAGS
                ]
        except (OSError, tifffile.TiffFileError) as error:
            raise DataError(f"{self.path}: cannot read as TIFF ({error})") from error

    @property
    def nodata(self) -> float | None:
        """GDAL's nodata value (GDAL_NODATA), if the file has one."""
        value = self.tag(GDAL_NODATA)
        return None if value is None else float(str(value).strip("\x00 "))

    def tag(self, code: int):
        return next((value for tag, _, _, value, _ in self.tags if tag == code), None)

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """The window's pixels (height, width, bands), decoding only the strips or tiles it
        overlaps (compressed files too: imagecodecs decodes them)."""
        if min(top, left) < 0 or top + height > self.height or left + width > self.width:
            raise ValueError(
                f"{self.path}: window rows {top}-{top + height}, columns {left}-{left + width} "
                f"is outside the {self.height}x{self.width} raster"
            )
        out = np.empty((height, width, self.bands), self.dtype)
        with _tifffile().TiffFile(self.path) as tiff:
            page = _first_page(tiff, self.path)
            if page.is_tiled:
                chunk_h, chunk_w = page.tilelength, page.tilewidth
            else:
                chunk_h, chunk_w = min(page.rowsperstrip, self.height), self.width
            across, down = math.ceil(self.width / chunk_w), math.ceil(self.height / chunk_h)
            planes = self.bands if page.planarconfig == 2 else 1  # planar: one plane per band
            handle = tiff.filehandle
            for plane in range(planes):
                for row in range(top // chunk_h, math.ceil((top + height) / chunk_h)):
                    for column in range(left // chunk_w, math.ceil((left + width) / chunk_w)):
                        index = (plane * down + row) * across + column
                        handle.seek(page.dataoffsets[index])
                        data = handle.read(page.databytecounts[index])
                        segment, (band, _, y, x, _), _ = page.decode(
                            data, index, jpegtables=page.jpegtables
                        )
                        segment = segment[0]  # (chunk height, chunk width, samples)
                        y0, x0 = max(y, top), max(x, left)
                        y1 = min(y + segment.shape[0], top + height, self.height)
                        x1 = min(x + segment.shape[1], left + width, self.width)
                        out[y0 - top : y1 - top, x0 - left : x1 - left,
                            band : band + segment.shape[2]] = segment[y0 - y : y1 - y, x0 - x : x1 - x]  # fmt: skip
        return out


def chip_tags(tags: list[Tag], top: int, left: int) -> list[Tag]:
    """``tags`` for the chip whose top-left pixel is (``top``, ``left``) of their raster: the
    same place on the earth. A tie point with a pixel scale is moved to the chip's corner
    (other tie points move in raster coordinates); a model transformation gets the offset's
    translation; every other tag is copied verbatim."""
    moved = []
    for code, datatype, count, value, once in tags:
        if code == MODEL_TIEPOINT:  # (I, J, K, X, Y, Z) per tie point: raster (I, J) -> model
            points = np.asarray(value, np.float64).reshape(-1, 6).copy()
            scale = next((v for c, _, _, v, _ in tags if c == MODEL_PIXEL_SCALE), None)
            if len(points) == 1 and scale is not None:
                # GDAL's form: the chip's own corner (0, 0) tied to its place on the earth
                points[0, 3] += (left - points[0, 0]) * scale[0]
                points[0, 4] -= (top - points[0, 1]) * scale[1]
                points[0, :2] = 0
            else:  # control points: the same points, in the chip's raster coordinates
                points[:, 0] -= left
                points[:, 1] -= top
            value = tuple(points.ravel().tolist())
        elif code == MODEL_TRANSFORMATION:  # 4x4, row-major: model = M @ (i, j, k, 1)
            matrix = np.asarray(value, np.float64).reshape(4, 4).copy()
            matrix[:, 3] += matrix[:, 0] * left + matrix[:, 1] * top
            value = tuple(matrix.ravel().tolist())
        moved.append((code, datatype, count, value, once))
    return moved


def check_same_grid(image: GeoRaster, label: GeoRaster) -> None:
    """Refuse an image and a label raster that are not on one grid: another size, pixel size,
    position or coordinate system. Their georeferencing is compared, not reprojected."""
    problems = []
    if (image.height, image.width) != (label.height, label.width):
        problems.append(f"{image.height}x{image.width} pixels against {label.height}x{label.width}")
    for code in GRID_TAGS:
        mine, theirs = image.tag(code), label.tag(code)
        if not _same(mine, theirs):
            problems.append(f"tag {code} {mine!r} against {theirs!r}")
    if problems:
        raise DataError(
            f"{label.path}: the label raster is not on the grid of {image.path}: "
            + "; ".join(problems)
            + ". Bring them onto one grid first (e.g. gdalwarp -tr/-te/-t_srs); seg does not "
            "reproject"
        )


def _same(mine, theirs) -> bool:
    """Equal tag values; numbers up to float rounding (a pixel size written by another tool)."""
    if mine is None or theirs is None or isinstance(mine, str) or isinstance(theirs, str):
        return mine == theirs
    return np.shape(mine) == np.shape(theirs) and np.allclose(mine, theirs, rtol=1e-9, atol=0)


def write_geotiff(path: Path, array: np.ndarray, tags: list[Tag]) -> None:
    """An (H, W) or (H, W, bands) array as a DEFLATE-compressed GeoTIFF with ``tags``."""
    _tifffile().imwrite(path, array, photometric="minisblack", compression="zlib",
                        planarconfig="contig" if array.ndim == 3 else None, extratags=tags)  # fmt: skip


def write_tiled(
    path: Path,
    tiles: Iterable[np.ndarray],
    height: int,
    width: int,
    dtype: np.dtype,
    tile: int,
    tags: list[Tag],
    bands: int = 1,
) -> None:
    """Write a (height, width[, bands]) raster from ``tiles`` (tile x tile[, bands] each, in
    row-major order, those at the right and bottom edges padded to full size) as a
    DEFLATE-compressed tiled GeoTIFF with ``tags``: nothing holds the whole raster."""
    shape = (height, width) if bands == 1 else (height, width, bands)
    _tifffile().imwrite(
        path, tiles, shape=shape, dtype=dtype, tile=(tile, tile), compression="zlib",
        photometric="minisblack", planarconfig="contig" if bands > 1 else None, extratags=tags,
    )  # fmt: skip


def positions(length: int, size: int, stride: int) -> list[int]:
    """Window starts covering ``length`` pixels with windows of ``size`` every ``stride``; the
    last one ends at the edge (it overlaps its neighbour rather than leaving pixels out)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    return starts if starts[-1] == length - size else [*starts, length - size]


def tile(
    image_path: Path,
    out: Path,
    size: int,
    stride: int | None = None,
    label_path: Path | None = None,
    split: str = "train",
    keep_empty: bool = False,
) -> int:
    """Cut a GeoTIFF (and its label raster, on the same grid) into ``size`` x ``size`` chips
    every ``stride`` pixels (default ``size``), each keeping its georeferencing, written as
    ``out/images/<split>/<stem>_r<row>_c<column>.tif`` (and ``out/masks/...``): data=folder's
    layout. Chips whose pixels are all the image's GDAL nodata are skipped unless
    ``keep_empty``. Returns the number of chips written."""
    stride = stride or size
    if size < 1 or stride < 1:
        raise ValueError(f"size={size}, stride={stride}: give sizes of at least one pixel")
    image = GeoRaster(image_path)
    label = None if label_path is None else GeoRaster(label_path)
    if label is not None:
        check_same_grid(image, label)  # before anything is written
        if label.bands != 1:
            raise DataError(f"{label.path}: a label raster has one band, this one {label.bands}")
    written = skipped = 0
    for top in positions(image.height, size, stride):
        for left in positions(image.width, size, stride):
            height, width = min(size, image.height), min(size, image.width)
            chip = image.read(top, left, height, width)
            if not keep_empty and image.nodata is not None and (chip == image.nodata).all():
                skipped += 1
                continue
            name = f"{image.path.stem}_r{top}_c{left}.tif"
            rasters = [("images", image, chip if image.bands > 1 else chip[..., 0])]
            if label is not None:
                rasters.append(("masks", label, label.read(top, left, height, width)[..., 0]))
            for folder, raster, array in rasters:
                directory = out / folder / split
                directory.mkdir(parents=True, exist_ok=True)
                write_geotiff(directory / name, array, chip_tags(raster.tags, top, left))
            written += 1
    log.info("%s: %d chips of %dx%d written to %s (%d of nodata only skipped)", image.path,
             written, size, size, out, skipped)  # fmt: skip
    return written
