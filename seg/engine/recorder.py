"""What a training run writes: checkpoints, the trackers (TensorBoard, MLflow), metrics.jsonl,
figures, the class table, progress and the loss lines. The entry point builds one; the Trainer
calls it at its ``if iteration % every == 0`` lines and never asks which rank it is: on every
rank but rank 0 (``write=False``, no trackers) nothing is written or printed."""

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seg.checkpoint import run_state, save_checkpoint
from seg.engine import dist
from seg.engine.task import Report
from seg.engine.trackers import Tracker
from seg.visualize import save_png

log = logging.getLogger(__name__)


class Recorder:
    """Writes the run directory ``run_dir`` (docs/training.md, "Outputs").

    ``class_names``, ``palette``, ``config_yaml`` and
    ``overrides`` also go into every checkpoint, so that a checkpoint rebuilds its model alone.
    ``trackers`` receive the scalars and pictures, and ``params`` (the resolved config by dotted
    key) when they open.
    """

    def __init__(
        self,
        run_dir: str | Path,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        config_yaml: str = "",
        overrides: Sequence[str] = (),
        write: bool = True,
        trackers: Sequence[Tracker] = (),
        params: Mapping[str, Any] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.class_names = list(class_names)
        self.palette = [list(color) for color in palette]
        self.config_yaml = config_yaml
        self.overrides = list(overrides)
        self.write = write
        self.trackers = list(trackers)
        self.params = dict(params or {})
        self.bar: tqdm | None = None
        self.seconds = {"training steps": 0.0, "validation": 0.0, "checkpoints": 0.0}
        # The loss between two log lines, summed on the device: no host sync per step.
        self.loss_sum = torch.zeros(())
        self.applied_steps = torch.zeros(())
        self.steps = 0
        self.clock = time.perf_counter()
        self.images_per_step = 0

    def checkpoint_path(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / f"{name}.pt"

    @contextmanager
    def session(
        self, iteration: int, max_iters: int, images_per_step: int, device: torch.device
    ) -> Iterator[None]:
        """Open the trackers and the progress bar for a ``fit`` from ``iteration``; on resume,
        metrics.jsonl and TensorBoard drop what the interrupted run logged after its checkpoint."""
        self.images_per_step = images_per_step
        self.loss_sum = torch.zeros((), device=device)
        self.applied_steps = torch.zeros((), device=device)
        self.restart_clock()
        if not self.write:
            yield
            return
        self.truncate_metrics(iteration)
        with ExitStack() as trackers:
            for tracker in list(self.trackers):
                trackers.enter_context(self.tracker_session(tracker, iteration))
            with (
                logging_redirect_tqdm(),
                tqdm(total=max_iters, initial=iteration, disable=None, unit="it") as self.bar,
            ):
                self.restart_clock()  # img/s leaves out opening a tracker (an MLflow run: ~1 s)
                yield
        self.bar = None
        log.info(
            "Time: " + ", ".join(f"{value:.1f} s {name}" for name, value in self.seconds.items())
        )

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the block's wall time to the breakdown logged at the end."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def step(self, loss: torch.Tensor, applied: torch.Tensor) -> None:
        """Count a training step; ``loss`` enters the average if the step was ``applied`` (both
        on the device, added there: no host sync)."""
        self.steps += 1
        self.loss_sum += torch.where(applied, loss.detach(), 0.0)  # a skipped NaN stays out
        self.applied_steps += applied
        if self.bar is not None:
            self.bar.update()

    def training(self, iteration: int, max_iters: int, lr: float, skipped_steps: int) -> None:
        """The loss (the mean over all ranks' batches), LR and speed since the last call:
        trackers, progress bar, train.log. Called on every rank at the same iteration."""
        # Summed over ranks: every rank applied the same steps, so this is the global mean.
        window = torch.stack([self.loss_sum, self.applied_steps])
        loss_sum, applied = dist.sum_over_ranks(window).tolist()  # the sync between log lines
        if self.write:
            loss = loss_sum / max(applied, 1)
            images_per_s = self.steps * self.images_per_step / (time.perf_counter() - self.clock)
            values = {"train/loss": loss, "train/lr": lr, "train/img_per_s": images_per_s,
                      "train/skipped_steps": skipped_steps}  # fmt: skip
            self.to_trackers(lambda tracker: tracker.scalars(values, iteration))
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
            # Also under a progress bar (printed above it): train.log keeps the history.
            log.info(
                "iteration %d/%d  loss %.4f  lr %.3e  %.1f img/s",
                iteration, max_iters, loss, lr, images_per_s,
            )  # fmt: skip
        self.restart_clock()

    def to_trackers(self, call: Callable[[Tracker], None]) -> None:
        """``call`` on every tracker still working; one that fails is switched off."""
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as error:  # any library's (SQLAlchemy, HTTP): the run goes on
                self.tracker_failed(tracker, error)

    def tracker_failed(self, tracker: Tracker, error: Exception) -> None:
        """Report a tracker's failure once and switch it off: a tracker never costs steps."""
        if tracker not in self.trackers:
            return  # switched off already (its session's end fails like its writes did)
        self.trackers.remove(tracker)
        log.error(
            "Tracker %s failed (%s: %s); training goes on without it: metrics.jsonl, train.log "
            "and the checkpoints keep everything", type(tracker).__name__, type(error).__name__,
            (str(error).strip().splitlines() or [""])[0],
        )  # fmt: skip

    @contextmanager
    def tracker_session(self, tracker: Tracker, iteration: int) -> Iterator[None]:
        """``tracker``'s session; one failing to open or close is reported and switched off,
        while an error of the training inside it propagates unchanged."""
        opened, training_error = False, None
        try:
            with tracker.session(self.run_dir, iteration, self.params):
                opened = True
                try:
                    yield
                except BaseException as error:
                    training_error = error
                    raise
        except Exception as error:
            if error is training_error:
                raise
            self.tracker_failed(tracker, error)
            if training_error is not None:
                raise training_error from None
            if not opened:
                yield

    def restart_clock(self) -> None:
        """Start a new averaging window (img/s counts training time only)."""
        self.loss_sum.zero_()
        self.applied_steps.zero_()
        self.steps = 0
        self.clock = time.perf_counter()

    def validation(self, iteration: int, report: Report) -> None:
        """Scalars, figures, the table and a metrics.jsonl line for one validation."""
        if not self.write:
            return
        tagged = {f"val/{name}": array for name, array in report.pictures.items()}
        self.to_trackers(lambda tracker: tracker.scalars(report.scalars, iteration))
        self.to_trackers(lambda tracker: tracker.images(tagged, iteration))
        for name, array in report.pictures.items():
            if not name.startswith("example"):
                save_png(array, self.run_dir / "figures" / f"val_{name}.png")
        log.info("Validation at iteration %d:\n%s", iteration, report.table)
        with open(self.run_dir / "metrics.jsonl", "a") as file:
            # The primary metric first: sweeps read it there (seg/sweep.py).
            record = {"iteration": iteration, report.metric: report.score, **report.record}
            file.write(json.dumps(record) + "\n")

    def save(self, state: Callable[[], dict], name: str) -> Path:
        """Write ``checkpoints/<name>.pt`` from ``state()`` plus what rebuilds the model."""
        path = self.checkpoint_path(name)
        if self.write:
            run = run_state(self.config_yaml, self.overrides, self.class_names, self.palette)
            save_checkpoint(state() | run, path)
        return path

    def keep_snapshot(self, iteration: int, keep: int) -> None:
        """Keep ``last.pt`` of ``iteration`` as ``checkpoints/iter_<iteration>.pt`` too, and only
        the ``keep`` newest such snapshots (``trainer.keep_checkpoints``; 0: none). A hard link:
        no disk is used until last.pt is replaced by a newer one."""
        if not self.write or keep == 0:
            return
        last = self.checkpoint_path("last")
        snapshot = self.checkpoint_path(f"iter_{iteration:07d}")
        snapshot.unlink(missing_ok=True)  # a resumed run passing the same iteration again
        try:
            os.link(last, snapshot)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(last, snapshot)
        for old in sorted(last.parent.glob("iter_*.pt"))[:-keep]:
            old.unlink()

    def truncate_metrics(self, iteration: int) -> None:
        """Keep only the metrics.jsonl lines up to ``iteration`` (the restored one)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        whole = lines
        if lines and not lines[-1].endswith("\n"):
            # A kill while the line was written: it belongs to no checkpoint (they follow it).
            log.warning("Dropping the torn last line of %s (the run was stopped while writing "
                        "it): %r", path, lines[-1][:80])  # fmt: skip
            whole = lines[:-1]
        try:
            kept = [line for line in whole if json.loads(line)["iteration"] <= iteration]
        except (ValueError, KeyError) as error:
            raise ValueError(f"{path} is damaged ({error!r}): remove its broken lines") from None
        if len(kept) != len(lines):
            path.write_text("".join(kept))
