"""Where things live: the embedded one-machine profile and its cluster overrides.

Every setting is an environment variable so the same code runs on a laptop and a
cluster (docs/design.md, "Embedded defaults and the cluster"); nothing else needs to change.

| variable                  | embedded default                         | cluster example                  |
|---------------------------|------------------------------------------|----------------------------------|
| CONDGEN_HOME              | ./.condgen                               | —                                |
| CONDGEN_STORAGE           | file://$CONDGEN_HOME/store               | s3://bucket/condgen              |
| MLFLOW_TRACKING_URI       | sqlite:///$CONDGEN_HOME/mlflow.db        | http://mlflow:5000               |
| CONDGEN_ARTIFACTS         | $CONDGEN_HOME/mlartifacts                | (server-side, e.g. s3://…)       |
| CONDGEN_RAY_STORAGE       | $CONDGEN_HOME/ray_results                | s3://bucket/condgen/ray_results  |
| RAY_ADDRESS               | (unset: local Ray)                       | ray://head:10001 or auto         |
| PREFECT_API_URL           | (unset: ephemeral Prefect)               | http://prefect:4200/api          |
| CONDGEN_S3_ENDPOINT_URL   | (unset: AWS)                             | http://minio:9000                |
"""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("CONDGEN_HOME", ".condgen")).resolve()


def storage_root() -> str:
    return os.environ.get("CONDGEN_STORAGE", (home() / "store").as_uri())


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{home() / 'mlflow.db'}")


def artifact_root() -> str:
    return os.environ.get("CONDGEN_ARTIFACTS", (home() / "mlartifacts").as_uri())


def ray_storage() -> str:
    """Ray Train's run storage (checkpoints, run state). Every node must reach it: on a
    multi-node cluster an ``s3://`` prefix or a shared mount, never a node-local disk."""
    return os.environ.get("CONDGEN_RAY_STORAGE", str(home() / "ray_results"))


def ray_address() -> str:
    """``RAY_ADDRESS`` when set (a cluster), else ``"local"``: a fresh local instance, never a
    stray cluster some other process left running on this machine."""
    return os.environ.get("RAY_ADDRESS") or "local"
