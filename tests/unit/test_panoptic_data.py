"""The panoptic layouts: COCO panoptic files, Cityscapes panoptic (as cityscapesscripts'
createPanopticImgs writes it) and seg's folder layout, read as panoptic ground truth and as the
semantic and instance targets that train the two models."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seg import panoptic
from seg.data.base import DataError
from seg.data.panoptic import (
    CityscapesPanoptic,
    CocoPanoptic,
    PanopticFolder,
    id_to_rgb,
    panoptic_categories,
)
from tests.conftest import write_png
from tests.unit.test_panoptic_quality import COCO

CATEGORIES = [
    {"id": 7, "name": "road", "isthing": 0, "color": [128, 64, 128]},
    {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 9, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
]  # in id order: person (0), car (1), road (2), sky (3); things 0 and 1


def scene() -> tuple[np.ndarray, list[dict]]:
    """A 24x32 segment-id map: road, sky, two cars, a person, a crowd of persons, void."""
    ids = np.full((24, 32), 1000)  # road
    ids[:6] = 2000  # sky
    ids[10:16, 2:8], ids[10:16, 10:16] = 3001, 3002  # two cars
    ids[8:20, 20:24] = 4001  # a person
    ids[18:22, 26:31] = 4500  # a crowd of persons
    ids[22:, :4] = 0  # void
    segments = [
        {"id": 1000, "category_id": 7, "iscrowd": 0},
        {"id": 2000, "category_id": 9, "iscrowd": 0},
        {"id": 3001, "category_id": 3, "iscrowd": 0},
        {"id": 3002, "category_id": 3, "iscrowd": 0},
        {"id": 4001, "category_id": 1, "iscrowd": 0},
        {"id": 4500, "category_id": 1, "iscrowd": 1},
    ]
    return ids, segments


def write_coco_panoptic(root: Path, split: str) -> Path:
    """COCO's tree with one image: annotations/panoptic_<split>.json, its PNG folder, <split>/."""
    ids, segments = scene()
    rng = np.random.default_rng(0)
    write_png(root / split / "a.jpg", rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    write_png(root / "annotations" / f"panoptic_{split}" / "a.png", id_to_rgb(ids))
    coco = {
        "images": [{"id": 5, "file_name": "a.jpg", "height": 24, "width": 32}],
        "annotations": [{"image_id": 5, "file_name": "a.png", "segments_info": segments}],
        "categories": CATEGORIES,
    }
    path = root / "annotations" / f"panoptic_{split}.json"
    path.write_text(json.dumps(coco))
    return path


def coco_dataset(root: Path, target: str = "panoptic", **keys) -> CocoPanoptic:
    path = root / "annotations" / "panoptic_val.json"
    ids = panoptic_categories(str(path), "ids")
    return CocoPanoptic(str(root), "val", ids, panoptic_categories(str(path), "things"),
                        target=target, **keys)  # fmt: skip


def test_coco_panoptic_is_read_as_its_segments_and_derives_both_training_targets(tmp_path):
    path = write_coco_panoptic(tmp_path, "val")
    assert panoptic_categories(str(path), "names") == ["person", "car", "road", "sky"]
    assert panoptic_categories(str(path), "things") == [0, 1]
    assert panoptic_categories(str(path), "instance_names") == ["background", "person", "car"]
    ids, segments = scene()
    _, id_map, table = coco_dataset(tmp_path)[0]
    # one segment per id: the same partition, each with its class and crowd flag
    for segment in segments:
        pixels = ids == segment["id"]
        (number,) = set(id_map[pixels].tolist())
        label = [c["id"] for c in sorted(CATEGORIES, key=lambda c: c["id"])].index(
            segment["category_id"]
        )
        assert table[number - 1].tolist() == [label, segment["iscrowd"]]
    assert (id_map[ids == 0] == 0).all() and len(table) == 6
    _, mask = coco_dataset(tmp_path, "semantic")[0]
    assert mask[0, 0] == 3 and mask[23, 0] == 255 and mask[19, 28] == 0  # sky, void, crowd
    # data.cache_dir keeps the decoded annotation map: read back, the same segments
    for _ in range(2):  # written, then read
        cached = coco_dataset(tmp_path, cache_dir=str(tmp_path / "cache"))[0]
        assert torch.equal(cached[1], id_map) and torch.equal(cached[2], table)
    _, thing_ids, things = coco_dataset(tmp_path, "instance")[0]
    # the cars (class 2 of background, person, car), the person, the crowd (ignored in training)
    assert sorted(things.tolist()) == [[1, 0], [1, 1], [2, 0], [2, 0]]
    assert (thing_ids[ids < 3000] == 0).all() and (thing_ids[ids >= 3000] > 0).all()


def test_coco_panoptic_names_a_png_id_missing_from_its_segments_info(tmp_path):
    path = write_coco_panoptic(tmp_path, "val")
    coco = json.loads(path.read_text())
    coco["annotations"][0]["segments_info"].pop(2)  # car 3001
    path.write_text(json.dumps(coco))
    with pytest.raises(
        DataError, match=r"a.png: segment ids \[3001\] are not in its segments_info"
    ):
        coco_dataset(tmp_path)[0]
    coco["annotations"][0]["segments_info"][0]["category_id"] = 99
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"a.png has category ids \[99\]"):
        coco_dataset(tmp_path)


