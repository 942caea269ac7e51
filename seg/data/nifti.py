"""``data=nifti``: CT and MRI volumes (NIfTI ``.nii``/``.nii.gz``) as 2D slices (issue 23).

Layout: ``<root>/images/<split>/<case>.nii.gz`` and ``<root>/labels/<split>/<case>.nii.gz``,
paired by case name. A split is a folder of whole volumes, so no patient is ever in two
splits. Every volume is reoriented to the closest canonical (RAS+) orientation first
(``nibabel.as_closest_canonical``), so that ``axis`` means the same for every file whatever
order its scanner stored the voxels in: 0 sagittal, 1 coronal, 2 axial.

A ``.nii.gz`` cannot give one slice without decompressing the whole file, so each volume is
decoded once: its windowed uint16 voxels and its labels go to ``data.cache_dir`` (two ``.npy``
files per volume, read back as memory maps; the same ``DecodedCache`` keys as other datasets:
settings, paths, sizes and times) when one is set, and every process also keeps its last few
volumes in memory (``volumes_in_memory``; DataLoader workers each their own).

Slices leave as (H, W, C) uint16, the window mapped to 0-65535 (0.02 HU apart for
[-1000, 400]; ``data.scale=auto`` divides by 65535 on the device), and (H, W) class indices.
C is ``2 * context + 1``: the slice alone, or with ``context`` slices on either side (2.5D).
"""

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from seg.data.base import DataError, SegmentationDataset, shown_values
from seg.data.cache import DecodedCache

log = logging.getLogger(__name__)

MEDICAL_EXTRA = 'pip install -e ".[medical]"'
NIFTI_TREE = """expected:
  <root>/images/<split>/<case>.nii.gz   image volumes (.nii or .nii.gz, 3D)
  <root>/labels/<split>/<case>.nii.gz   label volumes of the same case name, grid and affine"""
AXES = ("sagittal", "coronal", "axial")  # canonical RAS axes 0, 1, 2


def nibabel():
    """The nibabel module, or an ImportError naming the extra that installs it."""
    try:
        import nibabel as nib
    except ImportError as error:
        raise ImportError(f"NIfTI volumes need nibabel: {MEDICAL_EXTRA}") from error
    return nib


def case_name(path: Path) -> str | None:
    """``case`` for ``case.nii`` or ``case.nii.gz``; None for any other file."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def open_volume(path: Path, kind: str):
    """The NIfTI image at ``path`` (header read, voxels not yet): a DataError naming the file
    when it is missing, not NIfTI, or not a 3D volume (a 4D series with one volume is taken)."""
    nib = nibabel()
    try:
        image = nib.load(path)
    except FileNotFoundError as error:
        raise DataError(f"{path}: {kind} volume not found") from error
    except Exception as error:  # ImageFileError, a header cut short, ...
        raise DataError(
            f"{path}: cannot read {kind} volume ({type(error).__name__}: {error})"
        ) from error
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:  # (X, Y, Z, 1): one time point
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise DataError(
            f"{path}: {kind} volume has shape {tuple(shape)} ({len(shape)}D); a 3D volume "
            "(X, Y, Z) is expected: split a 4D series into one file per volume"
        )
    return image


def canonical_shape(image) -> tuple[int, ...]:
    """The shape ``as_closest_canonical`` gives, from the header alone (no voxels read)."""
    ornt = nibabel().io_orientation(image.affine)
    shape = [0, 0, 0]
    for size, (axis, _) in zip(image.shape, ornt, strict=True):
        shape[int(axis)] = size
    return tuple(shape)


def canonical_voxels(image, path: Path, kind: str) -> np.ndarray:
    """The voxels (X, Y, Z) in RAS+ orientation, scaled as the header says (``scl_slope``);
    a DataError naming the file when they cannot be read (a truncated ``.nii.gz``)."""
    try:
        return np.asanyarray(nibabel().as_closest_canonical(image).dataobj)
    except Exception as error:  # EOFError, zlib.error, OSError, ValueError: the data is damaged
        raise DataError(
            f"{path}: cannot read the {kind} volume's voxels ({type(error).__name__}: {error}); "
            "the file is truncated or damaged (an interrupted copy?): replace it"
        ) from error


def to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """A canonical (X, Y, Z) volume -> (D, H, W) slices along ``axis``, each shown as viewers
    show it: the remaining second axis runs up the rows (anterior or superior at the top)."""
    stack = np.moveaxis(volume, axis, 0)  # (D, A, B)
    return np.flip(stack.swapaxes(1, 2), 1)  # (D, B, A), B from high to low


def from_slices(stack: np.ndarray, axis: int) -> np.ndarray:
    """The inverse of ``to_slices``: (D, H, W) slices -> the canonical (X, Y, Z) volume."""
    return np.moveaxis(np.flip(stack, 1).swapaxes(1, 2), 0, axis)


def intensity_range(
    volume: np.ndarray, window: Sequence[float] | None, percentiles: Sequence[float]
) -> tuple[float, float]:
    """(low, high) of the voxels mapped to 0-1: the fixed ``window`` (CT, in Hounsfield units)
    or, without one, this volume's ``percentiles`` (MRI, whose scale differs per scan)."""
    if window is not None:
        return float(window[0]), float(window[1])
    low, high = np.percentile(volume, list(percentiles))
    return float(low), float(high)


