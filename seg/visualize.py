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


# The percentiles a multi-band or deep image is stretched between for display: a few bright
# or dark outliers (clouds, dead pixels) do not flatten the rest.
STRETCH_PERCENTILES = (2.0, 98.0)


def display_rgb(image: torch.Tensor, rgb_bands: Sequence[int] | None = None) -> torch.Tensor:
    """A (C, H, W) image of any pixel type as (3, H, W) uint8 RGB for pictures.

    3-band uint8 images (photos) are shown as they are. Others show ``rgb_bands`` (1-based
    input bands; None: the first three), or grey for one band, each band stretched in float
    between its ``STRETCH_PERCENTILES`` (NaNs left out, shown black)."""
    rgb_bands = list(rgb_bands) if rgb_bands is not None else None
    if image.dtype == torch.uint8 and image.shape[0] == 3 and rgb_bands in (None, [1, 2, 3]):
        return image
    if image.shape[0] < 3:
        picked = image[:1].expand(3, -1, -1)  # grey
    else:
        picked = image[[b - 1 for b in rgb_bands or (1, 2, 3)]]
    bands = picked.to(torch.float32)
    flat = bands.flatten(1)[:, :: max(1, bands[0].numel() // 100_000)]  # enough for percentiles
    low, high = (
        torch.from_numpy(np.nanpercentile(flat.numpy(), q, axis=1)).float().view(3, 1, 1)
        for q in STRETCH_PERCENTILES
    )
    stretched = (bands - low) / (high - low).clamp_min(1e-12) * 255
    return stretched.nan_to_num(0.0).clamp(0, 255).round().to(torch.uint8)


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
    rgb_bands: Sequence[int] | None = None,
) -> torch.Tensor:
    """Image | ground truth overlay | prediction overlay, side by side: (3, h, 3w) uint8, where
    (h, w) is the (C, H, W) image's size scaled down to a long side of at most
    ``MAX_PANEL_SIDE``; the image is shown as ``display_rgb`` makes it (``rgb_bands``)."""
    # Shrink first: the colouring and blending then run on the small panels too.
    size = panel_size(*image.shape[-2:])
    rgb = resize_image(display_rgb(image, rgb_bands), size)
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
    rgb_bands: Sequence[int] | None = None,
) -> torch.Tensor:
    """(K, H, W) bool instance ``masks`` over a (C, H, W) image shown as RGB (``display_rgb``
    with ``rgb_bands``): each filled with its class's colour (``labels``) and outlined in white,
    so that touching instances of one class stay apart. Later masks are drawn over earlier ones."""
    out = display_rgb(image, rgb_bands).float()
    if len(masks):
        masks = masks.bool()
        colors = torch.tensor([palette[label] for label in labels], dtype=torch.float32)
        inner = -torch.nn.functional.max_pool2d(-masks[:, None].float(), 3, 1, 1)[:, 0] > 0
        for mask, edge, color in zip(masks, masks & ~inner, colors, strict=True):
            out[:, mask] = out[:, mask] * (1 - alpha) + color[:, None] * alpha
            out[:, edge] = 255.0
    return out.to(torch.uint8)


def instance_colors(count: int) -> list[list[int]]:
    """``count`` distinct bright RGB colours, the same for the same count: hues a golden
    angle apart, so that neighbours in a picture rarely look alike."""
    if count == 0:
        return []  # (OpenCV refuses an empty image)
    hues = (np.arange(count) * 0.618034 % 1.0 * 180).astype(np.uint8)  # OpenCV's hue: 0-179
    hsv = np.stack([hues, np.full(count, 200, np.uint8), np.full(count, 255, np.uint8)], 1)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0].tolist()


def caption_boxes(
    picture: torch.Tensor, boxes: Sequence[Sequence[float]], texts: Sequence[str],
    colors: Sequence[Sequence[int]],
) -> np.ndarray:  # fmt: skip
    """``texts`` written at the top-left corners of ``boxes`` ([x0, y0, x1, y1]) on a
    (3, H, W) uint8 picture, each on a dark band in its colour: (H, W, 3) uint8."""
    array = np.ascontiguousarray(picture.permute(1, 2, 0).numpy())
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.35
    for (x0, y0, _, _), text, color in zip(boxes, texts, colors, strict=True):
        (width, height), _ = cv2.getTextSize(text, font, scale, 1)
        x, y = int(x0), max(int(y0), height + 2)  # inside the picture at the top
        cv2.rectangle(array, (x, y - height - 2), (x + width, y), (0, 0, 0), cv2.FILLED)
        cv2.putText(array, text, (x, y - 1), font, scale, tuple(map(int, color)), 1, cv2.LINE_AA)
    return array


def instance_comparison(
    image: torch.Tensor,
    truth: tuple[torch.Tensor, Sequence[int]],
    prediction: tuple[torch.Tensor, Sequence[int]],
    palette: Sequence[Sequence[int]],
    rgb_bands: Sequence[int] | None = None,
) -> torch.Tensor:
    """Image | ground-truth instances | predicted instances, side by side: (3, H, 3W) uint8;
    ``truth`` and ``prediction`` are (masks (K, H, W) bool, class labels); the (C, H, W) image
    is shown as ``display_rgb`` shows it."""
    shown = display_rgb(image, rgb_bands)
    panels = [
        shown,
        instance_overlay(shown, *truth, palette),
        instance_overlay(shown, *prediction, palette),
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


TITLE_HEIGHT = 20  # pixels of the strip that ``titled`` adds above a row
TITLE_FONT = cv2.FONT_HERSHEY_SIMPLEX


def titled(row: torch.Tensor, titles: Sequence[str]) -> torch.Tensor:
    """A (3, H, W) uint8 row of ``len(titles)`` panels of equal width with a black strip above
    naming each, centred, in white: (3, TITLE_HEIGHT + H, W). A title too long for its panel
    is drawn smaller."""
    width = row.shape[2] // len(titles)
    strip = np.zeros((TITLE_HEIGHT, row.shape[2], 3), np.uint8)
    for i, title in enumerate(titles):
        text_width = cv2.getTextSize(title, TITLE_FONT, 1.0, 1)[0][0]
        scale = min(0.45, (width - 4) / text_width)
        (text_width, text_height), _ = cv2.getTextSize(title, TITLE_FONT, scale, 1)
        origin = (i * width + (width - text_width) // 2, (TITLE_HEIGHT + text_height) // 2)
        cv2.putText(strip, title, origin, TITLE_FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return torch.cat([torch.from_numpy(strip).permute(2, 0, 1), row], dim=1)


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
