"""Images beyond 8-bit RGB (issue 22): readers at every depth and band count, and their errors."""

import logging
import sys

import cv2
import numpy as np
import pytest
import tifffile
import torch

from seg.data.base import DataError, image_info, read_image, read_mask
from seg.data.folder import FolderDataset
from seg.data.transforms import train_transform
from seg.inference import Normalize
from seg.predict import ImageFiles
from seg.visualize import display_rgb

RNG = np.random.default_rng(0)
STACK = RNG.integers(0, 10000, (12, 10, 13)).astype(np.uint16)  # (H, W, C), 13 bands


def test_8_bit_photos_decode_to_the_same_rgb_pixels_as_before(tmp_path):
    rgb = RNG.integers(0, 256, (12, 10, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    cv2.imwrite(str(tmp_path / "grey.png"), rgb[..., 0])
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)
    # 8-bit grey photos are expanded to RGB, as OpenCV's colour decode always did
    assert np.array_equal(read_image(tmp_path / "grey.png"), np.repeat(rgb[..., :1], 3, axis=2))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16_bit_pngs_keep_their_depth_and_channels(tmp_path, channels):
    pixels = RNG.integers(256, 65536, (12, 10, channels)).astype(np.uint16)  # all above 8 bits
    order = {1: [0], 3: [2, 1, 0], 4: [2, 1, 0, 3]}[channels]  # OpenCV writes BGR(A)
    stored = pixels[..., order].squeeze(2) if channels == 1 else pixels[..., order]
    cv2.imwrite(str(tmp_path / "a.png"), stored)
    image = read_image(tmp_path / "a.png")
    assert image.dtype == np.uint16 and image.max() > 255  # never squashed to 8 bits
    assert np.array_equal(image, pixels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize("layout", ["contig", "separate"])
def test_tiffs_read_every_band_from_the_files_own_layout(tmp_path, dtype, layout):
    pixels = STACK.astype(dtype) - (5000 if dtype == np.int16 else 0)
    written = pixels if layout == "contig" else pixels.transpose(2, 0, 1)  # planar: (C, H, W)
    tifffile.imwrite(tmp_path / "a.tif", written, photometric="minisblack", planarconfig=layout,
                     compression="deflate")  # fmt: skip
    image = read_image(tmp_path / "a.tif")
    assert image.dtype == dtype and np.array_equal(image, pixels)


def test_bands_are_counted_from_one_and_reorder(tmp_path):
    np.save(tmp_path / "a.npy", STACK)
    assert np.array_equal(read_image(tmp_path / "a.npy", bands=[4, 3, 2]), STACK[..., [3, 2, 1]])
    with pytest.raises(DataError, match=r"a\.npy.*bands \[0, 14\].*13 band"):
        read_image(tmp_path / "a.npy", bands=[0, 4, 14])


def test_a_page_stack_is_refused_not_guessed_into_bands(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", STACK)  # tifffile's default: 12 pages of 10x13
    with pytest.raises(DataError, match=r"stack\.tif.*axes QYX"):
        read_image(tmp_path / "stack.tif")
    with pytest.raises(DataError, match=r"stack\.tif.*axes QYX"):  # from the header alike
        image_info(tmp_path / "stack.tif")


def test_unsupported_dtypes_and_shapes_are_named(tmp_path):
    np.save(tmp_path / "f64.npy", STACK.astype(np.float64))
    np.save(tmp_path / "4d.npy", STACK[None])
    with pytest.raises(DataError, match=r"f64\.npy.*float64.*float32"):
        read_image(tmp_path / "f64.npy")
    with pytest.raises(DataError, match=r"4d\.npy.*channels last"):
        read_image(tmp_path / "4d.npy")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match=r"bad\.tif.*cannot decode"):
        read_image(tmp_path / "bad.tif")


@pytest.mark.parametrize("suffix", [".tif", ".npy"])
def test_label_rasters_read_as_one_band_of_integers(tmp_path, suffix):
    labels = RNG.integers(0, 300, (12, 10)).astype(np.uint16)

    def write(path, array):  # a TIFF with its bands as samples, as GDAL writes them
        if suffix == ".npy":
            return np.save(path, array)
        contig = array.ndim == 3 and array.shape[2] > 1
        tifffile.imwrite(
            path, array, photometric="minisblack", planarconfig="contig" if contig else None
        )

    write(tmp_path / f"m{suffix}", labels[..., None])  # (H, W, 1) as eo-learn stores LULC
    write(tmp_path / f"stack{suffix}", np.stack([labels, labels], axis=-1))
    write(tmp_path / f"float{suffix}", labels.astype(np.float32))
    mask = read_mask(tmp_path / f"m{suffix}")
    assert mask.dtype == np.uint16 and np.array_equal(mask, labels)
    with pytest.raises(DataError, match=rf"stack\{suffix}.*2 bands"):
        read_mask(tmp_path / f"stack{suffix}")
    with pytest.raises(DataError, match=rf"float\{suffix}.*float32.*integer"):
        read_mask(tmp_path / f"float{suffix}")


def raster_folder(root, images: dict[str, np.ndarray], mask: np.ndarray) -> str:
    """A data=folder tree with one train sample per image (``.npy``, channels last)."""
    for name, image in images.items():
        for kind, array in (("images", image), ("masks", mask)):
            (root / kind / "train").mkdir(parents=True, exist_ok=True)
            np.save(root / kind / "train" / f"{name}.npy", array)
    return str(root)


def folder(root: str, transform=None, **keys) -> FolderDataset:
    return FolderDataset(root, "train", num_classes=2, transform=transform, **keys)


def test_samples_keep_16_bits_and_the_bands_asked_for(tmp_path):
    mask = (RNG.integers(0, 2, STACK.shape[:2])).astype(np.uint8)
    root = raster_folder(tmp_path, {"a": STACK + 300}, mask)
    image, out = folder(root, bands=[4, 3, 2])[0]
    assert image.dtype == torch.uint16 and image.shape == (3, *STACK.shape[:2])
    assert torch.equal(image, torch.from_numpy(STACK[..., [3, 2, 1]] + 300).permute(2, 0, 1))
    assert int(image.int().max()) > 255 and torch.equal(out, torch.from_numpy(mask))


def test_cache_entries_of_other_bands_or_dtypes_never_collide(tmp_path):
    mask = np.zeros(STACK.shape[:2], np.uint8)
    root = raster_folder(tmp_path / "data", {"a": STACK}, mask)
    cache = str(tmp_path / "cache")
    for bands in ([1, 2, 3], [3, 2, 1], None):  # each read twice: decoded, then cached
        for _ in range(2):
            image = folder(root, cache_dir=cache, bands=bands)[0][0]
            wanted = STACK if bands is None else STACK[..., [b - 1 for b in bands]]
            assert torch.equal(image, torch.from_numpy(wanted).permute(2, 0, 1))
    # the same file name rewritten at another dtype (and the same size in bytes: int16)
    np.save(tmp_path / "data" / "images" / "train" / "a.npy", STACK.astype(np.int16))
    image = folder(root, cache_dir=cache, scale=10000)[0][0]
    assert image.dtype == torch.int16
    assert len(list((tmp_path / "cache").iterdir())) == 4  # one folder per settings


def test_nodata_pixels_are_ignored_and_padded_and_nans_need_nodata(tmp_path):
    image = STACK[..., :2].astype(np.float32) / 10000
    image[0, 0] = np.nan
    image[1, 1, 1] = -1
    mask = np.ones(STACK.shape[:2], np.uint8)
    root = raster_folder(tmp_path, {"a": image}, mask)
    with pytest.raises(DataError, match=r"a\.npy: the image holds NaN pixels.*data\.nodata"):
        folder(root, scale=1)[0]
    out = folder(root, scale=1, nodata=[-1, -1])[0][1]  # NaNs are no data too
    assert out[0, 0] == 255 and out[1, 1] == 255 and (out == 255).sum() == 2
    pad = train_transform([40, 40], 255, scale_range=(1, 1), hflip=0, fill=-1)
    padded, _ = folder(root, transform=pad, scale=1, nodata=-1)[0]
    assert (padded[:, 20:] == -1).all()  # padding is no data, not a valid 0


def test_colour_augmentation_is_skipped_off_3_band_uint8_and_says_so(tmp_path, caplog):
    root = raster_folder(tmp_path, {"a": STACK}, np.zeros(STACK.shape[:2], np.uint8))
    jitter = train_transform([8, 8], 255, color_jitter=1.0)
    with caplog.at_level(logging.INFO, logger="seg.data.transforms"):
        image, _ = folder(root, transform=jitter)[(0, 0, 0)]
    assert image.dtype == torch.uint16 and "ColorJitter skipped" in caplog.text
    assert "13 bands of uint16" in caplog.text


@pytest.mark.parametrize(
    ("dtype", "scale", "divisor"),
    [(torch.uint8, "auto", 255), (torch.uint16, "auto", 65535), (torch.int16, 4095, 4095)],
)
def test_pixels_are_widened_scaled_and_normalised_on_the_device(dtype, scale, divisor):
    images = torch.randint(0, 255 if dtype == torch.uint8 else 4095, (2, 5, 4, 3)).to(dtype)
    mean, std = [0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]
    out = Normalize(mean, std, torch.device("cpu"), scale=scale)(images)
    view = (1, 5, 1, 1)
    expected = (images.float() / divisor - torch.tensor(mean).view(view)) / torch.tensor(std).view(
        view
    )
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)


def test_auto_scale_and_band_counts_are_refused_where_undefined():
    cpu = torch.device("cpu")
    with pytest.raises(TypeError, match=r"data\.scale=auto .* int16.*10000"):
        Normalize([0.0], [1.0], cpu)(torch.zeros(1, 1, 2, 2, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"4 channels but data\.mean/data\.std 3"):
        Normalize([0.0] * 3, [1.0] * 3, cpu)(torch.zeros(1, 4, 2, 2, dtype=torch.uint8))


def test_nodata_pixels_become_the_band_mean():
    images = torch.tensor([[[[7.0, float("nan")]], [[7.0, 3.0]]]])  # (1, 2, 1, 2)
    out = Normalize([0.5, 0.5], [0.1, 0.1], torch.device("cpu"), scale=10, nodata=7)(images)
    assert out[0, :, 0, 0].tolist() == [0.0, 0.0] and out[0, 0, 0, 1] == 0.0
    assert out[0, 1, 0, 1] == pytest.approx((0.3 - 0.5) / 0.1)


def test_pictures_stretch_the_rgb_bands_or_show_one_band_grey():
    photo = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    assert display_rgb(photo) is photo  # photos as they are
    bands = torch.zeros(13, 40, 50, dtype=torch.int16)
    bands[3] = torch.arange(50, dtype=torch.int16) * 100  # a ramp in band 4 only
    picture = display_rgb(bands, [4, 3, 2])
    assert picture.dtype == torch.uint8 and picture.shape == (3, 40, 50)
    assert picture[0, 0, 0] == 0 and picture[0, 0, -1] == 255 and picture[1:].max() == 0
    grey = display_rgb(bands[3:4].to(torch.uint16))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], picture[0])


def test_a_tiff_without_the_geo_extra_names_it(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "a.tif", STACK[..., 0])
    monkeypatch.setitem(sys.modules, "tifffile", None)  # as if it were not installed
    with pytest.raises(DataError, match=r'a\.tif: reading TIFF needs .*pip install -e "\.\[geo\]"'):
        read_image(tmp_path / "a.tif")


def test_predict_skips_an_image_with_other_bands_than_the_model_naming_it(tmp_path):
    np.save(tmp_path / "a.npy", STACK)
    files = ImageFiles([tmp_path / "a.npy"], bands=[1, 2, 3], in_channels=3)
    assert files[0][1].shape == (3, *STACK.shape[:2]) and files[0][2] is None
    _, image, error = ImageFiles([tmp_path / "a.npy"], in_channels=4)[0]
    assert image is None and "a.npy: 13 bands but the model takes 4" in error
