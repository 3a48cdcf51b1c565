"""MLflow plumbing: one place that knows the tracking URI and experiment layout.

The embedded home is relocatable: MLflow's SQLite store records absolute artifact locations
(experiments, runs, model versions), so a ``CONDGEN_HOME`` copied elsewhere would keep pointing at
the old folder. ``configure`` rewrites them on open (:func:`relocate_home`): the home remembers the
artifact root it was last opened with (``tracking-home.json``) and, when that differs from the
current one, the old prefix becomes the new one in every location column, in one transaction.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sqlite3
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
    relocate_home()
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


HOME_RECORD = "tracking-home.json"
# (table, column) of MLflow's SQL schema that hold artifact locations; absent ones are skipped
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
                    ("model_versions", "storage_location"), ("logged_models", "artifact_location"))


def relocate_home() -> int:
    """Point the embedded store's artifact locations at this home when the home was moved or copied.

    Only for the embedded defaults (SQLite and artifacts both under ``CONDGEN_HOME``). Returns the number of rewritten rows (0 when in place)."""
    home, new = settings.home(), settings.artifact_root()
    db, record = home / "mlflow.db", home / HOME_RECORD
    # equal to the defaults rather than unset: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI
    if settings.tracking_uri() != f"sqlite:///{db}" or new != (home / "mlartifacts").as_uri():
        return 0
    old = json.loads(record.read_text()).get("artifact_root") if record.exists() else _previous_root(db, new)
    changed = rewrite_prefix(db, old, new) if old and old != new and db.exists() else 0
    if old != new:
        home.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"artifact_root": new}))
        os.replace(tmp, record)
    return changed


def _previous_root(db: Path, new: str) -> str | None:
    """A home from before ``tracking-home.json``: its one ``…/mlartifacts`` experiment root, if moved."""
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(db)) as con:
        roots = {r for (r,) in con.execute("SELECT DISTINCT artifact_location FROM experiments")
                 if r and r.startswith("file://") and r.endswith("/mlartifacts")}
    return roots.pop() if len(roots) == 1 and new not in roots else None


def rewrite_prefix(db: Path, old: str, new: str) -> int:
    """Replace the prefix ``old`` by ``new`` in every location column of an MLflow SQLite store (one
    transaction; idempotent: a second call finds nothing to rewrite)."""
    old, new = old.rstrip("/"), new.rstrip("/")
    changed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
        tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column in LOCATION_COLUMNS:
            if table not in tables or column not in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}:
                continue
            cur = con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # table and column: the fixed names above
                              f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                              (new, len(old) + 1, old, len(old) + 1, old + "/"))
            changed += cur.rowcount
    return changed


def retry(fn: Callable[[], T], attempts: int = 6, base_delay: float = 0.5) -> T:
    """Call ``fn`` with exponential backoff: a tracking server that restarts mid-run
    costs a few seconds of waiting, not the run."""
    for i in range(attempts):
        try:
            return fn()
        except Exception:
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
    """One table artifact (``mlflow.log_table``: a JSON table the UI shows and compares across runs)."""
    MlflowClient().log_table(run_id, data=rows, artifact_file=artifact_file)


PER_CLASS_TABLE = "eval/per_class.json"


def log_per_class_table(run_id: str, per_class_accuracy: list[float], class_names: list[str] | None = None,
                        artifact_file: str = PER_CLASS_TABLE) -> None:
    """The per-class conditional accuracies as one table (class, name, accuracy) instead of ten one-bar
    ``acc_class_*`` charts (issue #19). NaN (a class the split lacks) stays a row with an empty accuracy."""
    names = list(class_names or []) + [str(c) for c in range(len(class_names or []), len(per_class_accuracy))]
    log_table(run_id, {"class": list(range(len(per_class_accuracy))), "name": names[:len(per_class_accuracy)],
                       "accuracy": [None if math.isnan(a) else float(a) for a in per_class_accuracy]}, artifact_file)


def shard_dataset(shards_uri: str, manifest: dict[str, Any], name: str | None = None):
    """The shard set as an ``mlflow.data`` dataset: its URI as the source, a digest of its manifest (the
    sha256 of every shard, so two sets with the same bytes have the same digest), and its facts."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    shards = manifest.get("shards", [])
    facts = "|".join(str(manifest.get(k)) for k in ("schema_version", "source_fingerprint", "num_classes"))
    digest = hashlib.sha256(("|".join(str(sh.get("sha256", sh)) for sh in shards) + facts).encode()).hexdigest()
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns that it is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(shards_uri)
    return MetaDataset(source, name=name or shards_uri.rstrip("/").rsplit("/", 1)[-1], digest=digest[:16])


def log_shard_input(run_id: str, shards_uri: str, manifest: dict[str, Any], context: str = "train") -> None:
    """``mlflow.log_input`` for a run that is not active: the shard set it read, as lineage in the UI."""
    from mlflow.entities import DatasetInput, InputTag

    dataset = shard_dataset(shards_uri, manifest)
    tag = InputTag(key="mlflow.data.context", value=context)
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[tag])])


def log_params(params: dict[str, Any]) -> None:
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})


def run_shard_set(run_id: str, client: MlflowClient | None = None) -> tuple[str, dict[str, Any]] | None:
    """The shard set a training run read (its ``condgen.shards`` tag) and that set's manifest; None when the
    run has no such tag. What reading the run or the manifest raises is the caller's to handle: the service
    (``serving/pool.py``) and the pyfunc (``tasks/io/pyfunc_model.py``) treat it as "no hints"."""
    from condgen.tasks.io.shards import read_manifest

    shards = (client or MlflowClient()).get_run(run_id).data.tags.get("condgen.shards")
    return (shards, read_manifest(shards)) if shards else None
