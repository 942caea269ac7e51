"""``data.cache_dir``: each sample decoded once, then read back as arrays (issue 11).

Decoding a Cityscapes PNG pair is about 93% of a training sample's CPU time. With a cache
directory set, the first read of a sample writes its decoded image (H, W, C) at its stored dtype
(uint8 RGB for photos; any band count and depth for rasters) and its mapped,
checked mask (H, W) as two ``.npy`` files; later reads (epochs, workers, ranks, runs) load those
with ``np.load(mmap_mode="r")`` and touch only the pages under the crop. The price is disk:
uncompressed, about 8.4 MB per 2048x1024 sample (Cityscapes train: 25 GB).

Layout: ``<cache_dir>/<DatasetClass>-<settings hash>/<ab>/<files hash>-<stat hash>.{image,mask}.npy``.
The settings hash covers what decides a decoded sample besides its files (label mapping, mask
format, class count, the bands selected, the images' band count and dtype, nodata, decoder
versions, ``CACHE_FORMAT``); the files hash the source paths; the
stat hash their sizes, modification and change times, so an edited or replaced file is a miss,
never a stale hit, and its old entry is deleted when the new one is written.

Entries are written to a temporary name and ``os.replace``d: a killed run leaves at most a
``.*.tmp`` file that nothing reads, and DataLoader workers or torchrun ranks writing the same
entry at once each replace it whole with the same bytes.
"""

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import PIL
from PIL import Image

log = logging.getLogger(__name__)

# Part of every entry's key: bump it when a dataset's load/map_labels returns something else for
# the same files and settings, so that caches written before are never served.
CACHE_FORMAT = 2  # 2: images of any band count and dtype (1: uint8 RGB only)


def fingerprint(value: Any) -> str:
    """A stable text for a dataset setting (equal settings, equal text, in any process).

    Types without a stable text (objects whose repr holds an address) are refused: the key would
    change every run, and the cache would silently never hit.
    """
    if isinstance(value, np.ndarray):  # a label table: its bytes, not numpy's abbreviated repr
        digest = hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()
        return f"ndarray({value.dtype},{value.shape},{digest})"
    if isinstance(value, dict):
        return "{" + ",".join(f"{fingerprint(k)}:{fingerprint(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(fingerprint(v) for v in value) + "]"
    if value is None or isinstance(value, bool | int | float | str | Path | type | np.generic):
        return repr(value)
    raise TypeError(
        f"cannot key the decoded-sample cache on a {type(value).__name__}: give the dataset "
        "attribute a plain value, or list it in SegmentationDataset.CACHE_NEUTRAL"
    )


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image from its header: TIFF and ``.npy`` rasters by their readers'
    own headers (Pillow would warn about a TIFF of 13 bands), photos by Pillow."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False).shape[:2]
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            sizes = dict(zip(series.axes, series.shape, strict=True))
            return sizes["Y"], sizes["X"]
    with Image.open(path) as image:  # reads the header only
        return image.size[::-1]


