"""Images beyond 8-bit RGB (issue 22): readers at every depth and band count, and their errors."""

import cv2
import numpy as np
import pytest
import tifffile

from seg.data.base import DataError, read_image, read_mask

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
