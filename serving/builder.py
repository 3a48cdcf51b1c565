"""Ray Serve application builder for config-driven deploys: ``serve run``/``serve deploy``
with a config file, and a KubeRay ``RayService``'s ``serveConfigV2``
(``import_path: condgen.serving.builder:app``, infra/k8s/rayservice.yaml).

Serve calls it with the application's ``args`` mapping: ``models`` (a list of
``models:/NAME@alias`` URIs, or ``model_uri`` for one), optional ``tracking_uri``
(default ``MLFLOW_TRACKING_URI``), and any ``serving.config.ServeConfig`` field.
"""
from __future__ import annotations

from typing import Any

from condgen.serving.app import build_app


def app(args: dict[str, Any]):

    args = dict(args or {})
    models = args.pop("models", None) or args.pop("model_uri", None)
    return build_app(models, args.pop("tracking_uri", None), **args)
