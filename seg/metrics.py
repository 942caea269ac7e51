"""One confusion matrix over a whole split, and the segmentation metrics derived from it."""

import torch


class ConfusionMatrix:
    """Accumulates ``matrix[target, prediction]`` pixel counts on the predictions' device.

    Pixels whose target is ``ignore_index`` are left out. No host sync until ``compute``.
    """

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        """predictions, targets: (N, H, W) integer class indices (any integer dtype)."""
        n = self.num_classes
        # int64 for the bin arithmetic: uint8 masks (as datasets give them) would overflow
        targets, predictions = targets.long(), predictions.long()
        valid = targets != self.ignore_index
        # Ignored pixels go to an extra bin instead of being removed by boolean indexing,
        # which would need a host sync for the output size and is about 5x slower.
        bins = torch.where(valid, targets * n + predictions, n * n)
        self.matrix += bin_counts(bins, n * n + 1)[: n * n].view(n, n)

    def compute(self) -> dict:
        """Per-class IoU, Dice and accuracy (NaN for a class absent from both target and
        prediction), their NaN-ignoring means mIoU, mDice, mAcc, and pixel accuracy aAcc."""
        return metrics_from_confusion(self.matrix)


def bin_counts(bins: torch.Tensor, size: int) -> torch.Tensor:
    """``torch.bincount(bins.flatten(), minlength=size)`` for ``bins`` known to lie in
    [0, size): the same int64 counts, in a fixed-size output. On CUDA bincount reads the bins'
    minimum and maximum on the host to size its output, a sync per call (several per
    validation batch)."""
    bins = bins.flatten()
    ones = torch.ones((), dtype=torch.int64, device=bins.device).expand(bins.numel())
    return torch.zeros(size, dtype=torch.int64, device=bins.device).index_add_(0, bins, ones)


def per_image_counts(
    predictions: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """(N, 3, C) per image and class: true positives, target pixels, predicted pixels
    (ignored pixels left out): enough for per-image IoU and for resampling images."""
    batch, n = targets.shape[0], num_classes
    targets, predictions = targets.long(), predictions.long()  # no uint8 overflow in the bins
    valid = targets != ignore_index
    offsets = torch.arange(batch, device=targets.device).view(batch, 1, 1) * n

    def count(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        bins = torch.where(where, values + offsets, batch * n)  # excluded pixels: an extra bin
        return bin_counts(bins, batch * n + 1)[: batch * n].view(batch, n)

    hits = count(targets, valid & (predictions == targets))
    return torch.stack([hits, count(targets, valid), count(predictions, valid)], dim=1)


def iou_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """(..., 3, C) counts -> (..., C) IoU, NaN where a class is in neither target nor prediction."""
    true_positive, target, predicted = counts.unbind(-2)
    return true_positive / (target + predicted - true_positive)


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """(..., 3, C) counts -> (..., C) Dice, NaN where a class is in neither target nor prediction."""
    true_positive, target, predicted = counts.unbind(-2)
    return 2 * true_positive / (target + predicted)


def group_metrics(group_counts: torch.Tensor) -> dict:
    """Scores of G groups of images (the slices of a volume: medical papers score a patient
    whole) from their summed (G, 3, C) counts: ``IoU``/``Dice`` per class, each the mean over
    the groups where it is defined (a class in neither a volume's labels nor its prediction
    leaves that volume out), and ``mIoU``/``mDice``, their means over the classes."""
    counts = group_counts.double()
    iou, dice = iou_from_counts(counts).nanmean(0), dice_from_counts(counts).nanmean(0)
    return {"mIoU": iou.nanmean().item(), "mDice": dice.nanmean().item(),
            "IoU": iou.tolist(), "Dice": dice.tolist()}  # fmt: skip


def bootstrap_miou(
    image_counts: torch.Tensor, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the split's mIoU, resampling images.

    ``image_counts``: (N, 3, C) from ``per_image_counts``; each resample sums the counts of N
    images drawn with replacement and computes the mIoU of the sum, as the split's mIoU is.
    """
    count = image_counts.shape[0]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, count, (resamples, count), generator=generator)
    weights = torch.zeros(resamples, count, dtype=torch.float64)
    weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    totals = (weights @ image_counts.flatten(1).double()).view(resamples, *image_counts.shape[1:])
    mious = iou_from_counts(totals).nanmean(-1)
    low, high = torch.quantile(
        mious, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    )
    return low.item(), high.item()


def metrics_from_confusion(matrix: torch.Tensor) -> dict:
    matrix = matrix.double().cpu()
    true_positive = matrix.diag()
    target_pixels = matrix.sum(1)
    predicted_pixels = matrix.sum(0)
    union = target_pixels + predicted_pixels - true_positive
    # 0 / 0 = NaN marks classes that appear in neither target nor prediction.
    iou = true_positive / union
    dice = 2 * true_positive / (target_pixels + predicted_pixels)
    accuracy = true_positive / target_pixels
    return {
        "mIoU": iou.nanmean().item(),
        "mDice": dice.nanmean().item(),
        "aAcc": (true_positive.sum() / matrix.sum()).item(),
        "mAcc": accuracy.nanmean().item(),
        "IoU": iou.tolist(),
        "Dice": dice.tolist(),
        "Acc": accuracy.tolist(),
    }


def named(metrics: dict, class_names: list[str]) -> dict:
    """Per-class lists -> {class name: value} dicts, NaN -> None (valid JSON)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            out[key] = {
                name: _finite_or_none(v) for name, v in zip(class_names, value, strict=True)
            }
        else:
            out[key] = _finite_or_none(value)
    return out


def _finite_or_none(value: float) -> float | None:
    return None if value != value else value  # NaN is the only value unequal to itself


def format_table(
    metrics: dict, class_names: list[str], columns: tuple[str, ...] = ("IoU", "Dice", "Acc")
) -> str:
    """The per-class table of ``columns`` (IoU / Dice / accuracy) with their means (``m<column>``)
    and the pixel accuracy where there is one, in percent."""
    width = max(len(name) for name in [*class_names, "mean"])
    lines = [f"{'class':<{width}} " + " ".join(f"{h:>7}" for h in columns)]
    for i, name in enumerate(class_names):
        lines.append(f"{name:<{width}} " + " ".join(_percent(metrics[c][i]) for c in columns))
    lines.append(f"{'mean':<{width}} " + " ".join(_percent(metrics[f"m{c}"]) for c in columns))
    if "aAcc" in metrics:
        lines.append(f"aAcc {_percent(metrics['aAcc']).strip()}")
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "    nan" if value != value else f"{100 * value:7.2f}"
