"""The MLflow tracker, read back with MLflow's own client: scalars, params and figures of a real
tiny run, the same MLflow run after a resume and an evaluation, and the error when MLflow is
missing."""

import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from seg.checkpoint import load_checkpoint
from seg.engine.trackers import MLFLOW_RUN_ID_FILE, MLflow
from tests.conftest import run_evaluation, run_training

mlflow_tracking = pytest.importorskip("mlflow.tracking")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: creating one takes MLflow about 6 s of migrations."""
    root = tmp_path_factory.mktemp("mlruns")
    return f"sqlite:///{root}/mlflow.db", str(root / "artifacts")


def client(store):
    return mlflow_tracking.MlflowClient(store[0])


def artifacts(client, run_id: str, path: str = "") -> list[str]:
    """Every artifact file of the run under ``path``, recursively."""
    found = []
    for info in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, info.path) if info.is_dir else [info.path]
    return found


def test_a_tiny_run_and_its_resume_are_one_mlflow_run(tmp_path, store):
    run_dir = tmp_path / "run"
    mlflow = [
        "tracker=mlflow",
        f"tracker.mlflow.tracking_uri={store[0]}",
        f"tracker.mlflow.artifact_location={store[1]}",
        "tracker.mlflow.experiment=e2e",
    ]
    run_training(run_dir, *mlflow, "trainer.max_iters=2", "scheduler.max_iters=4")
    run_id = (run_dir / MLFLOW_RUN_ID_FILE).read_text().strip()
    run_training(
        tmp_path / "ignored", f"resume={run_dir / 'checkpoints/last.pt'}", "trainer.max_iters=4"
    )
    best = run_dir / "checkpoints/best.pt"
    evaluation = run_evaluation(f"checkpoint={best}", "bootstrap=0", "num_worst=0")
    mlflow_client = client(store)
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.run_id == run_id and run.info.run_name == "run"
    assert run.info.status == "FINISHED"

    # The same curves as metrics.jsonl, under TensorBoard's tags.
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = mlflow_client.get_metric_history(run_id, "val/mIoU")
    assert [(point.step, point.value) for point in history] == [
        (line["iteration"], pytest.approx(line["mIoU"])) for line in lines
    ]
    assert [point.step for point in mlflow_client.get_metric_history(run_id, "train/loss")] == [
        1, 2, 3, 4
    ]  # fmt: skip
    assert "val_class/IoU/disc" in run.data.metrics
    # The resolved config by dotted key; a resume adds nothing and changes nothing.
    assert run.data.params["trainer.max_iters"] == "2"
    assert run.data.params["data.num_classes"] == "6"
    files = artifacts(mlflow_client, run_id)
    for step in (2, 4):
        for name in ("confusion", "iou", "example_0"):
            assert f"val/{name}/{step:08d}.png" in files
    assert (run_dir / "tb").is_dir()  # TensorBoard too

    # evaluate.py adds to the run, under its report's name, at the checkpoint's iteration, and
    # leaves the run's status as it was.
    iteration = load_checkpoint(best)["iteration"]
    history = mlflow_client.get_metric_history(run_id, "eval_val_best/mIoU")
    assert [(point.step, point.value) for point in history] == [
        (iteration, pytest.approx(evaluation["mIoU"]))
    ]
    assert "eval_val_best_class/IoU/disc" in run.data.metrics
    assert f"eval_val_best/confusion/{iteration:08d}.png" in files


def test_scalars_params_and_pictures_read_back(tmp_path, store):
    tracker = MLflow(*store, experiment="unit")
    params = {"trainer.max_iters": 4, "data.class_names": ["a", "b"], "resume": None}
    picture = np.zeros((4, 6, 3), np.uint8)
    with tracker.session(tmp_path, 0, params):
        # NaN: a class absent from the split; "(left)": a name MLflow refuses as it is
        tracker.scalars({"val/mIoU": 0.5, "val_class/IoU/car (left)": math.nan}, step=2)
        tracker.images({"val/confusion": picture}, step=2)
    mlflow_client = client(store)
    run = mlflow_client.get_run(tracker.run_id)
    assert run.data.params == {
        "trainer.max_iters": "4",
        "data.class_names": "['a', 'b']",
        "resume": "None",
    }
    assert run.data.metrics["val/mIoU"] == 0.5
    assert math.isnan(run.data.metrics["val_class/IoU/car _left_"])
    assert artifacts(mlflow_client, tracker.run_id) == ["val/confusion/00000002.png"]


def test_more_params_and_metrics_than_one_request_takes_all_arrive(tmp_path, store):
    tracker = MLflow(*store, experiment="unit")
    params = {f"key.{i}": i for i in range(250)}  # MLflow takes 100 params per request
    with tracker.session(tmp_path, 0, params):
        tracker.scalars({f"val_class/IoU/{i}": i / 1200 for i in range(1200)}, step=1)  # 1000
    run = client(store).get_run(tracker.run_id)
    assert run.data.params == {key: str(value) for key, value in params.items()}
    assert len(run.data.metrics) == 1200


def test_a_failed_session_marks_the_run_and_a_resume_reopens_it(tmp_path, store):
    tracker = MLflow(*store, experiment="unit")
    with pytest.raises(RuntimeError), tracker.session(tmp_path, 0, {"a": 1}):
        raise RuntimeError("the run broke")
    first = tracker.run_id
    mlflow_client = client(store)
    assert mlflow_client.get_run(first).info.status == "FAILED"
    with tracker.session(tmp_path, 2, {"a": 2, "b": 3}):
        assert tracker.run_id == first
        assert mlflow_client.get_run(first).info.status == "RUNNING"
    run = mlflow_client.get_run(first)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a": "1", "b": "3"}  # MLflow params never change


def test_an_evaluation_adds_to_the_run_and_leaves_its_status(tmp_path, store):
    tracker = MLflow(*store, experiment="unit")
    with pytest.raises(RuntimeError), tracker.session(tmp_path, 0, {"a": 1}):
        raise RuntimeError("the run broke")
    trained = tracker.run_id
    with tracker.session(tmp_path, 2, {}, report="eval_val_best"):
        tracker.scalars({"eval_val_best/mIoU": 0.25}, step=2)
    mlflow_client = client(store)
    run = mlflow_client.get_run(trained)
    assert tracker.run_id == trained and run.info.status == "FAILED"
    assert run.data.metrics["eval_val_best/mIoU"] == 0.25
    # a run directory without an MLflow run (trained without tracker=mlflow) gets one, closed
    (tmp_path / "tensorboard_only").mkdir()
    with tracker.session(tmp_path / "tensorboard_only", 2, {}, report="eval_val_best"):
        pass
    assert tracker.run_id != trained
    assert mlflow_client.get_run(tracker.run_id).info.status == "FINISHED"


def test_a_run_id_from_another_store_starts_a_new_run(tmp_path, store, caplog):
    (tmp_path / MLFLOW_RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    tracker = MLflow(*store, experiment="unit")
    with tracker.session(tmp_path, 2, {}):
        pass
    assert "does not hold" in caplog.text
    assert (tmp_path / MLFLOW_RUN_ID_FILE).read_text().strip() == tracker.run_id


def test_missing_mlflow_fails_before_the_run_takes_its_directory(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails
    with pytest.raises(
        ImportError, match=r"needs the package 'mlflow': pip install -e \"\.\[mlflow\]\""
    ):
        run_training(tmp_path / "run", "tracker=mlflow")
    assert not (tmp_path / "run").exists()


def test_a_store_mlflow_cannot_open_fails_before_the_run_takes_its_directory(tmp_path):
    with pytest.raises(ValueError, match=r"tracker.mlflow.tracking_uri=foo://x: MLflow cannot"):
        run_training(tmp_path / "run", "tracker=mlflow", "tracker.mlflow.tracking_uri=foo://x")
    assert not (tmp_path / "run").exists()


def test_a_store_folder_that_does_not_exist_is_created_aloud(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(
        mlflow_tracking,
        "MlflowClient",
        lambda uri: type("Client", (), {"search_experiments": lambda self, max_results: []})(),
    )  # no migrations
    with caplog.at_level(logging.WARNING):
        MLflow(f"sqlite:///{tmp_path}/nonexistent/mlflow.db")
    assert f"creating the folder {tmp_path}/nonexistent" in caplog.text
    assert (tmp_path / "nonexistent").is_dir()


def test_a_new_folder_at_the_top_of_the_file_system_is_refused(tmp_path):
    top = Path("/seg-test-nonexistent")
    assert not top.exists()
    with pytest.raises(ValueError, match=r"/seg-test-nonexistent/runs does not exist, and seg"):
        MLflow(f"sqlite:///{top}/runs/mlflow.db")  # sqlite:////... : an absolute path
    assert not top.exists()


def test_an_unreachable_server_is_an_error_within_seconds(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")  # the user's own setting is kept
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"tracking_uri=http://127.0.0.1:{port}: MLflow cannot"):
        MLflow(f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 20  # MLflow's default retries took about 250 s
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # set for the probe alone
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
