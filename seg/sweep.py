"""Sweeps (``python train.py -m ...``, ``hparams_search=optuna``): what each job did, and one
summary of the sweep's runs, best validation score (mIoU, mask_AP) first, in ``<sweep dir>/summary.csv`` and on the
console.

Everything is read back from files, not kept in memory: a launcher may run the jobs in other
processes or on other machines, and a sweep that stops early (a failed grid job, Ctrl-C) keeps
the summary of the jobs that ended. Each ended job leaves ``<sweep dir>/jobs/<num>.json``
(its overrides, whether it failed and why, where it trained); its best score and the
iteration of that best come from that run directory's ``metrics.jsonl``.
"""

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from seg.config import USER_ERRORS
from seg.engine.guard import StopTraining
from seg.run_dir import RUN_FILE

log = logging.getLogger(__name__)

# Failures that a single run reports by their message alone (seg.config.report_user_errors, a
# stopped run); any other is a bug and keeps its type and traceback.
EXPECTED_FAILURES = (*USER_ERRORS, StopTraining)

JOBS = "jobs"  # <sweep dir>/jobs/<num>.json, one per ended job
SUMMARY = "summary.csv"


@dataclass
class Job:
    """One ended job of a sweep, as ``jobs/<num>.json`` keeps it."""

    num: int  # Hydra's job number (hydra.job.num)
    overrides: list[str]  # the job's command-line overrides
    run_dir: str | None  # where it trained; None: it failed before it had a run directory
    error: str | None = None  # why it failed; None: it completed


@dataclass
class Row:
    """One line of the summary."""

    job: int  # the job's number
    status: str  # completed or failed
    score: float | None  # the run's best validation score (None: no validation)
    metric: str | None  # its metric: the task's primary one (mIoU, mask_AP)
    iteration: int | None  # the iteration of that best
    run_dir: str | None
    overrides: str  # space-separated
    error: str | None


def record_job(sweep_dir: Path, job: Job) -> None:
    """Keep ``job`` in ``<sweep_dir>/jobs/<num>.json`` (the sweep directory may be gone: a
    job that failed to start removes the directories it did not use)."""
    path = sweep_dir / JOBS / f"{job.num}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(job), indent=2))


def best_validation(run_dir: Path) -> tuple[float, int] | None:
    """The best validation score in ``run_dir``'s metrics.jsonl (of each line's first metric,
    the task's primary one) and its iteration (on a tie the first, as the Trainer keeps it);
    None when the run never validated."""
    best = best_scored(run_dir)
    return None if best is None else best[:2]


def best_scored(run_dir: Path) -> tuple[float, int, str] | None:
    """``best_validation`` with the metric's name."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # Each line's first key after the iteration is the task's primary metric (the Recorder's
    # order): mIoU, mask_AP.
    metrics = [next((key for key in line if key != "iteration"), "mIoU") for line in lines]
    scored = [(line.get(metric, math.nan), line["iteration"], metric)
              for line, metric in zip(lines, metrics, strict=True)]  # fmt: skip
    scored = [score for score in scored if math.isfinite(score[0])]
    if not scored:
        return None
    return max(scored, key=lambda score: score[0])  # max keeps the first of equals


def summarize(sweep_dir: Path) -> list[Row]:
    """The sweep's ended jobs, completed ones by best validation score (highest first), then
    the failed ones (with what their runs reached, if anything); and the score's metric (mIoU,
    mask_AP: the task's)."""
    rows = []
    for path in (sweep_dir / JOBS).glob("*.json"):
        job = Job(**json.loads(path.read_text()))
        best = best_scored(Path(job.run_dir)) if job.run_dir else None
        rows.append(
            Row(
                job=job.num,
                status="failed" if job.error is not None else "completed",
                score=best[0] if best else None,
                metric=best[2] if best else None,
                iteration=best[1] if best else None,
                run_dir=job.run_dir,
                overrides=" ".join(job.overrides),
                error=job.error,
            )
        )
    rows = sorted(
        rows,
        key=lambda row: (
            row.status != "completed",
            -row.score if row.score is not None else math.inf,
            row.job,
        ),
    )
    return rows


