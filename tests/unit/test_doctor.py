"""The dataset doctor finds what would break or skew training, and says how to fix it."""

import json
import logging

import numpy as np
import pytest
from omegaconf import OmegaConf

from seg.data.base import DataError
from seg.data.cityscapes import Cityscapes
from seg.data.folder import FolderDataset
from seg.doctor import check_splits, format_report, inspect, quick_check
from tests.conftest import compose_config, write_png


def folder_config(root, *overrides):
    return compose_config("data=folder", f"data.root={root}", "data.num_workers=0", *overrides).data


def test_clean_data_gives_class_pixels_and_no_errors(folder_root):
    report = check_splits(folder_config(folder_root), ["train", "val"])
    assert report["errors"] == []
    assert report["files"] == {"train": 3, "val": 2}
    pixels = report["class_pixels"]["train"]
    assert pixels["foreground"] == 3 * 20 * 20 and pixels["background"] == 3 * 40 * 48 - 1200
    assert report["image_sizes"]["val"] == {"48x40": 2}
    json.dumps(report)  # the JSON report is valid JSON


def test_cityscapes_label_ids_in_a_train_id_dataset_are_diagnosed(folder_root):
    write_png(folder_root / "masks" / "train" / "img1.png", np.full((40, 48), 26, np.uint8))
    report = check_splits(folder_config(folder_root, "data.num_classes=19", "data.class_names=[" + ",".join(map(str, range(19))) + "]",
                                        "data.palette=[" + ",".join(["[0,0,0]"] * 19) + "]"), ["train"])  # fmt: skip
    (error,) = report["errors"]
    assert error["file"].endswith("img1.png") and "[26]" in error["message"]
    assert "Cityscapes labelIds" in error["message"] and "data=cityscapes" in error["message"]


def test_a_stray_label_value_is_called_stray_not_cityscapes_label_ids(folder_root):
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 5:25] = 1
    mask[0, :3] = 7  # 3 of 1920 pixels
    write_png(folder_root / "masks" / "train" / "img1.png", mask)
    (error,) = check_splits(folder_config(folder_root), ["train"])["errors"]
    assert "[7]" in error["message"] and "Cityscapes" not in error["message"]
    assert "only 3 pixels (0.16% of the mask): stray values" in error["message"]


def test_one_problem_of_many_files_is_one_line_with_a_count(folder_root):
    for name in ("img0.png", "img1.png"):
        (folder_root / "masks" / "train" / name).write_bytes(b"")
    (folder_root / "images" / "train" / "img2.png").write_bytes(b"")
    report = check_splits(folder_config(folder_root), ["train"])
    assert len(report["errors"]) == 3  # the JSON report keeps one entry per file
    masks, image = folder_root / "masks" / "train", folder_root / "images" / "train" / "img2.png"
    lines = format_report(report).splitlines()
    assert lines[lines.index("3 errors") :][:3] == [
        "3 errors",
        "  2 files: mask file is empty (0 bytes: an interrupted copy?); replace it "
        f"(e.g. {masks / 'img0.png'}, {masks / 'img1.png'})",
        f"  {image}: image file is empty (0 bytes: an interrupted copy?); replace it",
    ]


def test_a_class_only_in_files_with_errors_is_not_said_to_never_appear(folder_root):
    for name in ("img0.png", "img1.png"):
        write_png(folder_root / "masks" / "train" / name, np.ones((40, 48), np.uint8))
    (folder_root / "images" / "train" / "img2.png").write_bytes(b"")  # its mask has background
    (warning,) = check_splits(folder_config(folder_root), ["train"])["warnings"]
    assert warning["message"] == (
        "class 'background' never appears in the files without errors (the 1 with errors are "
        "not counted)"
    )


def test_train_ids_where_label_ids_are_expected(cityscapes_root):
    label = next((cityscapes_root / "gtFine" / "val").rglob("*_labelIds.png"))
    write_png(label, np.tile(np.arange(0, 19, dtype=np.uint8), (32, 4))[:, :64])
    report = inspect(Cityscapes(str(cityscapes_root), "val"), 0)
    assert any("labelTrainIds" in warning for warning in report.warnings)


def test_all_ignore_masks_and_leaked_images_are_warned(folder_root):
    write_png(folder_root / "masks" / "val" / "img1.png", np.full((40, 48), 255, np.uint8))
    (folder_root / "images" / "val" / "img0.png").write_bytes(
        (folder_root / "images" / "train" / "img2.png").read_bytes()
    )
    write_png(folder_root / "masks" / "val" / "img0.png", np.zeros((40, 48), np.uint8))
    report = check_splits(folder_config(folder_root), ["train", "val"])
    messages = [w["message"] for w in report["warnings"]]
    assert any("every pixel of the mask is ignore_index" in m for m in messages)
    assert any("identical image in split 'train'" in m and "img2.png" in m for m in messages)


def test_errors_are_collected_for_every_file_and_split(folder_root):
    (folder_root / "images" / "train" / "img0.png").write_bytes(b"broken")
    write_png(folder_root / "masks" / "train" / "img1.png", np.zeros((20, 48), np.uint8))
    report = check_splits(folder_config(folder_root), ["train", "test"])
    files = [e["file"] for e in report["errors"]]
    assert any(f.endswith("img0.png") for f in files) and any(f.endswith("img1.png") for f in files)
    assert any(f == "test split" for f in files)  # a missing split is an error, not a crash


