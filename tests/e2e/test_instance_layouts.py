"""task=instance trains, validates and evaluates on each instance layout on disk, generated here
(`python train.py task=instance debug=tiny data=<layout> data.root=...`)."""

import json

import pytest
import torch
import yaml
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from pycocotools.mask import area, toBbox
from torchvision.ops import masks_to_boxes

from seg import predict
from seg.checkpoint import load_checkpoint
from seg.data.base import DataError
from seg.data.coco import CocoInstances
from seg.tasks.instance import InstancePredict
from tests.conftest import run_evaluation, run_training, write_png
from tests.e2e.test_evaluate_predict_export import run_entry
from tests.unit.test_instance_data import write_coco


def test_a_tiny_run_on_coco_keeps_the_category_ids(tmp_path):
    for split in ("train2017", "val2017"):
        write_coco(tmp_path / "coco", split)
    run_dir = tmp_path / "run"
    run_training(run_dir, "task=instance", "data=coco_instances", f"data.root={tmp_path / 'coco'}",
                 "data.train_transform.crop_size=[32,32]")  # fmt: skip
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4] and lines[-1]["images"] == 2
    state = load_checkpoint(run_dir / "checkpoints/last.pt")
    config = yaml.safe_load(state["config"])
    # predictions can map classes back to the dataset's own ids
    assert config["data"]["category_ids"] == [0, 3, 7]
    assert state["class_names"] == ["background", "cat", "dog"]
    result = run_evaluation(f"checkpoint={run_dir / 'checkpoints/last.pt'}", "split=val2017")
    assert result["mask_AP"] == lines[-1]["mask_AP"]


GREYS = {120: 1, 240: 2}  # the objects' grey in the images written below -> their class


def grey_detections(self, batch, names):
    """InstancePredict's call answered by the pixels: a detection per grey of an object,
    scored by its grey, and one false one, whatever the 4-step model would find."""
    outputs = []
    for image in batch[0]:
        masks = [image[0] == grey for grey in GREYS] + [image[0] < 100]  # the last: false
        masks = torch.stack([m for m in masks if m.any()])
        labels = [GREYS.get(int(image[0][m][0]), 1) for m in masks]
        outputs.append({"masks": masks.float()[:, None], "labels": torch.tensor(labels),
                        "boxes": masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]),
                        "scores": torch.linspace(0.9, 0.5, len(masks))})  # fmt: skip
    return outputs


def test_predicts_coco_results_score_what_evaluate_reports(tmp_path, monkeypatch):
    for split in ("train2017", "val2017"):
        write_coco(tmp_path / "coco", split)
    dataset = CocoInstances(str(tmp_path / "coco"), "val2017", 3, [0, 3, 7])
    _, ids, table = dataset[0]
    # background 0, cat 120, dog 240, the crowd 60
    grey = torch.tensor([0, 120, 240, 60, 60], dtype=torch.uint8)
    kinds = torch.cat([torch.tensor([0]), table[:, 0] + 2 * table[:, 1]])  # per id: class, crowd
    write_png(dataset.samples[0][0], grey[kinds][ids.long()][..., None].expand(-1, -1, 3).numpy())
    run_dir = tmp_path / "run"
    run_training(run_dir, "task=instance", "data=coco_instances", f"data.root={tmp_path / 'coco'}",
                 "data.train_transform.crop_size=[32,32]")  # fmt: skip
    monkeypatch.setattr(InstancePredict, "__call__", grey_detections)
    checkpoint = f"checkpoint={run_dir / 'checkpoints/last.pt'}"
    result = run_evaluation(checkpoint, "split=val2017")
    annotations = tmp_path / "coco/annotations/instances_val2017.json"
    run_entry(predict, "predict", checkpoint, f"input={tmp_path / 'coco/val2017'}",
              f"output={tmp_path / 'out'}", f"annotations={annotations}")  # fmt: skip
    results = json.loads((tmp_path / "out/coco_results.json").read_text())
    # the dataset's own ids: images 11 and 12, categories 3 and 7
    pairs = {(r["image_id"], r["category_id"]) for r in results}
    assert pairs == {(11, 3), (11, 7), (12, 3)}  # (12, 3): the false one
    truth = COCO(str(annotations))
    for annotation in truth.dataset["annotations"]:  # the file leaves out what COCO's have
        encoded = truth.annToRLE(annotation)
        annotation |= {"area": float(area(encoded)), "bbox": toBbox(encoded).tolist()}
    evaluation = COCOeval(truth, truth.loadRes(str(tmp_path / "out/coco_results.json")), "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert 0 < result["mask_AP"] < 1
    assert evaluation.stats[0] == pytest.approx(result["mask_AP"], abs=1e-12)
    assert evaluation.stats[1] == pytest.approx(result["mask_AP50"], abs=1e-12)


def test_bad_coco_data_stops_the_run_before_anything_is_written(tmp_path):
    for split in ("train2017", "val2017"):
        write_coco(tmp_path / "coco", split)
    run_dir = tmp_path / "runs" / "run"
    with pytest.raises(DataError, match=r"a\.png: 3 instances, more than data.max_instances=2"):
        run_training(run_dir, "task=instance", "data=coco_instances",
                     f"data.root={tmp_path / 'coco'}", "data.max_instances=2")  # fmt: skip
    assert not run_dir.exists()
