"""The pixel-map instance layouts (seg/data/instance_layouts.py): a folder of 8- and 16-bit
instance-ID images with and without class masks, Cityscapes instanceIds with crowds, caravan and
trailer, the cache, and the clear errors. Data is generated here."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from seg.data.base import DataError
from seg.data.instance_layouts import CityscapesInstances, InstanceFolder
from seg.data.transforms import COLOR_TRANSFORMS, train_transform
from seg.doctor import check_splits
from seg.tasks.instance import CocoEvaluator, training_target
from tests.conftest import compose_config, write_png


def write_instance_folder(root: Path, split="train", dtype=np.uint16, classes=True, suffix=".png"):
    """Two 24x32 images: instances 300 and 7 (16-bit; 200 and 7 for 8-bit) of classes 1 and 2,
    and a crowd region of value 9 over class 1; the second image holds no instance. Instance
    maps and class masks are written as ``suffix`` files."""
    big = 300 if dtype == np.uint16 else 200
    ids = np.zeros((24, 32), dtype)
    ids[2:8, 2:10], ids[12:20, 4:8], ids[14:22, 20:30] = big, 7, 9
    class_mask = np.zeros((24, 32), np.uint8)
    class_mask[2:8, 2:10], class_mask[12:20, 4:8], class_mask[14:22, 20:30] = 1, 2, 1
    for name, id_map in (("a", ids), ("b", np.zeros_like(ids))):
        write_png(root / "images" / split / f"{name}.png", np.full((24, 32, 3), 50, np.uint8))
        path = root / "instances" / split / f"{name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), id_map)  # 16-bit PNG or TIFF, as cell tools write them
        if classes:  # class masks in the same format: index PNGs or integer TIFF rasters
            path = root / "masks" / split / f"{name}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), class_mask * (id_map > 0))
    return ids


@pytest.mark.parametrize(("dtype", "suffix"), [(np.uint8, ".png"), (np.uint16, ".png"),
                                               (np.uint16, ".tif")])  # fmt: skip
def test_folder_8_and_16_bit_with_classes_and_crowds(tmp_path, dtype, suffix):
    ids = write_instance_folder(tmp_path, dtype=dtype, suffix=suffix)
    dataset = InstanceFolder(str(tmp_path), "train", num_classes=3, crowd_value=9)
    image, id_map, table = dataset[0]
    assert image.shape == (3, 24, 32) and id_map.dtype == torch.int16
    # numbered in id order: 7 (class 2), 9 (the crowd, class 1), 200/300 (class 1)
    assert table.tolist() == [[2, 0], [1, 1], [1, 0]]
    assert torch.equal(id_map == 3, torch.from_numpy(ids == ids.max()))
    assert (id_map == 3).sum() == 48  # area = pixel count, through the evaluator's RLE
    target = training_target(id_map, table)
    assert target["labels"].tolist() == [2, 1]  # the crowd is no training target
    truths = CocoEvaluator(3, 0.5, 0.5, 0).image_result(image, id_map, table, {
        "masks": torch.zeros(0, 1, 24, 32), "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}, "a").truths  # fmt: skip
    assert [(t["iscrowd"], t["area"]) for t in truths] == [(0, 32.0), (1, 80.0), (0, 48.0)]
    _, id_map, table = dataset[1]  # no instances: kept, empty
    assert table.shape == (0, 2) and not id_map.any()


def test_folder_without_class_masks_is_one_class(tmp_path):
    write_instance_folder(tmp_path, classes=False)
    _, _, table = InstanceFolder(str(tmp_path), "train", num_classes=2)[0]
    assert table.tolist() == [[1, 0], [1, 0], [1, 0]]
    with pytest.raises(ValueError, match=r"masks/train does not exist: without class masks"):
        InstanceFolder(str(tmp_path), "train", num_classes=3)


def test_folder_images_of_any_band_count_and_depth(tmp_path):
    write_instance_folder(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):  # 2-band 16-bit TIFFs (values past 8 bits) instead of the photos
        (tmp_path / "images" / "train" / f"{name}.png").unlink()
        bands = rng.integers(1000, 60000, (24, 32, 2), dtype=np.uint16)
        tifffile.imwrite(tmp_path / "images" / "train" / f"{name}.tif", bands,
                         photometric="minisblack", planarconfig="contig")  # fmt: skip
    jitter = train_transform([24, 32], 0, color_jitter=1.0)
    dataset = InstanceFolder(str(tmp_path), "train", 3, crowd_value=9, bands=[2],
                             transform=jitter)  # fmt: skip
    assert (dataset.in_channels, dataset.dtype) == (1, "uint16")
    image, _, table = InstanceFolder(str(tmp_path), "train", 3, crowd_value=9, bands=[2])[0]
    stored = tifffile.imread(tmp_path / "images" / "train" / "a.tif")[..., 1]
    assert image.dtype == torch.uint16 and torch.equal(image[0], torch.from_numpy(stored))
    assert table.tolist() == [[2, 0], [1, 1], [1, 0]]  # the annotations as with RGB photos
    # albumentations' colour jitter takes RGB uint8 only: left out for these images
    assert not any(isinstance(t, COLOR_TRANSFORMS) for t in dataset.transform.transforms)
    assert dataset[0][0].shape == (1, 24, 32)
    with pytest.raises(DataError, match=r"a\.tif: 2 bands but data\.in_channels=3"):
        InstanceFolder(str(tmp_path), "train", 3, in_channels=3)


def test_folder_errors_name_the_file(tmp_path):
    write_instance_folder(tmp_path)
    with pytest.raises(DataError, match=r"instances/train/a\.png: 3 instances, more than "
                                        r"data.max_instances=2"):  # fmt: skip
        InstanceFolder(str(tmp_path), "train", 3, max_instances=2)[0]
    classes = np.array(Image.open(tmp_path / "masks" / "train" / "a.png"))
    classes[2:8, 6:10] = 2  # instance 300 (class 1) half on class 2
    write_png(tmp_path / "masks" / "train" / "a.png", classes)
    with pytest.raises(DataError, match=r"a\.png: instance id 300 spans classes \[1, 2\]"):
        InstanceFolder(str(tmp_path), "train", 3)[0]
    classes[2:8, 6:10] = 0  # and half on the background
    write_png(tmp_path / "masks" / "train" / "a.png", classes)
    with pytest.raises(DataError, match=r"masks/train/a\.png: instance pixels of .*a\.png have "
                                        r"classes \[0\], not 1 to 2"):  # fmt: skip
        InstanceFolder(str(tmp_path), "train", 3)[0]
    (tmp_path / "masks" / "train" / "b.png").unlink()
    with pytest.raises(
        DataError, match=r"lack an image, an instance map or a class mask, e\.g\. \['b'\]"
    ):
        InstanceFolder(str(tmp_path), "train", 3)


def test_folder_cache_gives_the_same_samples(tmp_path):
    write_instance_folder(tmp_path / "data")
    plain = InstanceFolder(str(tmp_path / "data"), "train", 3, crowd_value=9)[0]
    cached = InstanceFolder(str(tmp_path / "data"), "train", 3, crowd_value=9,
                            cache_dir=str(tmp_path / "cache"))  # fmt: skip
    for _ in range(2):  # decoded and written, then read back
        for a, b in zip(plain, cached[0], strict=True):
            assert torch.equal(a, b)
    assert len(list((tmp_path / "cache").rglob("*.mask.npy"))) == 1


def write_cityscapes_instances(root: Path, split: str = "val") -> None:
    """One 16x48 image: two persons (24001, 24002), a car crowd region (id 26, no
    instances), a caravan (29001) and a trailer (30000) instance, road (7) elsewhere."""
    ids = np.full((16, 48), 7, np.uint16)
    ids[2:8, 2:8], ids[2:8, 10:16], ids[8:14, 20:30] = 24001, 24002, 26
    ids[2:10, 32:38], ids[2:10, 40:46] = 29001, 30000
    name = "frankfurt_000000_000019"
    write_png(root / "leftImg8bit" / split / "frankfurt" / f"{name}_leftImg8bit.png",
              np.full((16, 48, 3), 80, np.uint8))  # fmt: skip
    path = root / "gtFine" / split / "frankfurt" / f"{name}_gtFine_instanceIds.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), ids)


def test_cityscapes_instance_ids_crowds_caravan_and_trailer(tmp_path):
    write_cityscapes_instances(tmp_path)
    dataset = CityscapesInstances(str(tmp_path), "val")
    _, id_map, table = dataset[0]
    # the car region without instances is a crowd of car (class 3); the persons are class 1
    assert table.tolist() == [[3, 1], [1, 0], [1, 0]]
    assert (id_map[2:8, 2:8] == 2).all() and (id_map[2:8, 10:16] == 3).all()
    assert not id_map[2:10, 32:46].any()  # caravan and trailer: background
    assert training_target(id_map, table)["labels"].tolist() == [1, 1]
    with pytest.raises(DataError, match=r"instanceIds\.png: 3 instances, more than "):
        CityscapesInstances(str(tmp_path), "val", max_instances=2)[0]


def test_the_doctor_checks_pixel_layouts(tmp_path):
    write_instance_folder(tmp_path / "folder")
    classes = np.array(Image.open(tmp_path / "folder" / "masks" / "train" / "a.png"))
    classes[2:8, 6:10] = 2  # instance 300 (class 1) half on class 2
    write_png(tmp_path / "folder" / "masks" / "train" / "a.png", classes)
    cfg = compose_config("task=instance", "data=instance_folder", f"data.root={tmp_path / 'folder'}",
                         "data.num_classes=3", "data.class_names=[bg,a,b]", "data.palette=[[0,0,0],"
                         "[1,1,1],[2,2,2]]", "data.num_workers=0")  # fmt: skip
    report = check_splits(cfg.data, ["train"])
    (error,) = report["errors"]
    assert (
        error["file"].endswith("instances/train/a.png")
        and "spans classes [1, 2]" in error["message"]
    )
    assert "no instances annotated" in report["warnings"][0]["message"]  # b.png, kept
    write_cityscapes_instances(tmp_path / "cityscapes", "train")
    cfg = compose_config("task=instance", "data=cityscapes_instances",
                         f"data.root={tmp_path / 'cityscapes'}", "data.num_workers=0")  # fmt: skip
    report = check_splits(cfg.data, ["train"])
    # caravan and trailer are background, never flagged; the car crowd counts as ignored
    assert report["errors"] == []
    assert all("never appears" in w["message"] for w in report["warnings"])  # only the split's
    pixels = report["class_pixels"]["train"]
    assert pixels["person"] == 72 and pixels["car"] == 0


NUCLEI = Path(os.environ.get("SEG_SHARED_DATA", "/work/shared/data")) / "nuclei_stardist/mask2d.tif"


@pytest.mark.skipif(not NUCLEI.is_file(), reason="needs ../shared/data/nuclei_stardist")
def test_real_16_bit_nuclei_tiff_reads_at_its_depth(tmp_path):
    (tmp_path / "instances" / "train").mkdir(parents=True)
    (tmp_path / "instances" / "train" / "n.tif").write_bytes(NUCLEI.read_bytes())
    write_png(tmp_path / "images" / "train" / "n.png", np.zeros((512, 512, 3), np.uint8))
    _, id_map, table = InstanceFolder(str(tmp_path), "train", num_classes=2)[0]
    areas = torch.bincount(id_map.flatten().long())[1:]
    assert len(table) == 125 and (table == torch.tensor([1, 0])).all()
    assert areas.min() == 25 and areas.max() == 751  # the nuclei's sizes, as the issue states
