"""task=instance trains, validates and evaluates on the pixel-map instance layouts, generated
here (`python train.py task=instance debug=tiny data=instance_folder|cityscapes_instances ...`)."""

import json

import cv2
import numpy as np
import tifffile
from omegaconf import OmegaConf

from seg import export, predict
from seg.checkpoint import load_checkpoint
from tests.conftest import run_evaluation, run_training
from tests.e2e.test_evaluate_predict_export import run_entry
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


def test_one_band_16_bit_microscopy_trains_evaluates_predicts_and_exports(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "val"):  # grey 12-bit images: the instances brighter
        ids = write_instance_folder(root, split, classes=False)
        for name, id_map in (("a", ids), ("b", np.zeros_like(ids))):
            (root / "images" / split / f"{name}.png").unlink()
            pixels = np.where(id_map > 0, 3000, 400).astype(np.uint16)
            tifffile.imwrite(root / "images" / split / f"{name}.tif", pixels)
    run_dir = tmp_path / "run"
    run_training(run_dir, "task=instance", "data=instance_folder", f"data.root={root}",
                 "data.dataset.crowd_value=9", "data.scale=4095", "data.mean=[0.3]",
                 "data.std=[0.3]", "data.train_transform.crop_size=[24,32]")  # fmt: skip
    checkpoint = load_checkpoint(run_dir / "checkpoints/last.pt")
    data = OmegaConf.create(checkpoint["config"]).data
    assert (data.in_channels, data.scale) == (1, 4095)
    assert checkpoint["model"]["backbone.body.0.0.weight"].shape[1] == 1  # one band in
    last = f"checkpoint={run_dir / 'checkpoints/last.pt'}"
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["mask_AP"]
    assert run_evaluation(last)["mask_AP"] == logged
    run_entry(predict, "predict", last, f"input={root / 'images' / 'val'}",
              f"output={tmp_path / 'out'}", "score_threshold=1")  # fmt: skip
    # no detection drawn (none scores 1): the band in grey, stretched from 400-3000 to 0-255
    overlay = cv2.imread(str(tmp_path / "out" / "overlay" / "a.png"))
    assert (overlay == np.where(ids > 0, 255, 0)[..., None]).all()
    ids = cv2.imread(str(tmp_path / "out" / "instances" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert ids.dtype == np.uint16 and ids.shape == (24, 32)
    report = run_entry(export, "export", last, "format=torchscript",
                       f"output={tmp_path / 'model.pt'}")  # fmt: skip
    assert report["verification"]["passed"] and report["input"]["channels"] == 1
