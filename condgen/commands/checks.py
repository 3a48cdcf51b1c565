"""Fail fast: every input of a command is checked here before Ray, Serve or a flow starts.

Each check raises :class:`InputError` with one line that names the bad value and the fix;
``condgen`` prints it as ``condgen: error: …`` and exits 2. The checks run cheapest first:
syntax, then files, then model names and config keys (``condgen.models.configs``: dataclasses only,
no torch), then the MLflow registry (~1.5 s). Those imports are inside the functions, so ``condgen --help``
and a syntax error answer without them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REGISTRY_URI = re.compile(r"models:/([^/@]+)(?:@([\w-]+)|/(\d+))")
SOURCES = "a folder, a .tar file or glob, s3://bucket/prefix, or bundled:mnist|uci_digits|shapes|openmoji"
DIFFUSION_FIX = ("train one with `condgen train --model diffusion` and pass its checkpoint as --model, or register "
                 "one with `condgen retrain --params FILE` whose models list {\"name\": \"diffusion\"}")


class InputError(Exception):
    """An input condgen cannot use; the message is one line with the fix (exit code 2)."""


# -- names and config keys ----------------------------------------------------------------------------------------
def model_name(name: str) -> str:
    """A key of ``condgen.models.registry.MODELS`` (whose names are ``condgen.models.configs.CONFIGS``'s)."""
    from condgen.models.configs import CONFIGS

    if name not in CONFIGS:
        raise InputError(f"unknown model {name!r} (choose from: {', '.join(sorted(CONFIGS))})")
    return name


def config_keys(model: str, config: dict[str, Any], where: str = "--set") -> dict[str, Any]:
    """``config``'s keys must be fields of ``model``'s config dataclass."""
    from condgen.models.configs import CONFIGS

    fields = sorted(f.name for f in dataclasses.fields(CONFIGS[model_name(model)]))
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown {model} config key {unknown[0]!r} (valid: {', '.join(fields)})")
    return config


def key_values(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` overrides; values parsed as JSON when they look like it."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def labels(text: str | None) -> list[int] | None:
    """``3`` or ``1,3,7``; ranges ``0-9`` too."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            a, sep, b = part.partition("-")
            out.extend(range(int(a), int(b) + 1) if sep and a else [int(part)])
    except ValueError:
        raise InputError(f"labels are comma-separated integers or ranges (e.g. 1,3,7 or 0-9), got {text!r}") from None
    return out


# -- files and sources --------------------------------------------------------------------------------------------
def local_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{what} {path!r} is not a file")
    return p


def json_file(path: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(local_file(path, what).read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {path!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _local(uri: str) -> Path | None:
    """The local path a URI names, or None for a remote one (s3://…)."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri).expanduser()


def source(spec: str) -> str:
    """A data source ingest can open (``tasks/data/sources.py``): the bundled name, or a local path that exists."""
    if spec.startswith("bundled:"):
        name = spec.removeprefix("bundled:").split(":", 1)[0]
        if name not in ("mnist", "uci_digits", "shapes", "openmoji"):
            raise InputError(f"unknown source {spec!r} ({SOURCES})")
        return spec
    path = _local(spec)
    if path is None or path.exists():
        return spec
    from condgen.tasks.data.file_sources import expand_tar_pattern

    try:
        expand_tar_pattern(str(path))
    except FileNotFoundError:
        raise InputError(f"source {spec!r} does not exist ({SOURCES})") from None
    return spec


def shards(uri: str) -> str:
    """An ingested shard set (its ``manifest.json``), when it is local."""
    path = _local(uri)
    if path is not None and not (path / "manifest.json").is_file():
        raise InputError(f"no shard set at {uri!r} (no manifest.json); make one with `condgen ingest SOURCE --out {uri}`")
    return uri


def checkpoint(uri: str) -> dict[str, Any] | None:
    """A local checkpoint folder's ``config.json`` (``model``, ``config``); None for a remote one."""
    path = _local(uri)
    if path is None:
        return None
    if not (path / "config.json").is_file():
        raise InputError(f"no checkpoint at {uri!r} (no config.json): pass a checkpoint folder, "
                         f"models:/NAME@ALIAS or models:/NAME/VERSION")
    return json.loads((path / "config.json").read_text())


def adapter(uri: str) -> str:
    """A LoRA adapter: registered, or a folder with ``adapter.json`` (``tasks.io.model_store.save_adapter``)."""
    if uri.startswith("models:/"):
        registered(uri)
        return uri
    path = _local(uri)
    if path is not None and not (path / "adapter.json").is_file():
        raise InputError(f"no LoRA adapter at {uri!r} (no adapter.json): pass an adapter folder or models:/NAME@ALIAS")
    return uri


# -- the MLflow registry ------------------------------------------------------------------------------------------
def registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    m = REGISTRY_URI.fullmatch(uri)
    if not m:
        raise InputError(f"bad registry URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return m.group(1), m.group(2), m.group(3)


@contextlib.contextmanager
def _client() -> Iterator[Any]:
    """An MlflowClient on the configured tracking URI that gives up after a few seconds (not MLflow's minutes)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from condgen.tasks.io import settings

    uri = settings.tracking_uri()
    mlflow.set_tracking_uri(uri)
    quiet = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        yield MlflowClient(tracking_uri=uri)
    except mlflow.exceptions.MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            raise
        raise InputError(f"the MLflow registry at {_shown(uri)} did not answer ({_shown(str(exc).splitlines()[0][:160])}); "
                         f"check MLFLOW_TRACKING_URI") from None
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _shown(uri: str) -> str:
    """A tracking URI fit for a message: no password (``postgresql://user:secret@host`` -> ``//***@host``)."""
    return re.sub(r"//[^/@]+@", "//***@", uri)


def _empty_registry() -> str | None:
    """The tracking URI when it is an embedded SQLite file that does not exist yet (nothing registered)."""
    from condgen.tasks.io import settings

    uri = settings.tracking_uri()
    return uri if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists() else None


def registered(uri: str, fix: str = "") -> Any:
    """The MLflow ``ModelVersion`` a ``models:/`` URI names now; InputError when the model, alias or version
    does not exist. ``fix``: what to do then (appended to the message)."""
    name, alias, version = registry_uri(uri)
    fix = f"; {fix}" if fix else ""
    empty = _empty_registry()
    if empty:
        raise InputError(f"no registered model {name!r}: the registry at {empty} is empty{fix}")
    from mlflow.exceptions import MlflowException

    with _client() as client:
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            known = sorted(m.name for m in client.search_registered_models(max_results=100))
            raise InputError(f"no registered model {name!r} (registered: {', '.join(known) or 'none'}){fix}") from None
        try:
            if alias:
                return client.get_model_version_by_alias(name, alias)
            return client.get_model_version(name, version)
        except MlflowException:
            have = ", ".join(f"@{a}" for a in sorted(model.aliases)) if alias else \
                ", ".join(sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int))
            what = f"alias @{alias}" if alias else f"version {version}"
            raise InputError(f"{name} has no {what} (it has: {have or 'none'}){fix}") from None


def model_ref(uri: str, fix: str = "") -> str | None:
    """A model URI (``models:/…`` or a checkpoint folder) that exists; returns its family (the checkpoint's
    registry name, e.g. ``cvae``) when it can be read without loading the weights, else None."""
    if uri.startswith("models:/"):
        version = registered(uri, fix)
        with _client():
            return _family_of_version(version)
    meta = checkpoint(uri)
    return None if meta is None else meta.get("model")


def _family_of_version(version: Any) -> str | None:
    import mlflow

    try:
        with tempfile.TemporaryDirectory(prefix="condgen-check-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{version.source}/config.json", dst_path=tmp)
            return json.loads(Path(local).read_text()).get("model")
    except Exception:  # noqa: BLE001 - no config.json (a CLIP, an adapter): the loader will say what it is
        return None


def run_id(rid: str) -> str:
    """An MLflow run that exists in the configured tracking store."""
    from condgen.tasks.io import settings

    fix = (f"not a run of the tracking store at {_shown(settings.tracking_uri())} (see `mlflow ui`, or set "
           f"MLFLOW_TRACKING_URI)")
    if not re.fullmatch(r"[0-9a-zA-Z_-]{1,64}", rid) or _empty_registry():
        raise InputError(f"unknown run id {rid!r}: {fix}")
    from mlflow.exceptions import MlflowException

    with _client() as client:
        try:
            client.get_run(rid)
        except MlflowException:
            raise InputError(f"unknown run id {rid!r}: {fix}") from None
    return rid


def needs_diffusion(command: str, uri: str, family: str | None) -> InputError:
    return InputError(f"condgen {command} needs a diffusion model, and {uri} is a {family or 'non-diffusion'} model; "
                      f"{DIFFUSION_FIX}")


# -- parameter files of the flows ---------------------------------------------------------------------------------
def flow_params(cls: Any, raw: dict[str, Any], where: str) -> Any:
    """``raw`` validated by a flow's parameter model (``condgen.flows.params``: pydantic only, so this costs
    milliseconds and runs before Prefect, Ray or torch is imported). The models forbid unknown fields: a typo
    such as ``"modles"`` is one line that lists the valid names, never silently ignored."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc, where, cls) from None


def _model_at(cls: Any, path: tuple[Any, ...]) -> Any:
    """The pydantic model class that ``path`` (a validation error's location, list indices included) leads to
    from ``cls``, or None."""
    import typing

    from pydantic import BaseModel

    model = cls
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        stack, model = [field.annotation], None
        while stack:  # list[TrainSpec], TrainSpec | None, ...
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
                break
            stack.extend(typing.get_args(t))
        if model is None:
            return None
    return model


def validation_error(exc: Any, where: str, cls: Any = None) -> InputError:
    """A pydantic ``ValidationError`` as one line: the first problem, where it is, and the count of the rest;
    an unknown field (``extra="forbid"``) with the valid names of its model when ``cls`` is given."""
    errors = exc.errors()
    first = errors[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or "(top level)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    model = _model_at(cls, tuple(first["loc"][:-1])) if cls is not None and first["type"] == "extra_forbidden" \
        else None
    if model is not None:
        return InputError(f"{where}: unknown field {first['loc'][-1]!r} of {model.__name__} at {loc} "
                          f"(valid: {', '.join(model.model_fields)}){more}")
    return InputError(f"{where}: {loc}: {first['msg']}, got {first.get('input')!r}{more}")
