"""No lost work: exact resume, signals (also inside a validation or a save), kill -9 (also
inside a save), data errors mid-run, the non-finite guard."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from seg.checkpoint import load_checkpoint
from seg.data.base import DataError
from seg.data.synthetic import SyntheticScenes
from seg.engine.guard import StopTraining
from seg.inference import Predictor
from tests.conftest import REPO, run_training

# 6 training scenes with batch 2: an epoch is 3 iterations.
SMALL_EPOCHS = ("data.dataset.num_samples.train=6", "trainer.ckpt_every=1", "trainer.val_every=5")


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize(
    ("stop_at", "workers"), [(2, 0), (3, 0), (2, 1)], ids=["mid-epoch", "epoch-end", "worker"]
)
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, stop_at, workers):
    common = (*SMALL_EPOCHS, "trainer.max_iters=5", f"data.num_workers={workers}")
    straight = tmp_path / "straight"
    run_training(straight, *common)
    resumed = tmp_path / "resumed"
    # Stopping at `stop_at` = the same run whose loop ends early (the schedule still spans 5).
    run_training(resumed, *common, f"trainer.max_iters={stop_at}", "scheduler.max_iters=5")
    run_training(
        tmp_path / "unused", f"resume={resumed / 'checkpoints/last.pt'}", "trainer.max_iters=5"
    )
    a, b = final_state(straight), final_state(resumed)
    # (best_miou may differ: the early-ending run also validated where it stopped)
    for key in ("model", "optimizer", "scheduler", "scaler", "iteration", "skipped_steps"):
        assert_same_tensors(a[key], b[key], key)
    # the stopped run also validated when it stopped; the final validations agree
    last_line = (straight / "metrics.jsonl").read_text().splitlines()[-1]
    assert (resumed / "metrics.jsonl").read_text().splitlines()[-1] == last_line


def test_best_checkpoint_is_not_replaced_by_a_worse_model_after_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, "trainer.max_iters=2", "scheduler.max_iters=4")
    best = load_checkpoint(run_dir / "checkpoints/best.pt")
    state = load_checkpoint(run_dir / "checkpoints/last.pt")
    state["best_miou"] = 2.0  # pretend the run already had a perfect model
    torch.save(state, run_dir / "checkpoints/last.pt")
    run_training(tmp_path / "x", f"resume={run_dir / 'checkpoints/last.pt'}", "trainer.max_iters=4")
    assert load_checkpoint(run_dir / "checkpoints/best.pt")["iteration"] == best["iteration"]


def start_training(run_dir: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "train.py", "debug=tiny", "trainer.precision=fp32"]
    command += [f"hydra.run.dir={run_dir}", f"output_root={run_dir.parent}", *overrides]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended early:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def log_has(run_dir: Path, text: str):
    return lambda: (run_dir / "train.log").exists() and text in (run_dir / "train.log").read_text()


def test_sigterm_saves_and_exits_with_the_documented_code_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    process = start_training(run_dir, "trainer.max_iters=500", "trainer.ckpt_every=1000")
    wait_for(log_has(run_dir, "iteration 3/500"), process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    state = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert state["iteration"] >= 3
    assert f"resume={run_dir / 'checkpoints' / 'last.pt'}" in output
    stopped_at = state["iteration"]
    # resume=auto continues the run of the same command (its max_iters may change)
    run_training(
        tmp_path / "x",
        "resume=auto",
        "trainer.ckpt_every=1000",
        f"trainer.max_iters={stopped_at + 2}",
    )
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"] == stopped_at + 2


def test_kill_9_at_random_moments_always_leaves_a_resumable_checkpoint(tmp_path):
    rng = torch.Generator().manual_seed(0)
    run_dir = tmp_path / "run"
    process = start_training(run_dir, "trainer.max_iters=500", "trainer.ckpt_every=1")
    wait_for(lambda: (run_dir / "checkpoints/last.pt").exists(), process)
    for _ in range(2):
        time.sleep(torch.rand(1, generator=rng).item() * 1.5)
        process.kill()
        process.wait()
        before = load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"]
        process = start_training(
            tmp_path / "next", "resume=auto", "trainer.max_iters=500", "trainer.ckpt_every=1"
        )
        # the resumed run continues from there (a failed load would raise here)
        wait_for(
            lambda b=before: load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"] > b,
            process,
        )
    process.kill()
    process.wait()


KILLED_IN_SAVE = """
import os, sys, torch
from seg import checkpoint

real_save = torch.save

