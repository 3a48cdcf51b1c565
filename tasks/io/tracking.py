"""MLflow plumbing: one place that knows the tracking URI and experiment layout."""
from __future__ import annotations

import contextlib
import re
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
    """Logs metrics to one run from inside a training worker, retried and buffered (a failed
    flush keeps the metrics for the next one), and exactly once per (key, step).

    A killed worker group resumes from its last checkpoint and re-runs the epochs after it, and
    rank 0 logs an epoch's metrics *before* ``ray.train.report`` commits its checkpoint, so the
    resumed run would log that epoch again (issue #20, item 7). The logger reads the steps the
    run already holds once, when it is created, and skips them: the first value logged for a
    step stands. Image series (``log_image_series``) are skipped the same way.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.pending: list[tuple[str, float, int]] = []
        self.logged: set[tuple[str, int]] | None = None  # None: not read yet (the store was unreachable)
        self.images: set[tuple[str, int]] | None = None
        self._read_logged()

    def _read_logged(self) -> None:
        """What the run already holds: (key, step) of every metric and of every image series entry."""
        if self.logged is None:
            with contextlib.suppress(Exception):  # unreachable store: read again at the next log
                self.logged = logged_steps(self.client, self.run_id)
        if self.images is None:
            with contextlib.suppress(Exception):
                self.images = logged_image_steps(self.client, self.run_id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``; a (key, step) the run already holds (or that is pending) is skipped."""
        self._read_logged()
        seen = (self.logged or set()) | {(k, s) for k, _, s in self.pending}
        self.pending += [(k, float(v), int(step)) for k, v in metrics.items() if (k, int(step)) not in seen]
        self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, s) for k, v, s in self.pending]
        try:
            retry(lambda: self.client.log_batch(self.run_id, metrics=batch), attempts=4)
            if self.logged is not None:
                self.logged |= {(k, s) for k, _, s in self.pending}
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

    def log_image_series(self, image, key: str, step: int) -> None:
        """One entry of the image series ``key`` (MLflow's image slider by step: sample grids per epoch),
        once per (key, step) like :meth:`log`."""
        self._read_logged()
        if self.images is not None and (key, int(step)) in self.images:
            return
        with contextlib.suppress(Exception):  # a lost grid must not kill training
            retry(lambda: self.client.log_image(self.run_id, image, key=key, step=int(step)), attempts=4)
            if self.images is not None:
                self.images.add((key, int(step)))


def logged_steps(client: MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """(key, step) of every metric value the run holds (one history read per key)."""
    keys = retry(lambda: list(client.get_run(run_id).data.metrics), attempts=4)
    return {(k, int(m.step)) for k in keys
            for m in retry(lambda k=k: client.get_metric_history(run_id, k), attempts=4)}


# MLflow's image-series file names: images/<key with / as ~>+step+<step>+timestamp+<ms>+<uuid>[+compressed].<ext>
_IMAGE_FILE = re.compile(r"^(?P<key>.+)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]")


def logged_image_steps(client: MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """(key, step) of every image series entry the run holds (``images/`` artifacts of ``log_image(key=…)``)."""
    files = retry(lambda: client.list_artifacts(run_id, "images"), attempts=4)
    out = set()
    for f in files:
        m = _IMAGE_FILE.match(f.path.rsplit("/", 1)[-1])
        if m:
            out.add((m.group("key").replace("~", "/"), int(m.group("step"))))
    return out


def log_table(run_id: str, rows: dict[str, list], artifact_file: str) -> None:
    """One table artifact (``mlflow.log_table``: a JSON table the UI shows and compares across runs), e.g.
    the per-class accuracies as rows instead of ten one-bar charts."""
    MlflowClient().log_table(run_id, data=rows, artifact_file=artifact_file)


def log_params(params: dict[str, Any]) -> None:
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
