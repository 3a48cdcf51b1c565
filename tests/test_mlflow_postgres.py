"""MLflow in its production form: a tracking server with a PostgreSQL backend store and
artifacts on the S3-compatible server (moto on 127.0.0.1), used through condgen's own
code (``tasks.promote``): a run with a checkpoint artifact, a registered model version,
the ``champion`` alias, and loading ``models:/…@champion`` back through the server (with condgen's
loader and as an MLflow pyfunc model).
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from condgen.tasks.io import storage
from tests.conftest import S3_TEST_BUCKET, free_port, kill_process_group, start_mlflow_server, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_pg_server(postgres_server, s3_server, tmp_path_factory):
    """``mlflow server`` on PostgreSQL (database ``mlflow``) with ``--artifacts-destination s3://…``."""
    import psycopg2

    pg = postgres_server
    con = psycopg2.connect(host=pg["host"], port=pg["port"], user=pg["user"], dbname="postgres")
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute("CREATE DATABASE mlflow")
    con.close()
    backend = f"postgresql+psycopg2://{pg['user']}@{pg['host']}:{pg['port']}/mlflow"
    prefix = f"mlartifacts-{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("mlflow_pg")
    port = free_port()
    # The server writes artifacts to S3 itself (clients upload through its proxy), so the
    # endpoint and credentials are the server's environment, not the clients'.
    proc = start_mlflow_server(backend, f"s3://{S3_TEST_BUCKET}/{prefix}", port, root / "server.log",
                               env={"MLFLOW_S3_ENDPOINT_URL": s3_server})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=240, proc=proc)
        yield {"url": url, "backend": backend, "artifacts": f"s3://{S3_TEST_BUCKET}/{prefix}", "pg": pg}
    finally:
        kill_process_group(proc)


def test_run_artifact_and_registry_on_postgres_and_s3(mlflow_pg_server, monkeypatch, tmp_path: Path):
    import mlflow
    import psycopg2
    import torch

    from condgen.models.registry import build_model
    from condgen.tasks.io import checkpoint as ckpt_io
    from condgen.tasks.io.model_store import load_registered
    from condgen.tasks.judging.promote import ALIAS, Gate, promote

    url = mlflow_pg_server["url"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)

    torch.manual_seed(0)
    model = build_model("cvae", {"channels": [4, 8], "latent_dim": 4, "cond_dim": 4})
    ckpt = ckpt_io.save_checkpoint(tmp_path / "ckpt", model)
    exp = mlflow.set_experiment("pg-s3")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied: clients need no S3 access
    with mlflow.start_run(run_name="pg-s3") as run:
        mlflow.log_params({"model": "cvae", "cfg.channels": "(4, 8)"})
        for step, loss in enumerate([3.0, 2.0, 1.5]):
            mlflow.log_metric("loss", loss, step=step)
        mlflow.log_metric("eval/cond_accuracy", 0.95)
        mlflow.log_artifacts(str(ckpt), artifact_path="model")

    name = f"condgen-pg-{uuid.uuid4().hex[:6]}"
    decision = promote(run.info.run_id, name, 0.95, Gate(min_accuracy=0.5))
    assert decision.promoted and decision.version == "1"
    loaded, meta = load_registered(f"models:/{name}@{ALIAS}")
    assert meta["version"] == "1" and meta["run_id"] == run.info.run_id
    assert ckpt_io.state_fingerprint(loaded) == ckpt_io.state_fingerprint(model)  # same bytes, via S3
    # ...and plain MLflow loads the same version as a pyfunc model through the server's artifact proxy
    images = mlflow.pyfunc.load_model(f"models:/{name}@{ALIAS}").predict({"condition": 4, "n": 2, "seed": 0})
    assert images.shape == (2, 28, 28, 1) and images.dtype == "uint8"
    assert "## Metrics" in mlflow.MlflowClient().get_model_version(name, "1").description

    # The artifacts are objects in the S3 bucket...
    keys = [k for k, _, _ in storage.list_objects(mlflow_pg_server["artifacts"])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/model/{ckpt_io.WEIGHTS}") for k in keys), keys
    # ...and runs, metrics and the registry are rows in PostgreSQL.
    pg = mlflow_pg_server["pg"]
    with psycopg2.connect(host=pg["host"], port=pg["port"], user=pg["user"], dbname="mlflow") as con, \
            con.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone() == ("FINISHED",)
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss'", (run.info.run_id,))
        assert cur.fetchone() == (3,)
        cur.execute("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s", (name, ALIAS))
        assert cur.fetchone() == (1,)
    print(f"\nMLflow on {mlflow_pg_server['backend'].split('@')[0]}@…/mlflow, artifacts {len(keys)} objects in "
          f"{mlflow_pg_server['artifacts']}; models:/{name}@{ALIAS} -> v{meta['version']}")
