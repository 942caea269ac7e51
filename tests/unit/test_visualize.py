"""Pictures: PNGs read back pixel-identical, full-resolution panels bounded, small ones untouched."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

import seg.visualize
from seg.visualize import (
    MAX_PANEL_SIDE,
    TITLE_HEIGHT,
    add_png,
    colorize,
    comparison,
    confusion_figure,
    gallery,
    overlay,
    panel_size,
    resize_mask,
    save_png,
    titled,
)

PALETTE = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 100, 50]]


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_save_png_reads_back_pixel_identical_in_rgb_order(tmp_path):
    array = random_rgb(37, 53)
    array[0, 0] = [255, 0, 0]  # pure red: a swapped channel order would read back blue
    save_png(array, tmp_path / "deep" / "picture.png")  # creates the folders
    with Image.open(tmp_path / "deep" / "picture.png") as image:
        assert image.format == "PNG" and image.mode == "RGB"
        read = np.asarray(image)
    np.testing.assert_array_equal(read, array)
    assert read[0, 0].tolist() == [255, 0, 0]


def test_save_png_takes_permuted_arrays(tmp_path):
    """figures() hands over (3, H, W) tensors permuted to (H, W, 3): not contiguous."""
    chw = torch.from_numpy(random_rgb(20, 30).transpose(2, 0, 1).copy())
    array = chw.permute(1, 2, 0).numpy()
    assert not array.flags.c_contiguous
    save_png(array, tmp_path / "permuted.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "permuted.png")), array)


@pytest.mark.parametrize(
    "array", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3))]
)
def test_save_png_names_a_wrong_array(tmp_path, array):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        save_png(array, tmp_path / "wrong.png")
    assert not (tmp_path / "wrong.png").exists()


def test_add_png_reads_back_as_add_image_does(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    array = random_rgb(24, 40, seed=1)
    with SummaryWriter(tmp_path) as writer:
        add_png(writer, "val/ours", array, 7)
        writer.add_image("val/theirs", array, 7, dataformats="HWC")
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    for tag in ("val/ours", "val/theirs"):
        (image,) = events.Images(tag)
        assert (image.step, image.height, image.width) == (7, 24, 40)
        with Image.open(io.BytesIO(image.encoded_image_string)) as decoded:
            np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), array)


@pytest.mark.parametrize(
    ("size", "bounded"),
    [
        ((1024, 2048), (512, 1024)),  # a Cityscapes image
        ((2048, 512), (1024, 256)),  # tall: the long side is the height
        ((600, 1500), (410, 1024)),  # aspect kept, rounded
        ((1024, 1024), (1024, 1024)),  # at the bound: untouched
        ((64, 96), (64, 96)),
    ],
)
def test_panel_size(size, bounded):
    assert panel_size(*size) == bounded


def test_resize_mask_never_invents_a_label():
    coarse = torch.tensor([[0, 3, 255], [1, 2, 3]])
    mask = coarse.repeat_interleave(4, 0).repeat_interleave(4, 1)  # (8, 12), 4x4 blocks
    torch.testing.assert_close(resize_mask(mask, (2, 3)), coarse)  # one pixel per block
    odd = resize_mask(mask, (5, 7))
    assert odd.dtype == mask.dtype and odd.shape == (5, 7)
    assert set(odd.unique().tolist()) <= set(coarse.unique().tolist())


def test_comparison_bounds_a_full_resolution_panel():
    """A 1024x2048 image: three 512x1024 panels, the classes' colours kept exactly."""
    height, width = 1024, 2048
    image = torch.full((3, height, width), 90, dtype=torch.uint8)  # one colour everywhere
    mask = torch.zeros(height, width, dtype=torch.int64)
    mask[:, width // 2 :] = 1  # left class 0, right class 1
    prediction = torch.full((height, width), 2)
    picture = comparison(image, mask, prediction, PALETTE)
    assert picture.shape == (3, 512, 3 * 1024) and picture.dtype == torch.uint8
    assert max(picture.shape[1:]) // 3 <= MAX_PANEL_SIDE
    rgb = torch.full((3, 1, 1), 90, dtype=torch.uint8)
    panel_image, truth, predicted = picture.split(1024, dim=2)
    assert (panel_image == rgb).all()
    for columns, label in ((slice(0, 512), 0), (slice(512, 1024), 1)):
        color = torch.tensor(PALETTE[label], dtype=torch.uint8).view(3, 1, 1)
        assert (truth[:, :, columns] == overlay(rgb, color)).all()  # no blend across classes
    assert (
        predicted == overlay(rgb, torch.tensor(PALETTE[2], dtype=torch.uint8).view(3, 1, 1))
    ).all()


def test_comparison_leaves_a_small_panel_untouched():
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 96), generator=generator, dtype=torch.uint8)
    mask = torch.randint(0, len(PALETTE), (64, 96), generator=generator)
    mask[:4] = 255  # ignored: black in the colour mask
    prediction = torch.randint(0, len(PALETTE), (64, 96), generator=generator)
    rgb = image  # uint8, as the datasets give it: shown as it is
    expected = torch.cat(
        [rgb, overlay(rgb, colorize(mask, PALETTE)), overlay(rgb, colorize(prediction, PALETTE))],
        dim=2,
    )
    torch.testing.assert_close(comparison(image, mask, prediction, PALETTE), expected)


