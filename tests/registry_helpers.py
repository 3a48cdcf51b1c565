"""Tiny models registered in MLflow the way tasks/judging/promote.py does it (tests of serving and batch generation)."""
from __future__ import annotations

import tempfile

import torch

TINY_DIFFUSION = {"channels": (4, 8), "timesteps": 50, "sample_steps": 8}
TINY_CVAE = {"channels": (4, 8)}


@torch.no_grad()
def nondegenerate(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give zero-initialised weights small random values: a fresh diffusion U-Net predicts
    eps = 0 everywhere (zero-init output and residual convs), which would make every label,
    guidance scale and adapter give the same image and the tests vacuous."""
    for p in model.parameters():
        if p.dim() > 1 and not bool(p.any()):
            p.normal_(0, std)
    return model


def register_tiny(name: str, kind: str, config: dict, *, seed: int = 0, alias: str | None = "champion") -> str:
    """Build ``kind`` with ``config`` (weights from ``manual_seed(seed)``), log its checkpoint as
    a run's ``model/`` artifacts, register a new version of ``name`` and (optionally) move ``alias``.
    Returns the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from condgen.models.registry import build_model
    from condgen.tasks.io import checkpoint as ckpt_io
    from condgen.tasks.io import tracking
    from condgen.tasks.io.model_store import register

    torch.manual_seed(seed)
    model = nondegenerate(build_model(kind, config))
    tracking.configure("condgen-serving-tests")
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=f"{name}-{seed}") as run:
        ckpt_io.save_checkpoint(tmp, model)
        mlflow.log_artifacts(tmp, artifact_path="model")
    version = register(run.info.run_id, name)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version)
    return version
