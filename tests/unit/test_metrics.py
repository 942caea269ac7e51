"""The confusion-matrix metrics against a NumPy reference."""

import numpy as np
import pytest
import torch

from seg.metrics import (
    ConfusionMatrix,
    bin_counts,
    format_table,
    group_metrics,
    named,
    per_image_counts,
)
from seg.tasks.semantic import SemanticEvaluator

IGNORE = 255


def numpy_reference(predictions, targets, num_classes):
    valid = targets != IGNORE
    p, t = predictions[valid], targets[valid]
    iou, dice, acc = [], [], []
    for c in range(num_classes):
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((p != c) & (t == c))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan)
        acc.append(tp / (tp + fn) if tp + fn else np.nan)
    return {
        "IoU": iou,
        "Dice": dice,
        "Acc": acc,
        "mIoU": np.nanmean(iou),
        "mDice": np.nanmean(dice),
        "mAcc": np.nanmean(acc),
        "aAcc": np.mean(p == t),
    }


def test_matches_numpy_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    num_classes = 6
    confusion = ConfusionMatrix(num_classes, IGNORE)
    all_predictions, all_targets = [], []
    for _ in range(3):  # accumulated over batches, like a whole split
        # class 4 never appears; class 5 only in predictions
        targets = rng.choice([0, 1, 2, 3, IGNORE], size=(2, 16, 16))
        predictions = rng.choice([0, 1, 2, 3, 5], size=(2, 16, 16))
        confusion.update(torch.from_numpy(predictions), torch.from_numpy(targets))
        all_predictions.append(predictions)
        all_targets.append(targets)
    reference = numpy_reference(np.concatenate(all_predictions), np.concatenate(all_targets), 6)
    metrics = confusion.compute()
    for key in ("IoU", "Dice", "Acc"):
        np.testing.assert_allclose(metrics[key], reference[key], rtol=1e-12)
    for key in ("mIoU", "mDice", "mAcc", "aAcc"):
        assert metrics[key] == pytest.approx(reference[key], rel=1e-12)
    assert np.isnan(metrics["IoU"][4])  # absent from both: NaN, left out of the mean
    assert metrics["IoU"][5] == 0.0  # predicted but absent from the truth: a real 0


def test_ignored_pixels_do_not_count_whatever_is_predicted():
    targets = torch.tensor([[[0, 1, IGNORE, IGNORE]]])
    confusion = ConfusionMatrix(2, IGNORE)
    confusion.update(torch.tensor([[[0, 1, 1, 0]]]), targets)
    assert confusion.matrix.tolist() == [[1, 0], [0, 1]]
    assert confusion.compute()["mIoU"] == 1.0


def test_named_and_table():
    metrics = {"mIoU": 0.5, "mDice": 0.6, "aAcc": 0.7, "mAcc": 0.8}
    metrics |= {"IoU": [0.5, float("nan")], "Dice": [0.6, float("nan")], "Acc": [0.8, float("nan")]}
    result = named(metrics, ["road", "sky"])
    assert result["IoU"] == {"road": 0.5, "sky": None}
    table = format_table(metrics, ["road", "sky"])
    assert "road" in table and "50.00" in table and "nan" in table


def test_uint8_targets_count_as_their_int64_selves():
    # 19 classes: target * 19 + prediction passes 255, which uint8 arithmetic would wrap
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 19, (2, 8, 8), generator=generator)
    targets[0, 0] = 255
    predictions = torch.randint(0, 19, (2, 8, 8), generator=generator)
    wide, narrow = ConfusionMatrix(19, 255), ConfusionMatrix(19, 255)
    wide.update(predictions, targets)
    narrow.update(predictions, targets.to(torch.uint8))
    assert torch.equal(wide.matrix, narrow.matrix)
    assert torch.equal(
        per_image_counts(predictions, targets, 19, 255),
        per_image_counts(predictions, targets.to(torch.uint8), 19, 255),
    )


def bincount_reference(predictions, targets, num_classes):
    """The matrix as torch.bincount computed it before (one host sync per call on CUDA)."""
    n = num_classes
    bins = torch.where(targets != IGNORE, targets.long() * n + predictions.long(), n * n)
    return torch.bincount(bins.flatten(), minlength=n * n + 1)[: n * n].view(n, n)


@pytest.mark.parametrize("num_classes", [1, 3, 19])
def test_fixed_size_counts_equal_bincount_with_ignored_pixels(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    targets = torch.randint(0, num_classes, (3, 17, 23), generator=generator, dtype=torch.uint8)
    targets[:, :4] = IGNORE  # ignored rows, whatever is predicted there
    predictions = torch.randint(0, num_classes, (3, 17, 23), generator=generator)
    matrix = ConfusionMatrix(num_classes, IGNORE)
    for _ in range(2):  # accumulates
        matrix.update(predictions, targets)
    expected = 2 * bincount_reference(predictions, targets, num_classes)
    assert matrix.matrix.dtype == torch.int64 and torch.equal(matrix.matrix, expected)
    bins = torch.randint(0, 7, (5, 9), generator=generator)
    assert torch.equal(bin_counts(bins, 10), torch.bincount(bins.flatten(), minlength=10))
    # per image: hits, target and predicted pixels, each as bincount per image counts them
    for image, counts in enumerate(per_image_counts(predictions, targets, num_classes, IGNORE)):
        one = bincount_reference(predictions[image], targets[image], num_classes)
        assert torch.equal(counts, torch.stack([one.diag(), one.sum(1), one.sum(0)]))


def test_groups_are_scored_whole_and_averaged():
    """Slices of two volumes: each volume's Dice is that of its voxels pooled, and the
    per-group means average the volumes, not the slices."""
    masks = torch.tensor([[[0, 1]], [[1, 1]], [[0, 0]]])  # three 1x2 slices
    predictions = torch.tensor([[[0, 1]], [[1, 0]], [[0, 1]]])
    names = ["a/0", "a/1", "b/0"]
    evaluator = SemanticEvaluator(2, 255, torch.device("cpu"), 0, 0, group=lambda n: n[0])
    evaluator.process((torch.zeros(3, 3, 1, 2), masks), (predictions, torch.tensor(0)), names)
    result = evaluator.result()
    assert list(result.group_counts) == ["a", "b"]
    # volume a: class 1 has 3 target voxels, 2 predicted, 2 hits: Dice 4/5; volume b: none
    # of class 1 in the labels, one predicted: Dice 0
    assert torch.equal(result.group_counts["a"][:, 1], torch.tensor([2, 3, 2]))
    grouped = group_metrics(torch.stack(list(result.group_counts.values())))
    assert grouped["Dice"][1] == pytest.approx((4 / 5 + 0) / 2)
    # background: a has Dice 2*1/(1+2) = 2/3, b 2*1/(2+1) = 2/3
    assert grouped["Dice"][0] == pytest.approx(2 / 3)
    assert grouped["mDice"] == pytest.approx((0.4 + 2 / 3) / 2)
    pooled = result.metrics["Dice"][1]  # the slice-pooled figure differs: 2*2/(3+3)
    assert pooled == pytest.approx(4 / 6)
