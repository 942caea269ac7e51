"""Run directories and run identity: no run overwrites another, resume=auto takes up only the
run the same command started, bad values and incompatible resumes write nothing."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose

from seg import train
from seg.run_dir import claim, run_identity
from tests.conftest import REPO, TINY, compose_config, group_options, hydra_context

STOPPED_EARLY = ("trainer.max_iters=2", "scheduler.max_iters=4")


def train_in(run_dir: Path, output_root: Path, *overrides: str, explicit: bool = True) -> float:
    """train.run as `python train.py debug=tiny hydra.run.dir=<run_dir> ...` calls it."""
    overrides = [*TINY, f"output_root={output_root}", *overrides]
    with hydra_context():
        cfg = compose("train", overrides=overrides)
        return train.run(cfg, run_dir, overrides, explicit_run_dir=explicit)


def iteration(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["iteration"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_identity_ignores_what_only_continues_a_run():
    base = ["debug=tiny", "optimizer.lr=0.01"]
    assert run_identity(base) == run_identity(
        [
            *reversed(base),
            "resume=auto",
            "trainer.max_iters=9",
            "trainer.early_stop_patience=8",  # what the early-stop message says to resume with
            "output_root=/x",
            "hydra.verbose=true",
            "tracker=mlflow",
            "tracker.mlflow.experiment=x",
        ]
    )
    assert run_identity(base) != run_identity([*base, "loss=dice"])
    assert run_identity(base, "a") == run_identity(["loss=dice"], "a") == "run_name=a"


def test_a_directory_is_claimed_once(tmp_path):
    run_dir = tmp_path / "10-31-07"
    assert claim(run_dir, "x", explicit=False) == run_dir
    # another job started in the same second gets its own directory
    assert claim(run_dir, "y", explicit=False) == tmp_path / "10-31-07_1"
    assert json.loads((tmp_path / "10-31-07_1" / "run.json").read_text())["identity"] == "y"
    with pytest.raises(FileExistsError, match=r"hydra.run.dir=.*first checkpoint"):
        claim(run_dir, "z", explicit=True)


def test_a_new_run_never_overwrites_a_named_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    train_in(run_dir, tmp_path, *STOPPED_EARLY)
    before = snapshot(run_dir)
    with pytest.raises(FileExistsError, match=f"hydra.run.dir={run_dir} already holds a run"):
        train_in(run_dir, tmp_path, *STOPPED_EARLY)
    assert snapshot(run_dir) == before


def test_two_jobs_in_one_default_directory_each_get_their_own(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # as Hydra sets it for train.py
    run_dir = tmp_path / "2026-11-26" / "10-31-07"
    train_in(run_dir, tmp_path, "trainer.max_iters=1", explicit=False)
    train_in(run_dir, tmp_path, "trainer.max_iters=1", "optimizer.lr=0.01", explicit=False)
    second = run_dir.with_name("10-31-07_1")
    assert iteration(run_dir) == iteration(second) == 1
    assert "lr: 0.01" in (second / "config.yaml").read_text()
    assert "lr: 0.01" not in (run_dir / "config.yaml").read_text()
    assert "Training on" in (second / "train.log").read_text()


def test_resume_auto_continues_the_named_run_directory(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # as Hydra sets it for train.py
    run_dir = tmp_path / "runs" / "mine"
    train_in(run_dir, tmp_path / "root_a", *STOPPED_EARLY)
    # another output_root, with no checkpoint in it: the named directory is the run to continue
    train_in(run_dir, tmp_path / "root_b", *STOPPED_EARLY, "resume=auto", "trainer.max_iters=4")
    assert iteration(run_dir) == 4
    log = (run_dir / "train.log").read_text()
    assert "Resuming" in log  # logged before the run directory was known, still in its log


def test_resume_auto_takes_up_only_the_run_the_same_command_started(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_in(a, tmp_path, *STOPPED_EARLY, "optimizer.lr=0.001")
    train_in(b, tmp_path, *STOPPED_EARLY, "optimizer.lr=0.002")  # newer, another experiment
    b_before = snapshot(b)
    unused = tmp_path / "2026-11-26" / "12-00-00"
    unused.mkdir(parents=True)  # what Hydra creates for the re-submitted job
    train_in(
        unused, tmp_path, *STOPPED_EARLY, "optimizer.lr=0.001", "resume=auto", "trainer.max_iters=4"
    )
    assert iteration(a) == 4
    assert snapshot(b) == b_before
    assert not unused.parent.exists()  # the unused directory Hydra made is gone


def test_resume_auto_by_run_name_survives_changed_overrides(tmp_path):
    run_dir = tmp_path / "named"
    train_in(run_dir, tmp_path, *STOPPED_EARLY, "run_name=exp1")
    train_in(tmp_path / "new", tmp_path, "run_name=exp1", "resume=auto", "trainer.max_iters=4")
    assert iteration(run_dir) == 4
    assert not (tmp_path / "new").exists()


def test_incompatible_resume_names_the_weights_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    train_in(run_dir, tmp_path, *STOPPED_EARLY)
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=r"does not fit the configured model: .*decoder"):
        train_in(
            tmp_path / "x",
            tmp_path,
            f"resume={run_dir / 'checkpoints/last.pt'}",
            "+model.options.decoder_channels=[64,32,16,16,8]",
        )
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    "override",
    [
        "trainer.max_iters=abc",
        "trainer.val_every=0",
        "trainer.ckpt_every=0",
        "trainer.log_every=0",
        "data.batch_size=-3",
        "data.batch_size=0",
        "optimizer.lr=-1",
        "data.max_val_samples=0",
        "trainer.precision=fp64",
        "trainer.compile=yes",
        "trainer.ema_decay=0",
        "trainer.ema_decay=1.5",
        "trainer.early_stop_patience=0",
    ],
)
def test_a_bad_value_fails_before_any_work_naming_its_key(tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=f"^{key}="):
        train_in(tmp_path / "run", tmp_path, override)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", [*group_options("experiment"), *group_options("debug")])
def test_every_shipped_recipe_passes_the_value_checks(option):
    from seg.config import check_values

    group = "experiment" if option in group_options("experiment") else "debug"
    check_values(compose_config(f"{group}={option}"))


def test_resume_with_a_longer_schedule_says_what_the_lr_does(tmp_path, caplog):
    run_dir = tmp_path / "run"
    train_in(run_dir, tmp_path, "trainer.max_iters=2", "scheduler.warmup_iters=0")
    resume = f"resume={run_dir}/checkpoints/last.pt"
    train_in(tmp_path / "x", tmp_path, resume, "trainer.max_iters=8")
    assert "learning-rate schedule differs from the checkpoint's (scheduler.max_iters 2 -> 8)" in (
        caplog.text
    )
    assert "scheduler.max_iters=2" in caplog.text  # how to keep the old schedule


def test_a_failed_start_prints_one_line_and_leaves_no_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "data=folder", f"data.root={tmp_path / 'nowhere'}",
         f"output_root={tmp_path / 'outputs'}"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "nowhere" in output
    assert "Traceback" not in output and "Error executing job" not in output
    assert not [p for p in (tmp_path / "outputs").rglob("*")]


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no fast bf16"
)
def test_a_resumed_run_keeps_its_precision_unless_the_command_changes_it(tmp_path, caplog):
    run_dir = tmp_path / "run"
    common = ["debug=tiny", f"output_root={tmp_path}", "scheduler.max_iters=4"]
    overrides = [*common, "trainer.precision=bf16", "trainer.max_iters=2"]
    with hydra_context():
        train.run(compose("train", overrides=overrides), run_dir, overrides)
        resume = [*common, f"resume={run_dir}/checkpoints/last.pt", "trainer.max_iters=3"]
        train.run(compose("train", overrides=resume), tmp_path / "x", resume)
    assert "precision: bf16" in (run_dir / "config.yaml").read_text()
    assert "settings other than the checkpoint's" not in caplog.text
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["scaler"] == {}  # bf16
    # an explicit change wins, and is named
    train_in(
        tmp_path / "y", tmp_path, f"resume={run_dir}/checkpoints/last.pt", "trainer.max_iters=4"
    )
    assert "trainer.precision bf16 -> fp32" in caplog.text
    assert "precision: fp32" in (run_dir / "config.yaml").read_text()


def test_a_run_killed_before_its_first_checkpoint_says_what_to_do(tmp_path):
    run_dir = tmp_path / "run"
    claim(run_dir, "x", explicit=True)  # all that a run killed (-9) during start-up leaves
    with pytest.raises(FileExistsError, match="stopped before its first checkpoint") as refused:
        train_in(run_dir, tmp_path, "resume=auto")
    assert "last.pt" not in str(refused.value)  # no file that does not exist


def test_a_failed_start_removes_the_named_directory_hydra_made(tmp_path):
    run_dir = tmp_path / "elsewhere" / "run"  # outside output_root
    run_dir.mkdir(parents=True)  # as Hydra makes it before the job starts
    with pytest.raises(ValueError, match=r"optimizer\.lr"):
        train_in(run_dir, tmp_path / "outputs", "optimizer.lr=-1")
    assert not run_dir.exists()
    default = tmp_path / "outputs" / "2026-12-05" / "06-00-00"
    default.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"optimizer\.lr"):
        train_in(default, tmp_path / "outputs", "optimizer.lr=-1", explicit=False)
    assert not (tmp_path / "outputs").exists()  # no empty outputs/ either