def slow_save(state, file, *args, **kwargs):
    real_save(state, file, *args, **kwargs)
    if state["iteration"] == 3:  # the third save: half written, then the process dies
        file.truncate(file.tell() // 2)
        file.flush()
        os.kill(os.getpid(), 9)

checkpoint.torch.save = slow_save
sys.argv = ["train.py", "debug=tiny", "trainer.precision=fp32", "trainer.max_iters=6",
            "trainer.ckpt_every=1", "hydra.run.dir={run_dir}"]
from seg.train import main
main()
"""


def run_script(template: str, run_dir: Path) -> subprocess.CompletedProcess:
    """Run a training script (``template`` with ``{run_dir}``) in its own Python process."""
    script = textwrap.dedent(template).format(run_dir=run_dir)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_kill_9_inside_a_save_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(KILLED_IN_SAVE, run_dir)
    assert result.returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"] == 2
    assert list((run_dir / "checkpoints").glob(".*.tmp"))  # the half-written temp file
    run_training(tmp_path / "x", "resume=auto", "trainer.ckpt_every=1", "trainer.max_iters=4")
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"] == 4


def test_resume_auto_skips_an_unreadable_newest_checkpoint(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_training(run_dir, "trainer.max_iters=2", "scheduler.max_iters=4")
    newest = run_dir / "checkpoints" / "last.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # disk corruption after the fact
    run_training(tmp_path / "x", "resume=auto", "scheduler.max_iters=4", "trainer.max_iters=4")
    assert f"Skipping checkpoint {newest}" in caplog.text
    # resumed from best.pt (iteration 2), so last.pt is whole again, at iteration 4
    assert load_checkpoint(newest)["iteration"] == 4


def test_a_signal_during_the_last_validation_is_made_up_on_resume(tmp_path, monkeypatch):
    only_last = ("trainer.val_every=100",)  # the one validation is the last: iteration 4
    straight = tmp_path / "straight"
    run_training(straight, *only_last)
    real_predict = Predictor.predict

    def ctrl_c_during_the_first_batch(self, images):
        monkeypatch.setattr(Predictor, "predict", real_predict)
        signal.raise_signal(signal.SIGINT)
        return real_predict(self, images)

    monkeypatch.setattr(Predictor, "predict", ctrl_c_during_the_first_batch)
    run_dir = tmp_path / "run"
    with pytest.raises(StopTraining) as stop:
        run_training(run_dir, *only_last)
    assert stop.value.exit_code == 128 + signal.SIGINT
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"] == 4
    assert not (run_dir / "checkpoints/best.pt").exists()
    assert not (run_dir / "metrics.jsonl").exists()

    # "nothing to train", but the validation the signal cut short is still owed
    run_training(tmp_path / "x", f"resume={run_dir / 'checkpoints/last.pt'}", *only_last)
    assert (run_dir / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    assert load_checkpoint(run_dir / "checkpoints/best.pt")["iteration"] == 4
    a, b = final_state(straight), final_state(run_dir)
    for key in ("model", "optimizer", "scheduler", "iteration", "best_metric", "rng"):
        assert_same_tensors(a[key], b[key], key)
    assert not b["pending_validation"]


def test_a_data_error_mid_run_first_saves_the_last_completed_iteration(tmp_path, monkeypatch):
    no_saves = ("trainer.ckpt_every=100", "trainer.val_every=100")
    straight = tmp_path / "straight"
    run_training(straight, *no_saves)
    real_prepare, train_reads = SyntheticScenes.prepare, []

    def truncated_in_iteration_4(self, index, seed):  # the samples the DataLoader reads
        if self.split == "train":
            train_reads.append(index)
            if len(train_reads) == 7:  # batches of 2: the first image of iteration 4
                raise DataError(f"{self.describe(index)}: image file is truncated; replace it")
        return real_prepare(self, index, seed)

    monkeypatch.setattr(SyntheticScenes, "prepare", truncated_in_iteration_4)
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="truncated"):
        run_training(run_dir, *no_saves)
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"] == 3

    monkeypatch.setattr(SyntheticScenes, "prepare", real_prepare)  # the file was replaced
    run_training(tmp_path / "x", f"resume={run_dir / 'checkpoints/last.pt'}", *no_saves)
    # no iteration lost or repeated: the same weights as the run without the error
    assert_same_tensors(final_state(straight)["model"], final_state(run_dir)["model"])


CTRL_C_TWICE_IN_A_SAVE = """
import io, signal, sys
from seg import checkpoint

class InterruptedFile(io.FileIO):
    interrupted = False

    def write(self, data):  # Ctrl-C, Ctrl-C inside torch.save of the first checkpoint
        if not InterruptedFile.interrupted:
            InterruptedFile.interrupted = True
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return super().write(data)

checkpoint.open = InterruptedFile
sys.argv = ["train.py", "debug=tiny", "trainer.precision=fp32", "trainer.max_iters=6",
            "hydra.run.dir={run_dir}"]
from seg.train import main
main()
"""


def test_ctrl_c_twice_inside_a_save_finishes_it_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(CTRL_C_TWICE_IN_A_SAVE, run_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "unexpected pos" not in output
    # the first save (best.pt after the validation at iteration 2) is whole, then the run stops
    saved = run_dir / "checkpoints" / "best.pt"
    assert load_checkpoint(saved)["iteration"] == 2
    assert f"resume={saved}" in output
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
