"""Exactly-once metrics across a restart (issue #20, item 7): ``tasks.io.tracking.MetricLogger`` on a
real MLflow store (SQLite + a local artifact folder). A second logger on the same run stands for the
resumed worker group's rank 0, which re-runs the epoch after its last checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from condgen.tasks.io.tracking import MetricLogger, logged_image_steps, logged_steps


@pytest.fixture
def run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("idempotent", artifact_location=(tmp_path / "art").as_uri())
    return uri, client, client.create_run(exp).info.run_id


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_resumed_logger_does_not_log_an_epoch_twice(run):
    uri, client, run_id = run
    first = MetricLogger(uri, run_id)
    first.log({"loss": 3.0, "step": 10.0}, step=0)
    first.log({"loss": 2.0, "step": 20.0}, step=1)
    first.log({"loss": 1.5, "step": 30.0}, step=2)  # epoch 2 logged, then the worker dies before the report

    resumed = MetricLogger(uri, run_id)  # the restarted group resumes from epoch 1's checkpoint
    assert resumed.logged == {(k, s) for k in ("loss", "step") for s in (0, 1, 2)}
    resumed.log({"loss": 1.6, "step": 30.0}, step=2)  # epoch 2 again: skipped, the first value stands
    resumed.log({"loss": 1.2, "step": 40.0, "lr": 0.1}, step=3)
    resumed.log({"loss": 9.9}, step=3)  # the same (key, step) twice in one process: skipped too

    assert _history(client, run_id, "loss") == [(0, 3.0), (1, 2.0), (2, pytest.approx(1.5)), (3, pytest.approx(1.2))]
    assert _history(client, run_id, "step") == [(0, 10.0), (1, 20.0), (2, 30.0), (3, 40.0)]
    assert _history(client, run_id, "lr") == [(3, pytest.approx(0.1))]
    assert logged_steps(client, run_id) == {("loss", s) for s in range(4)} | {("step", s) for s in range(4)} | {
        ("lr", 3)}


def test_image_series_once_per_step(run):
    uri, client, run_id = run
    grid = np.full((8, 8), 200, np.uint8)
    MetricLogger(uri, run_id).log_image_series(grid, "samples/grid", step=0)
    resumed = MetricLogger(uri, run_id)
    assert resumed.images == {("samples/grid", 0)}
    resumed.log_image_series(grid, "samples/grid", step=0)  # skipped
    resumed.log_image_series(grid, "samples/grid", step=1)
    assert logged_image_steps(client, run_id) == {("samples/grid", 0), ("samples/grid", 1)}
    full = [f.path for f in client.list_artifacts(run_id, "images") if f.path.endswith(".png")]
    assert len(full) == 2, full  # one full-size PNG per step, not three


def test_an_unreachable_store_at_creation_is_read_again_at_the_first_log(run, monkeypatch):
    uri, client, run_id = run
    MetricLogger(uri, run_id).log({"loss": 1.0}, step=0)
    from condgen.tasks.io import tracking

    real = tracking.logged_steps
    monkeypatch.setattr(tracking, "logged_steps", lambda *a: (_ for _ in ()).throw(ConnectionError("down")))
    logger = MetricLogger(uri, run_id)
    assert logger.logged is None
    monkeypatch.setattr(tracking, "logged_steps", real)
    logger.log({"loss": 5.0}, step=0)  # reads the run's steps first: still skipped
    assert _history(client, run_id, "loss") == [(0, 1.0)]
