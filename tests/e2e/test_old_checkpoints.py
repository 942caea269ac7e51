"""A checkpoint written by an older seg (format 1, tests/fixtures/README.md) still resumes,
evaluates, predicts and exports: ``seg.checkpoint.upgrade`` brings it to today's format."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from seg import export, predict
from seg.checkpoint import FORMAT_VERSION, load_checkpoint
from seg.data.synthetic import SyntheticScenes
from tests.conftest import REPO, run_evaluation, run_training
from tests.e2e.test_evaluate_predict_export import run_entry

FIXTURE = REPO / "tests" / "fixtures" / "format1_linknet_tiny.pt"


@pytest.fixture
def old_run(tmp_path) -> Path:
    """The fixture as ``checkpoints/last.pt`` of a run directory of its own."""
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    shutil.copy(FIXTURE, path)
    return path


def test_an_old_checkpoint_is_upgraded_on_load(old_run):
    raw = torch.load(old_run, weights_only=True)
    assert "format_version" not in raw and "best_miou" in raw  # what 46a71bf wrote
    state = load_checkpoint(old_run)
    assert state["format_version"] == FORMAT_VERSION
    assert state["metric"] == "mIoU" and state["best_metric"] == raw["best_miou"]
    assert isinstance(state["rng"], list) and state["rng"][0]["cuda"] is None


def test_evaluating_an_old_checkpoint_reproduces_its_validation(old_run):
    lines = (REPO / "tests/fixtures/format1_linknet_tiny.metrics.jsonl").read_text().splitlines()
    validated = json.loads(lines[-1])
    evaluated = run_evaluation(f"checkpoint={old_run}", "bootstrap=0")
    assert evaluated["images"] == 4
    assert evaluated["mIoU"] == validated["mIoU"]
    assert evaluated["IoU"] == validated["IoU"]


def test_an_old_checkpoint_resumes(old_run, tmp_path):
    run_training(tmp_path / "x", f"resume={old_run}", "trainer.max_iters=4")
    state = load_checkpoint(old_run)
    assert state["iteration"] == 4 and state["format_version"] == FORMAT_VERSION
    assert torch.load(old_run, weights_only=True)["format_version"] == FORMAT_VERSION


def test_an_old_checkpoint_predicts_and_exports(old_run, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    image, _ = SyntheticScenes("test", image_size=64).load(0)
    Image.fromarray(image).save(images / "scene.png")
    counts = run_entry(predict, "predict", f"checkpoint={old_run}", f"input={images}",
                       f"output={tmp_path / 'out'}")  # fmt: skip
    assert counts == {"written": 1, "skipped": 0}
    report = run_entry(export, "export", f"checkpoint={old_run}", "format=onnx",
                       f"output={tmp_path / 'model.onnx'}")  # fmt: skip
    assert report["verification"]["passed"]
