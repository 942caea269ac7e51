"""data=nifti: volumes reoriented, windowed, sliced and split by case, from nibabel's real MRI."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from seg.data.base import DataError
from seg.data.nifti import (
    NiftiDataset,
    from_slices,
    intensity_range,
    keep_slices,
    slice_channels,
    to_slices,
    to_uint16,
)
from seg.doctor import check_splits, format_report
from tests.conftest import compose_config, load_script

nib = pytest.importorskip("nibabel")
nifti_sample = load_script("nifti_sample")
ANATOMICAL = nifti_sample.anatomical_path()  # 33x41x25, LAS
threshold_labels, write_case = nifti_sample.threshold_labels, nifti_sample.write_case


def anatomical():
    return nib.load(ANATOMICAL)


def write_nifti(root: Path) -> Path:
    """Two training cases and one validation case, from the sample MRI (LAS, not canonical):
    the volume, it mirrored front to back, and mirrored left to right (no noise)."""
    return nifti_sample.write_sample(root, train=2, val=1)


@pytest.fixture
def nifti_root(tmp_path: Path) -> Path:
    return write_nifti(tmp_path / "nifti")


def test_slices_round_trip_and_show_anterior_at_the_top():
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for axis in range(3):
        assert np.array_equal(from_slices(to_slices(volume, axis), axis), volume)
    axial = to_slices(volume, 2)  # (Z, Y, X): rows run from anterior (high y) down
    assert axial.shape == (4, 3, 2)
    assert axial[0, 0, 1] == volume[1, 2, 0]


def test_a_non_canonical_volume_gives_the_canonical_slices(tmp_path):
    """The sample is stored LAS: as RAS+ (x flipped) it must give the same slices as a copy
    written in RAS+ order with the matching affine."""
    image = anatomical()
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    canonical = nib.as_closest_canonical(image)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    write_case(tmp_path / "las", "val", "x", data, image.affine)
    write_case(tmp_path / "ras", "val", "x", np.asanyarray(canonical.dataobj).astype(np.float32),
               canonical.affine)  # fmt: skip
    first, second = (NiftiDataset(str(tmp_path / name), "val", 2) for name in ("las", "ras"))
    assert len(first) == len(second) == 25  # axial slices
    for index in (0, 12, 24):
        for a, b in zip(first.load(index), second.load(index), strict=True):
            assert np.array_equal(a, b)
    image_slice, labels = first.load(12)
    assert image_slice.shape == (41, 33, 1)  # (y, x): 41 rows, 33 columns; one channel
    # the stored x runs right to left: the slice is the stored one mirrored
    stored = threshold_labels(data)[..., 12].T[::-1]
    assert np.array_equal(labels, stored[:, ::-1]) and not np.array_equal(labels, stored)


def test_window_and_percentiles():
    volume = np.array([-2000, -1000, -300, 400, 3000], np.float32)
    assert to_uint16(volume, -1000, 400).tolist() == [0, 0, 32768, 65535, 65535]
    data = np.asanyarray(anatomical().dataobj).astype(np.float32)
    windowed = to_uint16(data, *intensity_range(data, None, [1, 99]))
    assert 0.005 < (windowed == 65535).mean() < 0.02  # the brightest 1% saturate
    assert intensity_range(data, [-1000, 400], [1, 99]) == (-1000.0, 400.0)


def test_split_by_case_and_each_volume_decoded_once(nifti_root, monkeypatch):
    train, val = (NiftiDataset(str(nifti_root), split, 2) for split in ("train", "val"))
    assert len(train) == 50 and len(val) == 25
    assert {train.group(name) for name in train.names} == {
        str(nifti_root / "labels/train/a.nii.gz"), str(nifti_root / "labels/train/b.nii.gz")}  # fmt: skip
    decodes = []
    original = NiftiDataset.decode
    monkeypatch.setattr(
        NiftiDataset, "decode", lambda self, v: decodes.append(v) or original(self, v)
    )
    for index in range(len(train)):
        image, mask = train[index]
        assert image.shape == (1, 41, 33) and mask.shape == (41, 33)
        assert image.dtype == torch.uint16  # windowed to 0-65535: no 8-bit steps
    assert decodes == [0, 1]


def test_the_cache_holds_decoded_volumes(nifti_root, tmp_path, monkeypatch):
    first = NiftiDataset(str(nifti_root), "val", 2, cache_dir=str(tmp_path / "cache"))
    image, mask = first.load(7)
    monkeypatch.setattr(NiftiDataset, "decode", lambda self, v: pytest.fail("decoded again"))
    second = NiftiDataset(str(nifti_root), "val", 2, cache_dir=str(tmp_path / "cache"))
    cached = second.load(7)
    assert np.array_equal(cached[0], image) and np.array_equal(cached[1], mask)


def test_empty_slices_share_is_drawn_per_seed():
    foreground = [np.array([1, 0, 0, 0, 1], bool), np.array([0, 0, 0, 1], bool)]
    kept = keep_slices(foreground, 0.5, seed=3)
    assert {(0, 0), (0, 4), (1, 3)} <= set(kept)
    assert len(kept) == 3 + 3  # half of the 6 empty slices, rounded
    assert kept == keep_slices(foreground, 0.5, seed=3)
    assert kept == sorted(kept)
    assert keep_slices(foreground, 0.0, seed=0) == [(0, 0), (0, 4), (1, 3)]
    others = {tuple(keep_slices(foreground, 0.5, seed=s)) for s in range(8)}
    assert len(others) > 1


def test_empty_slices_apply_to_the_training_split_only(nifti_root):
    train = NiftiDataset(str(nifti_root), "train", 2, empty_slices=0.0)
    val = NiftiDataset(str(nifti_root), "val", 2, empty_slices=0.0)
    assert all(train.load(i)[1].any() for i in range(len(train)))
    assert len(train) == 30 and len(val) == 25


def test_context_stacks_the_neighbouring_slices(nifti_root):
    stack = np.arange(3 * 2 * 2).reshape(3, 2, 2)
    assert slice_channels(stack, 1, 1)[0, 0].tolist() == [0, 4, 8]
    assert slice_channels(stack, 0, 1)[0, 0].tolist() == [0, 0, 4]  # the edge repeats
    assert slice_channels(stack, 2, 0)[0, 0].tolist() == [8]
    assert slice_channels(stack, 1, 2)[0, 0].tolist() == [0, 0, 4, 8, 8]
    dataset = NiftiDataset(str(nifti_root), "val", 2, context=2)
    image, _ = dataset[12]
    assert dataset.in_channels == 5 and image.shape == (5, 41, 33)
    alone = NiftiDataset(str(nifti_root), "val", 2)
    assert torch.equal(image[1], alone[11][0][0]) and torch.equal(image[2], alone[12][0][0])


def test_label_volume_of_another_shape_names_the_file(nifti_root):
    image = anatomical()
    path = nifti_root / "labels/val/c.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((33, 41, 24), np.uint8), image.affine), path)
    with pytest.raises(DataError, match=rf"{path}: label volume has shape \(33, 41, 24\)"):
        NiftiDataset(str(nifti_root), "val", 2)


def test_label_volume_of_another_affine_names_the_file(nifti_root):
    image = anatomical()
    path = nifti_root / "labels/val/c.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine * 2), path)
    with pytest.raises(DataError, match=rf"{path}: label volume's affine differs"):
        NiftiDataset(str(nifti_root), "val", 2)


def test_a_4d_image_names_the_file(nifti_root):
    image = anatomical()
    path = nifti_root / "images/val/c.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*image.shape, 2), np.int16), image.affine), path)
    with pytest.raises(DataError, match=rf"{path}: image volume has shape .*4D.*3D volume"):
        NiftiDataset(str(nifti_root), "val", 2)


def test_a_truncated_volume_names_the_file(nifti_root):
    path = nifti_root / "images/val/c.nii.gz"
    data = path.read_bytes()
    assert gzip.decompress(data)  # whole before
    path.write_bytes(data[: len(data) // 2])
    dataset = NiftiDataset(str(nifti_root), "val", 2)  # the header is still readable
    with pytest.raises(DataError, match=rf"{path}: cannot read the image volume's voxels"):
        dataset[0]


def test_labels_outside_the_classes_name_the_file(nifti_root):
    image = anatomical()
    path = nifti_root / "labels/val/c.nii.gz"
    nib.save(nib.Nifti1Image(np.full(image.shape, 3, np.uint8), image.affine), path)
    with pytest.raises(DataError, match=rf"{path}: label values \[3\] are not class indices"):
        NiftiDataset(str(nifti_root), "val", 2)[0]


def test_unpaired_cases_and_bad_settings(nifti_root):
    (nifti_root / "labels/val/c.nii.gz").rename(nifti_root / "labels/val/d.nii.gz")
    with pytest.raises(DataError, match="cases without their pair"):
        NiftiDataset(str(nifti_root), "val", 2)
    with pytest.raises(ValueError, match=r"data\.dataset\.context=-1"):
        NiftiDataset(str(nifti_root), "train", 2, context=-1)
    with pytest.raises(ValueError, match=r"data\.dataset\.window"):
        NiftiDataset(str(nifti_root), "train", 2, window=[400, -1000])


def test_the_doctor_checks_every_volume_pair(nifti_root):
    image = anatomical()
    labels = nifti_root / "labels"
    nib.save(
        nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), labels / "train/a.nii.gz"
    )
    nib.save(
        nib.Nifti1Image(np.full(image.shape, 3, np.uint8), image.affine), labels / "train/b.nii.gz"
    )
    nib.save(
        nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine * 2), labels / "val/c.nii.gz"
    )
    cfg = compose_config("data=nifti", f"data.root={nifti_root}")
    report = check_splits(cfg.data, ["train", "val"])
    messages = {(e["file"], e["message"].split(" (")[0].split(";")[0]) for e in report["errors"]}
    assert messages == {
        (str(labels / "train/b.nii.gz"), "label values [3] are not class indices in [0, 2) nor ignore_index=255"),
        (str(labels / "val/c.nii.gz"), "label volume's affine differs from its image's "
         f"{nifti_root / 'images/val/c.nii.gz'}"),
    }  # fmt: skip
    warnings = [(w["file"], w["message"]) for w in report["warnings"]]
    no_foreground = "no foreground: every labelled voxel is class 0 (background)"
    assert (str(labels / "train/a.nii.gz"), no_foreground) in warnings
    low, p_low, p_high, high = report["intensity"]["train"][str(labels / "train/a.nii.gz")]
    assert (low, high) == (-610.0, 30393.0) and low < p_low < p_high < high  # the sample's range
    assert "intensity: -610 to 30393" in format_report(report)


def test_the_sample_cases_take_noise_but_keep_the_clean_labels(tmp_path):
    """scripts/nifti_sample.py: noisy cases (docs/results/nifti_example) are labelled from the
    clean volume, so the label is the same rule in every case."""
    nifti_sample.write_sample(tmp_path, train=1, val=1, noise=0.1)
    clean = np.asanyarray(nib.load(ANATOMICAL).dataobj).astype(np.float32)
    noisy = np.asanyarray(nib.load(tmp_path / "images/train/a.nii.gz").dataobj)
    labels = np.asanyarray(nib.load(tmp_path / "labels/val/b.nii.gz").dataobj)
    assert not np.array_equal(noisy, clean.astype(np.int16))
    assert np.array_equal(labels, threshold_labels(clean[:, ::-1]))  # case b: mirrored in y
