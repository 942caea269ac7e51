"""End to end: a tiny run fine-tunes another run's weights to other classes, and a run with
parameter groups resumes exactly."""

import logging

import pytest
import torch

from tests.conftest import run_training

SMALL = "model.encoder_name=resnet18"  # the smaller encoder keeps the runs short

THREE_CLASSES = (
    "data.num_classes=3",
    "data.class_names=[background,disc,box]",
    "data.palette=[[0,0,0],[255,0,0],[0,255,0]]",
)


def test_init_from_a_run_with_other_classes(tmp_path, caplog):
    source = tmp_path / "source"
    run_training(source, SMALL)  # 6 classes
    weights = source / "checkpoints" / "last.pt"
    tuned = tmp_path / "tuned"
    # encoder_lr_mult=0: the encoder's weights stay those of the source run
    with caplog.at_level(logging.INFO):
        run_training(
            tuned, SMALL, f"init_from={weights}", *THREE_CLASSES, "optimizer.encoder_lr_mult=0"
        )
    before = torch.load(weights, weights_only=True)["model"]
    after = torch.load(tuned / "checkpoints" / "last.pt", weights_only=True)
    assert after["iteration"] == 4  # a new run: its own schedule from iteration 0
    base, encoder = after["optimizer"]["param_groups"]
    assert (encoder["name"], encoder["initial_lr"]) == ("encoder", 0) and base["initial_lr"] > 0
    convolutions = [
        k for k in before if k.startswith("net.encoder.") and k.endswith("conv1.weight")
    ]
    assert convolutions
    for key in convolutions:
        assert torch.equal(after["model"][key], before[key]), key
    assert after["model"]["net.segmentation_head.0.weight"].shape[0] == 3
    assert f"init_from={weights}:" in caplog.text
    assert "re-initialised 2 of another shape: net.segmentation_head.* (2)" in caplog.text
    assert "Parameter group encoder:" in caplog.text


def test_a_run_with_parameter_groups_resumes_exactly(tmp_path, caplog):
    groups = (SMALL, "optimizer.encoder_lr_mult=0.1", "optimizer.norm_bias_decay=false")
    straight = tmp_path / "straight"
    run_training(straight, *groups)
    stopped = tmp_path / "stopped"
    run_training(stopped, *groups, "trainer.max_iters=2", "scheduler.max_iters=4")
    last = stopped / "checkpoints" / "last.pt"
    # The checkpoint's weights win over init_from's; its command line brings back its groups.
    with caplog.at_level(logging.INFO):
        run_training(
            tmp_path / "ignored", f"resume={last}", "trainer.max_iters=4", f"init_from={last}"
        )
    assert f"init_from={last} is ignored" in caplog.text
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert b["iteration"] == 4
    assert [g["name"] for g in b["optimizer"]["param_groups"]] == [
        "base", "base_no_decay", "encoder", "encoder_no_decay",
    ]  # fmt: skip
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    config = (stopped / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"keeps its optimizer\.encoder_lr_mult"):
        run_training(tmp_path / "other", f"resume={last}", "optimizer.norm_bias_decay=true")
    with pytest.raises(
        ValueError, match=r"encoder_lr_mult=0.5: the checkpoint was trained with 0.1"
    ):
        run_training(tmp_path / "other", f"resume={last}", "optimizer.encoder_lr_mult=0.5")
    assert (stopped / "config.yaml").read_text() == config  # refused before anything is written
