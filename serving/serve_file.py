"""The Ray Serve config file read by ``condgen serve --config FILE.yaml``: the same file that ``serve run``
and ``serve deploy`` take (``infra/ray/serve_config.yaml``), so one file describes the service however it
is started.

From the file, ``condgen serve`` takes: the application whose ``import_path`` is
``condgen.serving.builder:app`` (its ``args``: models and ``ServeConfig`` fields; its ``name`` and
``route_prefix``), its ``CondgenService`` deployment's ``num_replicas`` or ``autoscaling_config`` and
``ray_actor_options`` ``num_cpus``/``num_gpus`` (``config.Deployment``), and ``http_options`` ``host`` and
``port``. The file is checked against Ray Serve's own schema (``ServeDeploySchema``) first; a deployment
option ``condgen serve`` does not apply is refused (it would be silently different from ``serve run``).
Every error is one ``ValueError`` line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from condgen.serving.config import Deployment, config_error

IMPORT_PATH = "condgen.serving.builder:app"
DEPLOYMENT_NAME = "CondgenService"  # = serving.app.CondgenService's name (tests/test_serve_config.py checks)
READ_KEYS = ("name", "num_replicas", "autoscaling_config", "ray_actor_options")
ACTOR_KEYS = ("num_cpus", "num_gpus")


@dataclass
class ServeFile:
    args: dict[str, Any]
    deployment: Deployment
    host: str | None = None
    port: int | None = None
    name: str = "condgen"
    route_prefix: str = "/"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _one_line(exc: ValidationError, where: str) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"{where}: {loc}: {first['msg']}"


def parse_serve_file(text: str, where: str = "serve config") -> ServeFile:
    """The parts of a Serve config (YAML text) that ``condgen serve`` applies; ValueError (one line) otherwise."""
    from ray.serve.schema import ServeDeploySchema  # ~2 s to import: only when a YAML config is given

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None
    try:  # a mapping with 'applications', each with its import_path, args a mapping, ...
        ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_one_line(exc, f"{where} (Ray Serve's schema)")) from None
    ours = [a for a in data.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if len(ours) != 1:
        raise ValueError(f"{where} needs exactly one application with import_path {IMPORT_PATH}, found "
                         f"{len(ours)}")
    application = ours[0]
    options: dict[str, Any] = {}
    for dep in application.get("deployments") or []:
        if dep.get("name") != DEPLOYMENT_NAME:
            raise ValueError(f"{where}: unknown deployment {dep.get('name')!r}; condgen's is {DEPLOYMENT_NAME}")
        extra = sorted(set(dep) - set(READ_KEYS))
        actor = dict(dep.get("ray_actor_options") or {})
        extra += [f"ray_actor_options.{k}" for k in sorted(set(actor) - set(ACTOR_KEYS))]
        if extra:
            raise ValueError(f"{where}: condgen serve does not apply {', '.join(extra)} (it reads "
                             f"{', '.join(READ_KEYS)} with ray_actor_options {'/'.join(ACTOR_KEYS)}); use `serve "
                             "run FILE` for the rest")
        options.update({k: dep[k] for k in ("num_replicas", "autoscaling_config") if dep.get(k) is not None})
        options.update(actor)
    try:
        deployment = Deployment.model_validate(options)
    except ValidationError as exc:
        raise ValueError(config_error(exc, f"{where}: deployment {DEPLOYMENT_NAME}")) from None
    http = data.get("http_options") or {}
    return ServeFile(args=dict(application.get("args") or {}), deployment=deployment, host=http.get("host"), port=http.get("port"),
                     name=application.get("name", "condgen"), route_prefix=application.get("route_prefix") or "/",
                     raw=data)


def read_serve_file(path: str | Path) -> ServeFile:
    return parse_serve_file(Path(path).read_text(), str(path))
