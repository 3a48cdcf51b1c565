"""CLIPs in the MLflow model registry, through ``tasks/io/model_store.py``.

:func:`register_clip` logs a CLIP as an MLflow run (params, metrics, the checkpoint folder
as ``model/``) and registers it as a new version of ``condgen-clip`` under an alias
(``champion`` by default), so any later run or service can name it by registry URI;
:func:`load_registered_clip` resolves ``models:/condgen-clip@champion`` (or ``/<version>``)
and loads that version's ``model/`` artifacts, which are a :func:`save_clip` folder.
"""
from __future__ import annotations

import logging
import math
import tempfile
from typing import Any

import mlflow
import torch

from condgen.tasks.clip.handle import ClipHandle, load_checkpoint, save_clip
from condgen.tasks.io import tracking
from condgen.tasks.io.model_store import ALIAS, downloaded, register

log = logging.getLogger(__name__)

REGISTERED_NAME = "condgen-clip"
REGISTRY_NOTE = "registry.json"  # beside a cached embedded CLIP: where it was registered


def load_registered_clip(model_uri: str, *, device: str | torch.device = "cpu") -> ClipHandle:
    """A CLIP registered by :func:`register_clip` (``models:/NAME@ALIAS`` or ``models:/NAME/N``).
    ``source`` becomes the resolved ``models:/NAME/N``, so embeddings record the exact version."""
    with downloaded(model_uri, prefix="condgen-clip-") as (local, ref):
        handle = load_checkpoint(str(local), device=device)
    handle.source = ref.uri
    return handle


def register_clip(handle: ClipHandle, *, params: dict[str, Any] | None = None,
                  metrics: dict[str, float] | None = None, name: str = REGISTERED_NAME,
                  experiment: str = "condgen-clip", alias: str | None = ALIAS) -> str:
    """Log a CLIP as an MLflow run (params, metrics, the checkpoint as ``model/``), register a
    new version of ``name`` and point ``alias`` at it. Returns ``models:/name/<version>``."""
    tracking.configure(experiment)
    with mlflow.start_run(run_name=f"clip-{handle.fingerprint[:8]}") as run:
        tracking.log_params({"model_name": handle.model_name, "embed_dim": handle.embed_dim,
                             "fingerprint": handle.fingerprint, **(params or {})})
        clean = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if clean:
            mlflow.log_metrics(clean)
        with tempfile.TemporaryDirectory(prefix="condgen-clip-") as tmp:
            save_clip(handle, tmp)
            mlflow.log_artifacts(tmp, artifact_path="model")
        version = register(run.info.run_id, name, tags={"fingerprint": handle.fingerprint, "kind": "clip"},
                           alias=alias)
    log.info("registered CLIP %s as %s version %s (run %s)", handle.fingerprint[:12], name, version, run.info.run_id)
    return f"models:/{name}/{version}"
