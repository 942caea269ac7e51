"""Inference as evaluation and prediction run it: whole image or sliding window, optional
multi-scale + flip test-time augmentation, under autocast; plus what both report while they
run (progress, out-of-memory advice)."""

import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from seg.device import AMP_DTYPES, is_out_of_memory

log = logging.getLogger(__name__)

MODES = ("whole", "slide")


# data.scale=auto: the full range of the unsigned integer types; any other dtype needs a number
AUTO_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}


def pixel_scale(scale: float | str, dtype: torch.dtype) -> float:
    """The divisor that maps pixels of ``dtype`` to about [0, 1] (``data.scale``)."""
    if scale != "auto":
        return float(scale)
    if dtype not in AUTO_SCALE:
        raise TypeError(
            f"data.scale=auto is defined for uint8 (255) and uint16 (65535) images, but they are "
            f"{str(dtype).removeprefix('torch.')}: give the number that maps them to about [0, 1], "
            "e.g. data.scale=10000 for Sentinel-2 reflectance, 4095 for 12-bit data, 1 for floats "
            "already in [0, 1]"
        )
    return AUTO_SCALE[dtype]


class Normalize:
    """Images (N, C, H, W) of any pixel type to the model's input on ``device``: float32
    ``(x / scale - mean) / std`` in ``memory_format``, widened once, after the copy.

    ``scale``: ``data.scale`` (``auto``: 255 for uint8, 65535 for uint16). ``nodata``:
    ``data.nodata``, one value, one per band, or ``"nan"``: those pixels (and NaNs) become 0,
    the band's mean, after normalization (their labels are ignored: ``seg.data.base``).
    Batches travel at their stored dtype (uint8 is a quarter of float32's bytes) and are
    converted where the model runs (on a GPU, after a pinned, non-blocking copy).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
        scale: float | str = "auto",
        nodata: float | str | Sequence[float] | None = None,
    ):
        if len(mean) != len(std):
            raise ValueError(f"data.mean has {len(mean)} values but data.std {len(std)}")
        channels = len(mean)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, channels, 1, 1)
        self.shift = (
            -torch.tensor(mean, dtype=torch.float32, device=device).view_as(self.std) / self.std
        )
        self.scale = scale
        self.factors: dict[torch.dtype, torch.Tensor] = {}  # 1 / (scale * std) per pixel type
        self.nodata = None  # compared after widening: exact for every integer of 16 bits
        if nodata is not None and nodata != "nan":
            values = [nodata] * channels if isinstance(nodata, int | float) else list(nodata)
            self.nodata = torch.tensor(values, dtype=torch.float32, device=device).view_as(self.std)
        self.masks_nodata = nodata is not None
        self.device = device
        self.memory_format = memory_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.bool or images.dtype.is_complex:
            raise TypeError(f"images of dtype {images.dtype}: expected pixel values")
        if images.shape[1] != self.std.shape[1]:
            raise ValueError(
                f"images have {images.shape[1]} channels but data.mean/data.std "
                f"{self.std.shape[1]} values: give one per band (data.bands, data.in_channels)"
            )
        if images.dtype not in self.factors:
            self.factors[images.dtype] = 1 / (pixel_scale(self.scale, images.dtype) * self.std)
        images = images.to(self.device, non_blocking=True)
        inputs = images.to(torch.float32, memory_format=self.memory_format)
        missing = None
        if self.masks_nodata:
            missing = inputs.isnan()
            if self.nodata is not None:
                missing |= inputs == self.nodata
        inputs.mul_(self.factors[images.dtype]).add_(self.shift)  # in place: the layout stays
        return inputs if missing is None else inputs.masked_fill_(missing, 0.0)


class DeviceNormalize:
    """``Normalize`` for whichever device and memory format a caller asks for, each built once
    (a task normalizes training batches and validation images alike)."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        scale: float | str = "auto",
        nodata: float | str | Sequence[float] | None = None,
    ):
        self.mean, self.std, self.scale, self.nodata = list(mean), list(std), scale, nodata
        self.built: dict[tuple, Normalize] = {}

    def __call__(
        self, images: torch.Tensor, device: torch.device, memory_format: torch.memory_format
    ) -> torch.Tensor:
        key = (device, memory_format)
        if key not in self.built:
            self.built[key] = Normalize(
                self.mean, self.std, device, memory_format, self.scale, self.nodata
            )
        return self.built[key](images)


