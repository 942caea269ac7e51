"""task=instance trains, validates and evaluates on each instance layout on disk, generated here
(`python train.py task=instance debug=tiny data=<layout> data.root=...`)."""

import json

import pytest
import yaml

from seg.checkpoint import load_checkpoint
from seg.data.base import DataError
from tests.conftest import run_evaluation, run_training
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


def test_bad_coco_data_stops_the_run_before_anything_is_written(tmp_path):
    for split in ("train2017", "val2017"):
        write_coco(tmp_path / "coco", split)
    run_dir = tmp_path / "runs" / "run"
    with pytest.raises(DataError, match=r"a\.png: 3 instances, more than data.max_instances=2"):
        run_training(run_dir, "task=instance", "data=coco_instances",
                     f"data.root={tmp_path / 'coco'}", "data.max_instances=2")  # fmt: skip
    assert not run_dir.exists()