def test_quick_check_stops_with_the_doctors_message(folder_root):
    write_png(folder_root / "masks" / "train" / "img2.png", np.full((40, 48), 9, np.uint8))
    dataset = FolderDataset(str(folder_root), "train", num_classes=2)
    with pytest.raises(
        DataError, match=r"data check: 1 problems in 3 sampled files:\n.*img2.png.*\[9\]"
    ):
        quick_check(dataset)


def test_quick_check_reports_and_goes_on_within_skip_bad_samples(folder_root, caplog):
    (folder_root / "images" / "train" / "img2.png").write_bytes(b"")  # a zero-byte image
    within = FolderDataset(str(folder_root), "train", num_classes=2, skip_bad_samples=0.5)
    with caplog.at_level(logging.WARNING):
        quick_check(within)  # 1 of 3 files: training skips it
    assert "img2.png" in caplog.text and "data.skip_bad_samples=0.5" in caplog.text
    beyond = FolderDataset(str(folder_root), "train", num_classes=2, skip_bad_samples=0.2)
    with pytest.raises(DataError, match=r"1 problems in 3 sampled files"):
        quick_check(beyond)


def test_the_command_line_exit_code_and_json(folder_root, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "report.json"
    command = [sys.executable, "scripts/check_data.py", "data=folder", f"data.root={folder_root}",
               "split=train,val", f"out={out}", "data.num_workers=0"]  # fmt: skip
    clean = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert "split train: 3 files" in clean.stdout
    assert set(json.loads(out.read_text())["class_pixels"]) == {"train", "val"}
    write_png(folder_root / "masks" / "val" / "img1.png", np.full((40, 48), 7, np.uint8))
    broken = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1
    assert json.loads(out.read_text())["errors"][0]["file"].endswith("img1.png")


@pytest.mark.parametrize(
    ("argument", "message"),
    [("split=[]", r"split=\[\] names no split"), ("max_files=0", "max_files=0 checks no file"),
     ("max_files=-2", "max_files=-2 checks no file")],
)  # fmt: skip
def test_arguments_that_select_nothing_are_refused(folder_root, argument, message):
    from seg.doctor import run

    cfg = compose_config("data=folder", f"data.root={folder_root}", argument,
                         config_name="check_data")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        run(cfg)


def test_an_unwritable_report_fails_before_the_scan(folder_root, tmp_path, monkeypatch):
    import seg.doctor

    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the report's folder should be
    cfg = compose_config("data=folder", f"data.root={folder_root}", f"out={blocker}/r.json",
                         config_name="check_data")  # fmt: skip
    monkeypatch.setattr(seg.doctor, "check_splits", lambda *args: pytest.fail("scanned"))
    with pytest.raises(OSError):
        seg.doctor.run(cfg)


def write_tiff_pair(root, split, name, image, mask):
    tifffile = pytest.importorskip("tifffile")
    for folder, array in (("images", image), ("masks", mask)):
        (root / folder / split).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / folder / split / f"{name}.tif", array)


def data_with(root, **keys):
    """data=folder at ``root`` with ``keys`` set, whether or not the config declares them."""
    data = folder_config(root)
    for key, value in keys.items():
        OmegaConf.update(data, key, value, force_add=True)
    return data


def test_band_statistics_over_files_leave_out_nodata_and_are_ready_to_paste(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(1, 4096, (16, 20, 4)).astype(np.uint16) for _ in range(3)]
    images[1][:5, :, 2] = 0  # nodata in band 3 of one file
    for i, image in enumerate(images):
        write_tiff_pair(tmp_path, "train", f"s{i}", image, (image[..., 0] > 2000).astype(np.uint8))
    report = check_splits(data_with(tmp_path, nodata=0), ["train"])
    pixels = report["pixels"]["train"]
    stacked = np.concatenate([image.reshape(-1, 4) for image in images]).astype(np.float64)
    band3 = stacked[:, 2][stacked[:, 2] != 0]
    assert pixels["dtypes"] == {"uint16": 3}
    assert pixels["min"][2] == band3.min() > 0 and pixels["max"][0] == stacked[:, 0].max()
    np.testing.assert_allclose(pixels["mean"], [*stacked[:, :2].mean(0), band3.mean(),
                                                stacked[:, 3].mean()])  # fmt: skip
    np.testing.assert_allclose(pixels["std"][2], band3.std())
    assert pixels["scale"] == 65535  # auto for uint16
    np.testing.assert_allclose(pixels["data.mean"][2], band3.mean() / 65535, atol=1e-4)
    first = report["file_pixels"]["train"][str(tmp_path / "masks" / "train" / "s0.tif")]
    assert first == {"dtype": "uint16", "bands": 4, "min": int(images[0].min()),
                     "max": int(images[0].max())}  # fmt: skip
    # 12-bit values in uint16 scaled by 65535: the maximum is far below the scale
    assert any("under a quarter of data.scale=auto" in w["message"] for w in report["warnings"])
    scaled = check_splits(data_with(tmp_path, scale=4095), ["train"])
    assert not any("data.scale" in w["message"] for w in scaled["warnings"])
    too_small = check_splits(data_with(tmp_path, scale=1000), ["train"])
    assert any("exceed data.scale=1000" in w["message"] for w in too_small["warnings"])
    assert "data.mean=[" in format_report(scaled) and "data.std=[" in format_report(scaled)