def to_uint16(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Voxels clipped to [low, high] and mapped to 0-65535 (a flat volume: all 0)."""
    scale = 65535.0 / (high - low) if high > low else 0.0
    scaled = (np.clip(volume.astype(np.float32), low, high) - low) * scale
    return np.rint(scaled).astype(np.uint16)


def integer_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """Label voxels as int64; stored as floats (common in NIfTI) they must be whole numbers."""
    if labels.dtype.kind == "f":
        fractional = labels != np.round(labels)
        if fractional.any():
            raise DataError(
                f"{path}: label volume holds non-integer values {shown_values(labels, fractional)}"
                "; a label volume holds class indices (an image volume given as labels?)"
            )
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{path}: label volume has dtype {labels.dtype}; integers expected")
    return labels.astype(np.int64)


def slice_channels(stack: np.ndarray, z: int, context: int) -> np.ndarray:
    """Slice ``z`` of a (D, H, W) stack as (H, W, 2 * context + 1): slices z - context to
    z + context (2.5D; past the volume's ends its edge slice repeats)."""
    picked = [min(max(z + offset, 0), len(stack) - 1) for offset in range(-context, context + 1)]
    return np.stack([stack[i] for i in picked], axis=2)


def keep_slices(foreground: list[np.ndarray], share: float, seed: int) -> list[tuple[int, int]]:
    """(volume, slice) pairs: every slice with foreground, and ``share`` of those without,
    drawn with ``seed`` (the same list for the same seed: a resumed run reads what it read)."""
    pairs = [(v, z) for v, flags in enumerate(foreground) for z in range(len(flags))]
    empty = [i for i, (v, z) in enumerate(pairs) if not foreground[v][z]]
    rng = np.random.default_rng(seed)
    dropped = set(rng.permutation(empty)[round(share * len(empty)) :].tolist())
    return [pair for i, pair in enumerate(pairs) if i not in dropped]


def image_slices(
    path: Path, axis: int, window: Sequence[float] | None, percentiles: Sequence[float]
):
    """The image volume at ``path`` (nibabel's, for its affine and header) and its windowed
    (D, H, W) uint16 slices along ``axis`` of the canonical orientation."""
    image = open_volume(path, "image")
    voxels = canonical_voxels(image, path, "image")
    low, high = intensity_range(voxels, window, percentiles)
    return image, np.ascontiguousarray(to_slices(to_uint16(voxels, low, high), axis))


def write_label_volume(slices: np.ndarray, axis: int, image, path: Path) -> None:
    """(D, H, W) class indices from ``image_slices``' slices written to ``path`` as a label
    volume in ``image``'s own voxel order (its stored orientation, not RAS), with its affine
    and header (an integer type, no intensity scaling): it overlays the image in any viewer."""
    nib = nibabel()
    to_stored = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.io_orientation(image.affine)
    )
    labels = nib.orientations.apply_orientation(from_slices(slices, axis), to_stored)
    dtype = np.uint8 if slices.max(initial=0) <= 255 else np.int16
    header = image.header.copy()
    header.set_data_dtype(dtype)
    volume = type(image)(np.ascontiguousarray(labels, dtype), image.affine, header)
    volume.header.set_slope_inter(1, 0)  # class indices as stored, whatever the image's scaling
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(volume, path)


def volume_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """The (image, label) volume paths of ``split``, paired by case name."""
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    for directory in (image_dir, label_dir):
        if not directory.is_dir():
            raise DataError(f"{directory}: directory not found (data.root={root}).\n{NIFTI_TREE}")
    images, labels = (
        {case_name(p): p for p in sorted(d.iterdir()) if case_name(p)}
        for d in (image_dir, label_dir)
    )
    alone = sorted(images.keys() ^ labels.keys())
    if alone:
        raise DataError(
            f"{root}: split '{split}' has cases without their pair: "
            f"{[str(images.get(c) or labels.get(c)) for c in alone[:5]]}; every image volume "
            "needs a label volume of the same case name"
        )
    if not images:
        raise DataError(f"{image_dir}: split '{split}' has no .nii/.nii.gz volumes.\n{NIFTI_TREE}")
    return [(images[case], labels[case]) for case in sorted(images)]


def open_pair(image_path: Path, label_path: Path):
    """The image and label volumes (headers read): a DataError naming the label file when its
    grid (shape) or affine is not its image's."""
    image, labels = open_volume(image_path, "image"), open_volume(label_path, "label")
    if image.shape != labels.shape:
        raise DataError(
            f"{label_path}: label volume has shape {labels.shape} but its image "
            f"{image_path} has {image.shape}; they must share one voxel grid"
        )
    if not np.allclose(image.affine, labels.affine, atol=1e-4):
        raise DataError(
            f"{label_path}: label volume's affine differs from its image's {image_path} "
            f"(label\n{np.round(labels.affine, 4)}\nimage\n{np.round(image.affine, 4)}); "
            "resample the labels onto the image's grid"
        )
    return image, labels


def class_labels(labels: np.ndarray, path: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """Label voxels as int64 class indices: a DataError naming the file for fractional values
    or values that are neither a class nor ``ignore_index``."""
    labels = integer_labels(labels, path)
    invalid = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if invalid.any():
        raise DataError(
            f"{path}: label values {shown_values(labels, invalid)} are not class indices in "
            f"[0, {num_classes}) nor ignore_index={ignore_index}; check data.num_classes"
        )
    return labels


class NiftiDataset(SegmentationDataset):
    """Slices of the image/label volume pairs of ``<root>/{images,labels}/<split>/``.

    ``axis``: 0 sagittal, 1 coronal, 2 axial, of the canonical (RAS+) volume. ``window``:
    [low, high] in the images' units mapped to 0-65535 (CT: [-1000, 400] HU), or null to use
    ``percentiles`` of each volume (MRI). ``context``: the slices on either side added as
    channels (0: one channel; 1: three, 2.5D). ``empty_slices``: the share of slices
    without foreground (no class but 0) kept in ``train_split``, drawn with ``seed``; other
    splits keep every slice, so that their volumes are scored whole.
    """

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int,
        ignore_index: int = 255,
        transform=None,
        axis: int = 2,
        window: Sequence[float] | None = None,
        percentiles: Sequence[float] = (0.5, 99.5),
        context: int = 0,
        empty_slices: float = 1.0,
        train_split: str = "train",
        seed: int = 0,
        volumes_in_memory: int = 4,
        skip_bad_samples: float = 0.0,
        cache_dir: str | None = None,
    ):
        nibabel()  # the extra's message before anything else
        if axis not in (0, 1, 2):
            raise ValueError(f"data.dataset.axis={axis}: 0 (sagittal), 1 (coronal) or 2 (axial)")
        if context < 0:
            raise ValueError(f"data.dataset.context={context}: slices on either side, >= 0")
        if window is not None and not (len(window) == 2 and window[0] < window[1]):
            raise ValueError(f"data.dataset.window={list(window)}: give [low, high], low < high")
        if not (len(percentiles) == 2 and 0 <= percentiles[0] < percentiles[1] <= 100):
            raise ValueError(
                f"data.dataset.percentiles={list(percentiles)}: give [low, high] in 0-100"
            )
        if not 0.0 <= empty_slices <= 1.0:
            raise ValueError(f"data.dataset.empty_slices={empty_slices}: a share in [0, 1]")
        super().__init__(num_classes, ignore_index, transform, None, skip_bad_samples)
        self.axis, self.context = axis, context
        # The pixels every slice has (SegmentationDataset's keys): the model's input channels
        # and data.scale=auto (65535) follow from them.
        self.in_channels, self.dtype = 2 * context + 1, "uint16"
        self.window = None if window is None else [float(v) for v in window]
        self.percentiles = [float(v) for v in percentiles]
        self.volumes = volume_pairs(Path(root), split)  # [(image path, label path)]
        # slices per volume; the pairs' grids and affines checked from their headers
        self.depths = [canonical_shape(open_pair(*pair)[0])[axis] for pair in self.volumes]
        self.volumes_in_memory = volumes_in_memory
        self._memory: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.volume_cache = None
        if cache_dir is not None:  # keyed on what decides a decoded volume, as other datasets
            settings = {"axis": axis, "window": self.window, "percentiles": self.percentiles,
                        "num_classes": num_classes, "ignore_index": ignore_index,
                        "dtype": self.dtype}  # fmt: skip
            self.volume_cache = DecodedCache(cache_dir, type(self).__name__, settings)
        if split == train_split and empty_slices < 1.0:  # needs the labels: decodes them now
            foreground = [
                (self.volume(v)[1] > 0).any(axis=(1, 2)) for v in range(len(self.volumes))
            ]
            self.slices = keep_slices(foreground, empty_slices, seed)
            log.info("Split '%s': %d of %d slices kept (data.dataset.empty_slices=%s)", split,
                     len(self.slices), sum(map(len, foreground)), empty_slices)  # fmt: skip
        else:
            self.slices = [(v, z) for v, depth in enumerate(self.depths) for z in range(depth)]
        self.names = [self.describe(i) for i in range(len(self.slices))]
        self.volume_of = {name: str(self.volumes[v][1]) for name, (v, _) in
                          zip(self.names, self.slices, strict=True)}  # fmt: skip

    def __len__(self) -> int:
        return len(self.slices)

    def describe(self, index: int) -> str:
        v, z = self.slices[index]
        return f"{self.volumes[v][1]} ({AXES[self.axis]} slice {z})"

    def group(self, name: str) -> str:
        """The volume (its label file) that the sample ``describe`` named ``name`` is a slice
        of: evaluate.py scores each volume on its own."""
        return self.volume_of[name]

    def volume(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        """Volume ``v`` as (D, H, W) slices: uint16 windowed image, ``mask_dtype`` labels."""
        if v in self._memory:
            self._memory.move_to_end(v)
            return self._memory[v]
        entry = self.volume_cache.entry(self.volumes[v]) if self.volume_cache else None
        stacks = self.read_cached(entry) if entry is not None else None
        if stacks is None:
            stacks = self.decode(v)
            if entry is not None:
                self.volume_cache.write(entry, *stacks)
        self._memory[v] = stacks
        if len(self._memory) > max(1, self.volumes_in_memory):
            self._memory.popitem(last=False)
        return stacks

    def read_cached(self, entry: Path) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            stacks = tuple(
                np.load(f"{entry}.{part}.npy", mmap_mode="r") for part in ("image", "mask")
            )
        except (OSError, ValueError, EOFError):  # missing or cut short: decode again
            return None
        image, labels = stacks
        if (
            image.dtype != np.uint16
            or labels.dtype != self.mask_dtype
            or image.shape != labels.shape
        ):
            return None
        return image, labels

    def decode(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        """Read, reorient, window and slice volume ``v``; labels checked against the classes."""
        image_path, label_path = self.volumes[v]
        _, image = image_slices(image_path, self.axis, self.window, self.percentiles)
        voxels = canonical_voxels(open_volume(label_path, "label"), label_path, "label")
        labels = class_labels(voxels, label_path, self.num_classes, self.ignore_index)
        return image, np.ascontiguousarray(to_slices(labels.astype(self.mask_dtype), self.axis))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        v, z = self.slices[index]
        image, labels = self.volume(v)
        return slice_channels(image, z, self.context), np.array(labels[z])

    def decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # The volume's labels were checked as it was decoded: the slice needs nothing more.
        return self.load(index)

    def source_files(self, index: int) -> tuple[Path, ...]:
        return self.volumes[self.slices[index][0]]
