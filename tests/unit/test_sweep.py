"""The sweep summary: read back from each job's record and its run's metrics.jsonl, best first,
failed jobs listed as failed; the Hydra callback that records the jobs; the Optuna search config."""

import csv
import json
import logging
import math
import pickle
from pathlib import Path

import pytest
from hydra import compose
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import OmegaConf

from seg.run_dir import RunResult
from seg.sweep import Job, SweepSummary, best_validation, format_summary, record_job, write_summary
from tests.conftest import hydra_context


def write_metrics(run_dir: Path, *mious: float) -> Path:
    """A run directory whose metrics.jsonl has one validation per value, every 2 iterations."""
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"iteration": 2 * (i + 1), "mIoU": m}) for i, m in enumerate(mious)]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run_dir


def read_summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_best_validation_is_the_first_of_the_highest_and_skips_nan(tmp_path):
    assert best_validation(write_metrics(tmp_path / "a", 0.1, 0.3, 0.3, 0.2)) == (0.3, 4)
    assert best_validation(write_metrics(tmp_path / "b", math.nan, 0.05)) == (0.05, 4)
    assert best_validation(write_metrics(tmp_path / "c")) is None  # never validated
    assert best_validation(tmp_path / "gone") is None


def test_summary_lists_runs_best_first_and_failed_jobs_as_failed(tmp_path):
    sweep = tmp_path / "sweep"
    low = write_metrics(sweep / "0", 0.2, 0.25)
    high = write_metrics(sweep / "1", 0.4, 0.3)  # its best is not its last validation
    diverged = write_metrics(sweep / "3", 0.5)  # failed after a good start: still listed last
    common = ["debug=tiny"]
    record_job(sweep, Job(0, ["optimizer.lr=0.001", *common], str(low)))
    record_job(sweep, Job(1, ["optimizer.lr=0.003", *common], str(high)))
    record_job(sweep, Job(2, ["optimizer.lr=-1", *common], None, "optimizer.lr=-1 is not allowed"))
    record_job(sweep, Job(3, ["optimizer.lr=1", *common], str(diverged), "non-finite loss"))

    rows = write_summary(sweep)

    lines = read_summary(sweep)
    assert [line["job"] for line in lines] == ["1", "0", "3", "2"]
    assert [line["status"] for line in lines] == ["completed", "completed", "failed", "failed"]
    assert float(lines[0]["mIoU"]) == 0.4 and lines[0]["iteration"] == "2"
    assert lines[0]["run_dir"] == str(high)
    assert lines[0]["overrides"] == "optimizer.lr=0.003 debug=tiny"
    assert lines[2]["mIoU"] == "0.5" and lines[2]["error"] == "non-finite loss"
    assert lines[3]["mIoU"] == lines[3]["run_dir"] == "" and "not allowed" in lines[3]["error"]
    table = format_summary(rows).splitlines()
    assert len(table) == 5 and "debug=tiny" not in "\n".join(table)  # shared by all: left out
    assert table[1].split()[:4] == ["0.4000", "2", "1", "optimizer.lr=0.003"]
    assert "failed: optimizer.lr=-1 is not allowed" in table[4]
    assert f"failed: non-finite loss ({diverged})" in table[3]


def test_run_result_is_the_float_optuna_reads_and_survives_pickling():
    result = pickle.loads(pickle.dumps(RunResult(0.25, Path("runs/0"))))
    assert float(result) == 0.25 and result == pytest.approx(0.25)
    assert result.run_dir == Path("runs/0")


def job_config(tmp_path: Path, num: int, mode: RunMode = RunMode.MULTIRUN):
    """What Hydra hands the callback for job ``num`` of a sweep in ``tmp_path / 'sweep'``."""
    sweep = tmp_path / "sweep"
    return OmegaConf.create(
        {
            "hydra": {
                "mode": mode,
                "sweep": {"dir": str(sweep)},
                "runtime": {"output_dir": str(sweep / str(num))},
                "job": {"num": num},
            }
        }
    )


def ended(status: JobStatus, value, *overrides: str) -> JobReturn:
    job_return = JobReturn(overrides=list(overrides), status=status)
    job_return.return_value = value
    return job_return


def test_the_callback_records_completed_and_failed_jobs(tmp_path, caplog):
    callback = SweepSummary()
    run_dir = write_metrics(tmp_path / "elsewhere", 0.1)  # e.g. a run that resume=auto continued
    callback.on_job_end(
        job_config(tmp_path, 0), ended(JobStatus.COMPLETED, RunResult(0.1, run_dir), "a=1")
    )
    user_error = ended(JobStatus.FAILED, ValueError("a=2 is wrong"), "a=2")
    callback.on_job_end(job_config(tmp_path, 1), user_error)
    bug = ended(JobStatus.FAILED, KeyError("x"), "a=3")
    callback.on_job_end(job_config(tmp_path, 2), bug)
    with caplog.at_level(logging.INFO):
        callback.on_multirun_end(job_config(tmp_path, 0))

    lines = read_summary(tmp_path / "sweep")
    assert [(line["job"], line["status"]) for line in lines] == [
        ("0", "completed"),
        ("1", "failed"),
        ("2", "failed"),
    ]
    assert lines[0]["run_dir"] == str(run_dir) and float(lines[0]["mIoU"]) == 0.1
    assert lines[1]["error"] == "a=2 is wrong"  # a user error: its message, as a single run
    assert lines[2]["error"] == "KeyError: 'x'"  # a bug: its type too, and its traceback logged
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.exc_info is not None for r in failures] == [False, True]
    assert "Sweep of 3 run(s)" in caplog.text
    # What the grid sweeper raises at its end: a user error is told with the summary of every
    # job (read then), without traceback (a CompactHydraException); a bug keeps its own.
    with pytest.raises(CompactHydraException) as raised:
        _ = user_error.return_value  # as the sweeper reads it
    message = str(raised.value).splitlines()
    assert message[:2] == [
        "Job #1 failed: a=2 is wrong",
        f"Sweep of 3 run(s), best val mIoU first ({tmp_path / 'sweep' / 'summary.csv'}):",
    ]
    assert len(message) == 2 + 1 + 3 and "failed: KeyError: 'x'" in message[-1]
    with pytest.raises(KeyError):
        _ = bug.return_value


def test_the_callback_leaves_a_single_run_alone(tmp_path):
    SweepSummary().on_job_end(
        job_config(tmp_path, 0, RunMode.RUN), ended(JobStatus.COMPLETED, RunResult(0.1, tmp_path))
    )
    assert not (tmp_path / "sweep").exists()


def test_the_optuna_search_maximizes_over_lr_loss_and_model():
    with hydra_context():
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode == RunMode.MULTIRUN
    assert sweeper.direction == "maximize" and sweeper.sampler.seed == cfg.seed
    assert set(sweeper.params) == {"optimizer.lr", "loss", "model"}
    assert sweeper.params["optimizer.lr"].startswith("tag(log")
