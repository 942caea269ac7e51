"""Palettes, overlays and figures for TensorBoard, reports and predictions; fast PNG encoding."""

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

# A panel's long side is at most this many pixels: a TensorBoard image or figure wider than the
# screen shows no more, while every pixel costs PNG encoding time, here and in TensorBoard's own
# encoder (issue 11: encoding full-resolution 1024x2048 panels cost more than the model did).
MAX_PANEL_SIDE = 1024
# zlib level 1: on photos and overlays 2-8 times faster than PIL's default level 6, for files
# 10-25% larger (scripts/profile_pictures.py).
PNG_COMPRESSION = 1


def colorize(mask: torch.Tensor, palette: Sequence[Sequence[int]]) -> torch.Tensor:
    """(H, W) class indices -> (3, H, W) uint8 RGB; indices without a colour (ignore) are black."""
    colors = torch.zeros(256, 3, dtype=torch.uint8)
    colors[: len(palette)] = torch.tensor(palette, dtype=torch.uint8)
    return colors[mask.long().clamp(0, 255)].permute(2, 0, 1)


def overlay(image: torch.Tensor, colored: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend a (3, H, W) uint8 colour mask over a (3, H, W) uint8 image."""
    return (image.float() * (1 - alpha) + colored.float() * alpha).to(torch.uint8)


def panel_size(height: int, width: int, max_side: int = MAX_PANEL_SIDE) -> tuple[int, int]:
    """(height, width) scaled down, aspect kept, so that the long side is at most ``max_side``;
    unchanged when it already is."""
    scale = max_side / max(height, width)
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, *size) uint8, antialiased (no aliasing moire when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    batch = image[None].float()
    resized = torch.nn.functional.interpolate(
        batch, size=size, mode="bilinear", antialias=True, align_corners=False
    )[0]
    return resized.round().clamp(0, 255).to(torch.uint8)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) -> size by nearest neighbour, same dtype: every value is one of the input's
    (a class index is never blended into another class)."""
    height, width = mask.shape[-2:]
    if (height, width) == tuple(size):
        return mask
    # the source pixel whose centre is nearest each output pixel's centre ("nearest-exact")
    rows = ((torch.arange(size[0]) + 0.5) * (height / size[0])).long().clamp_max(height - 1)
    cols = ((torch.arange(size[1]) + 0.5) * (width / size[1])).long().clamp_max(width - 1)
    return mask[rows[:, None], cols]


def comparison(
    image: torch.Tensor,
    mask: torch.Tensor,
    prediction: torch.Tensor,
    palette: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Image | ground truth overlay | prediction overlay, side by side: (3, h, 3w) uint8, where
    (h, w) is the (3, H, W) uint8 image's size scaled down to a long side of at most
    ``MAX_PANEL_SIDE``."""
    # Shrink first: the colouring and blending then run on the small panels too.
    size = panel_size(*image.shape[-2:])
    rgb = resize_image(image, size)
    mask, prediction = resize_mask(mask, size), resize_mask(prediction, size)
    ground_truth = overlay(rgb, colorize(mask, palette))
    predicted = overlay(rgb, colorize(prediction, palette))
    return torch.cat([rgb, ground_truth, predicted], dim=2)


def instance_overlay(
    image: torch.Tensor,
    masks: torch.Tensor,
    labels: Sequence[int],
    palette: Sequence[Sequence[int]],
    alpha: float = 0.5,
) -> torch.Tensor:
    """(K, H, W) bool instance ``masks`` over a (3, H, W) uint8 image: each filled with its
    class's colour (``labels``) and outlined in white, so that touching instances of one class
    stay apart. Later masks are drawn over earlier ones."""
    out = image.float()
    if len(masks):
        masks = masks.bool()
        colors = torch.tensor([palette[label] for label in labels], dtype=torch.float32)
        inner = -torch.nn.functional.max_pool2d(-masks[:, None].float(), 3, 1, 1)[:, 0] > 0
        for mask, edge, color in zip(masks, masks & ~inner, colors, strict=True):
            out[:, mask] = out[:, mask] * (1 - alpha) + color[:, None] * alpha
            out[:, edge] = 255.0
    return out.to(torch.uint8)


def instance_comparison(
    image: torch.Tensor,
    truth: tuple[torch.Tensor, Sequence[int]],
    prediction: tuple[torch.Tensor, Sequence[int]],
    palette: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Image | ground-truth instances | predicted instances, side by side: (3, H, 3W) uint8;
    ``truth`` and ``prediction`` are (masks (K, H, W) bool, class labels)."""
    panels = [
        image,
        instance_overlay(image, *truth, palette),
        instance_overlay(image, *prediction, palette),
    ]
    return torch.cat(panels, dim=2)


def panoptic_picture(
    image: torch.Tensor,
    ids: np.ndarray,
    segments: Sequence[dict],
    palette: Sequence[Sequence[int]],
    isthing: Sequence[bool],
    alpha: float = 0.5,
) -> torch.Tensor:
    """A panoptic segmentation over a (3, H, W) uint8 image: each segment of the (H, W) id map
    (``segments``: ``id``, ``category_id``) in its own colour (its class's, things' shifted per
    segment so that neighbours of one class differ) and things outlined in white; void (0) and
    ids without an entry stay as the image is."""
    colors = np.zeros((int(ids.max(initial=0)) + 1, 3), np.float32)
    shown = np.zeros(len(colors), bool)
    edges = np.zeros(ids.shape, bool)
    for segment in segments:
        color = np.asarray(palette[segment["category_id"]], np.float32)
        if isthing[segment["category_id"]]:
            shift = np.random.default_rng(segment["id"]).uniform(-60, 60, 3)
            color = np.clip(color + shift, 0, 255)
            mask = (ids == segment["id"]).astype(np.uint8)
            edges |= (mask > 0) & (cv2.erode(mask, np.ones((3, 3), np.uint8)) == 0)
        colors[segment["id"]], shown[segment["id"]] = color, True
    out = image.permute(1, 2, 0).numpy().astype(np.float32)
    covered = shown[ids]
    out[covered] = out[covered] * (1 - alpha) + colors[ids][covered] * alpha
    out[edges] = 255.0
    return torch.from_numpy(out.round().astype(np.uint8)).permute(2, 0, 1)


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
    # in percent, as the cells' numbers (a 0-1 bar beside them read as another unit)
    image = axes.imshow(100 * rows.numpy(), cmap="Blues", vmin=0, vmax=100)
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
    figure.colorbar(image, ax=axes, fraction=0.046, label="%")
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


def encode_png(array: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 RGB array as PNG bytes, with OpenCV's encoder at ``PNG_COMPRESSION``
    (several times faster than PIL's at its default level: scripts/profile_pictures.py)."""
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {array.shape} {array.dtype}")
    # OpenCV reads BGR; the copy also makes a permuted (non-contiguous) array contiguous.
    bgr = np.ascontiguousarray(array[..., ::-1])
    ok, encoded = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {array.shape} array as PNG")
    return encoded.tobytes()


def save_png(array: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 RGB array as a PNG."""
    data = encode_png(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def add_png(writer, tag: str, array: np.ndarray, step: int) -> None:
    """``writer.add_image(tag, array, step, dataformats="HWC")`` for an (H, W, 3) uint8 RGB
    array, with ``encode_png`` in place of PIL's slower encoder (``writer``: a SummaryWriter)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width, channels = array.shape
    image = Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=encode_png(array)
    )
    # SummaryWriter takes no encoded image; its own add_image ends in this same call.
    writer._get_file_writer().add_summary(
        Summary(value=[Summary.Value(tag=tag, image=image)]), step
    )
