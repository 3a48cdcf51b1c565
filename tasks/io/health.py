"""Health probes for a worker of the pool: can it reach what condgen's flows need?

Each probe is a plain function that returns what it found and raises on failure, so the
``healthcheck`` flow (flows/healthcheck.py) fails exactly when a real run would. Nothing
secret is returned: URIs are reduced to scheme and host.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import ray
from mlflow.tracking import MlflowClient

from condgen.tasks.io import settings, storage
from condgen.tasks.io.cluster import ensure_ray


def _where(uri: str) -> str:
    """scheme://host of a URI, without credentials, path or query."""
    parsed = urlparse(uri)
    host = parsed.hostname or ""
    if parsed.port:
        host += f":{parsed.port}"
    return f"{parsed.scheme}://{host}" if parsed.scheme else "local"


def storage_roundtrip(root: str | None = None) -> dict[str, Any]:
    """Write, read back and delete a small object under ``<storage>/healthcheck/``."""
    root = root or settings.storage_root()
    uri = storage.join(root, "healthcheck", f"probe-{uuid.uuid4().hex}.json")
    payload = {"probe": uri.rsplit("/", 1)[-1], "time": time.time()}
    t0 = time.perf_counter()
    storage.write_json(uri, payload)
    try:
        if storage.read_json(uri) != payload:
            raise OSError(f"storage probe read back different bytes at {_where(root)}")
    finally:
        storage.delete(uri)
    return {"storage": _where(root) if storage.is_s3(root) else "local", "seconds": time.perf_counter() - t0}


def tracking_ping(tracking_uri: str | None = None) -> dict[str, Any]:
    """Ask the MLflow tracking store for its experiments (a read: no run is created)."""
    uri = tracking_uri or settings.tracking_uri()
    t0 = time.perf_counter()
    experiments = MlflowClient(tracking_uri=uri).search_experiments(max_results=100)
    return {"tracking": _where(uri), "experiments": len(experiments), "seconds": time.perf_counter() - t0}


def ray_ping(address: str | None = None) -> dict[str, Any]:
    """Connect to Ray (``RAY_ADDRESS`` or a local instance), run one task, report the cluster size."""
    address = address if address is not None else os.environ.get("RAY_ADDRESS")
    t0 = time.perf_counter()
    started = ensure_ray(address)
    try:
        node = ray.get(ray.remote(num_cpus=0)(lambda: ray.get_runtime_context().get_node_id()).remote(), timeout=120)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        resources = ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()
    return {"ray": "local" if not address else _where(address if "://" in address else f"ray://{address}"),
            "nodes": len(nodes), "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
            "task_node": node[:12], "seconds": time.perf_counter() - t0}


def report_uri(root: str | None = None) -> str:
    """Where the last probe's report is kept: ``<storage>/healthcheck/latest.json``."""
    return storage.join(root or settings.storage_root(), "healthcheck", "latest.json")


def write_report(found: dict[str, Any], run_id: str | None = None, root: str | None = None) -> str:
    """Keep the probe's findings (atomically) for an operator or a deploy script to read back
    without the orchestrator's UI; returns the report's URI."""
    uri = report_uri(root)
    storage.write_json(uri, {"healthy": found, "flow_run_id": run_id, "time": time.time()})
    return uri