@pytest.mark.skipif(not COCO.is_dir(), reason=f"{COCO} is absent")
def test_the_real_coco_sample_reads_back_to_its_ground_truth(tmp_path):
    path = COCO / "panoptic_examples.json"
    keys = dict(annotation_file=str(path), panoptic_dir=str(COCO / "panoptic_examples"),
                image_dir=str(COCO / "input_images"))  # fmt: skip
    dataset = coco_dataset_at(path, **keys)
    coco = json.loads(path.read_text())
    categories = panoptic.categories_from_json(coco)
    ids = panoptic_categories(str(path), "ids")
    assert len(dataset) == len(coco["annotations"]) == 2
    for index, annotation in enumerate(coco["annotations"]):
        image, id_map, table = dataset[index]
        assert image.shape[1:] == id_map.shape
        # the read segments, as COCO panoptic again, score PQ 1 against the original files
        segments = [{"id": k + 1, "category_id": ids[c], "iscrowd": crowd}
                    for k, (c, crowd) in enumerate(table.tolist())]  # fmt: skip
        truth = panoptic.read_ids(COCO / "panoptic_examples", annotation)
        present = [s for s in segments if (id_map.numpy() == s["id"]).any()]
        stats = panoptic.match_image(truth, annotation["segments_info"], id_map.numpy(), present,
                                     categories)  # fmt: skip
        assert stats[:, panoptic.FP].sum() == stats[:, panoptic.FN].sum() == 0
        assert stats[:, panoptic.TP].sum() == stats[:, panoptic.IOU].sum() > 0


def coco_dataset_at(path: Path, **keys) -> CocoPanoptic:
    return CocoPanoptic("unused", "val", panoptic_categories(str(path), "ids"),
                        panoptic_categories(str(path), "things"), **keys)  # fmt: skip


def write_cityscapes_panoptic(root: Path, split: str) -> None:
    """gtFine instanceIds converted by cityscapesscripts' own createPanopticImgs."""
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    name = "aachen_000000_000019"
    ids = np.full((16, 24), 7, np.uint16)  # road
    ids[:4] = 23  # sky
    ids[6:12, 2:8] = 26001  # a car
    ids[6:12, 12:16] = 24  # a person crowd (a label id below 1000 on a thing class)
    ids[14:, :3] = 0  # unlabelled
    write_png(root / "gtFine" / split / "aachen" / f"{name}_gtFine_instanceIds.png", ids)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
    write_png(root / "leftImg8bit" / split / "aachen" / f"{name}_leftImg8bit.png", image)
    convert2panoptic(str(root / "gtFine"), str(root / "gtFine"), setNames=[split])


def test_cityscapes_panoptic_reads_what_create_panoptic_imgs_writes(tmp_path, capsys):
    write_cityscapes_panoptic(tmp_path, "val")
    capsys.readouterr()  # the script's printing
    path = tmp_path / "gtFine" / "cityscapes_panoptic_val.json"
    dataset = CityscapesPanoptic(str(tmp_path), "val", panoptic_categories(str(path), "ids"),
                                 panoptic_categories(str(path), "things"))  # fmt: skip
    names = panoptic_categories(str(path), "names")
    _, id_map, table = dataset[0]
    classes = {names[c]: crowd for c, crowd in table.tolist()}
    assert classes == {"road": 0, "sky": 0, "car": 0, "person": 1}
    assert id_map[15, 0] == 0 and (id_map[:4] == id_map[0, 0]).all()
    assert set(panoptic_categories(str(path), "instance_names")[1:]) == {
        "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"}  # fmt: skip


def write_panoptic_folder(root: Path, split: str) -> None:
    """Classes ground (0), sky (1), object (2, a thing); two objects, one without an id."""
    classes = np.zeros((16, 20), np.uint8)
    classes[:4] = 1
    classes[6:10, 2:6] = classes[6:10, 8:12] = classes[12:15, 14:18] = 2
    classes[15, :] = 255  # void
    instances = np.zeros((16, 20), np.uint16)
    instances[6:10, 2:6], instances[6:10, 8:12] = 7, 300  # the third object has no id: a crowd
    rng = np.random.default_rng(0)
    write_png(root / "images" / split / "a.png", rng.integers(0, 255, (16, 20, 3), dtype=np.uint8))
    write_png(root / "masks" / split / "a.png", classes)
    write_png(root / "instances" / split / "a.png", instances)


def test_the_folder_layout_gives_stuff_per_class_things_per_id_and_crowds(tmp_path):
    write_panoptic_folder(tmp_path, "val")
    _, id_map, table = PanopticFolder(str(tmp_path), "val", 3, [2])[0]
    assert sorted(table.tolist()) == [[0, 0], [1, 0], [2, 0], [2, 0], [2, 1]]
    assert (id_map[15] == 0).all() and id_map[7, 3] != id_map[7, 9]
    _, mask = PanopticFolder(str(tmp_path), "val", 3, [2], target="semantic")[0]
    assert mask[15, 0] == 255 and mask[13, 15] == 2
    _, thing_ids, things = PanopticFolder(str(tmp_path), "val", 3, [2], target="instance")[0]
    assert sorted(things.tolist()) == [[1, 0], [1, 0], [1, 1]]
    assert torch.equal(thing_ids > 0, mask == 2)  # every thing pixel, crowds included
