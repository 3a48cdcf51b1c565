"""Scheduling: a real Prefect server on 127.0.0.1, the deployments of prefect.yaml
registered by ``flows.deploy.deploy``, and a run of one of them by a ``process`` worker.

The run is the ``healthcheck/probe`` deployment (a storage round trip and an MLflow read
from inside the worker's flow-run process): the whole server -> pool -> worker ->
flow-run path at a cost of seconds. The nightly ``retrain`` and the on-demand
``batch_generate`` deployments are registered and checked (schedule, pool, parameters
against the flows' own pydantic models), not run: a retrain is minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from condgen.flows.deploy import PREFECT_FILE, deploy, read_deployments

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
POOL = "condgen"


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def test_deploy_and_run_on_a_process_worker(prefect_server, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from condgen.flows.batch_generate import BatchGenerateParams
    from condgen.flows.retrain import RetrainParams

    t0 = time.monotonic()
    ids = deploy(prefect_server)
    t_deploy = time.monotonic() - t0
    specs = read_deployments(PREFECT_FILE)
    assert len(ids) == len(specs) == len(set(ids)) == 3

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool(POOL)
            assert pool.type == "process"
            deps = {f"{d['flow_name']}/{d['name']}": client.read_deployment(i) for d, i in zip(specs, ids)}
            nightly, batch, probe = deps["retrain/nightly"], deps["batch_generate/on-demand"], deps["healthcheck/probe"]
            assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
            assert nightly.schedules[0].schedule.timezone == "UTC" and nightly.schedules[0].active
            assert batch.schedules == [] and probe.schedules == []
            assert {d.work_pool_name for d in deps.values()} == {POOL}
            # The stored parameters are valid inputs of the flows they will be passed to.
            RetrainParams.model_validate(nightly.parameters["params"])
            BatchGenerateParams.model_validate(batch.parameters["params"])
            assert "params" in nightly.parameter_openapi_schema["properties"]
            # Deploying again updates in place: same ids, no duplicates.
            assert deploy(prefect_server) == ids

        # Trigger the probe (a flow run scheduled now), then let a worker pick it up.
        home = tmp_path / "home"
        run = run_deployment("healthcheck/probe", timeout=0)
        worker_env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "worker"),
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "CONDGEN_WORKDIR": str(REPO),
                      "CONDGEN_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
        worker_env.pop("CONDGEN_STORAGE", None)
        t1 = time.monotonic()
        # --run-once with --limit: poll once, submit what is due, wait for it to finish.
        worker = subprocess.run(_prefect("worker", "start", "--pool", POOL, "--type", "process", "--run-once",
                                         "--limit", "1"),
                                cwd=tmp_path, env=worker_env, capture_output=True, text=True, timeout=400,
                                start_new_session=True)
        t_run = time.monotonic() - t1
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
        print(f"\ndeployed {len(ids)} deployments in {t_deploy:.1f}s; probe run {run.id} -> {state.type.value} "
              f"in {t_run:.1f}s on a process worker")
        assert state.is_completed(), f"{state}\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
        # The flow keeps its findings in the worker's storage (run logs reach the API
        # asynchronously and may land after the worker exits, so they are not relied on).
        report = json.loads((home / "store" / "healthcheck" / "latest.json").read_text())
        assert report["flow_run_id"] == str(run.id)
        assert report["healthy"]["storage"]["storage"] == "local"
        assert report["healthy"]["tracking"]["tracking"] == "sqlite://"
        assert (home / "mlflow.db").exists()  # the flow ran with the worker's environment
