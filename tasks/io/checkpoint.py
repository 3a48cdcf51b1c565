"""Checkpoints: a model's ``state_dict`` as safetensors + its config as JSON.

Never a pickled module: loading parses JSON and safetensors only, so a checkpoint
from an untrusted place cannot execute code. The model class is looked up in the
explicit registry (``models.registry.MODELS``) by the name stored in the JSON.

These functions read and write local folders only; ``tasks.io.model_store`` loads from
any storage URI and attaches frozen parts a config names by URI (``attach_frozen_parts``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from condgen.models.base import config_to_dict
from condgen.models.registry import build_model, model_name

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared/non-contiguous storage; clone to plain tensors.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"model": model_name(model), "config": config_to_dict(model.config), **(extra or {})}
    _atomic_write(directory / WEIGHTS, lambda p: save_file(state, p))
    _atomic_write(directory / CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / CONFIG).read_text())


def load_checkpoint(directory: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the registered model from ``config.json`` and load its safetensors weights (frozen parts
    included: a checkpoint carries them)."""
    meta = read_meta(directory)
    model = build_model(meta["model"], meta["config"])
    state = load_file(str(Path(directory) / WEIGHTS), device=map_location)
    model.load_state_dict(state)
    return model.eval(), meta


def state_fingerprint(model: nn.Module) -> str:
    """sha256 over the weights, for "did this change?" checks."""

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def to_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    return model.to(device)


# -- optimiser state, also without pickle ------------------------------------------------
def optimizer_tensors(optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimiser state dicts into flat tensors (safetensors) and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{name}.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def load_optimizer_tensors(optimizers: dict[str, torch.optim.Optimizer], tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    for name, opt in optimizers.items():
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            group, idx, field = key.split(".", 2)
            if group == name:
                state.setdefault(int(idx), {})[field] = value
        for idx, fields in meta[name]["scalars"].items():
            state.setdefault(int(idx), {}).update(fields)
        opt.load_state_dict({"state": state, "param_groups": meta[name]["param_groups"]})
