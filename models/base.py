"""The contract every trainable generative model in condgen follows.

A model is an ``nn.Module`` with a frozen config dataclass next to it (nanoGPT
style). The generic Ray Train loop in ``tasks/training/worker.py`` knows nothing about
VAEs, GANs or diffusion: it only calls the three methods below, so a GAN's two
optimisers and a VAE's single one go through the same loop.

Batches are dicts of tensors:

* ``x``   (B, C, H, W) float in [-1, 1]  — the image
* ``y``   (B,) int64                     — the class label
* ``txt`` (B, D) float                   — precomputed CLIP text embedding (optional)
* ``cond_img`` (B, C, H, W) float [-1,1] — paired condition image (optional)

A *condition* passed to ``sample`` is a tensor: int64 (B,) means labels, float
(B, D) means embeddings (CLIP text). ``condition_from_batch`` picks the right one
for a model from a batch according to its config's ``condition`` field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch
from torch import nn

# the config helpers live with the configs (torch-free); re-exported here for the modules that import them from base
from condgen.models.configs import (  # noqa: F401
    config_from_dict,
    config_to_dict,
    flatten_params,
    json_normalised,
    nested_config,
)

# opt_step(group_name, loss): zero_grad, backward, all-reduce grads across workers, step.
OptStep = Callable[[str, torch.Tensor], None]


@runtime_checkable
class GenerativeModel(Protocol):
    config: Any

    def optimizer_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        """Named parameter groups, one optimiser each (e.g. {"gen": ..., "disc": ...})."""

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        """One optimisation step on a batch; calls ``opt_step`` once per group; returns scalar logs."""

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one sample per condition row, (B, C, H, W) in [-1, 1]."""


def is_generator(model: type | nn.Module) -> bool:
    """Whether a model family draws samples from a condition alone, so that the pipeline
    judges it (conditional accuracy, FID) and gates its promotion on that.

    Components set ``GENERATOR = False``: the judge and guidance classifiers, the
    autoencoder of latent diffusion, a super-resolution stage that needs its low-resolution
    input. They train and checkpoint like any model; later specs use their weights.
    """
    return bool(getattr(model, "GENERATOR", True))


def trains_on_latents(model: type | nn.Module, config: Any) -> str | None:
    """The checkpoint URI of the autoencoder on whose latents a model of this family, built from
    ``config`` (its dataclass), trains; None for a model trained on pixels. The pipeline then encodes
    the shards once per autoencoder (``tasks/data/latents.py``) and training never runs the encoder.

    A family opts in with a classmethod of the same name (``models.latent_diffusion``).
    """
    ask = getattr(model, "trains_on_latents", None)
    return ask(config) if ask is not None else None


# -- frozen parts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrozenPart:
    """A trained model that another model embeds, frozen: the autoencoder of latent diffusion, the base
    of a ControlNet, the first stage embedded in a super-resolution stage. Its config names it by a
    checkpoint URI (``autoencoder_uri``, ``base_uri``).

    ``models/`` reads no checkpoints. The caller in ``tasks/`` loads ``uri``
    (``tasks.io.model_store.attach_frozen_parts``), checks that it holds a ``model``, and hands the
    module in with the embedding model's ``attach_frozen(module)``, which checks the architecture
    against ``config`` and copies the weights in place. They are then part of the embedding model's
    ``state_dict``, so its own checkpoints are self-contained and load without ``uri``.
    """

    uri: str  # the checkpoint folder
    model: str  # the registry name that checkpoint must hold
    config: dict[str, Any]  # the architecture the embedding model was built for (JSON form)


def missing_frozen_part(model: nn.Module) -> FrozenPart | None:
    """The frozen part ``model`` was built to embed from a URI and holds no weights for yet; None when it
    embeds none, has them (handed in, attached, or loaded with a checkpoint), or names no URI."""
    ask = getattr(model, "missing_frozen_part", None)
    return ask() if ask is not None else None


def check_frozen_config(module: nn.Module, expected: Any, what: str) -> None:
    """ValueError unless ``module.config`` is the architecture ``expected`` (a config dataclass or its JSON form)."""
    want = expected if isinstance(expected, dict) else config_to_dict(expected)
    if json_normalised(config_to_dict(module.config)) != json_normalised(want):
        raise ValueError(f"the {what} handed in has config {config_to_dict(module.config)}, but this model was built "
                         f"for {want}; build the config from the checkpoint (tasks.data.latents.*_config helpers)")


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode: a frozen component (its buffers may still be loaded)."""
    module.requires_grad_(False)
    return module.eval()


def condition_from_batch(batch: dict[str, torch.Tensor], condition: str) -> torch.Tensor:
    """The condition tensor a model of kind ``condition`` ("label" | "text") reads from a batch."""
    if condition == "label":
        return batch["y"]
    if condition == "text":
        if "txt" not in batch:
            raise KeyError("condition='text' needs precomputed CLIP text embeddings ('txt'); run `condgen embed` first")
        return batch["txt"].float()
    if condition == "image":
        if "cond_img" not in batch:
            raise KeyError("condition='image' needs a paired condition image ('cond_img')")
        return batch["cond_img"]
    raise ValueError(f"unknown condition kind {condition!r} (expected 'label', 'text' or 'image')")


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, updates: torch.Tensor, decay: float) -> None:
    """ema <- d ema + (1 - d) net with d = min(decay, (1 + n) / (10 + n)), n = ``updates``
    (incremented in place). The warm-up lets short runs average too. Parameters only: the
    models that use it keep no running statistics (GroupNorm, not BatchNorm)."""
    n = int(updates)
    d = min(decay, (1 + n) / (10 + n))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1 - d)
    updates += 1


class BatchDraws:
    """A training step's per-sample random draws, made for the whole global batch and sliced to this worker's rows.

    Scaling out must not change the model. When each of W workers draws its own timesteps and noise for its share,
    a W-worker run of a seed sees other draws than the 1-worker run, and micro-batches (gradient accumulation) see
    other draws again: the same recipe, a different model. A model that routes its training randomness through
    ``take`` gets the same draws for every split: the training loop calls ``begin(offset, total)`` before each
    optimiser step (this worker's first row in the global batch, the global batch's size; every worker's
    generator in the same state) and ``at(offset)`` before each micro-batch; ``take(key, n, make)`` calls
    ``make(total)`` once per key and step and returns rows ``[offset, offset + n)``. Outside a step (``total`` None)
    it returns ``make(n)``: the draws of a model without it. One worker and no accumulation draw exactly what they
    drew before, so existing seeds give the models they gave.
    """

    def __init__(self) -> None:
        self.end()

    def begin(self, offset: int, total: int) -> None:
        self.offset, self.total, self._made, self._seq = offset, total, {}, 0

    def at(self, offset: int) -> None:
        self.offset, self._seq = offset, 0

    def end(self) -> None:
        self.offset, self.total, self._made, self._seq = 0, None, {}, 0

    def take(self, key: str | None, n: int, make: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Rows ``[offset, offset + n)`` of ``make(total)``; ``key`` None: the call's order in the micro-batch
        (every rank and micro-batch makes the same calls in the same order)."""
        if key is None:
            key, self._seq = f"#{self._seq}", self._seq + 1
        if self.total is None:
            return make(n)
        if self.offset + n > self.total:
            raise ValueError(f"rows [{self.offset}, {self.offset + n}) are outside a global batch of {self.total}")
        if key not in self._made:
            self._made[key] = make(self.total)
        return self._made[key][self.offset:self.offset + n]
