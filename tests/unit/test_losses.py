"""Losses against hand-computed values, and the shared contract over every loss config."""

import math

import pytest
import torch
from hydra.utils import instantiate

from seg.losses import CrossEntropy, Dice, Focal, WeightedSum
from tests.conftest import compose_config, group_options

IGNORE = 255


def two_pixels():
    """One image of 1x2 pixels, 2 classes: pixel 0 is class 1, pixel 1 is ignored."""
    logits = torch.tensor([[[[0.0, 5.0]], [[math.log(3.0), -5.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1, IGNORE]]])
    return logits, target


def test_cross_entropy_by_hand():
    logits, target = two_pixels()
    # softmax at pixel 0 = (1, 3) / 4 -> -log(3/4); the ignored pixel adds nothing.
    assert CrossEntropy(IGNORE)(logits, target).item() == pytest.approx(-math.log(0.75))


def test_cross_entropy_class_weights_and_smoothing():
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3.0), 0.0]]]])
    target = torch.tensor([[[1, 0]]])
    weighted = CrossEntropy(IGNORE, class_weights=[1.0, 3.0])(logits, target).item()
    expected = (3 * -math.log(0.75) + 1 * -math.log(0.5)) / 4  # weighted mean over pixels
    assert weighted == pytest.approx(expected)
    smoothed = CrossEntropy(IGNORE, label_smoothing=0.2)(logits, target).item()
    pixel0 = 0.9 * -math.log(0.75) + 0.1 * -math.log(0.25)
    pixel1 = 0.9 * -math.log(0.5) + 0.1 * -math.log(0.5)
    assert smoothed == pytest.approx((pixel0 + pixel1) / 2)


def test_dice_by_hand():
    logits, target = two_pixels()
    # Only pixel 0 counts: p = (1/4, 3/4), target one-hot (0, 1). Class 0 is absent -> 0.
    # Class 1: dice = 2 * 3/4 / (3/4 + 1) = 6/7. Loss = mean(0, 1 - 6/7).
    assert Dice(IGNORE)(logits, target).item() == pytest.approx((1 - 6 / 7) / 2)


def test_focal_by_hand():
    logits, target = two_pixels()
    assert Focal(IGNORE, gamma=0.0)(logits, target).item() == pytest.approx(-math.log(0.75))
    expected = -((1 - 0.75) ** 2) * math.log(0.75)
    assert Focal(IGNORE, gamma=2.0)(logits, target).item() == pytest.approx(expected)


def test_focal_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2)
    assert Focal(IGNORE)(logits, torch.full((1, 2, 2), IGNORE)).item() == 0.0


def test_weighted_sum_is_the_weighted_sum_of_its_terms():
    logits, target = torch.randn(2, 4, 6, 6), torch.randint(0, 4, (2, 6, 6))
    ce, dice = CrossEntropy(IGNORE), Dice(IGNORE)
    combo = WeightedSum({"ce": ce, "dice": dice}, {"ce": 0.5, "dice": 2.0})
    expected = 0.5 * ce(logits, target) + 2.0 * dice(logits, target)
    assert combo(logits, target).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match=r"weights"):
        WeightedSum({"ce": ce}, {"dice": 1.0})


@pytest.mark.parametrize("option", group_options("loss"))
def test_every_loss_ignores_ignored_pixels_and_reduces_in_float32(option):
    cfg = compose_config(f"loss={option}")
    loss_fn = instantiate(cfg.loss)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 8, 8, generator=generator)
    target = torch.randint(0, 6, (2, 8, 8), generator=generator)
    target[:, :3] = cfg.data.ignore_index
    changed = logits.clone()
    changed[:, :, :3] = torch.randn(2, 6, 3, 8, generator=generator) * 10
    assert loss_fn(logits, target).item() == pytest.approx(loss_fn(changed, target).item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss_fn(logits.bfloat16().requires_grad_(), target)
    assert value.dtype == torch.float32 and value.ndim == 0
