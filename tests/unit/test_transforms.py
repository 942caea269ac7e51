"""Training augmentation: uint8 in and out, never invents labels, keeps image and mask aligned,
and crops with the distribution of the scale-then-crop pipeline it replaced."""

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from seg.data.transforms import apply, train_transform, val_transform

IGNORE = 255
COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


def blocks(height=60, width=80):
    """A mask of large class blocks (with an ignored strip) and the image painting it."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 3 :] = 1
    mask[height // 2 :, 2 * width // 3 :] = 2
    mask[:4] = IGNORE
    image = COLORS[np.minimum(mask, 2)]
    return image, mask


@pytest.mark.parametrize("seed", range(12))
def test_no_invented_labels_and_aligned(seed):
    transform = train_transform(crop_size=(48, 64), ignore_index=IGNORE, scale_range=(0.5, 2.0))
    image, mask = blocks()
    out_image, out_mask = apply(transform, image, mask, seed=(0, seed))
    assert out_image.dtype == torch.uint8 and out_mask.dtype == torch.uint8  # no CPU normalize
    assert out_image.shape == (3, 48, 64) and out_mask.shape == (48, 64)
    out_mask = out_mask.numpy()
    assert set(np.unique(out_mask)) <= {0, 1, 2, IGNORE}
    rgb = out_image.numpy().transpose(1, 2, 0).astype(np.int64)
    nearest = np.abs(rgb[..., None, :] - COLORS).sum(-1).argmin(-1)
    labelled = out_mask != IGNORE
    agreement = (nearest[labelled] == out_mask[labelled]).mean()
    assert agreement > 0.95  # only interpolated edge pixels of the image may disagree


def test_same_seed_same_sample_different_seed_different_sample():
    transform = train_transform(crop_size=(32, 32), ignore_index=IGNORE)
    image, mask = blocks()
    first = apply(transform, image, mask, seed=(0, 1))
    again = apply(transform, image, mask, seed=(0, 1))
    assert (first[0] == again[0]).all() and (first[1] == again[1]).all()
    others = [apply(transform, image, mask, seed=(0, s))[1] for s in range(2, 8)]
    assert any((other != first[1]).any() for other in others)


def test_small_images_are_padded_with_ignore():
    transform = train_transform(crop_size=(100, 120), ignore_index=IGNORE, scale_range=(1, 1))
    image, mask = blocks()
    out_image, out_mask = apply(transform, image, mask, seed=(0, 0))
    assert out_mask.shape == (100, 120)
    assert (out_mask.numpy() == IGNORE).sum() >= 100 * 120 - 60 * 80
    assert (out_image[:, 60:] == 0).all() and (out_mask[60:] == IGNORE).all()  # bottom/right


def test_bad_scale_range():
    with pytest.raises(ValueError, match=r"scale_range"):
        train_transform(crop_size=(8, 8), ignore_index=IGNORE, scale_range=(2.0, 1.0))


def test_validation_keeps_the_uint8_image_whole():
    image, mask = blocks()
    out_image, out_mask = apply(val_transform(), image, mask, seed=None)
    assert out_image.dtype == torch.uint8 and torch.equal(
        out_image.permute(1, 2, 0), torch.from_numpy(image)
    )
    assert torch.equal(out_mask, torch.from_numpy(mask))


@pytest.mark.parametrize(
    ("dtype", "ignore_index", "values"),
    [(np.uint8, 255, [0, 3, 7, 200]), (np.int16, -1, [0, 5, 299, 300]), (np.int16, 400, [0, 1, 2])],
)
def test_masks_only_hold_source_values_or_ignore_index(dtype, ignore_index, values):
    rng = np.random.default_rng(0)
    # 6x8 blocks of random labels, upscaled nearest to 90x120: many label edges to resize
    labels = np.array([*values, ignore_index], dtype)[rng.integers(0, len(values) + 1, (6, 8))]
    mask = cv2.resize(labels, (120, 90), interpolation=cv2.INTER_NEAREST)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    transform = train_transform((64, 96), ignore_index, scale_range=(0.3, 2.5), color_jitter=0.5)
    seen = set()
    for seed in range(40):
        out_image, out_mask = apply(transform, image, mask, seed=(1, seed))
        assert out_image.dtype == torch.uint8 and out_mask.dtype == torch.from_numpy(mask).dtype
        seen |= set(out_mask.unique().tolist())
    assert ignore_index in seen and seen <= set(values) | {ignore_index}


# The distribution check: a source image whose pixels encode their own coordinates (R = x,
# G = y) lets each crop tell its scale and its source position. The pipeline it replaced
# (scale the whole image, pad bottom/right, random crop) is built here as the reference.
SOURCE_H, SOURCE_W = 200, 240
CROP = (64, 96)
SCALES = (0.25, 1.5)  # below 0.32 the scaled image is smaller than the crop: padding too


def coordinate_image() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:SOURCE_H, 0:SOURCE_W]
    image = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    return image, np.zeros((SOURCE_H, SOURCE_W), np.uint8)


def scale_then_crop(crop, ignore_index, scale_range) -> A.Compose:
    low, high = scale_range
    return A.Compose(
        [
            A.RandomScale(
                scale_limit=(low - 1.0, high - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            ),
            A.PadIfNeeded(
                min_height=crop[0],
                min_width=crop[1],
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
            ),
            A.RandomCrop(height=crop[0], width=crop[1]),
        ]
    )


def crop_geometry(image: torch.Tensor, mask: torch.Tensor) -> tuple[float, ...]:
    """(scale, source x and y of the crop's top-left pixel, valid height and width) of a crop of
    ``coordinate_image``, by a straight-line fit of the coordinates it shows."""
    valid = (mask != IGNORE).numpy()
    rows, columns = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    fits = []
    for channel, line, limit in (
        (0, image[0, rows[0]], SOURCE_W - 1),
        (1, image[1, :, columns[0]], SOURCE_H - 1),
    ):
        values = line.numpy()[: len(columns) if channel == 0 else len(rows)].astype(float)
        inside = (values > 0) & (values < limit)  # the edges are clamped, not interpolated
        position = np.flatnonzero(inside)
        slope, intercept = np.polyfit(position, values[inside], 1)
        fits.append((1 / slope, intercept))
    (scale_x, left), (scale_y, top) = fits
    return (scale_x + scale_y) / 2, left, top, len(rows), len(columns)


def geometries(transform, seeds) -> np.ndarray:
    image, mask = coordinate_image()
    return np.array([crop_geometry(*apply(transform, image, mask, seed=(7, s))) for s in seeds])


def test_crop_first_has_the_distribution_of_scale_then_crop():
    count = 800
    new = geometries(train_transform(CROP, IGNORE, SCALES, hflip=0.0), range(count))
    # other seeds: two independent samples, not the same draws twice
    old = geometries(scale_then_crop(CROP, IGNORE, SCALES), range(count, 2 * count))
    for name, a, b in zip(("scale", "left", "top"), new.T, old.T, strict=False):
        assert abs(a.mean() - b.mean()) < 4 * np.sqrt((a.var() + b.var()) / count), name
        assert a.std() == pytest.approx(b.std(), rel=0.12), name
        deciles = np.quantile(a, np.linspace(0.1, 0.9, 9)) - np.quantile(
            b, np.linspace(0.1, 0.9, 9)
        )
        assert (abs(deciles) < 0.1 * (b.max() - b.min())).all(), name
    # the valid (unpadded) height and width: how often the crop is padded, and by how much
    for name, a, b, side in zip(("height", "width"), new.T[3:], old.T[3:], CROP, strict=True):
        padded_a, padded_b = (a < side).mean(), (b < side).mean()
        assert padded_b > 0 and abs(padded_a - padded_b) < 4 * np.sqrt(2 * padded_b / count), name
        assert abs(a.mean() - b.mean()) < 4 * np.sqrt((a.var() + b.var()) / count), name


def test_a_seed_gives_the_crop_window_of_scale_then_crop():
    """Drawn in the same order from the same stream: the same crop, up to sub-pixel rounding."""
    seeds = range(200)
    new = geometries(train_transform(CROP, IGNORE, SCALES, hflip=0.0), seeds)
    old = geometries(scale_then_crop(CROP, IGNORE, SCALES), seeds)
    np.testing.assert_allclose(new[:, 0], old[:, 0], rtol=0.03)  # scale
    # source position: the region is rounded to whole source pixels, and the fit reads uint8
    np.testing.assert_allclose(new[:, 1:3], old[:, 1:3], atol=1.5)
    np.testing.assert_array_equal(new[:, 3:], old[:, 3:])  # the valid (unpadded) part


def small_structure(height=64, width=64):
    """Background with one small square of class 1, as in a cell or a building."""
    mask = np.zeros((height, width), np.uint8)
    mask[40:56, 10:26] = 1
    return COLORS[mask], mask


def foreground_shares(transform, seeds) -> np.ndarray:
    image, mask = small_structure()
    return np.array([(apply(transform, image, mask, (3, s))[1] == 1).float().mean() for s in seeds])


def test_cat_max_ratio_redraws_crops_one_class_dominates():
    crop = dict(crop_size=(24, 24), ignore_index=IGNORE, scale_range=(1, 1), hflip=0.0)
    plain = foreground_shares(train_transform(**crop), range(60))
    aware = foreground_shares(train_transform(**crop, cat_max_ratio=0.75), range(60))
    assert (plain > 0.25).mean() < 0.4  # the square is mostly outside a random crop
    assert (aware > 0.25).mean() > 0.8  # up to 10 redraws mostly find it
    again = foreground_shares(train_transform(**crop, cat_max_ratio=0.75), range(60))
    np.testing.assert_array_equal(aware, again)  # seeded: resuming gives the same crops


def test_cat_max_ratio_leaves_out_the_ignore_index_and_1_changes_nothing():
    mask = (np.indices((64, 64)).sum(0) % 2).astype(np.uint8)  # classes 0 and 1, half each
    mask[np.arange(64) % 10 < 7] = IGNORE  # 70 % ignored: more than the ratio below
    image = COLORS[np.minimum(mask, 2)]
    crop = dict(crop_size=(20, 20), ignore_index=IGNORE, scale_range=(1, 1))
    for seed in range(10):
        plain = apply(train_transform(**crop), image, mask, (0, seed))
        accepted = apply(train_transform(**crop, cat_max_ratio=0.6), image, mask, (0, seed))
        off = apply(train_transform(**crop, cat_max_ratio=1.0), image, mask, (0, seed))
        assert torch.equal(plain[1], accepted[1]) and torch.equal(plain[0], accepted[0])
        assert torch.equal(plain[0], off[0]) and torch.equal(plain[1], off[1])


@pytest.mark.parametrize("ratio", [0.0, 1.5])
def test_a_cat_max_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ValueError, match="cat_max_ratio"):
        train_transform(crop_size=(8, 8), ignore_index=IGNORE, cat_max_ratio=ratio)


@pytest.mark.parametrize("scale_range", [(1, 1), (0.5, 0.5)])  # cropped, and padded
def test_one_band_images_keep_their_band_axis_and_values(scale_range):
    image = np.arange(40 * 48, dtype=np.uint16).reshape(40, 48, 1) * 30  # past 8 bits
    mask = (image[..., 0] % 2).astype(np.uint8)
    transform = train_transform((32, 32), IGNORE, scale_range=scale_range, hflip=0.0)
    out_image, out_mask = apply(transform, image, mask, seed=(0, 1))
    assert out_image.shape == (1, 32, 32) and out_image.dtype == torch.uint16
    assert out_image.numpy().max() > 255 and out_mask.shape == (32, 32)
