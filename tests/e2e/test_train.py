"""End to end: tiny training runs write their outputs, resume exactly, and evaluate agrees."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, run_evaluation, run_training


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def metric_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("outputs") / "tiny"
    miou = run_training(run_dir)
    return run_dir, miou


def test_tiny_run_writes_checkpoints_events_and_metrics(tiny_run):
    run_dir, miou = tiny_run
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert "num_classes: 6" in (run_dir / "config.yaml").read_text()
    lines = metric_lines(run_dir)
    assert [line["iteration"] for line in lines] == [2, 4]
    assert max(line["mIoU"] for line in lines) == pytest.approx(miou)  # the best
    assert set(lines[-1]["IoU"]) == {"background", "disc", "box", "triangle", "ring", "cross"}
    assert sorted(scalars(run_dir, "train/loss")) == [1, 2, 3, 4]
    assert max(scalars(run_dir, "val/mIoU").values()) == pytest.approx(miou)
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = events.Tags()
    for tag in (
        "train/lr",
        "val/mDice",
        "val/aAcc",
        "val/mAcc",
        "val_class/IoU/disc",
        "val_class/Dice/ring",
    ):
        assert tag in tags["scalars"], tag
    assert "val/example_0" in tags["images"]


def test_checkpoint_is_plain_and_rebuilds_the_model(tiny_run):
    run_dir, _ = tiny_run
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 4
    assert state["class_names"][1] == "disc" and len(state["palette"]) == 6
    assert "_target_: seg.models.smp_model" in state["config"]
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in state["model"])
    for key in ("optimizer", "scheduler", "scaler", "rng", "best_metric", "overrides"):
        assert key in state


def test_evaluate_reproduces_the_logged_val_miou(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    best = max(line["mIoU"] for line in metric_lines(run_dir))
    out = tmp_path / "metrics.json"
    # the same 4 images that training validated on (debug=tiny's data.max_val_samples)
    checkpoint = f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}"
    result = run_evaluation(checkpoint, f"out={out}", "max_samples=4")
    assert result["mIoU"] == pytest.approx(best, abs=1e-12)
    written = json.loads(out.read_text())
    assert written["mIoU"] == result["mIoU"]
    assert set(written["Dice"]) == set(written["IoU"]) == set(metric_lines(run_dir)[0]["IoU"])
    for key in ("mDice", "aAcc", "mAcc"):
        assert key in written


def test_evaluate_applies_command_line_overrides(tiny_run):
    run_dir, _ = tiny_run
    checkpoint = f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}"
    one = run_evaluation(checkpoint, "data.max_val_samples=1", "split=test")
    two = run_evaluation(checkpoint, "data.max_val_samples=2", "split=test")
    assert one["mIoU"] != two["mIoU"]


def test_resume_continues_at_the_right_iteration_and_lr(tmp_path):
    straight = tmp_path / "straight"
    run_training(straight)
    # Stop after 2 of 4 iterations (the schedule still spans 4), then resume to the end.
    stopped = tmp_path / "resumed"
    run_training(stopped, "trainer.max_iters=2", "scheduler.max_iters=4")
    assert torch.load(stopped / "checkpoints/last.pt", weights_only=True)["iteration"] == 2
    run_training(
        tmp_path / "ignored", f"resume={stopped / 'checkpoints/last.pt'}", "trainer.max_iters=4"
    )
    assert not (tmp_path / "ignored").exists()  # the resumed run writes into its own run dir
    assert scalars(stopped, "train/lr") == scalars(straight, "train/lr")
    assert scalars(stopped, "train/loss") == scalars(straight, "train/loss")
    a = torch.load(straight / "checkpoints/last.pt", weights_only=True)
    b = torch.load(stopped / "checkpoints/last.pt", weights_only=True)
    assert b["iteration"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [line["iteration"] for line in metric_lines(stopped)] == [2, 4]


def test_resume_auto_takes_the_newest_run(tmp_path):
    first = tmp_path / "first"
    run_training(first, "trainer.max_iters=2", "scheduler.max_iters=4")
    # resume=auto takes up the run of the same command (max_iters and resume may differ)
    run_training(tmp_path / "second", "resume=auto", "trainer.max_iters=4", "scheduler.max_iters=4")
    assert torch.load(first / "checkpoints/last.pt", weights_only=True)["iteration"] == 4


@pytest.mark.parametrize("model", ["fcn", "deeplabv3", "deeplabv3plus"])
def test_tiny_run_for_each_main_model(tmp_path, model):
    miou = run_training(tmp_path / model, f"model={model}")
    assert 0 <= miou <= 1
    assert (tmp_path / model / "checkpoints" / "best.pt").is_file()


def test_train_script_in_a_subprocess(tmp_path):
    run_dir = tmp_path / "run"
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "train.py", "debug=tiny", f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert "Validation at iteration 4" in (run_dir / "train.log").read_text()