def test_gallery_of_bounded_rows_is_bounded():
    """The worst-images gallery of full-resolution images: rows of bounded panels."""
    rows = [
        comparison(
            torch.zeros(3, *size, dtype=torch.uint8),
            torch.zeros(size, dtype=torch.int64),
            torch.zeros(size, dtype=torch.int64),
            PALETTE,
        )
        for size in ((1024, 2048), (256, 512))
    ]
    picture = gallery(rows)
    assert picture.shape == (512 + 256, 3 * 1024, 3)
    assert (picture[512:, 3 * 512 :] == 0).all()  # the narrower row padded with black


def test_the_confusion_colour_bar_is_in_percent_as_the_cells(monkeypatch):
    figures = []
    monkeypatch.setattr(seg.visualize, "_figure_to_array", figures.append)
    confusion_figure(torch.tensor([[3, 1], [0, 4]]), ["a", "b"])
    (figure,) = figures
    matrix, bar = figure.axes
    assert [text.get_text() for text in matrix.texts] == ["75", "25", "0", "100"]
    assert bar.get_ylim() == (0, 100) and bar.get_ylabel() == "%"


def test_the_worst_images_have_column_titles():
    from seg.tasks.semantic import Evaluation, figures

    mask = torch.zeros(64, 96, dtype=torch.uint8)
    worst = [(0.25, f"val/{i}", (torch.full((3, 64, 96), 90, dtype=torch.uint8), mask, mask))
             for i in range(2)]  # fmt: skip
    confusion = torch.eye(2, dtype=torch.int64)
    result = Evaluation({"IoU": [1.0, 1.0]}, confusion, torch.zeros(0), [], worst=worst)
    picture = figures(result, ["a", "b"], PALETTE[:2])["worst"]
    assert picture.shape == (2 * (TITLE_HEIGHT + 64), 3 * 96, 3)
    # above each row, a title over each of its three panels: image | ground truth | prediction
    for top in (0, TITLE_HEIGHT + 64):
        strip = picture[top : top + TITLE_HEIGHT]
        assert all(strip[:, 96 * i : 96 * (i + 1)].max() > 128 for i in range(3))
        assert (picture[top + TITLE_HEIGHT : top + TITLE_HEIGHT + 64, :96] == 90).all()


def test_a_long_title_is_drawn_smaller_within_its_panel():
    row = torch.zeros(3, 10, 60, dtype=torch.uint8)
    picture = titled(row, ["a very long title for a panel this narrow", "b"])
    assert picture.shape == (3, TITLE_HEIGHT + 10, 60)
    assert picture[:, :, :30].max() > 0 and picture[:, :, 30:].max() > 0
    assert picture[:, :, 28:32].max() == 0  # nothing spills over into the next panel
