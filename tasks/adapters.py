"""LoRA adapters as first-class artifacts: one frozen base model, many small adapters.

An adapter folder holds ``adapter.safetensors`` (only the ``lora_A`` / ``lora_B`` tensors)
and ``adapter.json`` (the exact layer names it wraps, rank, alpha and the base it was
trained on). It is written by an adapter run (``tasks.train`` with ``TrainRequest.adapter``,
``condgen adapt``), logged to that run under ``adapter/``, optionally registered in the
MLflow model registry, and applied at serving time to a copy of the base
(``ModelSpec.adapters``), so swapping adapters never touches the base weights.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (seed 000).
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"


def prepare(model: torch.nn.Module, targets: list[str], rank: int, alpha: float) -> list[str]:
    """Inject adapters on ``targets`` and freeze the base; returns every adapted layer's exact name.

    A model may define ``after_lora_injection()`` for what else its adaptation needs (a GAN
    keeps training its discriminator, the critic that is never served, and restarts the
    generator's EMA with the same adapters, so eval-mode samples carry the adapter too).
    """
    from models.conditioning import lora

    lora.inject_lora(model, targets, rank=rank, alpha=alpha)
    lora.freeze_base(model)
    hook = getattr(model, "after_lora_injection", None)
    if hook is not None:
        hook()
    return sorted(lora.lora_modules(model))


# Top-level submodules that are never served: discriminators (critics) and the EMA copy of a generator.
NOT_SERVED = ("D", "D_A", "D_B", "G_ema")


def served_parameters(model: torch.nn.Module) -> int:
    """Base scalars of the part of a model that is served (the denominator of an adapter's share)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if n.split(".", 1)[0] not in NOT_SERVED and "lora_" not in n)


def trained_adapter_parameters(model: torch.nn.Module) -> int:
    """Adapter scalars that train (the served share; a GAN's critic is not counted)."""
    from models.conditioning import lora

    return sum(p.numel() for p in lora.lora_parameters(model) if p.requires_grad)


def save_adapter(uri: str, model: torch.nn.Module, *, rank: int, alpha: float, base: str | None = None,
                 targets: list[str] | None = None) -> str:
    """Write an injected model's LoRA weights + their settings to a storage folder (each write atomic).

    ``targets`` defaults to the exact names of every adapted layer, which is what
    ``apply_adapter`` needs to rebuild the same wrappers on a fresh copy of the base.
    """
    from safetensors.torch import save as st_save

    from models.conditioning import lora
    from tasks import storage

    sd = lora.lora_state_dict(model)
    storage.write_bytes(storage.join(uri, ADAPTER_WEIGHTS), st_save({k: v.contiguous() for k, v in sd.items()}))
    storage.write_json(storage.join(uri, ADAPTER_CONFIG),
                       {"targets": targets or sorted(lora.lora_modules(model)), "rank": rank, "alpha": alpha,
                        "base": base})
    return uri


def read_adapter(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter tensors, settings) from a storage folder or a registered ``models:/NAME@alias``."""
    from safetensors.torch import load as st_load

    from tasks import storage

    if uri.startswith("models:/"):
        import mlflow
        from mlflow.tracking import MlflowClient

        from tasks.promote import parse_model_uri

        name, alias, version = parse_model_uri(uri)
        client = MlflowClient()
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="adapter", dst_path=tmp)
            return read_adapter(Path(local).as_uri())
    return st_load(storage.read_bytes(storage.join(uri, ADAPTER_WEIGHTS))), storage.read_json(
        storage.join(uri, ADAPTER_CONFIG))


def apply_adapter(base: torch.nn.Module, uri: str) -> torch.nn.Module:
    """A merged copy of ``base`` with the adapter at ``uri`` (the base stays untouched)."""
    from models.conditioning import lora

    tensors, cfg = read_adapter(uri)
    model = copy.deepcopy(base)
    lora.inject_lora(model, cfg["targets"], rank=int(cfg["rank"]), alpha=float(cfg["alpha"]))
    lora.load_lora_state_dict(model, tensors)
    lora.merge_lora(model)
    return model.eval()
