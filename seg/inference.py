"""Inference as evaluation and prediction run it: whole image or sliding window, optional
multi-scale + flip test-time augmentation, under autocast."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

AMP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("whole", "slide")


class Predictor:
    """Turns a batch of normalized images (N, 3, H, W) into class scores (N, C, H, W).

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
        precision: str = "fp32",
        channels_last: bool = False,
        mode: str = "whole",
        crop: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        window_batch: int = 4,
    ):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; options: {list(MODES)}")
        if mode == "slide" and crop is None:
            raise ValueError("mode=slide needs crop=[height,width] (and optionally stride)")
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales={list(scales)} must be positive numbers")
        self.model = model
        self.device = device
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mode = mode
        self.crop = tuple(crop) if crop is not None else None
        # Default stride: 2/3 of the window, so that every pixel is seen at least once with
        # context on both sides, as mmsegmentation's slide configs do.
        self.stride = tuple(stride) if stride is not None else None
        if self.crop is not None and self.stride is None:
            self.stride = tuple(max(c * 2 // 3, 1) for c in self.crop)
        self.scales = tuple(scales)
        self.flip = flip
        self.window_batch = window_batch

    @property
    def num_passes(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
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
        """Class indices (N, H, W)."""
        return self(images).argmax(1)

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
