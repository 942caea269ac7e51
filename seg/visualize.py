"""Palettes and overlays for TensorBoard images (and, later, prediction files)."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def colorize(mask: torch.Tensor, palette: Sequence[Sequence[int]]) -> torch.Tensor:
    """(H, W) class indices -> (3, H, W) uint8 RGB; indices without a colour (ignore) are black."""
    colors = torch.zeros(256, 3, dtype=torch.uint8)
    colors[: len(palette)] = torch.tensor(palette, dtype=torch.uint8)
    return colors[mask.long().clamp(0, 255)].permute(2, 0, 1)


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize``: (3, H, W) float -> (3, H, W) uint8 RGB."""
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    return ((image.float() * std_t + mean_t) * 255).clamp(0, 255).to(torch.uint8)


def overlay(image: torch.Tensor, colored: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend a (3, H, W) uint8 colour mask over a (3, H, W) uint8 image."""
    return (image.float() * (1 - alpha) + colored.float() * alpha).to(torch.uint8)


def comparison(
    image: torch.Tensor,
    mask: torch.Tensor,
    prediction: torch.Tensor,
    palette: Sequence[Sequence[int]],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Image | ground truth overlay | prediction overlay, side by side: (3, H, 3W) uint8."""
    rgb = denormalize(image, mean, std)
    ground_truth = overlay(rgb, colorize(mask, palette))
    predicted = overlay(rgb, colorize(prediction, palette))
    return torch.cat([rgb, ground_truth, predicted], dim=2)


def _figure_to_array(figure) -> np.ndarray:
    """Render a matplotlib figure to (H, W, 3) uint8 RGB and close it."""
    import matplotlib.pyplot as plt

    figure.canvas.draw()
    array = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return array


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, also on a headless server
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(confusion: torch.Tensor, class_names: Sequence[str]) -> np.ndarray:
    """Row-normalized confusion matrix (rows: ground truth) with class names, as an RGB array."""
    plt = _pyplot()
    matrix = confusion.double()
    rows = matrix / matrix.sum(1, keepdim=True).clamp_min(1)
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = axes.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=90, fontsize=8)
    axes.set_yticks(ticks, class_names, fontsize=8)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    if len(class_names) <= 25:  # the numbers stay legible up to about this many classes
        for i in ticks:
            for j in ticks:
                value = rows[i, j].item()
                color = "white" if value > 0.5 else "black"
                axes.text(
                    j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7, color=color
                )
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_title("confusion (% of each ground-truth class)")
    figure.tight_layout()
    return _figure_to_array(figure)


def iou_figure(iou: Sequence[float], class_names: Sequence[str]) -> np.ndarray:
    """Per-class IoU bars (NaN classes left empty) with the mIoU line, as an RGB array."""
    plt = _pyplot()
    values = np.nan_to_num(np.asarray(iou, dtype=np.float64) * 100)
    figure, axes = plt.subplots(figsize=(max(4.0, 0.4 * len(class_names) + 2), 4), dpi=100)
    axes.bar(range(len(class_names)), values, color="tab:blue")
    axes.axhline(np.nanmean(np.asarray(iou, dtype=np.float64)) * 100, color="tab:red", label="mIoU")
    axes.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=8)
    axes.set_ylim(0, 100)
    axes.set_ylabel("IoU (%)")
    axes.legend()
    figure.tight_layout()
    return _figure_to_array(figure)


def gallery(rows: Sequence[torch.Tensor]) -> np.ndarray:
    """Stack (3, H, W) pictures of possibly different sizes vertically: (H_total, W_max, 3)."""
    width = max(row.shape[2] for row in rows)
    padded = [torch.nn.functional.pad(row, (0, width - row.shape[2])) for row in rows]
    return torch.cat(padded, dim=1).permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 RGB array as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
