"""Run directories and run identity: one run per directory, and ``resume=auto`` takes up only
the run that the same command started.

A run directory belongs to the run that wrote its ``run.json`` (created exclusively, so two
jobs can never both claim one). A run's identity is ``run_name`` when set, else its
command-line overrides minus the ones that do not change what is trained (``resume``,
``trainer.max_iters``, ``trainer.early_stop_patience``, ``output_root``, ``hydra.*``).
"""

import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

from seg.checkpoint import newest_loadable_checkpoint
from seg.config import override_keys

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# Overrides that continue a run rather than define it: a re-submitted job may change them (the
# early-stop message says to resume with a larger patience).
NOT_IDENTITY = ("resume", "trainer.max_iters", "trainer.early_stop_patience", "output_root",
                "run_name")  # fmt: skip
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def run_identity(overrides: list[str], run_name: str | None = None) -> str:
    """``run_name=<name>`` when a name is given, else the sorted overrides that define the run."""
    if run_name:
        return f"run_name={run_name}"
    keys = override_keys(overrides)
    kept = [
        override
        for override, key in zip(overrides, keys, strict=True)
        # Where the curves go (tracker=mlflow) does not change what is trained.
        if key not in NOT_IDENTITY and not key.startswith(("hydra", "tracker"))
    ]
    return " ".join(sorted(kept))


def holds_run(directory: Path) -> bool:
    """Whether ``directory`` already holds (part of) a run: its claim, checkpoints or metrics."""
    return any((directory / name).exists() for name in (RUN_FILE, "checkpoints", "metrics.jsonl"))


def recorded_identity(run_dir: Path) -> str | None:
    """The identity in ``run_dir``'s run.json; for runs older than run.json, derived from the
    overrides stored in its newest checkpoint (None if none loads)."""
    try:
        return json.loads((run_dir / RUN_FILE).read_text())["identity"]
    except (OSError, ValueError, KeyError):
        found = newest_loadable_checkpoint(run_dir, resumable=False)  # any kind has overrides
        if found is None:
            return None
        stored = found[1].get("overrides", [])
        name = next((o.split("=", 1)[1] for o in stored if o.startswith("run_name=")), None)
        return run_identity(stored, name)


def find_resumable(root: Path, identity: str, run_dir: Path) -> tuple[Path, dict] | None:
    """``resume=auto``: the newest loadable checkpoint of ``run_dir`` when it holds one (the
    command named that directory), else of the newest run under ``root`` with ``identity``."""
    found = newest_loadable_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if found is not None or not root.is_dir():
        return found
    runs = {path.parent.parent for path in root.glob("**/checkpoints/*.pt")}
    matching = [run for run in runs if recorded_identity(run) == identity]
    if not matching and runs:
        log.warning(
            "resume=auto: the %d run(s) under %s were started by other commands (overrides "
            "other than this one's: %s); not resuming them. Resume one with resume=<its "
            "checkpoints/last.pt>, or give runs a run_name",
            len(runs), root, identity or "none",
        )  # fmt: skip
    newest_first = sorted(
        matching,
        key=lambda run: max(path.stat().st_mtime for path in run.glob("checkpoints/*.pt")),
        reverse=True,
    )
    for run in newest_first:
        found = newest_loadable_checkpoint(run)
        if found is not None:
            return found
    return None


def claim(run_dir: Path, identity: str, explicit: bool) -> Path:
    """Make ``run_dir`` this new run's own and return it.

    A directory that already holds a run is never reused: a directory the user named
    (``hydra.run.dir``) is refused; a default timestamped one shared with another job started in
    the same second becomes ``<dir>_1``, ``<dir>_2``, ...
    """
    candidate = run_dir
    for suffix in range(1, 1000):
        if not holds_run(candidate):
            candidate.mkdir(parents=True, exist_ok=True)
            record = {"identity": identity, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "command": sys.argv}  # fmt: skip
            try:
                # O_EXCL: of two jobs claiming the same directory at once, exactly one wins.
                descriptor = os.open(
                    candidate / RUN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
                )
            except FileExistsError:
                pass
            else:
                with os.fdopen(descriptor, "w") as file:
                    json.dump(record, file, indent=2)
                if candidate != run_dir:
                    log.warning("%s already holds another run: this run writes to %s",
                                run_dir, candidate)  # fmt: skip
                return candidate
        if explicit:
            refuse_taken(run_dir)
        candidate = run_dir.with_name(f"{run_dir.name}_{suffix}")
    raise FileExistsError(f"no free run directory next to {run_dir}")


def refuse_taken(run_dir: Path) -> None:
    """A new run never goes into a directory the user named that holds another run."""
    if holds_run(run_dir) and not any(run_dir.glob("checkpoints/*.pt")):
        # Killed before its first save: resume=auto found nothing, and resume=<last.pt> would
        # name a file that does not exist.
        raise FileExistsError(
            f"hydra.run.dir={run_dir} holds a run that stopped before its first checkpoint: "
            f"there is nothing in it to continue. Delete {run_dir} to start again there, or "
            "choose a new hydra.run.dir"
        )
    if holds_run(run_dir):
        raise FileExistsError(
            f"hydra.run.dir={run_dir} already holds a run: a new run would overwrite its "
            f"checkpoints and metrics. Continue it with resume={run_dir}/checkpoints/last.pt "
            "(or resume=auto), or choose a new hydra.run.dir"
        )


def remove_if_empty(directory: Path, root: Path) -> None:
    """Remove ``directory`` (what Hydra created up front for a run that failed to start or
    continued elsewhere, wherever ``hydra.run.dir`` put it) and its empty parents up to ``root``
    (``output_root``), that one included; never the current directory or one that holds a
    file."""
    root = root.resolve()
    directory = directory.resolve()
    here = Path.cwd().resolve()
    while directory != here and directory not in here.parents:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (or not ours to remove)
        if directory == root or root not in directory.parents:
            return
        directory = directory.parent


class RunResult(float):
    """A run's best validation score (the task's primary metric; NaN if it never validated),
    which also names its run directory.

    A float, because that is what Hydra's Optuna sweeper maximizes of what a job returns; the
    directory tells a sweep's summary (seg/sweep.py) where the job trained: its own directory,
    a ``_1`` one beside it, or the earlier run that ``resume`` continued.
    """

    run_dir: Path

    def __new__(cls, best_score: float, run_dir: Path):
        result = super().__new__(cls, best_score)
        result.run_dir = run_dir
        return result

    def __reduce__(self):  # launchers that run jobs in other processes pickle the result
        return RunResult, (float(self), self.run_dir)


class RunLog:
    """``train.log`` for the run directory decided during start-up: records logged before the
    directory is known are held in memory and written first, so the file has them all."""

    def __init__(self):
        self.buffer = logging.handlers.MemoryHandler(
            capacity=10_000, flushLevel=logging.CRITICAL + 1
        )
        self.file: logging.FileHandler | None = None
        logging.getLogger().addHandler(self.buffer)

    def write_to(self, run_dir: Path) -> None:
        self.file = logging.FileHandler(run_dir / "train.log")
        self.file.setFormatter(logging.Formatter(LOG_FORMAT))
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        logging.getLogger().removeHandler(self.buffer)
        logging.getLogger().addHandler(self.file)

    def close(self) -> None:
        for handler in (self.buffer, self.file):
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
