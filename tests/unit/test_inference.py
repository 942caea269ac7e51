"""Sliding windows, test-time augmentation, progress and out-of-memory reports, the
bootstrap interval, and the images an evaluation keeps to show."""

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from seg.inference import (
    Normalize,
    Predictor,
    ProgressLog,
    explain_out_of_memory,
    memory_advice,
    sliding_windows,
)
from seg.metrics import ConfusionMatrix, bootstrap_miou, iou_from_counts, per_image_counts
from seg.models import Segmenter, smp_model
from seg.tasks.semantic import evaluate

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def predictor(model, **kwargs):
    return Predictor(model.eval(), torch.device("cpu"), MEAN, STD, **kwargs)


def pixels(*shape: int) -> torch.Tensor:
    """uint8 RGB images, as the datasets give them."""
    return torch.randint(
        0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def test_normalize_converts_uint8_on_the_device_in_the_layout_asked_for():
    images = pixels(2, 3, 5, 7)
    normalize = Normalize(MEAN, STD, torch.device("cpu"), torch.channels_last)
    inputs = normalize(images)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    assert inputs.dtype == torch.float32
    assert torch.allclose(inputs, expected, atol=1e-5)
    assert inputs.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="uint8"):
        normalize(images.float())  # already converted: normalizing twice would be wrong


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
    images = pixels(2, 3, 64, 96)
    whole = predictor(model)(images)
    slide = predictor(model, mode="slide", crop=(64, 96), window_batch=3)(images)
    assert torch.allclose(whole, slide, atol=1e-5)


def test_slide_averages_overlapping_windows():
    # A pointwise model gives the same logits whatever window a pixel is seen in.
    model = Segmenter(nn.Conv2d(3, 5, 1), stride=1)
    images = pixels(2, 3, 50, 70)
    slide = predictor(model, mode="slide", crop=(32, 32), stride=(20, 20), window_batch=2)(images)
    assert torch.allclose(slide, predictor(model)(images), atol=1e-6)


def test_flip_tta_on_a_flip_symmetric_model_equals_no_tta():
    model = Segmenter(nn.Conv2d(3, 5, 3, padding=1), stride=1)
    with torch.no_grad():  # symmetric kernels: the model commutes with a horizontal flip
        model.net.weight.copy_((model.net.weight + model.net.weight.flip(-1)) / 2)
    images = pixels(2, 3, 24, 40)
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
    scores = predictor(model, scales=[0.5, 1.0, 1.5], flip=True)(pixels(1, 3, 50, 70))
    assert scores.shape == (1, 4, 50, 70)
    assert torch.allclose(scores.sum(1), torch.ones(1, 50, 70), atol=1e-5)


def test_bad_inference_settings():
    model = Segmenter(nn.Conv2d(3, 2, 1), stride=1)
    with pytest.raises(ValueError, match="crop"):
        predictor(model, mode="slide")
    with pytest.raises(ValueError, match="options"):
        predictor(model, mode="sliding")


@pytest.mark.parametrize(
    ("crop", "stride", "window_batch", "message"),
    [
        # a step past the window leaves rows and columns no window covers (NaN scores)
        ((32, 32), (40, 20), 4, r"stride=\[40, 20\] with crop=\[32, 32\].*1 <= stride <= crop"),
        ((32, 32), (0, 0), 4, r"stride=\[0, 0\].*1 <= stride <= crop"),  # never moves
        ((0, 32), None, 4, r"crop=\[0, 32\].*>= 1"),
        ((32,), None, 4, r"crop=\[32\].*\[height,width\]"),
        ((32, 32), None, 0, r"window_batch=0.*>= 1"),
    ],
)
def test_slide_settings_are_checked(crop, stride, window_batch, message):
    model = Segmenter(nn.Conv2d(3, 2, 1), stride=1)
    with pytest.raises(ValueError, match=message):
        predictor(model, mode="slide", crop=crop, stride=stride, window_batch=window_batch)


def test_slide_with_stride_equal_to_crop_tiles_the_image():
    # The largest stride allowed: windows touch without overlap and still cover every pixel.
    model = Segmenter(nn.Conv2d(3, 5, 1), stride=1)
    images = pixels(1, 3, 50, 70)
    slide = predictor(model, mode="slide", crop=(16, 16), stride=(16, 16))(images)
    assert torch.allclose(slide, predictor(model)(images), atol=1e-6)


def test_out_of_memory_names_the_images_their_size_and_what_to_change():
    model = Segmenter(nn.Conv2d(3, 2, 1), stride=1)
    images = torch.zeros(2, 3, 600, 800, dtype=torch.uint8)
    names = ["a.jpg", "b.jpg"]
    advice = memory_advice(predictor(model), "batch_size")
    for error in (
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                     "memory: you tried to allocate 26214400000 bytes"),
    ):  # fmt: skip
        with (
            pytest.raises(MemoryError, match=r"a.jpg, b.jpg \(800x600 pixels, batch of 2\)"),
            explain_out_of_memory(images, names, advice),
        ):
            raise error
    assert "mode=slide" in advice and advice.endswith("a smaller batch_size")
    slide = memory_advice(predictor(model, mode="slide", crop=(64, 64), scales=[1, 2]), "b")
    assert "crop (now [64, 64])" in slide and "scales above 1" in slide
    # Other errors, and all errors where the caller gives no advice, pass unchanged.
    with (
        pytest.raises(RuntimeError, match="shape mismatch"),
        explain_out_of_memory(images, names, advice),
    ):
        raise RuntimeError("shape mismatch")
    with pytest.raises(torch.OutOfMemoryError), explain_out_of_memory(images, names, None):
        raise torch.OutOfMemoryError("CUDA out of memory")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_log_reports_every_tenth_and_every_30_seconds(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="seg.inference")
    progress = ProgressLog("evaluate", 200, clock=clock)
    for _ in range(50):  # 2 s per 2-image batch: a tenth of the images before 30 s pass
        clock.now += 2
        progress.update(2)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "evaluate: 20/200 images (10%), 20 s elapsed, ~3 min left"
    assert [line.split()[1] for line in lines] == [f"{n}/200" for n in range(20, 101, 20)]
    caplog.clear()
    for _ in range(50):  # now 20 s per batch: 30 s pass before a tenth, a line every 2 batches
        clock.now += 20
        progress.update(2)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 25 and lines[0].startswith("evaluate: 104/200 images (52%)")
    assert lines[-1] == "evaluate: 200/200 images (100%), 18 min elapsed"
    caplog.clear()
    quick = ProgressLog("predict", 100, clock=clock)
    for _ in range(100):  # a 3-second pass: its last line is enough
        clock.now += 0.03
        quick.update(1)
    assert [record.getMessage() for record in caplog.records] == [
        "predict: 100/100 images (100%), 3 s elapsed"
    ]


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


