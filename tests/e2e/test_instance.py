"""task=instance end to end on the CPU: Mask R-CNN (debug=tiny's MobileNetV3 one) trains on the
synthetic instances through the same Trainer, resumes bit for bit (1 and 2 processes),
evaluates with COCOeval, and 2 processes score exactly what one does."""

import json
import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from seg import export, predict
from seg.checkpoint import load_checkpoint
from seg.data.instance_layouts import InstanceFolder
from seg.data.synthetic import SyntheticScenes
from tests.conftest import run_evaluation, run_training, write_png
from tests.e2e.test_distributed import assert_same_weights, torchrun
from tests.e2e.test_distributed_eval import torchrun as torchrun_script
from tests.e2e.test_evaluate_predict_export import run_entry

INSTANCE = ("task=instance",)
# Fewer anchors and proposals sampled than a 64-pixel crop has: which ones the samplers draw
# depends on the random state (with all of them taken, any state would do).
FEW_SAMPLES = ("model.rpn_batch_size=16", "model.roi_batch_size=16")
KEYS = ("mask_AP", "mask_AP50", "mask_AP75", "box_AP", "mask_AP_class", "box_AP_class")


@pytest.fixture(scope="module")
def instance_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("instance") / "run"
    run_training(run_dir, *INSTANCE, "data.dataset.num_samples.val=5", "data.max_val_samples=null")
    return run_dir


def test_a_tiny_instance_run_trains_and_validates_with_coco_ap(instance_run):
    lines = [json.loads(line) for line in (instance_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4]
    assert list(lines[0])[:2] == ["iteration", "mask_AP"]  # the primary metric first
    assert set(KEYS) <= set(lines[0]) and lines[0]["images"] == 5
    state = load_checkpoint(instance_run / "checkpoints/last.pt")
    assert state["metric"] == "mask_AP" and state["iteration"] == 4


def test_evaluate_reports_the_validation_coco_ap(instance_run, tmp_path):
    lines = (instance_run / "metrics.jsonl").read_text().splitlines()
    validated = json.loads(lines[-1])
    out = tmp_path / "ap.json"
    result = run_evaluation(f"checkpoint={instance_run / 'checkpoints/last.pt'}", f"out={out}")
    for key in KEYS:
        assert result[key] == validated[key], key
    written = json.loads(out.read_text())
    assert written["mask_AP"] == result["mask_AP"] and written["images"] == 5
    report = instance_run / "eval_val_last"
    assert (report / "per_image.csv").read_text().count("\n") == 6  # header + 5 images


def test_an_instance_run_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path):
    # Mask R-CNN's samplers draw randperm on data-dependent counts: the checkpoint's RNG state
    # must be the one the run had, or the resumed run samples other proposals.
    # Both validate at iteration 2 (debug=tiny): a validation's DataLoader draws a seed from
    # the global RNG, as it does in an uninterrupted run.
    common = (*INSTANCE, "scheduler.max_iters=4", *FEW_SAMPLES)
    run_training(tmp_path / "straight", *common)
    stopped = tmp_path / "stopped"
    run_training(stopped, *common, "trainer.max_iters=2")
    run_training(stopped, *common, f"resume={stopped / 'checkpoints/last.pt'}",
                 "trainer.max_iters=4")  # fmt: skip
    assert_same_weights(tmp_path / "straight", stopped)


def test_two_processes_resume_exactly_with_each_ranks_own_random_state(tmp_path):
    common = (*INSTANCE, "scheduler.max_iters=4", *FEW_SAMPLES)
    torchrun(tmp_path / "out", f"hydra.run.dir={tmp_path / 'straight'}", *common)
    stopped = tmp_path / "stopped"
    torchrun(tmp_path / "out", f"hydra.run.dir={stopped}", *common, "trainer.max_iters=2")
    state = load_checkpoint(stopped / "checkpoints/last.pt")
    assert len(state["rng"]) == 2  # one per rank
    torchrun(tmp_path / "out", f"resume={stopped / 'checkpoints/last.pt'}", *common,
             "trainer.max_iters=4")  # fmt: skip
    assert_same_weights(tmp_path / "straight", stopped)


