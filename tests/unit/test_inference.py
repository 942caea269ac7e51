"""Sliding windows, test-time augmentation and the bootstrap interval."""

import pytest
import torch
from torch import nn

from seg.inference import Predictor, sliding_windows
from seg.metrics import ConfusionMatrix, bootstrap_miou, iou_from_counts, per_image_counts
from seg.models import Segmenter, smp_model


def predictor(model, **kwargs):
    return Predictor(model.eval(), torch.device("cpu"), **kwargs)


def test_windows_cover_the_image_flush_with_the_border():
    windows = sliding_windows(100, 70, crop=(40, 40), stride=(30, 30))
    covered = torch.zeros(100, 70)
    for y0, y1, x0, x1 in windows:
        assert (y1 - y0, x1 - x0) == (40, 40)
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    assert max(w[1] for w in windows) == 100 and max(w[3] for w in windows) == 70
    assert sliding_windows(30, 20, crop=(40, 40), stride=(30, 30)) == [(0, 30, 0, 20)]


def test_slide_over_an_image_equal_to_the_crop_equals_whole():
    model = smp_model("Unet", 4, encoder_name="resnet18")
    images = torch.randn(2, 3, 64, 96)
    whole = predictor(model)(images)
    slide = predictor(model, mode="slide", crop=(64, 96), window_batch=3)(images)
    assert torch.allclose(whole, slide, atol=1e-5)


def test_slide_averages_overlapping_windows():
    # A pointwise model gives the same logits whatever window a pixel is seen in.
    model = Segmenter(nn.Conv2d(3, 5, 1), stride=1)
    images = torch.randn(2, 3, 50, 70)
    slide = predictor(model, mode="slide", crop=(32, 32), stride=(20, 20), window_batch=2)(images)
    assert torch.allclose(slide, predictor(model)(images), atol=1e-6)


def test_flip_tta_on_a_flip_symmetric_model_equals_no_tta():
    model = Segmenter(nn.Conv2d(3, 5, 3, padding=1), stride=1)
    with torch.no_grad():  # symmetric kernels: the model commutes with a horizontal flip
        model.net.weight.copy_((model.net.weight + model.net.weight.flip(-1)) / 2)
    images = torch.randn(2, 3, 24, 40)
    plain = predictor(model)(images).softmax(1)
    flipped = predictor(model, flip=True)(images)
    assert torch.allclose(plain, flipped, atol=1e-6)
    not_symmetric = Segmenter(nn.Conv2d(3, 5, 3, padding=1), stride=1)
    assert not torch.allclose(
        predictor(not_symmetric)(images).softmax(1),
        predictor(not_symmetric, flip=True)(images),
        atol=1e-4,
    )


def test_multi_scale_tta_returns_probabilities_at_input_size():
    model = smp_model("Unet", 4, encoder_name="resnet18")
    scores = predictor(model, scales=[0.5, 1.0, 1.5], flip=True)(torch.randn(1, 3, 50, 70))
    assert scores.shape == (1, 4, 50, 70)
    assert torch.allclose(scores.sum(1), torch.ones(1, 50, 70), atol=1e-5)


def test_bad_inference_settings():
    model = Segmenter(nn.Conv2d(3, 2, 1), stride=1)
    with pytest.raises(ValueError, match="crop"):
        predictor(model, mode="slide")
    with pytest.raises(ValueError, match="options"):
        predictor(model, mode="sliding")


def test_per_image_counts_add_up_to_the_confusion_matrix():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (3, 10, 12), generator=generator)
    targets[0, :2] = 255
    predictions = torch.randint(0, 4, (3, 10, 12), generator=generator)
    counts = per_image_counts(predictions, targets, 4, 255)
    confusion = ConfusionMatrix(4, 255)
    confusion.update(predictions, targets)
    totals = counts.sum(0)
    assert torch.equal(totals[0], confusion.matrix.diag())
    assert torch.equal(totals[1], confusion.matrix.sum(1))
    assert torch.equal(totals[2], confusion.matrix.sum(0))
    miou = iou_from_counts(totals.double()).nanmean().item()
    assert miou == pytest.approx(confusion.compute()["mIoU"])


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_images():
    generator = torch.Generator().manual_seed(0)

    def counts(images):
        targets = torch.randint(0, 3, (images, 8, 8), generator=generator)
        noise = torch.randint(0, 3, (images, 8, 8), generator=generator)
        predictions = torch.where(
            torch.rand(images, 8, 8, generator=generator) < 0.7, targets, noise
        )
        return per_image_counts(predictions, targets, 3, 255)

    few, many = counts(20), counts(400)
    for image_counts in (few, many):
        low, high = bootstrap_miou(image_counts, resamples=500)
        estimate = iou_from_counts(image_counts.sum(0).double()).nanmean().item()
        assert low <= estimate <= high
    assert bootstrap_miou(many, 500)[1] - bootstrap_miou(many, 500)[0] < (
        bootstrap_miou(few, 500)[1] - bootstrap_miou(few, 500)[0]
    )