def score_name(rows: list[Row]) -> str:
    """The name of the rows' score: their metric (mIoU for semantic sweeps), or ``score`` when
    the jobs differ (a sweep over tasks)."""
    metrics = {row.metric for row in rows if row.metric is not None}
    return metrics.pop() if len(metrics) == 1 else "score"


def write_summary(sweep_dir: Path) -> list[Row]:
    """Write ``<sweep_dir>/summary.csv`` from the jobs' files, the score's column named by its
    metric; returns its rows."""
    rows = summarize(sweep_dir)
    metric = score_name(rows)
    columns = [metric if field.name == "score" else field.name for field in fields(Row)]
    with open(sweep_dir / SUMMARY, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(
            {metric if key == "score" else key: value for key, value in asdict(row).items()}
            for row in rows
        )
    return rows


def format_summary(rows: list[Row]) -> str:
    """The summary as a table for people; the overrides that all its jobs share are left out."""
    metric = score_name(rows)
    if len(rows) > 1:
        shared = set.intersection(*(set(row.overrides.split()) for row in rows))
    else:
        shared = set()
    overrides = [" ".join(o for o in row.overrides.split() if o not in shared) for row in rows]
    width = max(len("overrides"), *map(len, overrides))
    lines = [f"{metric:>7}  {'iteration':>9}  {'job':>4}  {'overrides':{width}}  run directory"]
    for row, changed in zip(rows, overrides, strict=True):
        where = row.run_dir or ""
        if row.error is not None:
            where = f"failed: {row.error.splitlines()[0]}" + (f" ({where})" if where else "")
        score = "-" if row.score is None else f"{row.score:.4f}"
        iteration = "-" if row.iteration is None else row.iteration
        lines.append(f"{score:>7}  {iteration:>9}  {row.job:>4}  {changed:{width}}  {where}")
    return "\n".join(lines)


def describe_failure(error: BaseException) -> str:
    """A failed job's error as the summary shows it."""
    if isinstance(error, EXPECTED_FAILURES) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"


class SweepJobFailed(CompactHydraException):
    """A job's user error as the sweep ends with it: Hydra's grid sweeper raises the first
    failed job's error once all ran, and prints a ``CompactHydraException`` as its message
    alone. The message ends with the summary, read when printed: then every job has ended."""

    def __init__(self, sweep_dir: Path, num: int, error: str):
        super().__init__(error)
        self.sweep_dir, self.num, self.error = sweep_dir, num, error

    def __str__(self) -> str:
        rows = summarize(self.sweep_dir)
        return (
            f"Job #{self.num} failed: {self.error}\nSweep of {len(rows)} run(s), best val "
            f"{score_name(rows)} first ({self.sweep_dir / SUMMARY}):\n{format_summary(rows)}"
        )


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in configs/train.yaml): records each job of a sweep
    when it ends, rewrites the summary, and prints it when the sweep ends."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return  # a single run: nothing to summarize
        sweep_dir = Path(config.hydra.sweep.dir)
        job_dir = Path(config.hydra.runtime.output_dir)
        num = config.hydra.job.num
        overrides = list(job_return.overrides)
        # ._return_value: the task's result, or a failed job's exception (.return_value would
        # raise it)
        result = job_return._return_value
        if job_return.status == JobStatus.COMPLETED:
            job = Job(num, overrides, str(Path(result.run_dir).resolve()))
        else:
            # A run that failed after it took its directory: Hydra's for a new run (one that
            # resumed elsewhere fails without its directory in the summary)
            claimed = (job_dir / RUN_FILE).is_file()
            job = Job(num, overrides, str(job_dir) if claimed else None, describe_failure(result))
            log.error(
                "Job #%d (%s) failed: %s",
                num, " ".join(overrides), job.error,
                exc_info=None if isinstance(result, EXPECTED_FAILURES) else result,
            )  # fmt: skip
        record_job(sweep_dir, job)
        if isinstance(result, EXPECTED_FAILURES):
            # The sweep would end in this error's traceback, without on_multirun_end's summary.
            job_return._return_value = SweepJobFailed(sweep_dir, num, job.error)
        # After every job: a sweep that ends early still has the summary of the jobs that ended.
        write_summary(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        log.info(
            "Sweep of %d run(s), best val %s first (%s):\n%s",
            len(rows), score_name(rows), sweep_dir / SUMMARY, format_summary(rows),
        )  # fmt: skip
