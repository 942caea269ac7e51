"""Training under torchrun (2 CPU processes, gloo): one run directory, identical weights, exact
validation, SyncBN equivalence, exact resume, restarts after kill -9, collective stops."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seg.checkpoint import load_checkpoint
from tests.conftest import REPO, TINY, run_evaluation, run_training

WORKER = REPO / "tests" / "e2e" / "ddp_worker.py"


def torchrun_command(out: Path, *overrides: str, launcher: tuple[str, ...] = ()) -> tuple:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", *launcher, str(WORKER), *TINY, *overrides]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1", SEG_TEST_OUT=str(out))
    return command, environment


def torchrun(out: Path, *overrides: str, launcher: tuple[str, ...] = (), fails=False, **env) -> str:
    command, environment = torchrun_command(out, *overrides, launcher=launcher)
    result = subprocess.run(
        command, cwd=REPO, env=environment | env, capture_output=True, text=True, timeout=400
    )
    output = result.stdout + result.stderr
    assert (result.returncode != 0) == fails, output[-4000:]
    return output


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def exit_codes(out: Path) -> list[int]:
    return [int((out / f"exit_rank{rank}").read_text()) for rank in range(2)]


def test_two_processes_train_one_run_with_the_same_weights_and_exact_validation(tmp_path):
    root = tmp_path / "outputs"
    # 7 val images: the ranks' shares differ in size, and each image counts once
    split = ("data.dataset.num_samples.val=7", "data.max_val_samples=null", "data.val_batch_size=1")
    torchrun(tmp_path / "out", f"output_root={root}", *split)
    runs = [path.parent for path in root.rglob("run.json")]
    assert len(runs) == 1, runs  # rank 0 decided the directory; no rank left one of its own
    assert not [p for p in root.rglob("*") if p.is_dir() and not any(p.iterdir())]
    run_dir = runs[0]
    log = (run_dir / "train.log").read_text()
    assert "2 process(es) x data.batch_size 2 x trainer.grad_accum_steps 1 = global batch 4" in log
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4]  # written once, by rank 0
    state = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["samples_seen"] == 4 * 4
    rank0, rank1 = (torch.load(tmp_path / "out" / f"weights_rank{r}.pt") for r in range(2))
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
    # the same checkpoint, evaluated by one process, gives exactly the validation's figures
    single = run_evaluation(
        f"checkpoint={run_dir / 'checkpoints/last.pt'}", "data.val_batch_size=1"
    )
    assert single["images"] == 7
    assert single["mIoU"] == lines[-1]["mIoU"]
    assert single["IoU"] == lines[-1]["IoU"]


def train_loss(run_dir: Path) -> list[float]:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [event.value for event in events.Scalars("train/loss")]


def test_two_processes_with_sync_bn_match_one_process_with_twice_the_batch(tmp_path):
    # SGD: Adam's normalised steps would blow float-rounding differences of tiny gradients up
    common = ("trainer.max_iters=3", "trainer.val_every=100", "data.max_val_samples=2",
              "optimizer=sgd", "trainer.log_every=1")  # fmt: skip
    torchrun(tmp_path / "out", f"hydra.run.dir={tmp_path / 'two'}", "data.batch_size=2", *common)
    run_training(tmp_path / "one", "data.batch_size=4", *common)
    two, one = (
        weights(tmp_path / "two/checkpoints/last.pt"),
        weights(tmp_path / "one/checkpoints/last.pt"),
    )
    # The same global batches in the same order: only the order of float sums differs. Measured
    # after 3 SGD steps: loss 1e-5 to 1.2e-4, weights 4e-5, BatchNorm running statistics 9e-4
    # apart (relative); without SyncBN (each rank normalising its 2 images) 3e-3 to 1e-2 in the
    # loss, 5e-4 in the weights, 0.1 in the statistics.
    assert train_loss(tmp_path / "two") == pytest.approx(train_loss(tmp_path / "one"), rel=1e-3)
    assert relative_difference(two, one, running_stats=False) < 1e-4
    assert relative_difference(two, one, running_stats=True) < 1e-2


def relative_difference(a: dict, b: dict, running_stats: bool) -> float:
    """|a - b| / |b| over the floating-point weights, or over the BatchNorm running statistics."""

    def flat(state: dict) -> torch.Tensor:
        chosen = [v.flatten() for k, v in state.items()
                  if v.is_floating_point() and ("running_" in k) == running_stats]  # fmt: skip
        return torch.cat(chosen)

    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


def test_stopped_and_resumed_under_torchrun_equals_uninterrupted(tmp_path):
    torchrun(tmp_path / "out", f"hydra.run.dir={tmp_path / 'straight'}")
    stopped = tmp_path / "stopped"
    torchrun(
        tmp_path / "out", f"hydra.run.dir={stopped}", "trainer.max_iters=2", "scheduler.max_iters=4"
    )
    torchrun(tmp_path / "out", f"resume={stopped / 'checkpoints/last.pt'}", "trainer.max_iters=4")
    assert_same_weights(tmp_path / "straight", stopped)


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """The two runs' final weights (``checkpoints/last.pt``) are equal, tensor by tensor."""
    a, b = (weights(run / "checkpoints/last.pt") for run in (run_a, run_b))
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_kill_9_of_one_worker_restarts_the_group_which_resumes_and_finishes(tmp_path):
    run_dir = tmp_path / "run"
    overrides = (f"hydra.run.dir={run_dir}", f"output_root={tmp_path}", "trainer.max_iters=10",
                 "trainer.ckpt_every=1", "trainer.val_every=100", "resume=auto")  # fmt: skip
    command, environment = torchrun_command(
        tmp_path / "out", *overrides, launcher=("--max-restarts=1",)
    )
    launcher = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    last = run_dir / "checkpoints/last.pt"
    deadline = time.monotonic() + 200
    while not (last.exists() and load_checkpoint(last)["iteration"] >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline, "training ended early"
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, output[-4000:]
    assert "Resuming" in output
    assert load_checkpoint(last)["iteration"] == 10


def test_sigterm_to_torchrun_saves_and_every_rank_exits_143(tmp_path):
    run_dir = tmp_path / "run"
    overrides = (f"hydra.run.dir={run_dir}", "trainer.max_iters=500", "trainer.ckpt_every=1000")
    command, environment = torchrun_command(tmp_path / "out", *overrides)
    launcher = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 200
    log = run_dir / "train.log"
    while not (log.exists() and "iteration 3/500" in log.read_text()):
        assert launcher.poll() is None and time.monotonic() < deadline, "training ended early"
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=300)[0]
    assert exit_codes(tmp_path / "out") == [143, 143], output[-4000:]
    stopped = load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"]
    # every rank stopped after the same step
    assert output.count(f"SIGTERM: stopped at iteration {stopped} of 500") == 2, output[-4000:]