class ChannelZero(nn.Module):
    """Predicts class 1 where the image's first channel is 1, else class 0."""

    def forward(self, images):
        return torch.stack([1 - images[:, 0], images[:, 0]], 1)


def test_evaluate_keeps_the_first_examples_and_the_lowest_miou_images_in_order():
    # every pixel is class 1; image i predicts it on hits[i] of 16 pixels: mIoU hits / 32
    hits = [8, 4, 12, 4, 2, 8]
    images = torch.zeros(len(hits), 3, 4, 4, dtype=torch.uint8)
    for i, count in enumerate(hits):
        images[i, 0].view(-1)[:count] = 255
    masks = torch.ones(len(hits), 4, 4, dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, masks), batch_size=4)
    # mean 0, std 1: the model sees pixels / 255, 1 where a hit was drawn
    unscaled = Predictor(ChannelZero(), torch.device("cpu"), (0, 0, 0), (1, 1, 1))
    result = evaluate(unscaled, loader, 2, 255, num_examples=2, num_worst=2)
    assert result.image_names == [str(i) for i in range(len(hits))]
    assert result.image_counts[:, 0, 1].tolist() == hits  # true positives of class 1, in order
    # images 1 and 3 tie at 4/32: the earlier one is kept
    assert [(miou, name) for miou, name, _ in result.worst] == [(2 / 32, "4"), (4 / 32, "1")]
    for (_, _, (image, _, prediction)), index in zip(result.worst, (4, 1), strict=True):
        assert torch.equal(image, images[index])
        assert torch.equal(prediction, (image[0] == 255).long())
    assert len(result.examples) == 2
    for (image, mask, _), index in zip(result.examples, (0, 1), strict=True):
        assert torch.equal(image, images[index]) and torch.equal(mask, masks[index])
        assert mask.dtype == torch.uint8  # an eighth of int64's bytes to gather to rank 0
    assert result.metrics["IoU"][1] == sum(hits) / (16 * len(hits))


class OverflowsOnBright(nn.Module):
    """Class scores that are NaN for images whose first pixel is 255 (as fp16 overflow gives)."""

    def forward(self, images):
        scores = torch.stack([1 - images[:, 0], images[:, 0]], 1)
        bright = (images[:, 0, 0, 0] == 1).view(-1, 1, 1, 1)
        return scores.masked_fill(bright, float("nan"))


def test_non_finite_class_scores_are_reported_once_at_the_end_of_an_evaluation(caplog):
    # NaN scores argmax to class 0: without the warning the mIoU looks plausible.
    images = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    images[[1, 3], 0, 0, 0] = 255
    loader = DataLoader(TensorDataset(images, torch.ones(5, 4, 4, dtype=torch.uint8)), batch_size=2)
    scores = Predictor(OverflowsOnBright(), torch.device("cpu"), (0, 0, 0), (1, 1, 1))
    evaluate(scores, loader, 2, 255)
    assert caplog.text.count("non-finite class scores") == 1
    assert "2 of 5 images had non-finite class scores (NaN or inf)" in caplog.text
    caplog.clear()
    evaluate(
        scores, DataLoader(TensorDataset(images[:1], torch.ones(1, 4, 4)), batch_size=1), 2, 255
    )
    assert "non-finite" not in caplog.text  # counted afresh for each evaluation


class RecordsAutotuning(nn.Module):
    """Class scores from the first channel; notes cuDNN's autotuning flag at each batch."""

    def __init__(self):
        super().__init__()
        self.autotuning = []

    def forward(self, images):
        self.autotuning.append(torch.backends.cudnn.benchmark)
        return torch.stack([1 - images[:, 0], images[:, 0]], 1)


@pytest.mark.parametrize("autotuning", [True, False])
def test_autotuning_stops_at_the_first_batch_of_another_image_size_and_comes_back(autotuning):
    # whole images of varying sizes (VOC, ADE20K): cuDNN would tune again at every new shape
    sizes = [(4, 6), (4, 6), (5, 6), (4, 6)]
    samples = [(pixels(3, *size), torch.ones(size, dtype=torch.uint8)) for size in sizes]
    model = RecordsAutotuning()
    torch.backends.cudnn.benchmark = autotuning  # as the run configured it
    try:
        scores = Predictor(model, torch.device("cpu"), (0, 0, 0), (1, 1, 1))
        evaluate(scores, DataLoader(samples, batch_size=1), 2, 255)
        assert model.autotuning == [autotuning, autotuning, False, False]
        assert torch.backends.cudnn.benchmark == autotuning  # restored
    finally:
        torch.backends.cudnn.benchmark = False
