"""Where a run's curves and figures go besides metrics.jsonl and figures/: TensorBoard (the
default) and MLflow, chosen by ``configs/tracker/``. The Recorder calls them on rank 0 only; a
tracker is a class with the three methods of ``Tracker`` (docs/trackers.md)."""

import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from seg.visualize import add_png, save_png

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def session(
        self, run_dir: Path, iteration: int, params: Mapping[str, Any], report: str | None = None
    ) -> AbstractContextManager[None]:
        """Open for a ``fit`` of the run in ``run_dir`` from ``iteration`` (0: a new run, else
        a resume); ``params``: the resolved config by dotted key (``trainer.max_iters``).
        With ``report`` (``eval_val_best``): for an evaluation of the run's checkpoint of
        ``iteration``, whose values and pictures go beside the run's own (no ``params``)."""
        ...

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Values by tag (``train/loss``, ``val/mIoU``, ``val_class/IoU/<class>``) at
        iteration ``step``."""
        ...

    def images(self, pictures: Mapping[str, np.ndarray], step: int) -> None:
        """(H, W, 3) uint8 RGB pictures by tag (``val/confusion``) at iteration ``step``."""
        ...


class TensorBoard:
    """Event files in ``<run_dir>/tb`` (docs/trackers.md, "TensorBoard")."""

    def __init__(self) -> None:
        self.writer: SummaryWriter | None = None

    @contextmanager
    def session(
        self, run_dir: Path, iteration: int, params: Mapping[str, Any], report: str | None = None
    ) -> Iterator[None]:
        # No params: add_hparams would add a run of its own beside every run's curves, and
        # config.yaml already holds them.
        if report is None:
            folder = run_dir / "tb"
            # On resume, TensorBoard hides what the interrupted run logged after its checkpoint.
            purge_step = iteration + 1 if iteration else None
        else:
            # A TensorBoard run of its own per report (settings never mix); it hides what an
            # earlier evaluation of the same iteration wrote: a repeat replaces, not doubles.
            folder = run_dir / "tb" / report
            purge_step = iteration
        with SummaryWriter(folder, purge_step=purge_step) as self.writer:
            yield
        self.writer = None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # curves show up in a running TensorBoard now, not in 2 min

    def images(self, pictures: Mapping[str, np.ndarray], step: int) -> None:
        for tag, array in pictures.items():
            add_png(self.writer, tag, array, step)
        self.writer.flush()


# The file in the run directory that names its MLflow run: a resume continues that run.
MLFLOW_RUN_ID_FILE = "mlflow_run_id"

# The start-up probe of a server: an unreachable one is an error within seconds, not after
# MLflow's default 7 retries with doubling waits (about 250 s). Training keeps MLflow's
# defaults (a short outage mid-run is retried); variables the user set are kept.
PROBE_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # waits of 1 and 2 s
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # seconds per request
}


@contextmanager
def environment_defaults(settings: Mapping[str, str]) -> Iterator[None]:
    """``settings`` in ``os.environ`` while the block runs, where not set already."""
    added = {name: value for name, value in settings.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class MLflow:
    """One MLflow run per seg run: the scalars as metrics (same names), the resolved config as
    params, the pictures as PNG artifacts ``<tag>/<iteration>.png``.

    ``tracking_uri``: a store (``sqlite:///path/mlflow.db``) or server (``http://host:5000``);
    ``artifact_location``: where a new ``experiment`` keeps its runs' files (None: the store's
    default). The run is named after the run directory, which keeps its id in
    ``mlflow_run_id``.
    """

    def __init__(
        self, tracking_uri: str, artifact_location: str | None = None, experiment: str = "seg"
    ):
        # Checked here, before the run takes its directory: the entry point builds trackers
        # with the other checks.
        try:
            import mlflow  # noqa: F401

            if tracking_uri.startswith("sqlite:"):
                # mlflow-skinny leaves out what its SQLite store needs.
                import alembic  # noqa: F401
                import sqlalchemy  # noqa: F401
        except ImportError as error:
            raise ImportError(
                f"tracker=mlflow needs the package '{error.name}': pip install -e \".[mlflow]\""
            ) from error
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.experiment = experiment
        self.client = self.open_store()
        self.run_id: str | None = None

    def open_store(self):
        """A client of the store, checked with a first request: a tracking_uri that MLflow
        cannot open fails here, with the other checks, not once training has started."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if self.tracking_uri.startswith("sqlite:///"):
            # SQLite creates the database file but not its folder.
            folder = Path(self.tracking_uri.removeprefix("sqlite:///")).absolute().parent
            if not folder.is_dir():
                # A new top-level folder (sqlite://// + a typo) is a mistake, never a store.
                if len(folder.parents) > 1 and not folder.parents[-2].exists():
                    raise ValueError(
                        f"tracker.mlflow.tracking_uri={self.tracking_uri}: {folder} does not "
                        f"exist, and seg does not create folders at the top of the file system "
                        f"({folder.parents[-2]}). Create it, or give a path under an existing "
                        "folder (sqlite:///relative/path/mlflow.db, sqlite:////absolute/path/"
                        "mlflow.db)"
                    )
                log.warning("tracker.mlflow.tracking_uri=%s: creating the folder %s for it",
                            self.tracking_uri, folder)  # fmt: skip
                folder.mkdir(parents=True, exist_ok=True)
        try:
            client = MlflowClient(self.tracking_uri)
            with environment_defaults(PROBE_HTTP_SETTINGS):
                client.search_experiments(max_results=1)
        except MlflowException as error:
            raise ValueError(
                f"tracker.mlflow.tracking_uri={self.tracking_uri}: MLflow cannot open this store "
                f"({error.message.strip().splitlines()[0]}). Give sqlite:///<path>/mlflow.db "
                "for a local store, or http://<host>:<port> of a running MLflow server"
            ) from error
        return client

    @contextmanager
    def session(
        self, run_dir: Path, iteration: int, params: Mapping[str, Any], report: str | None = None
    ) -> Iterator[None]:
        # No purge on resume (``iteration``): MLflow cannot delete metric points, so what an
        # interrupted run logged after its checkpoint stays beside the resumed run's values.
        recorded = self.recorded_run(run_dir)
        self.run_id = recorded or self.new_run(run_dir)
        if report is not None and recorded is not None:
            # An evaluation adds to the run and leaves its status: it may still be training.
            yield
            return
        if recorded is not None:
            self.client.update_run(recorded, status="RUNNING")
        if report is None:
            self.log_params(params)
        status = "FAILED"  # also after a stop signal: a resume sets it back to RUNNING
        try:
            yield
            status = "FINISHED"
        finally:
            self.client.set_terminated(self.run_id, status)

    def recorded_run(self, run_dir: Path) -> str | None:
        """The id of the MLflow run this run directory started; None for a new seg run, or
        when the store does not hold that run (another tracking_uri)."""
        from mlflow.exceptions import MlflowException

        path = run_dir / MLFLOW_RUN_ID_FILE
        if not path.is_file():
            return None
        run_id = path.read_text().strip()
        try:
            self.client.get_run(run_id)
        except MlflowException as error:
            log.warning("%s names MLflow run %s, which %s does not hold (%s): this run continues "
                        "in a new MLflow run", path, run_id, self.tracking_uri,
                        error.message)  # fmt: skip
            return None
        return run_id

    def new_run(self, run_dir: Path) -> str:
        """Create the run in ``experiment`` (created too if need be) and record its id."""
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            experiment_id = self.client.create_experiment(
                self.experiment, artifact_location=self.artifact_location
            )
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(
            experiment_id, run_name=run_dir.name, tags={"seg.run_dir": str(run_dir.resolve())}
        )
        (run_dir / MLFLOW_RUN_ID_FILE).write_text(run.info.run_id + "\n")
        return run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a logged param: a resumed run keeps its first values
        # (train.log names the settings a resume changed) and adds only new keys.
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(mlflow_name(key), str(value)) for key, value in params.items()]
        new = [param for param in new if param.key not in logged]
        self.client.log_batch(self.run_id, params=new)  # split into the store's limits by MLflow

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # milliseconds, as MLflow counts
        metrics = [Metric(mlflow_name(tag), float(value), now, step)
                   for tag, value in values.items()]  # fmt: skip
        self.client.log_batch(self.run_id, metrics=metrics)

    def images(self, pictures: Mapping[str, np.ndarray], step: int) -> None:
        # seg's PNG encoder (seg.visualize) rather than log_image's slower PIL one; one upload
        # for all of them.
        with tempfile.TemporaryDirectory() as folder:
            for tag, array in pictures.items():
                save_png(array, Path(folder) / tag / f"{step:08d}.png")
            self.client.log_artifacts(self.run_id, folder)


def mlflow_name(name: str) -> str:
    """``name`` with what MLflow refuses in metric and param names (a class name's comma or
    parenthesis) replaced by ``_``."""
    return re.sub(r"[^\w./ -]", "_", name)
