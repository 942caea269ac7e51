"""What every dataset shares: reading, label mapping and checking, seeded transforms."""

import io
import logging
import multiprocessing
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from seg.data.cache import DecodedCache
from seg.data.transforms import apply, to_tensors, without_color

log = logging.getLogger(__name__)

# DataLoader workers decode in parallel already: OpenCV's own thread pool would oversubscribe
# the CPU. Set here, in the parent, before any worker forks: calling it inside a forked worker
# after the parent used the pool deadlocks.
cv2.setNumThreads(1)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".npy")


class DataError(ValueError):
    """A problem with the data on disk; the message names the file and how to fix it."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's error is raised again in the training process from the text
        # of its whole traceback (torch's ExceptionWrapper: "Caught DataError in DataLoader
        # worker process 0. Original Traceback ..."): keep the message alone, as without
        # workers; the traceback is of the worker's internals, not of the file.
        last = message.rfind(WORKER_ERROR_LINE)
        if message.startswith("Caught DataError in DataLoader worker") and last >= 0:
            message = message[last + len(WORKER_ERROR_LINE) :].rstrip("\n")
        super().__init__(message)


# How a DataError's own line starts in a worker's formatted traceback.
WORKER_ERROR_LINE = f"\n{DataError.__module__}.{DataError.__qualname__}: "


def is_truncated(data: bytes) -> bool:
    """True for a PNG without its IEND chunk or a JPEG without its end marker.

    OpenCV decodes such files partially, with only a warning: the rest would be grey.
    """
    if data.startswith(b"\x89PNG"):
        return b"IEND" not in data[-32:]
    if data.startswith(b"\xff\xd8"):
        return data.rfind(b"\xff\xd9") < len(data) - 1024  # some cameras pad after the marker
    return False


def read_file(path: Path, kind: str) -> bytes:
    """The bytes of an image or mask file (``kind`` names which in messages).

    The checks before any decoder: a file that is missing, not a regular file, unreadable, empty
    or cut short raises a DataError naming it, as does (in the readers) one that cannot be decoded.
    """
    try:
        data = path.read_bytes()
    except OSError as error:  # missing, a directory, no read permission, an I/O error
        raise DataError(f"{path}: cannot read {kind} ({error.strerror or error})") from error
    if not data:  # OpenCV would fail an assertion (!buf.empty()) instead of returning None
        raise DataError(f"{path}: {kind} file is empty (0 bytes: an interrupted copy?); replace it")
    if is_truncated(data):
        raise DataError(f"{path}: {kind} file is truncated (an interrupted copy?); replace it")
    return data


# The pixel types an image may hold: the consumers widen them on the device (data.scale says
# how: auto for the unsigned ones, a number for the others). Not int32: OpenCV cannot resize it.
IMAGE_DTYPES = (np.uint8, np.uint16, np.int16, np.float32)
# Read by tifffile (TIFF/GeoTIFF) or numpy (.npy, channels last), at their dtype and band count;
# every other suffix is a photo format decoded by OpenCV.
RASTER_SUFFIXES = (".tif", ".tiff", ".npy")
# Class-index masks (read_mask): index PNGs and integer label rasters.
CLASS_MASK_SUFFIXES = (".png", *RASTER_SUFFIXES)
GEO_EXTRA = 'pip install -e ".[geo]"'


def read_tiff(path: Path, kind: str) -> np.ndarray:
    """A TIFF/GeoTIFF's first image as (H, W, C) at its dtype. The layout comes from the file's
    own axes (tifffile's ``series.axes``): YX (one band), YXS (bands interleaved) or SYX/CYX
    (planar); anything else (a multi-page stack, a time series) is a DataError naming the axes,
    never a guess from the array's shape."""
    try:
        import tifffile
    except ImportError as error:
        raise DataError(
            f"{path}: reading TIFF needs tifffile and imagecodecs: {GEO_EXTRA}"
        ) from error
    data = read_file(path, kind)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            series = tiff.series[0]
            axes, array = series.axes, series.asarray()
    except Exception as error:  # tifffile raises TiffFileError, ValueError, KeyError, ...
        hint = (
            f"; compressed TIFFs need imagecodecs: {GEO_EXTRA}"
            if "imagecodecs" in str(error)
            else ""
        )
        raise DataError(
            f"{path}: cannot decode {kind} ({type(error).__name__}: {error}){hint}"
        ) from error
    axes, shape = tiff_layout(path, kind, axes, array.shape)
    array = array.reshape(shape)
    if axes == "YX":
        return array[..., None]
    if axes == "YXS":
        return array
    return np.ascontiguousarray(array.transpose(1, 2, 0))  # planar (SYX, CYX): a plane per band


def tiff_layout(path: Path, kind: str, axes: str, shape: Sequence[int]) -> tuple[str, list[int]]:
    """A TIFF series' ``axes`` and ``shape`` (tifffile's ``series.axes``) without the axes of
    length 1 other than Y and X, which say nothing about the layout (tifffile keeps the shape an
    (H, W, 1) array was written with, as YXQ): YX, YXS or planar SYX/CYX, or a DataError."""
    kept = [i for i, (axis, size) in enumerate(zip(axes, shape, strict=True))
            if size > 1 or axis in "YX"]  # fmt: skip
    axes, shape = "".join(axes[i] for i in kept), [shape[i] for i in kept]
    if axes not in ("YX", "YXS", "SYX", "CYX"):
        raise DataError(
            f"{path}: {kind} has axes {axes} (shape {shape}); expected one image of axes YX, "
            "YXS or SYX (bands as samples of one page). A stack of pages (Q, I, Z, T axes) is "
            "not read as bands: write it with tifffile.imwrite(path, array_hwc, "
            "photometric='minisblack', planarconfig='contig'), or with GDAL/rasterio"
        )
    return axes, shape


def read_npy(path: Path, kind: str) -> np.ndarray:
    """A ``.npy`` array, (H, W) or (H, W, C): channels last, as stated (not guessed)."""
    read_file(path, kind)  # the common checks: missing, unreadable, empty
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # ValueError (pickled objects, a bad header), EOFError, OSError
        raise DataError(
            f"{path}: cannot read {kind} as .npy ({type(error).__name__}: {error})"
        ) from error
    if array.ndim == 2:
        return array[..., None]
    if array.ndim != 3:
        raise DataError(
            f"{path}: {kind} array has shape {list(array.shape)}; a .npy {kind} is (H, W) or "
            "(H, W, C), channels last"
        )
    return array


def read_raster(path: Path, kind: str) -> np.ndarray:
    """A TIFF or ``.npy`` file (``RASTER_SUFFIXES``) as (H, W, C) at its dtype."""
    if path.suffix.lower() == ".npy":
        return read_npy(path, kind)
    return read_tiff(path, kind)


def png_bit_depth(data: bytes) -> int | None:
    """The bit depth in a PNG's header (IHDR), None for other formats."""
    return data[24] if data.startswith(b"\x89PNG") and len(data) > 25 else None


def read_image(path: Path, bands: Sequence[int] | None = None) -> np.ndarray:
    """Decode an image file to (H, W, C) at its stored dtype (one of ``IMAGE_DTYPES``).

    - TIFF/GeoTIFF (tifffile, the ``geo`` extra) and ``.npy`` (channels last): every band, as
      stored (``read_tiff``, ``read_npy``).
    - 16-bit PNG: its channels at 16 bits (grey: C=1; colour: RGB or RGBA order).
    - 8-bit PNG, JPEG, BMP, WebP: photos, RGB uint8 (C=3) as always: grey is expanded, alpha
      dropped, EXIF orientation applied (OpenCV's colour decode).

    ``bands``: 1-based band numbers to keep, in that order (as GDAL and rasterio count; e.g.
    [4, 3, 2]). A file that cannot be decoded, a dtype outside ``IMAGE_DTYPES`` or a band out of
    range raises a DataError naming the file.
    """
    if path.suffix.lower() in RASTER_SUFFIXES:
        image = read_raster(path, "image")
    else:
        data = read_file(path, "image")
        # 16-bit PNGs at their depth; the rest as before (the same pixels for 8-bit photos).
        flags = cv2.IMREAD_UNCHANGED if png_bit_depth(data) == 16 else cv2.IMREAD_COLOR
        # OpenCV decodes PNG/JPEG faster than PIL. It returns None for most undecodable data but
        # raises for some, e.g. a header claiming more than CV_IO_MAX_IMAGE_PIXELS.
        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        except cv2.error:
            image = None
        if image is None:
            raise DataError(f"{path}: cannot decode image (not an image file, or corrupted)")
        if image.ndim == 2:
            image = image[..., None]
        elif image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    if image.dtype not in IMAGE_DTYPES:
        raise DataError(
            f"{path}: image pixels are {image.dtype}; supported: "
            f"{', '.join(np.dtype(t).name for t in IMAGE_DTYPES)} (convert it, e.g. float64 to "
            "float32)"
        )
    return image if bands is None else select_bands(image, bands, path)


# 16-bit PNG colour type -> the channels OpenCV decodes it to (grey + alpha becomes RGBA)
PNG16_CHANNELS = {0: 1, 2: 3, 4: 4, 6: 4}


def image_info(path: Path) -> tuple[int, np.dtype]:
    """The band count and dtype ``read_image`` (without ``bands``) gives for ``path``, from the
    file's header alone (no pixels decoded); a DataError names a file whose header cannot be read.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return (array.shape[2] if array.ndim == 3 else 1), array.dtype
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tiff:
                series = tiff.series[0]
                axes, shape = tiff_layout(path, "image", series.axes, series.shape)
                # the length of the bands' axis (S or C), or one band
                sizes = dict(zip(axes, shape, strict=True))
                return sizes.get("S", sizes.get("C", 1)), series.dtype
        with open(path, "rb") as file:
            header = file.read(26)
    except DataError:
        raise
    except ImportError as error:
        raise DataError(
            f"{path}: reading TIFF needs tifffile and imagecodecs: {GEO_EXTRA}"
        ) from error
    except Exception as error:
        raise DataError(
            f"{path}: cannot read the image's header ({type(error).__name__}: {error})"
        ) from error
    if png_bit_depth(header) == 16:
        return PNG16_CHANNELS.get(header[25], 3), np.dtype(np.uint16)
    return 3, np.dtype(np.uint8)  # photos decode to RGB


def first_readable(images: Sequence[Path]) -> tuple[Path, int, np.dtype]:
    """The first of ``images`` whose header reads, with its ``image_info``; the first one's
    DataError when none does."""
    errors = []
    for path in images:
        try:
            return path, *image_info(path)
        except DataError as error:
            errors.append(error)
    raise errors[0]


def select_bands(image: np.ndarray, bands: Sequence[int], path: Path) -> np.ndarray:
    """The 1-based ``bands`` of an (H, W, C) image, in that order (a copy)."""
    count = image.shape[2]
    outside = [b for b in bands if not 1 <= b <= count]
    if outside:
        raise DataError(
            f"{path}: data.bands={list(bands)} asks for bands {outside} but the image has {count} "
            f"band(s), numbered 1-{count} (counted from 1, as GDAL and rasterio count)"
        )
    return image[..., [b - 1 for b in bands]]


def read_label_raster(path: Path) -> np.ndarray:
    """A TIFF/GeoTIFF or ``.npy`` label raster as (H, W) integers (any integer dtype, or bool).

    One band only: a stack (H, W, C>1) or a float raster is a DataError naming the file.
    """
    array = read_raster(path, "mask")
    if array.shape[2] != 1:
        raise DataError(
            f"{path}: mask has {array.shape[2]} bands (shape {list(array.shape)}); a label raster "
            "holds one band of class values, (H, W) or (H, W, 1)"
        )
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise DataError(
            f"{path}: mask pixels are {array.dtype}; label rasters hold integer class values "
            "(store them as uint8, uint16 or int16)"
        )
    return array[..., 0]


def read_mask(path: Path, mode: str | None = None) -> np.ndarray:
    """Decode a label file to (H, W) class indices: uint8, uint16 for 16-bit PNGs, bool for 1-bit;
    TIFF and ``.npy`` label rasters at their integer dtype (``read_label_raster``).

    PIL keeps palette ("P") PNGs as their indices, where OpenCV would expand them to colours.
    ``mode``: a PIL mode to convert to first ("L" for JPEG masks, "RGB" for colour-coded ones,
    which may then have 3 channels). A file that cannot be decoded raises a DataError naming it.
    """
    if mode is None and path.suffix.lower() in RASTER_SUFFIXES:
        return read_label_raster(path)
    data = read_file(path, "mask")
    try:
        with Image.open(io.BytesIO(data)) as mask:
            stored = mask.mode
            array = np.array(mask if mode is None else mask.convert(mode))  # a writable copy
    except UnidentifiedImageError as error:  # its message would name the BytesIO, not the file
        raise DataError(f"{path}: cannot decode mask (not an image file, or corrupted)") from error
    # Pillow's decoders fail with OSError, SyntaxError, ValueError, DecompressionBombError, ...
    # depending on the format and the damage: each is a file that cannot be used.
    except Exception as error:
        raise DataError(f"{path}: cannot decode mask ({type(error).__name__}: {error})") from error
    if mode is None and array.ndim != 2:
        raise DataError(
            f"{path}: mask has mode {stored} with {array.shape[-1]} channels; expected a "
            "single-channel index PNG (mode L or P) whose pixel values are class indices "
            "(colour-coded masks: data=folder with data.dataset.mask_format=rgb)"
        )
    return array


def mask_dtype(num_classes: int, ignore_index: int) -> type[np.integer]:
    """The dtype of a dataset's masks: uint8 where every class index and ``ignore_index`` fit in
    0-255, else int16 (half the bytes of int32; the consumers widen on the device)."""
    if num_classes - 1 <= 255 and 0 <= ignore_index <= 255:
        return np.uint8
    limits = np.iinfo(np.int16)
    if num_classes - 1 > limits.max or not limits.min <= ignore_index <= limits.max:
        raise ValueError(
            f"num_classes={num_classes}, ignore_index={ignore_index}: masks are int16 past 255, so "
            f"classes must be at most {limits.max + 1} and ignore_index in [{limits.min}, {limits.max}]"
        )
    return np.int16


class SegmentationDataset(Dataset):
    """Base class: subclasses fill ``load(index)`` and ``describe(index)``.

    ``__getitem__`` accepts a plain index or the ``(index, seed, position)`` tuples of
    ``InfiniteSampler`` and returns ``image`` (C, H, W) at its stored dtype (uint8 RGB for
    photos; ``in_channels`` bands of ``dtype`` for rasters), not normalized, and ``mask``
    (H, W) of ``mask_dtype`` (uint8, or int16 where classes or ignore_index pass 255). Samples
    travel small; the consumers normalize and widen them on the device (issue 11).

    A subclass that reads files takes ``cache_dir`` (``data.cache_dir``) and calls
    ``use_cache(cache_dir)`` at the end of its ``__init__``: samples are then decoded once and
    read back from there (``seg.data.cache``).
    """

    # Attributes that do not change what a sample decodes to, left out of the cache's key; every
    # other attribute (label table, mask format, ...) is part of it, so a new setting is too.
    CACHE_NEUTRAL = ("transform", "samples", "skip_bad_samples", "cache", "_counts", "_skipped",
                     "scale")  # fmt: skip
    # The pixels every sample must have; RGB photo datasets keep these, data=folder decides
    # them from its settings and first image (``expect_pixels``). Part of the cache's key.
    bands: list[int] | None = None  # data.bands: 1-based, selected and reordered
    in_channels: int = 3
    dtype: str = "uint8"
    nodata: float | str | list[float] | None = None  # data.nodata: ignored labels, see Normalize
    scale: float | str = "auto"

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        transform: A.Compose | None = None,
        label_map: np.ndarray | None = None,
        skip_bad_samples: float = 0.0,
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform
        self.label_map = label_map  # lookup table from stored label values to train ids
        self.mask_dtype = mask_dtype(num_classes, ignore_index)  # of every mask returned
        # Up to this fraction of the samples read may be unreadable/invalid and replaced by
        # the next good one (0: the first bad sample stops the run).
        self.skip_bad_samples = skip_bad_samples
        # Shared with the DataLoader workers (created before they fork): reads, skips, and
        # the first distinct skipped samples' indices for the report.
        self._counts = multiprocessing.Array("q", 2)
        self._skipped = multiprocessing.Array("q", [-1] * 10)
        self.cache: DecodedCache | None = None  # set by use_cache

    def use_cache(self, cache_dir: str | None) -> None:
        """Keep decoded samples in ``cache_dir`` (None: off). Called at the end of a subclass's
        ``__init__``, once every setting that ``load`` and ``map_labels`` read is set: they key
        the cache. A folder that cannot be written is a PermissionError naming data.cache_dir."""
        if cache_dir is None:
            return
        settings = {k: v for k, v in vars(self).items() if k not in self.CACHE_NEUTRAL}
        self.cache = DecodedCache(cache_dir, type(self).__name__, settings)
        pixel_bytes = self.in_channels * np.dtype(self.dtype).itemsize
        self.cache.log_size(len(self), self.source_files(0)[0], self.mask_dtype, pixel_bytes)

    def expect_pixels(
        self,
        images: Sequence[Path],
        bands: Sequence[int] | None,
        in_channels: int | None,
        nodata: float | str | Sequence[float] | None,
        scale: float | str,
    ) -> None:
        """Set the pixels every sample must have from the first of ``images`` whose header reads
        and the data keys: ``bands`` (1-based), ``in_channels`` (None: ``len(bands)`` or that
        image's band count), ``nodata`` (a number, one per band, or ``"nan"``), ``scale``
        (``auto`` needs uint8 or uint16). Called by a subclass before ``use_cache``; a DataError
        names the file. Unreadable images before it fail (or are skipped) when read, as any.
        Colour augmentations leave the transform unless the images are 3 bands of uint8."""
        self.bands = [int(b) for b in bands] if bands is not None else None
        if nodata is not None and not isinstance(nodata, int | float | str):
            nodata = [float(value) for value in nodata]
        if isinstance(nodata, str) and nodata != "nan":
            raise ValueError(f"data.nodata={nodata!r}: give a number, one per band, or nan")
        self.nodata, self.scale = nodata, scale
        # From the header: a dataset over cached samples reads no pixels of its files.
        first_image, count, dtype = first_readable(images)
        if self.bands is not None:
            select_bands(np.empty((0, 0, count)), self.bands, first_image)  # in range
            count = len(self.bands)
        self.dtype = dtype.name
        if nodata == "nan" and dtype.kind != "f":
            raise DataError(
                f"{first_image}: data.nodata=nan but the pixels are {self.dtype}, which hold no "
                "NaN: give the number that marks no data"
            )
        if in_channels is not None and in_channels != count:
            raise DataError(
                f"{first_image}: {count} bands"
                f"{f' (data.bands={self.bands})' if self.bands else ''} but "
                f"data.in_channels={in_channels}; set data.in_channels={count} or null (derived)"
            )
        self.in_channels = count
        if isinstance(nodata, list) and len(nodata) != count:
            raise ValueError(
                f"data.nodata has {len(nodata)} values but the images have {count} bands "
                f"({first_image}); give one per band or a single number"
            )
        if scale == "auto" and self.dtype not in ("uint8", "uint16"):
            raise DataError(
                f"{first_image}: pixels are {self.dtype}, and data.scale=auto is defined for uint8 "
                "(255) and uint16 (65535) only: give the number that maps them to about [0, 1], "
                "e.g. data.scale=10000 for Sentinel-2 reflectance, 4095 for 12-bit data, 1 for "
                "floats in [0, 1]"
            )
        if not (self.in_channels == 3 and self.dtype == "uint8"):  # albumentations: RGB uint8
            self.transform = without_color(self.transform, f"{count} bands of {self.dtype}")

    def read_pixels(self, path: Path) -> np.ndarray:
        """``read_image`` with ``bands``, checked against the pixels every sample must have:
        the band count and dtype of the others, and no NaNs without ``data.nodata``."""
        image = read_image(path, self.bands)
        if image.shape[2] != self.in_channels or image.dtype.name != self.dtype:
            raise DataError(
                f"{path}: {image.shape[2]} bands of {image.dtype}"
                f"{f' (data.bands={self.bands})' if self.bands else ''} but the dataset's "
                f"images have {self.in_channels} of {self.dtype} (data.in_channels, or its first "
                "image): every image needs the same bands and pixel type"
            )
        self.check_pixels(image, path)
        return image

    def check_pixels(self, image: np.ndarray, path: Path) -> None:
        if self.nodata is None and image.dtype.kind == "f" and np.isnan(image).any():
            raise DataError(
                f"{path}: the image holds NaN pixels and data.nodata is not set: set "
                "data.nodata=nan to ignore them (their labels are ignored, the model sees the band "
                "mean), or fill them in the file"
            )

    def mask_nodata(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``mask`` with ``ignore_index`` where any band of ``image`` is ``data.nodata`` (or NaN)."""
        if self.nodata is None:
            return mask
        missing = np.isnan(image) if image.dtype.kind == "f" else np.zeros(image.shape, bool)
        if self.nodata != "nan":  # compared as float64: a value outside the dtype matches none
            missing |= image == np.asarray(self.nodata, np.float64)
        # arrays of both dtypes: the result holds every mask value and ignore_index
        return np.where(missing.any(axis=2), np.asarray(self.ignore_index, self.mask_dtype), mask)

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the raw (H, W, C) image (``read_pixels``) and (H, W) integer mask."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Name the sample in error messages (usually the mask's path)."""
        raise NotImplementedError

    def source_files(self, index: int) -> tuple[Path, ...]:
        """The files sample ``index`` is decoded from, the image first: its cache entry's key
        (their paths, sizes and modification times). Needed only with a cache."""
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = (key[0], key[1:]) if isinstance(key, tuple) else (key, None)
        with self._counts.get_lock():
            self._counts[0] += 1
        for attempt in range(len(self)):
            try:
                return self.prepare((index + attempt) % len(self), seed)
            except DataError as error:
                if not self.skip_bad_samples:
                    raise
                self.record_skip((index + attempt) % len(self), error)
        raise DataError("every sample of the split is unreadable or invalid")

    def record_skip(self, index: int, error: DataError) -> None:
        with self._counts.get_lock():
            reads, skips = self._counts[0], self._counts[1] + 1
            self._counts[1] = skips
            skipped = self._skipped[:]
            met_before = index in skipped  # in an earlier epoch: warned then
            if not met_before and -1 in skipped:
                self._skipped[skipped.index(-1)] = index
        # The allowance is a share of the split, growing once more than one epoch was read.
        if skips > self.skip_bad_samples * max(reads, len(self)):
            raise DataError(
                f"{skips} bad samples among {reads} read, more than "
                f"data.skip_bad_samples={self.skip_bad_samples}; the last one: {error}"
            ) from error
        if not met_before:
            log.warning("Skipping a bad sample (data.skip_bad_samples): %s", error)

    def report_skipped(self) -> None:
        """Log how many bad samples were skipped, and each one's error, naming its bad file
        (the image or the mask: the sample's mask is only its name)."""
        reads, skips = self._counts[:]
        if not skips:
            return
        errors = []
        for index in (i for i in self._skipped[:] if i >= 0):
            try:  # decoded again: the workers' messages stayed in their processes
                self.decoded(index)
                errors.append(f"{self.describe(index)} (readable now)")
            except DataError as error:
                errors.append(str(error))
        listed = "".join(f"\n  {error}" for error in errors)
        full = len(errors) == len(self._skipped)  # later distinct ones went unrecorded
        log.warning("Skipped %d bad samples of %d read (data.skip_bad_samples)%s:%s", skips,
                    reads, f", the first {len(errors)} distinct" * full, listed)  # fmt: skip

    def prepare(
        self, index: int, seed: tuple[int, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Load (or read from the cache), map, check and transform sample ``index``."""
        image, mask = self.decoded(index)
        if self.transform is None:
            return to_tensors(image, mask)
        return apply(self.transform, image, mask, seed)

    def decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` before its transform: the (H, W, C) image and the (H, W) mask of
        ``mask_dtype``, mapped (``data.nodata`` pixels ignored) and checked. With a cache, read from it (read-only memory
        maps), or decoded and then written to it: the mapping is a fixed table and the checks
        passed, so the cached pair is what decoding gives, bit for bit."""
        entry = self.cache.entry(self.source_files(index)) if self.cache is not None else None
        cached = None
        if entry is not None:
            cached = self.cache.read(entry, self.mask_dtype, self.in_channels, self.dtype)
        if cached is not None:
            try:  # the checks the files get (an entry edited, or damaged with a valid header)
                self.check_labels(cached[1], index)
                return cached
            except DataError as error:
                log.warning("Decoding again: the cached entry %s fails the label check (%s)",
                            entry, error)  # fmt: skip
        image, mask = self.load(index)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{self.describe(index)}: image is {image.shape[1]}x{image.shape[0]} but mask is "
                f"{mask.shape[1]}x{mask.shape[0]} (width x height); they must be the same size"
            )
        mask = self.mask_nodata(image, self.map_labels(mask, index))
        self.check_labels(mask, index)
        # Checked, so its values fit; cast before the transform so that padding with
        # ignore_index is exact (a no-op for the usual uint8 masks).
        mask = mask.astype(self.mask_dtype, copy=False)
        if entry is not None:
            self.cache.write(entry, image, mask)
        return image, mask

    def map_labels(self, mask: np.ndarray, index: int) -> np.ndarray:
        """Stored label values -> class indices through ``label_map`` (if any).

        A value beyond the lookup table (a 16-bit mask where 8-bit label ids are expected) is a
        DataError naming the file and the values, not an IndexError deep inside a worker.
        """
        # 1-bit PNGs: as integers, so that tables and padding apply. Not a view: Pillow's bool
        # arrays may store True as 255.
        if mask.dtype == bool:
            mask = mask.astype(np.uint8)
        if self.label_map is None:
            return mask
        size = len(self.label_map)
        # uint8 masks always fit the usual 256-entry tables: no pass over the pixels for them,
        # and cv2.LUT maps them about 4x faster than indexing (0.6 vs 2.8 ms at 1024x2048).
        if mask.dtype == np.uint8 and size == 256 and self.label_map.dtype in (np.uint8, np.int16):
            return cv2.LUT(mask, self.label_map)
        if not (mask.dtype == np.uint8 and size >= 256):
            outside = (mask < 0) | (mask >= size)
            if outside.any():
                raise DataError(
                    f"{self.describe(index)}: label values {shown_values(mask, outside)} are "
                    f"outside this dataset's label ids 0-{size - 1} (the mask is "
                    f"{mask.dtype}). Store the masks as 8-bit PNGs holding the dataset's label ids."
                )
        return self.label_map[mask]

    def check_labels(self, mask: np.ndarray, index: int) -> None:
        # A 2-class mask with no class 1 but many ignored pixels: 0/255 binary, not 0/1.
        ignored_share = (mask == self.ignore_index).mean() if self.num_classes == 2 else 0.0
        if ignored_share > 0.01 and not (mask == 1).any() and (mask == 0).any():
            raise DataError(
                f"{self.describe(index)}: the mask holds 0 and {self.ignore_index} only: a "
                f"binary mask stored as 0/255? {self.ignore_index} is ignore_index, so the "
                "foreground would be ignored. Store it as 0/1, or read it with "
                "data.dataset.mask_format=binary (folder datasets)."
            )
        invalid = (mask >= self.num_classes) & (mask != self.ignore_index)
        if invalid.any():
            raise DataError(
                f"{self.describe(index)}: label values {shown_values(mask, invalid)} are not "
                f"class indices in [0, {self.num_classes}) nor ignore_index={self.ignore_index}. Check "
                "data.num_classes and the mask format (index PNG with one value per class)."
            )


def shown_values(mask: np.ndarray, where: np.ndarray) -> list:
    """The distinct values of ``mask`` at ``where``, the first ten, for an error message."""
    values = np.unique(mask[where]).tolist()
    return values[:10] + (["..."] if len(values) > 10 else [])


class PairedFiles(SegmentationDataset):
    """A dataset whose subclass lists ``self.samples``: (image path, mask path) pairs."""

    samples: list[tuple[Path, Path]]

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return str(self.samples[index][1])

    def source_files(self, index: int) -> tuple[Path, ...]:
        return self.samples[index]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.samples[index]
        return self.read_pixels(image_path), read_mask(mask_path)
