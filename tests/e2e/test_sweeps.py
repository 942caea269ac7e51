"""Sweeps as a user runs them: `python train.py -m ...` and `hparams_search=optuna`, each job in
its own run directory, a summary best first that keeps failed jobs, resume=auto per job."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY


def train_py(output_root: Path, *arguments: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "train.py", *arguments, *TINY, f"output_root={output_root}"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    result.output = result.stdout + result.stderr
    return result


def sweep_dirs(output_root: Path) -> list[Path]:
    return sorted(output_root.glob("multirun/*/*"))


def summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as file:
        return list(csv.DictReader(file))


def best_miou(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(line)["mIoU"] for line in lines)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Two runs and a job with a bad value: the grid goes on past it, then fails the command."""
    output_root = tmp_path_factory.mktemp("grid")
    result = train_py(output_root, "-m", "optimizer.lr=1e-3,3e-3,-1")
    return output_root, result


def test_a_grid_sweep_runs_each_job_in_its_own_directory(grid):
    output_root, result = grid
    assert result.returncode == 1, result.output[-3000:]  # the failed job fails the command
    (sweep_dir,) = sweep_dirs(output_root)
    assert sorted(p.name for p in sweep_dir.iterdir() if (p / "run.json").exists()) == ["0", "1"]
    for num, lr in (("0", "0.001"), ("1", "0.003")):
        run_dir = sweep_dir / num
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()
        log = (run_dir / "train.log").read_text()
        assert log.count("Training on") == 1 and str(run_dir) in log  # its own lines only
    assert not (sweep_dir / "2").exists()  # the job with the bad value wrote nothing


def test_the_summary_lists_each_run_best_first_and_the_failed_job(grid):
    output_root, result = grid
    (sweep_dir,) = sweep_dirs(output_root)
    lines = summary(sweep_dir)
    assert [line["status"] for line in lines] == ["completed", "completed", "failed"]
    assert float(lines[0]["mIoU"]) >= float(lines[1]["mIoU"])
    for line in lines[:2]:
        run_dir = Path(line["run_dir"])
        assert run_dir.parent == sweep_dir.resolve()
        assert float(line["mIoU"]) == best_miou(run_dir)
        lr = {"0": "0.001", "1": "0.003"}[run_dir.name]  # Hydra writes 1e-3 as 0.001
        assert line["overrides"].split()[0] == f"optimizer.lr={lr}"
    assert lines[2]["overrides"].split()[0] == "optimizer.lr=-1" and lines[2]["run_dir"] == ""
    assert "optimizer.lr=-1 is not allowed" in lines[2]["error"]
    assert "Job #2 (optimizer.lr=-1" in result.output  # said when the job failed, too
    # and the command ends with it and the summary table, not a traceback
    assert "Traceback" not in result.output
    assert "Sweep of 3 run(s), best val mIoU first" in result.output.split("Job #2 failed:")[1]


def test_resume_auto_in_a_sweep_continues_the_jobs_own_run(grid):
    output_root, _ = grid
    (first,) = sweep_dirs(output_root)
    result = train_py(output_root, "-m", "optimizer.lr=3e-3", "resume=auto", "trainer.max_iters=6")
    assert result.returncode == 0, result.output[-3000:]
    second = sweep_dirs(output_root)[1]
    (line,) = summary(second)
    run_dir = first / "1"  # the run of optimizer.lr=3e-3, not the one of 1e-3
    assert line["run_dir"] == str(run_dir.resolve())
    assert [json.loads(x)["iteration"] for x in (run_dir / "metrics.jsonl").open()] == [2, 4, 6]
    assert float(line["mIoU"]) == best_miou(run_dir)
    assert not (second / "0").exists()  # the new job's own directory went unused


def test_an_optuna_search_writes_its_summary_and_best_value(tmp_path):
    result = train_py(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.output[-3000:]
    (sweep_dir,) = sweep_dirs(tmp_path)
    lines = summary(sweep_dir)
    assert [line["status"] for line in lines] == ["completed", "completed"]
    for line in lines:
        assert float(line["mIoU"]) == best_miou(Path(line["run_dir"]))
    optuna = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert optuna["best_value"] == float(lines[0]["mIoU"])
    assert all(
        f"{key}={value}" in lines[0]["overrides"] for key, value in optuna["best_params"].items()
    )
    assert "Sweep of 2 run(s), best val mIoU first" in result.output
