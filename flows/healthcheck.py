"""The ``healthcheck`` flow: a worker of the pool runs it on demand to show that it can
run condgen flows and reach storage, MLflow and (optionally) Ray.

Deployed beside ``retrain`` and ``batch_generate`` (prefect.yaml), it is the cheap
first run after a deploy: it fails exactly where a real run would, in seconds. Its
findings go to the run log and to ``<storage>/healthcheck/latest.json``.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, runtime
from pydantic import BaseModel

from condgen.flows.steps import ray_check_task, storage_check_task, tracking_check_task
from condgen.tasks.io import health


class HealthcheckParams(BaseModel):
    storage: bool = True
    tracking: bool = True
    ray: bool = False  # starts a local Ray when RAY_ADDRESS is unset: off by default


@flow(name="healthcheck")
def healthcheck(params: HealthcheckParams = HealthcheckParams()) -> dict[str, Any]:
    log = get_run_logger()
    out: dict[str, Any] = {}
    if params.storage:
        out["storage"] = storage_check_task()
    if params.tracking:
        out["tracking"] = tracking_check_task()
    if params.ray:
        out["ray"] = ray_check_task()
    if params.storage:  # storage answered: keep the report there
        where = health.write_report(out, run_id=runtime.flow_run.id)
        log.info("report written to %s", where)
    log.info("healthy: %s", out)
    return out
