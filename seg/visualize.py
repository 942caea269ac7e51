"""Palettes and overlays for TensorBoard images (and, later, prediction files)."""

from collections.abc import Sequence

import torch


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