class Predictor:
    """Turns a batch of images (N, C, H, W), any pixel type (``Normalize``), into class scores
    (N, K, H, W).

    ``mode="slide"`` runs ``crop``-sized windows every ``stride`` pixels, ``window_batch``
    windows per forward pass, and averages the logits where windows overlap: memory is bounded
    by one window batch plus the (C, H, W) score map. With several ``scales`` or ``flip``, the
    scores are the mean softmax probabilities over the variants; with one pass they are the
    logits (both give the same argmax).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        precision: str = "fp32",
        channels_last: bool = False,
        mode: str = "whole",
        crop: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        window_batch: int = 4,
        scale: float | str = "auto",
        nodata: float | str | Sequence[float] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; options: {list(MODES)}")
        if mode == "slide" and crop is None:
            raise ValueError("mode=slide needs crop=[height,width] (and optionally stride)")
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales={list(scales)} must be positive numbers")
        if window_batch < 1:
            raise ValueError(f"window_batch={window_batch}: give the windows per pass, >= 1")
        self.model = model
        self.device = device
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # mean and std: the data config's, of pixel values divided by scale (data.scale)
        self.normalize = Normalize(mean, std, device, self.memory_format, scale, nodata)
        self.mode = mode
        self.crop = tuple(crop) if crop is not None else None
        # Default stride: 2/3 of the window, so that every pixel is seen at least once with
        # context on both sides, as mmsegmentation's slide configs do.
        self.stride = tuple(stride) if stride is not None else None
        if self.crop is not None and self.stride is None:
            self.stride = tuple(max(c * 2 // 3, 1) for c in self.crop)
        if mode == "slide":
            check_windows(self.crop, self.stride)
        self.scales = tuple(scales)
        self.flip = flip
        self.window_batch = window_batch
        self.nonfinite = torch.zeros((), dtype=torch.int64)  # of the last ``predict`` call

    @property
    def num_passes(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = self.normalize(images)
        if self.num_passes == 1 and self.scales[0] == 1.0:
            return self.logits(images)
        height, width = images.shape[-2:]
        total = None
        for scale in self.scales:
            scaled = images if scale == 1.0 else _resize(images, scale)
            for flipped in (False, True) if self.flip else (False,):
                view = scaled.flip(-1) if flipped else scaled
                logits = self.logits(view)
                if flipped:
                    logits = logits.flip(-1)
                if logits.shape[-2:] != (height, width):
                    logits = F.interpolate(logits, (height, width), mode="bilinear")
                probabilities = logits.softmax(1)
                total = probabilities if total is None else total + probabilities
        return total / self.num_passes

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class indices (N, H, W); ``nonfinite`` is then how many of the images had NaN or
        inf scores (on the device: no sync)."""
        scores = self(images)
        self.nonfinite = nonfinite_images(scores)
        return scores.argmax(1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """One pass (whole or sliding window) at the images' own size: float32 logits."""
        if self.mode == "whole":
            return self.forward(images)
        return self.slide(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(
            self.device.type, AMP_DTYPES[self.precision], enabled=self.precision != "fp32"
        ):
            return self.model(images).float()

    def slide(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        windows = sliding_windows(height, width, self.crop, self.stride)
        totals = None
        counts = torch.zeros(1, 1, height, width, device=images.device)
        for first in range(0, len(windows), self.window_batch):
            group = windows[first : first + self.window_batch]
            crops = torch.cat([images[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in group])
            logits = self.forward(crops)  # windows at the border may be smaller: padded inside
            if totals is None:
                totals = images.new_zeros(
                    batch, logits.shape[1], height, width, dtype=torch.float32
                )
            for k, (y0, y1, x0, x1) in enumerate(group):
                totals[:, :, y0:y1, x0:x1] += logits[k * batch : (k + 1) * batch]
                counts[:, :, y0:y1, x0:x1] += 1
        return totals / counts


def nonfinite_images(scores: torch.Tensor) -> torch.Tensor:
    """How many images of (N, C, H, W) ``scores`` hold a NaN or inf, on the device (no sync):
    an fp16 overflow, whose argmax reads as class 0, a plausible-looking wrong result."""
    return scores.isfinite().logical_not().flatten(1).any(1).sum()


def warn_nonfinite(count: int, total: int) -> None:
    """Say once, at the end of a pass, that ``count`` of ``total`` images had non-finite class
    scores, and what to do about it."""
    if count:
        log.warning(
            "%d of %d images had non-finite class scores (NaN or inf): their predicted classes "
            "are meaningless (NaN argmax reads as class 0). Run with trainer.precision=fp32 "
            "(fp16 overflows where fp32 does not)",
            count, total,
        )  # fmt: skip


def check_windows(crop: Sequence[int], stride: Sequence[int]) -> None:
    """Refuse windows that leave pixels uncovered (stride > crop: NaN scores there) or never
    move (stride 0), naming the keys and the allowed range."""
    if len(crop) != 2 or min(crop) < 1:
        raise ValueError(f"crop={list(crop)}: give the window as [height,width], both >= 1")
    if len(stride) != 2 or any(not 1 <= s <= c for s, c in zip(stride, crop, strict=True)):
        raise ValueError(
            f"stride={list(stride)} with crop={list(crop)}: each stride must be in "
            "1 <= stride <= crop, per dimension (a larger step leaves pixels no window covers); "
            "null: 2/3 of the crop"
        )


def sliding_windows(
    height: int, width: int, crop: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) windows of at most ``crop`` covering the image, the last ones flush with
    the bottom/right border (mmsegmentation's slide_inference)."""
    crop_h, crop_w = crop
    stride_h, stride_w = stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y1 = min(row * stride_h + crop_h, height)
            x1 = min(col * stride_w + crop_w, width)
            windows.append((max(y1 - crop_h, 0), y1, max(x1 - crop_w, 0), x1))
    return windows


def _resize(images: torch.Tensor, scale: float) -> torch.Tensor:
    height, width = images.shape[-2:]
    size = (max(round(height * scale), 1), max(round(width * scale), 1))
    return F.interpolate(images, size, mode="bilinear", align_corners=False)


def memory_advice(predictor: Predictor, batch_key: str) -> str:
    """What to change when ``predictor`` runs out of memory; ``batch_key`` is the command's
    batch-size key (``batch_size``, ``data.val_batch_size``)."""
    if predictor.mode == "whole":
        advice = "use mode=slide with crop=[height,width] (e.g. crop=[512,512]) to bound memory"
    else:
        advice = (
            f"use a smaller crop (now {list(predictor.crop)}) or window_batch "
            f"(now {predictor.window_batch})"
        )
    if max(predictor.scales) > 1:
        advice += f", drop the scales above 1 (now {list(predictor.scales)})"
    return f"{advice}, or a smaller {batch_key}"


@contextmanager
def explain_out_of_memory(
    images: torch.Tensor, names: Sequence[str], advice: str | None
) -> Iterator[None]:
    """Re-raise an allocator's out-of-memory error inside the block as a MemoryError naming the
    images (N, 3, H, W), their size and ``advice``; other errors, and all with ``advice`` None,
    pass unchanged."""
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
        if advice is None or not is_out_of_memory(error):
            raise
        height, width = images.shape[-2:]
        shown = list(names)
        listed = ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
        raise MemoryError(
            f"out of memory on {listed} ({width}x{height} pixels, batch of {len(images)}): {advice}"
        ) from error


class ProgressLog:
    """Progress as log lines, for runs whose output is not a terminal (where tqdm's bar is
    hidden): "evaluate: 40/200 images (20%), 35 s elapsed, ~2 min left", once ``share`` of
    the total or ``seconds`` have passed since the last line, whichever comes first, but at
    most one line per ``min_seconds`` (a pass of a few seconds needs no more than its last
    line), and at the end."""

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str = "images",
        share: float = 0.1,
        seconds: float = 30.0,
        min_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.desc, self.total, self.unit, self.clock = desc, total, unit, clock
        self.step = max(round(total * share), 1)  # images per line
        self.seconds, self.min_seconds = seconds, min_seconds
        self.done = 0
        self.start = self.last = clock()
        self.next = self.step

    def update(self, count: int = 1) -> None:
        self.done += count
        now = self.clock()
        since = now - self.last
        due = since >= self.min_seconds and (self.done >= self.next or since >= self.seconds)
        if not due and self.done < self.total:
            return
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        remaining = f", ~{_duration(left)} left" if self.done < self.total else ""
        log.info(
            "%s: %d/%d %s (%.0f%%), %s elapsed%s", self.desc, self.done, self.total, self.unit,
            100 * self.done / max(self.total, 1), _duration(elapsed), remaining,
        )  # fmt: skip
        self.last, self.next = now, self.done + self.step

    def __enter__(self) -> "ProgressLog":
        return self

    def __exit__(self, *exc) -> None:
        pass  # nothing to close: the same ``with`` works for this and a tqdm bar


def progress(desc: str, total: int, unit: str = "images") -> "tqdm | ProgressLog":
    """How evaluate and predict show progress: a tqdm bar on a terminal, log lines otherwise
    (a run redirected to a file or under nohup would show nothing for minutes). Use as a
    context manager and call ``update(count)``."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit)
    return ProgressLog(desc, total, unit)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