def test_two_processes_score_exactly_what_one_does(instance_run, tmp_path):
    checkpoint = instance_run / "checkpoints/last.pt"
    single = run_evaluation(f"checkpoint={checkpoint}", f"report_dir={tmp_path / 'one'}",
                            "data.val_batch_size=2")  # fmt: skip
    out = tmp_path / "two.json"
    # 5 images, batches of 2: the ranks' batches (0, 2 | 4 and 1, 3) are not one process's
    torchrun_script("evaluate.py", f"checkpoint={checkpoint}", f"out={out}",
                    f"report_dir={tmp_path / 'two'}", "data.val_batch_size=2")  # fmt: skip
    two = json.loads(out.read_text())
    for key in KEYS:
        assert two[key] == single[key], key


def test_predict_writes_overlays_instance_maps_that_read_back_and_coco_results(
    instance_run, tmp_path
):
    checkpoint = instance_run / "checkpoints/last.pt"
    root = tmp_path / "data"
    for i in range(3):
        image, _ = SyntheticScenes("test", image_size=48).load(i)
        write_png(root / "images" / "test" / f"scene{i}.png", image)
    # a low score threshold: the 4-step model's detections are unsure, but they are drawn
    counts = run_entry(predict, "predict", f"checkpoint={checkpoint}", f"input={root / 'images'}",
                       f"output={root}", "score_threshold=0.05")  # fmt: skip
    assert counts == {"written": 3, "skipped": 0}
    results = json.loads((root / "coco_results.json").read_text())
    assert results and {r["image_id"] for r in results} <= {1, 2, 3}
    assert set(results[0]) == {"image_id", "category_id", "segmentation", "bbox", "score"}
    ids = cv2.imread(str(root / "instances/test/scene0.png"), cv2.IMREAD_UNCHANGED)
    assert ids.dtype == np.uint16 and ids.shape == (48, 48)
    overlay = np.asarray(Image.open(root / "overlay/test/scene0.png"))
    assert overlay.shape == (48, 48, 3)
    # the outputs are a dataset: the instance_folder layout, with the classes in masks/
    _, id_map, table = InstanceFolder(str(root), "test", num_classes=6)[0]
    ranked = sorted((r for r in results if r["image_id"] == 1), key=lambda r: -r["score"])
    visible = np.unique(ids[ids > 0])  # id k: the k-th highest score (those hidden are gone)
    assert len(visible) > 0 and np.array_equal(id_map.numpy() > 0, ids > 0)
    assert table[:, 0].tolist() == [ranked[k - 1]["category_id"] for k in visible]
    # loadRes takes the file as it is
    truth = COCO()
    truth.dataset = {"images": [{"id": i, "height": 48, "width": 48} for i in (1, 2, 3)],
                     "annotations": [], "categories": [{"id": c} for c in range(1, 6)]}  # fmt: skip
    truth.createIndex()
    assert len(truth.loadRes(str(root / "coco_results.json")).anns) == len(results)
    # two processes, each its share of the images: one file, the same results in input order
    torchrun_script("predict.py", f"checkpoint={checkpoint}", f"input={root / 'images'}",
                    f"output={tmp_path / 'two'}", "format=[coco]")  # fmt: skip
    assert json.loads((tmp_path / "two/coco_results.json").read_text()) == results


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_export_gives_the_same_detections_and_says_so(instance_run, tmp_path, format, caplog):
    output = tmp_path / f"model.{format}"
    with caplog.at_level(logging.INFO, logger="seg.export"):
        report = run_entry(export, "export", f"checkpoint={instance_run / 'checkpoints/last.pt'}",
                           f"format={format}", f"output={output}")  # fmt: skip
    verification = report["verification"]
    assert verification["passed"] and len(verification["images"]) == 3
    assert all(check["detections"] > 0 for check in verification["images"])  # a real test
    assert report["input"]["size"] == "exactly [3, 64, 64]"  # debug=tiny's crop, fixed
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Verification"))
    assert "passed: 3 images, the same detections" in line and str(output) in line
    # the file runs on its own: an image of the stated size in, detections out
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(5))
    detections = export.ExportedDetector(output, format)(image)
    assert detections["masks"].shape[1:] == (1, 64, 64)
    assert len(detections["boxes"]) == len(detections["scores"]) == len(detections["labels"])
