"""MLflow plumbing: one place that knows the tracking URI and experiment layout."""
from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from condgen.tasks.io import settings

T = TypeVar("T")


def configure(experiment: str = "condgen") -> str:
    """Point MLflow at the configured tracking URI; make sure the experiment exists.

    Returns the experiment id. With the embedded SQLite backend the artifacts go to
    ``CONDGEN_ARTIFACTS`` instead of MLflow's cwd-relative ``./mlruns``.
    """
    uri = settings.tracking_uri()
    if uri.startswith("sqlite:///"):
        settings.home().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None if uri.startswith("http") else settings.artifact_root()
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created concurrently
            exp_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def retry(fn: Callable[[], T], attempts: int = 6, base_delay: float = 0.5) -> T:
    """Call ``fn`` with exponential backoff: a tracking server that restarts mid-run
    costs a few seconds of waiting, not the run."""
    for i in range(attempts):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - any transport error is worth a retry
            if i == attempts - 1:
                raise
            time.sleep(base_delay * 2**i)
    raise AssertionError("unreachable")


class MetricLogger:
    """Logs metrics to one run from inside a training worker, retried and buffered:
    a failed flush keeps the metrics for the next one."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.pending: list[tuple[str, float, int]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.pending += [(k, float(v), step) for k, v in metrics.items()]
        self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, s) for k, v, s in self.pending]
        try:
            retry(lambda: self.client.log_batch(self.run_id, metrics=batch), attempts=4)
            self.pending.clear()
        except Exception:  # noqa: BLE001 - keep the buffer; the next flush retries
            pass

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        try:
            retry(lambda: self.client.log_dict(self.run_id, obj, artifact_file), attempts=4)
        except Exception:  # noqa: BLE001 - bookkeeping must not kill training
            pass

    def log_image(self, image, artifact_file: str) -> None:
        try:
            retry(lambda: self.client.log_image(self.run_id, image, artifact_file), attempts=4)
        except Exception:  # noqa: BLE001 - a lost grid must not kill training
            pass


def log_params(params: dict[str, Any]) -> None:
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
