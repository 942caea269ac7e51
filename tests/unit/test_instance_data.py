"""Instance layouts on disk (seg/data/coco.py): what a sample holds, crowds, category ids with
gaps, and the clear errors for bad annotations. Data is generated here."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from pycocotools import mask as mask_utils
from torch.utils.data import Subset

from seg.data.base import DataError
from seg.data.coco import CocoInstances, decode
from seg.doctor import check_splits
from seg.tasks.instance import CocoEvaluator, InstanceTask, annotation_image_ids, training_target
from tests.conftest import compose_config, write_png

SHARED_COCO = Path(os.environ.get("SEG_SHARED_DATA", "/work/shared/data")) / "panoptic_coco"


def _square(y0: int, x0: int, size: int, shape=(32, 40)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[y0 : y0 + size, x0 : x0 + size] = 1
    return mask


def write_coco(root: Path, split: str = "train", edit=None) -> dict:
    """A 2-image split: a polygon (category 3), an uncompressed RLE (category 7), a compressed
    RLE crowd (category 3) on image 1; image 2 has no annotations. Category ids have gaps."""
    write_png(root / split / "a.png", np.full((32, 40, 3), 90, np.uint8))
    write_png(root / split / "b.png", np.full((32, 40, 3), 30, np.uint8))
    uncompressed = _square(2, 20, 8)
    counts = mask_utils.encode(np.asfortranarray(uncompressed))
    # an uncompressed RLE: run lengths in column-major order, starting with zeros
    flat = uncompressed.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    runs = np.diff(np.concatenate([[0], changes]))[: len(changes)].tolist()
    assert (
        mask_utils.decode(mask_utils.frPyObjects({"counts": runs, "size": [32, 40]}, 32, 40)).sum()
        == 64
    )
    crowd = mask_utils.encode(np.asfortranarray(_square(20, 20, 10)))
    coco = {
        "images": [{"id": 11, "file_name": "a.png", "height": 32, "width": 40},
                   {"id": 12, "file_name": "b.png", "height": 32, "width": 40}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 3, "iscrowd": 0,
             "segmentation": [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]},
            {"id": 2, "image_id": 11, "category_id": 7, "iscrowd": 0,
             "segmentation": {"counts": runs, "size": [32, 40]}},
            {"id": 3, "image_id": 11, "category_id": 3, "iscrowd": 1,
             "segmentation": {"counts": crowd["counts"].decode(), "size": [32, 40]}},
        ],
    }  # fmt: skip
    assert counts["size"] == [32, 40]
    if edit is not None:
        edit(coco)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return coco


def test_coco_polygons_both_rle_forms_and_crowds(tmp_path):
    write_coco(tmp_path)
    dataset = CocoInstances(str(tmp_path), "train", num_classes=3, category_ids=[0, 3, 7])
    image, ids, table = dataset[0]
    assert image.shape == (3, 32, 40) and ids.dtype == torch.int16
    assert table.tolist() == [[1, 0], [2, 0], [1, 1]]  # category 7 is class 2: ids have gaps
    # the polygon covers x, y 2..12 (pycocotools rasterizes its inside), the RLEs their squares
    assert (
        (ids == 1).sum() > 80 and (ids[2:10, 20:28] == 2).all() and (ids[20:30, 20:30] == 3).all()
    )
    target = training_target(ids, table)
    assert target["labels"].tolist() == [1, 2]  # the crowd is out of the training targets
    evaluator = CocoEvaluator(3, 0.5, 0.5, 0)
    truths = evaluator.image_result(image, ids, table, _no_detections(), "a").truths
    assert [t["iscrowd"] for t in truths] == [0, 0, 1]  # and in the evaluation's ground truth
    _, ids, table = dataset[1]  # an image without annotations is kept, with no instances
    assert table.shape == (0, 2) and not ids.any()


def _no_detections() -> dict:
    return {"masks": torch.zeros(0, 1, 32, 40), "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}  # fmt: skip


def test_coco_config_takes_classes_and_ids_from_the_json(tmp_path):
    write_coco(tmp_path, "train2017")
    write_coco(tmp_path, "val2017")
    cfg = compose_config("task=instance", "data=coco_instances", f"data.root={tmp_path}")
    assert cfg.data.class_names == ["background", "cat", "dog"]
    assert cfg.data.category_ids == [0, 3, 7] and cfg.data.num_classes == 3
    assert len(cfg.data.palette) == 3
    dataset = instantiate(cfg.data.dataset, split="val2017",
                          transform=instantiate(cfg.data.val_transform))  # fmt: skip
    assert dataset[0][2].tolist() == [[1, 0], [2, 0], [1, 1]]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["annotations"][0].update(image_id=99), r"annotation id 1 is for image_id 99"),
        (lambda c: c["annotations"][1].update(category_id=5), r"annotation id 2 has category_id 5"),
        (
            lambda c: c["annotations"][0].update(segmentation=[]),
            r"annotation id 1 has an empty segmentation",
        ),
        (
            lambda c: c["annotations"][0].update(segmentation=[[1, 2, 3, 4]]),
            r"annotation id 1 has a degenerate polygon",
        ),
        (lambda c: c["images"][1].update(file_name="gone.png"), r"1 images it lists are missing"),
        (
            lambda c: c["annotations"][1]["segmentation"].update(size=[40, 32]),
            r"RLE of size \[40, 32\]",
        ),
    ],
)
def test_coco_bad_annotations_name_the_file(tmp_path, edit, message):
    write_coco(tmp_path, edit=edit)
    with pytest.raises(DataError, match=message) as error:
        CocoInstances(str(tmp_path), "train", num_classes=3, category_ids=[0, 3, 7])
    assert "instances_train.json" in str(error.value)


def test_coco_over_max_instances_names_the_image(tmp_path):
    write_coco(tmp_path)
    with pytest.raises(DataError, match=r"a\.png: 3 instances, more than data.max_instances=2"):
        CocoInstances(str(tmp_path), "train", 3, [0, 3, 7], max_instances=2)


def test_coco_cache_gives_the_same_samples(tmp_path):
    write_coco(tmp_path / "data")
    args = (str(tmp_path / "data"), "train", 3, [0, 3, 7])
    plain = CocoInstances(*args)[0]
    cached = CocoInstances(*args, cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # decoded and written, then read back
        for a, b in zip(plain, cached[0], strict=True):
            assert torch.equal(a, b)
    assert list((tmp_path / "cache").rglob("*.mask.npy"))


def file_detections(dataset: CocoInstances, index: int) -> dict:
    """Detections that are sample ``index``'s non-crowd annotations exactly as its file gives
    them (not as painted into the ID map), scored 1."""
    _, height, width, annotations = dataset.samples[index]
    kept = [a for a in annotations if not a.get("iscrowd", 0)]
    masks = [torch.from_numpy(decode(a["segmentation"], height, width)) for a in kept]
    boxes = [mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.numpy()))) for m in masks]
    return {"masks": torch.stack(masks).float()[:, None] if masks else torch.zeros(0, 1, height, width),
            "labels": torch.tensor([dataset.labels[a["category_id"]] for a in kept], dtype=torch.int64),
            "boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes]).reshape(-1, 4),
            "scores": torch.ones(len(kept))}  # fmt: skip


def score_split(dataset, evaluator) -> dict:
    for index in range(len(dataset)):
        image, ids, table = dataset[index]
        evaluator.process(([image], [ids], [table]), [file_detections(dataset, index)],
                          [dataset.describe(index)])  # fmt: skip
    return evaluator.result().metrics


def test_a_coco_split_is_scored_against_its_file_not_the_painted_maps(tmp_path):
    def occluded(coco):  # a dog covering 64 of the cat's 100 pixels: painted over it
        coco["annotations"][0]["segmentation"] = [[20.0, 0.0, 30.0, 0.0, 30.0, 10.0, 20.0, 10.0]]
        coco["annotations"][0]["area"] = 123.0  # the file's area, whatever its pixels

    write_coco(tmp_path, edit=occluded)
    dataset = CocoInstances(str(tmp_path), "train", 3, [0, 3, 7])
    task = InstanceTask(3, ["background", "cat", "dog"], [[0, 0, 0]] * 3, [0.5] * 3, [0.25] * 3)
    against_file = task.evaluator(torch.device("cpu"), dataset=Subset(dataset, [0, 1]))
    assert against_file.reference.image_ids == {str(tmp_path / "train" / "a.png"): 11,
                                                str(tmp_path / "train" / "b.png"): 12}  # fmt: skip
    assert score_split(dataset, against_file)["mask_AP"] == pytest.approx(1.0)
    # the same detections against the painted maps: the cat shows 36 of its pixels there
    assert score_split(dataset, CocoEvaluator(3, 0.5, 0.5, 0))["mask_AP"] < 0.8


@pytest.mark.skipif(not (SHARED_COCO / "panoptic_coco_detection_format.json").is_file(),
                    reason="needs ../shared/data/panoptic_coco")  # fmt: skip
def test_real_coco_rle_and_crowds_score_ap_1_against_themselves(tmp_path):
    coco = json.loads((SHARED_COCO / "panoptic_coco_detection_format.json").read_text())
    # its annotation ids start at 0, which COCOeval reads as "unmatched": seg renumbers them
    assert min(a["id"] for a in coco["annotations"]) == 0
    assert any(a["iscrowd"] for a in coco["annotations"])
    for image in coco["images"]:  # the images are not needed: blank ones of the stated size
        write_png(tmp_path / "val" / image["file_name"],
                  np.zeros((image["height"], image["width"], 3), np.uint8))  # fmt: skip
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    ids = [0, *sorted(c["id"] for c in coco["categories"])]
    dataset = CocoInstances(str(tmp_path), "val", len(ids), ids)
    task = InstanceTask(len(ids), ["c"] * len(ids), [[0, 0, 0]] * len(ids), [0.5] * 3, [0.25] * 3)
    metrics = score_split(dataset, task.evaluator(torch.device("cpu"), dataset=dataset))
    assert metrics["mask_AP"] == pytest.approx(1.0) and metrics["box_AP"] == pytest.approx(1.0)


def _doctor(root, *overrides):
    cfg = compose_config("task=instance", "data=coco_instances", f"data.root={root}",
                         "data.train_split=train", "data.num_workers=0", *overrides)  # fmt: skip
    return check_splits(cfg.data, ["train"])


def test_the_doctor_reports_instance_pixels_empty_images_and_degenerate_shapes(tmp_path):
    def collinear(coco):  # 3 points on one line: a valid polygon that covers no pixel
        coco["annotations"].append({"id": 4, "image_id": 12, "category_id": 7, "iscrowd": 0,
                                    "segmentation": [[1.0, 1.0, 5.0, 5.0, 9.0, 9.0]]})  # fmt: skip

    write_coco(tmp_path, edit=collinear)
    report = _doctor(tmp_path)
    assert report["errors"] == []
    pixels = report["class_pixels"]["train"]
    assert pixels["dog"] == 64 and pixels["cat"] > 80  # the crowd's 100 pixels are not "cat"
    warnings = {w["file"].split("/")[-1]: w["message"] for w in report["warnings"]}
    assert "cover no pixels" in warnings["b.png"]  # the collinear polygon
    write_coco(tmp_path)
    assert "no instances annotated" in _doctor(tmp_path)["warnings"][0]["message"]


def test_the_doctor_lists_every_bad_annotation_and_crowded_images(tmp_path):
    def broken(coco):
        coco["annotations"][0]["image_id"] = 99
        coco["annotations"][1]["category_id"] = 5

    write_coco(tmp_path, edit=broken)
    (error,) = _doctor(tmp_path)["errors"]
    assert "2 bad annotations" in error["message"] and "image_id 99" in error["message"]
    assert "category_id 5" in error["message"] and "instances_train.json" in error["message"]
    write_coco(tmp_path)
    (error,) = _doctor(tmp_path, "data.max_instances=2")["errors"]
    assert "a.png: 3 instances, more than data.max_instances=2" in error["message"]


def test_predict_matches_inputs_to_the_annotation_files_images(tmp_path):
    write_coco(tmp_path)
    annotations = tmp_path / "annotations" / "instances_train.json"
    inputs = [tmp_path / "train" / "b.png", tmp_path / "train" / "a.png"]
    assert annotation_image_ids(annotations, inputs, tmp_path / "train") == [12, 11]
    with pytest.raises(ValueError, match=r"instances_train.json lists no image with file_name "
                                         r"\['train/a.png'\].*give input=<root>/<split>"):  # fmt: skip
        annotation_image_ids(annotations, inputs[1:], tmp_path)
