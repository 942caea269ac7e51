"""task=instance trains, validates and evaluates on the pixel-map instance layouts, generated
here (`python train.py task=instance debug=tiny data=instance_folder|cityscapes_instances ...`)."""

import json

from seg.checkpoint import load_checkpoint
from tests.conftest import run_evaluation, run_training
from tests.unit.test_instance_layouts import write_cityscapes_instances, write_instance_folder


def test_a_tiny_run_on_an_instance_folder_and_on_cityscapes(tmp_path):
    for split in ("train", "val"):  # 16-bit instance maps with class masks and a crowd region
        write_instance_folder(tmp_path / "folder", split)
        write_cityscapes_instances(tmp_path / "cityscapes", split)
    run_dir = tmp_path / "folder_run"
    run_training(run_dir, "task=instance", "data=instance_folder", f"data.root={tmp_path / 'folder'}",
                 "data.dataset.crowd_value=9", "data.num_classes=3", "data.class_names=[bg,a,b]",
                 "data.palette=[[0,0,0],[9,9,9],[99,99,99]]", "data.train_transform.crop_size=[24,32]",
                 f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4] and lines[-1]["images"] == 2
    assert list((tmp_path / "cache").rglob("*.mask.npy"))  # the decoded annotation maps
    result = run_evaluation(f"checkpoint={run_dir / 'checkpoints/last.pt'}")
    assert result["mask_AP"] == lines[-1]["mask_AP"]
    run_dir = tmp_path / "cityscapes_run"
    run_training(run_dir, "task=instance", "data=cityscapes_instances",
                 f"data.root={tmp_path / 'cityscapes'}", "data.train_transform.crop_size=[16,48]")  # fmt: skip
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["class_names"][1] == "person"
    # Cityscapes splits also report the official AP, in validation and evaluate.py alike
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = run_evaluation(f"checkpoint={run_dir / 'checkpoints/last.pt'}")
    for key in ("cityscapes_AP", "cityscapes_AP50", "cityscapes_AP_class"):
        assert result[key] == lines[-1][key], key
    assert set(result["cityscapes_AP_class"]) == {"person", "rider", "car", "truck", "bus",
                                                  "train", "motorcycle", "bicycle"}  # fmt: skip
