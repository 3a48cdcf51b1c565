"""The one place that turns a model reference into weights: ``models:/NAME@ALIAS`` and
``models:/NAME/VERSION`` in the MLflow registry, a checkpoint folder in storage
(``file://…``, ``s3://…``, a path), and LoRA adapter folders.

Everything else (training, evaluation, promotion, the CLIP registry, batch generation, the
service) resolves, downloads, registers and loads through these functions, so "pick the
version by alias or number, then download" exists once. Loading parses safetensors and
JSON only (never a pickle).

Frozen parts (``models.base.FrozenPart``: the autoencoder of latent diffusion, the base of a
ControlNet or of a super-resolution stage) that a config names by URI are loaded here too
(``attach_frozen_parts``) and handed to the model, because ``models/`` reads nothing.
"""
from __future__ import annotations

import contextlib
import copy
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from condgen.models.base import missing_frozen_part
from condgen.models.conditioning import lora
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io import storage, tracking

ALIAS = "champion"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
_URI_RE = re.compile(r"models:/([^/@]+)(?:@([\w-]+)|/(\d+))")


def is_registry_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` or ``models:/name/3`` -> (name, alias, version)."""
    m = _URI_RE.fullmatch(uri)
    if not m:
        raise ValueError(f"not a registry URI: {uri!r} (expected models:/NAME@ALIAS or models:/NAME/VERSION)")
    return m.group(1), m.group(2), m.group(3)


@dataclass(frozen=True)
class Version:
    """A registry reference pinned to the version it names now."""

    name: str
    version: str
    run_id: str
    source: str  # the artifact URI the version was created from

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def resolve(uri: str) -> Version:
    """Pin ``models:/NAME@ALIAS`` (or ``/VERSION``) to a :class:`Version`."""
    name, alias, version = parse_model_uri(uri)
    tracking.relocate_home()  # an embedded home that was moved or copied: its artifact locations first
    client = MlflowClient()
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return Version(name, str(mv.version), mv.run_id, mv.source)


def alias_version(name: str, alias: str = ALIAS) -> str | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


@contextlib.contextmanager
def downloaded(uri: str, artifact_path: str | None = None, prefix: str = "condgen-") -> Iterator[tuple[Path, Version]]:
    """A registry version's artifacts in a temporary local folder (removed on exit).

    ``artifact_path`` picks a sub-folder of the version's run (``"adapter"``); by default
    the version's own source (its ``model/``)."""
    ref = resolve(uri)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        if artifact_path is None:
            local = mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=tmp)
        else:
            local = mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path=artifact_path, dst_path=tmp)
        yield Path(local), ref


def register(run_id: str, name: str, tags: dict[str, str] | None = None, artifact_path: str = "model",
             alias: str | None = None) -> str:
    """A new version of ``name`` from the run's ``artifact_path`` artifacts (the registered
    model is created on first use); ``alias``, if given, moves to it. Returns the version."""
    client = MlflowClient()
    try:
        client.create_registered_model(name, tags={"condgen": "true"})
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags or {}).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


# -- models -----------------------------------------------------------------------------------------
def attach_frozen_parts(model: torch.nn.Module) -> torch.nn.Module:
    """Load the frozen part ``model``'s config names by URI and hand it in (``model.attach_frozen``), when
    the model holds no weights for it yet; otherwise (none, handed in, or loaded with a checkpoint) a
    no-op. ValueError when the checkpoint holds another family or another architecture. Returns ``model``."""
    part = missing_frozen_part(model)
    if part is None:
        return model
    frozen, meta = load_trained(part.uri)
    if meta.get("model") != part.model:
        raise ValueError(f"{part.uri} holds a {meta.get('model')!r} checkpoint, expected {part.model!r}")
    model.attach_frozen(frozen)
    return model


def load_trained(checkpoint_uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A checkpoint folder (``model.safetensors`` + ``config.json``) from any storage URI, with its frozen
    parts (a checkpoint carries them; one saved without them gets them from their URIs)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in (ckpt_io.WEIGHTS, ckpt_io.CONFIG):
            Path(tmp, name).write_bytes(storage.read_bytes(storage.join(checkpoint_uri, name)))
        model, meta = ckpt_io.load_checkpoint(tmp)
    return attach_frozen_parts(model), meta


def load_registered(uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``models:/name@alias`` (or ``/version``) as a module + meta (with ``name``, ``version``, ``run_id``)."""
    with downloaded(uri, artifact_path="model") as (local, ref):
        model, meta = ckpt_io.load_checkpoint(local)
    meta.update(name=ref.name, version=ref.version, run_id=ref.run_id)
    return attach_frozen_parts(model), meta


def load_model_uri(uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``models:/…`` through the registry, anything else as a checkpoint folder in storage;
    the module is in eval mode and meta always has ``name``, ``version`` and ``run_id``."""
    if is_registry_uri(uri):
        model, meta = load_registered(uri)
        return model.eval(), meta
    model, meta = load_trained(uri)
    meta.setdefault("name", uri.rstrip("/").rsplit("/", 1)[-1])
    meta.setdefault("version", "checkpoint")
    meta.setdefault("run_id", "")
    return model.eval(), meta


# -- LoRA adapters ----------------------------------------------------------------------------------
def save_adapter(uri: str, model: torch.nn.Module, *, rank: int, alpha: float, base: str | None = None,
                 targets: list[str] | None = None) -> str:
    """Write an injected model's LoRA weights + their settings to a storage folder (each write atomic).

    ``targets`` defaults to the exact names of every adapted layer, which is what
    :func:`apply_adapter` needs to rebuild the same wrappers on a fresh copy of the base.
    """
    sd = lora.lora_state_dict(model)
    storage.write_bytes(storage.join(uri, ADAPTER_WEIGHTS), st_save({k: v.contiguous() for k, v in sd.items()}))
    storage.write_json(storage.join(uri, ADAPTER_CONFIG),
                       {"targets": targets or sorted(lora.lora_modules(model)), "rank": rank, "alpha": alpha,
                        "base": base})
    return uri


def read_adapter(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter tensors, settings) from a storage folder or a registered ``models:/NAME@alias``."""
    if is_registry_uri(uri):
        with downloaded(uri, artifact_path="adapter") as (local, _):
            return read_adapter(local.as_uri())
    return st_load(storage.read_bytes(storage.join(uri, ADAPTER_WEIGHTS))), storage.read_json(
        storage.join(uri, ADAPTER_CONFIG))


def apply_adapter(base: torch.nn.Module, uri: str) -> torch.nn.Module:
    """A merged copy of ``base`` with the adapter at ``uri`` (the base stays untouched)."""
    tensors, cfg = read_adapter(uri)
    model = copy.deepcopy(base)
    lora.inject_lora(model, cfg["targets"], rank=int(cfg["rank"]), alpha=float(cfg["alpha"]))
    lora.load_lora_state_dict(model, tensors)
    lora.merge_lora(model)
    return model.eval()
