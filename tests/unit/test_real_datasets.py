"""CamVid, VOC, ADE20K and the extended folder formats, on tiny trees in the real layouts."""

import numpy as np
import pytest
import torch
from PIL import Image

from seg.data.ade20k import ADE20K
from seg.data.base import DataError
from seg.data.camvid import CamVid
from seg.data.folder import FolderDataset
from seg.data.voc import VOC
from tests.conftest import write_png

RNG = np.random.default_rng(0)


def image(height=24, width=32):
    return RNG.integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_camvid_maps_void_to_ignore(tmp_path):
    labels = np.array([[0, 3, 10, 11]], np.uint8).repeat(6, 0).repeat(8, 1)  # 6x32
    for split in ("train", "test"):
        write_png(tmp_path / split / "0001TP_000010.png", image(6, 32))
        write_png(tmp_path / f"{split}annot" / "0001TP_000010.png", labels)
    _, mask = CamVid(str(tmp_path), "test")[0]
    expected = np.where(labels == 11, 255, labels)
    assert torch.equal(mask, torch.from_numpy(expected).long())
    with pytest.raises(DataError, match=r"valannot"):
        CamVid(str(tmp_path), "val")


def test_camvid_label_without_image_is_named(tmp_path):
    write_png(tmp_path / "train" / "a.png", image())
    write_png(tmp_path / "trainannot" / "a.png", np.zeros((24, 32), np.uint8))
    write_png(tmp_path / "trainannot" / "b.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(DataError, match=r"1 labels without images \(e.g. \['b.png'\]\)"):
        CamVid(str(tmp_path), "train")


def test_voc_reads_palette_labels_as_indices_and_the_sbd_list(voc_root):
    _, mask = VOC(str(voc_root), "val")[0]
    assert set(mask.unique().tolist()) == {0, 2, 255}
    assert len(VOC(str(voc_root), "train")) == 1
    augmented = VOC(str(voc_root), "trainaug")
    assert len(augmented) == 2 and augmented.samples[0][1].parent.name == "SegmentationClassAug"
    with pytest.raises(DataError, match=r"ImageSets/Segmentation/test.txt: split list not found"):
        VOC(str(voc_root), "test")


def test_voc_listed_file_missing(voc_root):
    (voc_root / "JPEGImages" / "2007_000033.jpg").unlink()
    with pytest.raises(DataError, match=r"1 listed files do not exist"):
        VOC(str(voc_root), "val")


def test_ade20k_reduce_zero_label(ade20k_root):
    labels = np.array([[0, 1, 2, 150]], np.uint8).repeat(24, 0).repeat(8, 1)
    _, mask = ADE20K(str(ade20k_root), "val")[0]
    expected = np.where(labels == 0, 255, labels.astype(np.int64) - 1)
    assert torch.equal(mask, torch.from_numpy(expected))
    _, raw = ADE20K(str(ade20k_root), "val", num_classes=151, reduce_zero_label=False)[0]
    assert torch.equal(raw, torch.from_numpy(labels).long())


PALETTE = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]


def test_folder_rgb_masks_map_colours_to_classes(folder_root):
    classes = np.zeros((40, 48), np.uint8)
    classes[:, 16:] = 1
    classes[:, 32:] = 2
    write_png(folder_root / "masks" / "val" / "img0.png", np.array(PALETTE, np.uint8)[classes])
    dataset = FolderDataset(
        str(folder_root), "val", num_classes=3, mask_format="rgb", palette=PALETTE
    )
    assert torch.equal(dataset[0][1], torch.from_numpy(classes).long())
    odd = np.array(PALETTE, np.uint8)[classes]
    odd[0, 0] = [10, 20, 30]
    write_png(folder_root / "masks" / "val" / "img0.png", odd)
    with pytest.raises(DataError, match=r"colours \[\[10, 20, 30\]\] are not in data.palette"):
        dataset[0]


def test_folder_jpeg_masks_are_refused_unless_thresholded(folder_root):
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 10:30] = 255
    (folder_root / "masks" / "val" / "img0.png").unlink()
    Image.fromarray(mask).save(folder_root / "masks" / "val" / "img0.jpg", quality=80)
    with pytest.raises(DataError, match=r"JPEG is lossy.*jpeg_threshold=128"):
        FolderDataset(str(folder_root), "val", num_classes=2)
    dataset = FolderDataset(str(folder_root), "val", num_classes=2, jpeg_threshold=128)
    _, loaded = dataset[0]
    assert set(loaded.unique().tolist()) == {0, 1}
    assert (loaded.numpy() == mask // 255).mean() > 0.98  # JPEG blurs a few edge pixels
