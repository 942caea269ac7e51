"""Every unreadable file is one DataError naming it, whatever the damage; binary masks of any
bit depth; label values beyond a lookup table; two files of one name."""

import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seg.data.base import DataError
from seg.data.cityscapes import Cityscapes
from seg.data.folder import FolderDataset
from seg.doctor import check_splits, inspect
from tests.conftest import compose_config, write_png


def png_claiming(width: int, height: int) -> bytes:
    """A complete PNG whose header claims ``width`` x ``height``: past OpenCV's pixel limit
    (it raises cv2.error) and Pillow's decompression-bomb limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "zero bytes":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "not an image":
        path.write_bytes(b"name,label\nimg0,1\n")
    elif how == "a directory":
        path.unlink()
        path.mkdir()
    elif how == "no read permission":
        path.chmod(0)
    elif how == "corrupted pixel data":  # the compressed pixels flipped, the file complete
        start = data.index(b"IDAT") + 4
        flipped = bytes(b ^ 0xFF for b in data[start : start + 8])
        path.write_bytes(data[:start] + flipped + data[start + 8 :])
    elif how == "a header past the decoders' limits":
        path.write_bytes(png_claiming(200_000, 200_000))


# What the message says is wrong, after the file's path and ": ".
SAYS = {
    "zero bytes": r"(image|mask) file is empty",
    "truncated": r"(image|mask) file is truncated",
    "not an image": r"cannot decode (image|mask) \(not an image file",
    "a directory": r"cannot read (image|mask) \(Is a directory\)",
    "no read permission": r"cannot read (image|mask) \(Permission denied\)",
    "corrupted pixel data": r"cannot decode (image|mask)",
    "a header past the decoders' limits": r"cannot decode (image|mask)",
}
ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without permission")
DAMAGES = [pytest.param(how, marks=ROOT) if "permission" in how else how for how in SAYS]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", ["images", "masks"])
def test_an_unreadable_file_is_a_data_error_naming_it(folder_root, kind, how):
    path = folder_root / kind / "val" / "img0.png"
    damage(path, how)
    dataset = FolderDataset(str(folder_root), "val", num_classes=2)
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + SAYS[how]):
        dataset[0]


@pytest.mark.parametrize(
    ("name", "options"),
    [("img0.png", {"mask_format": "rgb", "palette": [[0, 0, 0], [255, 255, 255]]}),
     ("img0.jpg", {"jpeg_threshold": 128})],
)  # fmt: skip
def test_zero_byte_rgb_and_jpeg_masks_are_named(folder_root, name, options):
    (folder_root / "masks" / "val" / "img0.png").unlink()
    path = folder_root / "masks" / "val" / name
    path.write_bytes(b"")
    dataset = FolderDataset(str(folder_root), "val", num_classes=2, **options)
    with pytest.raises(DataError, match=re.escape(f"{path}: mask file is empty")):
        dataset[0]


@pytest.mark.parametrize("kind", ["images", "masks"])
def test_zero_byte_files_are_skipped_with_skip_bad_samples(folder_root, kind):
    (folder_root / kind / "train" / "img1.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"img1.png: (image|mask) file is empty"):
        FolderDataset(str(folder_root), "train", num_classes=2)[1]
    dataset = FolderDataset(str(folder_root), "train", num_classes=2, skip_bad_samples=0.5)
    image, mask = dataset[1]
    expected_image, expected_mask = dataset[2]  # the next good sample stands in
    assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask)


def test_the_doctor_reports_zero_byte_files_as_problems_of_those_files(folder_root):
    (folder_root / "images" / "train" / "img0.png").write_bytes(b"")
    (folder_root / "masks" / "train" / "img1.png").write_bytes(b"")
    data = compose_config("data=folder", f"data.root={folder_root}", "data.num_workers=0").data
    report = check_splits(data, ["train"])
    # An entry's file is the sample's mask; a message about its image names the image.
    errors = {Path(e["file"]).name: e["message"] for e in report["errors"]}
    assert errors == {
        "img0.png": f"{folder_root}/images/train/img0.png: image file is empty (0 bytes: an "
        "interrupted copy?); replace it",
        "img1.png": "mask file is empty (0 bytes: an interrupted copy?); replace it",
    }
    assert report["files"] == {"train": 3}  # the good file was still checked


def test_predict_reports_a_zero_byte_image_instead_of_failing(tmp_path):
    from seg.predict import ImageFiles

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    index, image, error = ImageFiles([empty])[0]
    assert (index, image) == (0, None)
    assert error.startswith(f"{empty}: image file is empty")


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [(np.uint8, 127, 128), (np.uint16, 32767, 32768), (bool, False, True)],
)
def test_binary_masks_of_any_bit_depth(folder_root, dtype, low, high):
    maximum = True if dtype is bool else np.iinfo(dtype).max
    mask = np.zeros((40, 48), dtype)
    mask[10:30, 10:30] = maximum
    mask[0, :24] = low  # just below half the range: background
    mask[1, :24] = high  # half the range: foreground
    write_png(folder_root / "masks" / "val" / "img0.png", mask)
    assert np.asarray(Image.open(folder_root / "masks" / "val" / "img0.png")).dtype == dtype
    dataset = FolderDataset(str(folder_root), "val", num_classes=2, mask_format="binary")
    expected = np.zeros((40, 48), np.uint8)
    expected[10:30, 10:30] = 1
    expected[1, :24] = 1
    assert torch.equal(dataset[0][1], torch.from_numpy(expected))


def test_label_values_beyond_the_label_map_are_named(cityscapes_root):
    label = next((cityscapes_root / "gtFine" / "val").rglob("*_labelIds.png"))
    stored = np.asarray(Image.open(label))
    write_png(label, stored.astype(np.uint16))  # 16 bits but label ids: still fine
    dataset = Cityscapes(str(cityscapes_root), "val")
    _, mask = dataset[0]
    assert set(mask.unique().tolist()) == {0, 1, 2, 8, 10, 11, 13, 18, 255}
    wide = stored.astype(np.uint16)
    wide[0, :3] = [300, 1000, 1000]
    write_png(label, wide)
    message = re.escape(f"{label}: label values [300, 1000] are outside this dataset's label ids")
    with pytest.raises(DataError, match=message):
        dataset[0]
    (error,) = inspect(dataset, 0).errors  # the doctor, too, names the values
    assert error.startswith("label values [300, 1000]")


@pytest.mark.parametrize("kind", ["images", "masks"])
def test_two_files_of_one_name_are_refused(folder_root, kind):
    directory = folder_root / kind / "train"
    (directory / "img1.jpg").write_bytes((directory / "img1.png").read_bytes())
    with pytest.raises(DataError) as error:
        FolderDataset(str(folder_root), "train", num_classes=2, jpeg_threshold=128)
    message = str(error.value)
    assert f"[['{directory / 'img1.jpg'}', '{directory / 'img1.png'}']]" in message
    assert "remove or rename one" in message


def test_a_1_bit_index_mask_is_padded_with_ignore_index(folder_root):
    from seg.data.transforms import train_transform

    mask = np.zeros((40, 48), bool)
    mask[10:30] = True
    write_png(folder_root / "masks" / "val" / "img0.png", mask)  # a 1-bit PNG, read as bool
    pad = train_transform((64, 64), ignore_index=255, scale_range=(1.0, 1.0), hflip=0.0)
    _, padded = FolderDataset(str(folder_root), "val", num_classes=2, transform=pad)[0]
    assert torch.equal(padded[:40, :48], torch.from_numpy(mask).to(torch.uint8))
    assert (padded[40:] == 255).all() and (padded[:, 48:] == 255).all()
