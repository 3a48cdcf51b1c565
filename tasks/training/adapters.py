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

import torch

from condgen.models.conditioning import lora


def prepare(model: torch.nn.Module, targets: list[str], rank: int, alpha: float) -> list[str]:
    """Inject adapters on ``targets`` and freeze the base; returns every adapted layer's exact name.

    A model may define ``after_lora_injection()`` for what else its adaptation needs (a GAN
    keeps training its discriminator, the critic that is never served, and restarts the
    generator's EMA with the same adapters, so eval-mode samples carry the adapter too).
    """

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

    return sum(p.numel() for p in lora.lora_parameters(model) if p.requires_grad)