def test_an_error_on_one_rank_ends_the_job_with_its_message(tmp_path):
    started = time.monotonic()
    output = torchrun(
        tmp_path / "out", f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_iters=50",
        fails=True, SEG_TEST_FAIL="1:3",
    )  # fmt: skip
    assert "injected failure on rank 1" in output
    assert time.monotonic() - started < 120  # the other rank did not wait for its timeout
    # rank 0's lines are short: no collective's traceback, and only rank 1's "Error executing"
    assert "Connection closed by peer" not in output, output[-4000:]
    assert output.count("Error executing job") <= 1, output[-4000:]
    assert output.count("failed; saved") <= 1, output[-4000:]  # only rank 0 writes


def test_sync_bn_keeps_timm_activations_so_validation_equals_evaluate(tmp_path):
    # tu-efficientnet_b0's BatchNormAct2d layers: converted to plain SyncBatchNorm they lost
    # their activations, and the run validated another network than evaluate.py rebuilds.
    run_dir = tmp_path / "run"
    torchrun(tmp_path / "out", f"hydra.run.dir={run_dir}", "model.encoder_name=tu-efficientnet_b0",
             "trainer.max_iters=2", "data.max_val_samples=4")  # fmt: skip
    validated = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    evaluated = run_evaluation(f"checkpoint={run_dir / 'checkpoints/last.pt'}", "max_samples=4")
    assert evaluated["mIoU"] == validated["mIoU"]
    assert evaluated["IoU"] == validated["IoU"]


def test_a_shallow_encoder_depth_trains_under_torchrun(tmp_path):
    # depth 4 leaves layer4 unused: DDP stopped at iteration 2 ("Expected to have finished
    # reduction in the prior iteration")
    torchrun(tmp_path / "out", f"hydra.run.dir={tmp_path / 'run'}", "model=fpn",
             "model.encoder_name=resnet18", "model.encoder_depth=4", "trainer.max_iters=3",
             "trainer.val_every=100")  # fmt: skip
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["iteration"] == 3


def test_a_compile_failure_on_one_rank_makes_every_rank_go_on_eagerly(tmp_path):
    output = torchrun(tmp_path / "out", f"hydra.run.dir={tmp_path / 'run'}", "trainer.compile=true",
                      "trainer.max_iters=2", SEG_TEST_COMPILE_FAIL="1")  # fmt: skip
    assert "torch.compile failed (RuntimeError: injected compile failure" in output  # rank 1
    assert "torch.compile failed on another rank; continuing without it" in output  # rank 0
    rank0, rank1 = (torch.load(tmp_path / "out" / f"weights_rank{r}.pt") for r in range(2))
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