class DecodedCache:
    """The entries of one dataset's settings under ``data.cache_dir`` (see the module docstring).

    ``entry(files)`` names a sample's entry, ``read(entry)`` returns its arrays or None (missing,
    torn or not what was expected: decode again), ``write(entry, image, mask)`` stores them.
    """

    def __init__(self, cache_dir: str | Path, name: str, settings: dict[str, Any]):
        identity = fingerprint({"format": CACHE_FORMAT, "class": name, "cv2": cv2.__version__,
                                "pillow": PIL.__version__, **settings})  # fmt: skip
        self.root = Path(cache_dir)
        self.directory = self.root / f"{name}-{hashlib.sha1(identity.encode()).hexdigest()[:16]}"
        try:  # fail before any work, naming the key, rather than in a worker mid-epoch
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as error:
            raise PermissionError(
                f"data.cache_dir={cache_dir}: cannot write the decoded-sample cache there "
                f"({error.strerror or error}); give a writable folder, or data.cache_dir=null "
                "to decode every sample each time"
            ) from error
        self.writing = True  # until a write fails (a full disk): then reads only, with a warning

    def entry(self, files: tuple[Path, ...]) -> Path | None:
        """The entry's path without suffix; None when a source file cannot be stat'ed (the
        uncached read then raises the DataError that names it)."""
        names = "\0".join(os.path.abspath(path) for path in files)
        try:
            stats = [os.stat(path) for path in files]
        except OSError:
            return None
        # The change time too: cp -p, rsync -a or touch -r keep a replaced file's mtime (and
        # often its size), but nothing sets ctime back.
        state = "\0".join(f"{s.st_size}:{s.st_mtime_ns}:{s.st_ctime_ns}" for s in stats)
        name = hashlib.sha1(names.encode()).hexdigest()[:24]
        return self.directory / name[:2] / f"{name}-{hashlib.sha1(state.encode()).hexdigest()[:12]}"

    def read(
        self, entry: Path, mask_dtype: type, in_channels: int = 3, dtype: str = "uint8"
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached (H, W, ``in_channels``) image of ``dtype`` and (H, W) ``mask_dtype`` mask,
        read-only memory maps; None when the entry is missing or unusable (a file cut short by
        a power loss) or not of that shape and dtype."""
        try:
            image = np.load(f"{entry}.image.npy", mmap_mode="r")
            mask = np.load(f"{entry}.mask.npy", mmap_mode="r")
        except (OSError, ValueError, EOFError):  # missing; an empty or short file
            return None
        if (
            image.dtype != dtype
            or image.ndim != 3
            or image.shape[2] != in_channels
            or mask.shape != image.shape[:2]
            or mask.dtype != mask_dtype
        ):
            return None
        return image, mask

    def write(self, entry: Path, image: np.ndarray, mask: np.ndarray) -> None:
        """Store a sample's arrays under ``entry`` (each file whole or not at all), then delete
        the entries of the same files at another size or modification time."""
        if not self.writing:
            return
        try:
            entry.parent.mkdir(exist_ok=True)
            for suffix, array in ((".image.npy", image), (".mask.npy", mask)):
                final = entry.with_name(entry.name + suffix)
                # A name of this process alone, hidden and never read: two writers of one entry
                # do not share a temporary file, and a killed one leaves no torn entry behind.
                temp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
                try:
                    with open(temp, "xb") as file:
                        np.save(file, np.ascontiguousarray(array), allow_pickle=False)
                    os.replace(temp, final)
                finally:
                    temp.unlink(missing_ok=True)
            files_hash = entry.name.split("-")[0]
            for old in entry.parent.glob(f"{files_hash}-*.npy"):
                if not old.name.startswith(f"{entry.name}."):
                    old.unlink(missing_ok=True)
        except OSError as error:  # a full disk should not end the run: it only gets slower
            self.writing = False
            log.warning(
                "data.cache_dir: cannot write to %s (%s); this process caches no more samples "
                "(those cached are still read)",
                self.directory, error.strerror or error,
            )  # fmt: skip

    def log_size(
        self, samples: int, first_image: Path, mask_dtype: type, pixel_bytes: int = 3
    ) -> None:
        """Log what the cache will hold once every sample was read (from the first image's size),
        the free space, and other settings' caches beside it."""
        try:
            height, width = image_size(first_image)
        except Exception:  # an unreadable file fails later with its DataError; no estimate
            return
        # + .npy headers; pixel_bytes: the image's bands x bytes per band
        per_sample = height * width * (pixel_bytes + np.dtype(mask_dtype).itemsize) + 256
        total, free = samples * per_sample, shutil.disk_usage(self.directory).free
        others = [p.name for p in self.root.iterdir() if p.is_dir() and p != self.directory]
        log.info(
            "data.cache_dir: decoded samples go to %s: %d samples x %.1f MB = %.1f GB once all "
            "were read (estimated from %dx%d, the first image's size); %.1f GB free there%s",
            self.directory, samples, per_sample / 1e6, total / 1e9, width, height, free / 1e9,
            f"; also there, caches of other settings or seg versions: {', '.join(others)}"
            if others else "",
        )  # fmt: skip
        if total > free:
            log.warning(
                "data.cache_dir=%s: the cache needs about %.1f GB but %.1f GB are free: samples "
                "past that are decoded each time",
                self.root, total / 1e9, free / 1e9,
            )  # fmt: skip
