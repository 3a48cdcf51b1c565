"""Tiny, fast configurations of every registered model, shared by the tests.

``TINY[name]`` holds the config overrides (JSON-like dict, as ``build_model`` takes them) of
every key of ``condgen.models.registry.MODELS``: widths (4, 8), 20 diffusion timesteps and 3
sampling steps, so a train step or a sample takes milliseconds on one CPU thread.
``tests/test_model_contract.py`` fails when a registered model has no entry here.

* ``build_tiny(name, seed=0, **overrides)``: the model, seeded; models with a frozen part
  (latent diffusion's autoencoder, ControlNet's base, the super-resolution stage's embedded
  base) get a tiny one built here and handed to the constructor (``FROZEN``).
* ``tiny_batch(name, n)``: a fixed batch of real digits (sklearn's 8x8 digits, 3x upscaled and
  centred in 28x28, in [-1, 1]) with the keys that model's ``train_step`` reads.
* ``outputs(name, model, batch, generator)``: what the model produces for a batch: samples
  for models that sample from conditions, ``forward`` / ``encode`` for components.
* ``opt_step_for(model)``: one Adam per ``optimizer_groups()`` entry, built as
  ``tasks/training/worker.py``'s ``make_optimizers`` builds them (without Ray or MLflow).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from condgen.models.base import OptStep, config_from_dict
from condgen.models.registry import MODELS, build_model

TEXT_DIM = 12  # CLIP-text width for tests that switch a model to condition="text"

DIFFUSION = {"channels": (4, 8), "timesteps": 20, "text_dim": TEXT_DIM, "sample_steps": 3, "lr": 1e-2}
AUTOENCODER = {"channels": (4, 8), "latent_channels": 4, "lr": 1e-2}  # 28 x 28 x 1 -> 7 x 7 x 4
GAN = {"channels": (4, 8), "latent_dim": 8, "cond_dim": 4, "lr": 1e-3}

# Shared dicts: copy before changing one ({**TINY[name], ...} or tiny_config(name, **overrides)).
TINY: dict[str, dict[str, Any]] = {
    "cvae": {"channels": (4, 8), "latent_dim": 4, "cond_dim": 4, "lr": 1e-2},
    "diffusion": DIFFUSION,
    # cosine: with the linear schedule at T = 20, alpha_bar < 0.05 for half the steps (pure noise), so
    # its loss barely moves; guide a tiny diffusion model with it only under the same schedule
    "noisy_classifier": {"channels": (4, 8), "timesteps": 20, "schedule": "cosine", "lr": 1e-2},
    "cgan": GAN,
    "acgan": {**GAN, "lr": 1e-2},  # its classifier term learns slowly at 1e-3
    "pix2pix": {"channels": (4, 8), "lr": 1e-3},
    "cyclegan": {"channels": (4, 8), "disc_channels": (4, 8), "n_res": 1, "lr": 1e-3},
    "classifier": {"channels": (4, 8), "feature_dim": 16, "dropout": 0.0, "lr": 1e-2},
    "autoencoder": AUTOENCODER,
    "latent_diffusion": {**DIFFUSION, "autoencoder": AUTOENCODER, "lr": 2e-2},
    "controlnet": {"base": DIFFUSION, "hint_channels": 4, "lr": 2e-2},
    "superres": DIFFUSION,
}

# name -> (build_model keyword, registered name of the frozen part): a trained component handed in
FROZEN: dict[str, tuple[str, str]] = {
    "latent_diffusion": ("autoencoder", "autoencoder"),
    "controlnet": ("base", "diffusion"),
    "superres": ("base", "diffusion"),
}

# The log entry of train_step that each family drives down on a fixed batch: GANs' total losses
# see-saw, so D's hinge loss (cGAN), the classifier term (AC-GAN), the L1 (pix2pix) and the cycle loss.
LOSS_KEY: dict[str, str] = {"cgan": "d_loss", "acgan": "term1", "pix2pix": "l1", "cyclegan": "cycle"}


def tiny_config(name: str, **overrides: Any) -> Any:
    """The config dataclass of ``TINY[name]`` with ``overrides`` on top."""
    cfg_cls, _ = MODELS[name]
    return config_from_dict(cfg_cls, {**TINY[name], **overrides})


def build_tiny(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """``TINY[name]`` (+ overrides) built after ``torch.manual_seed(seed)``, its frozen part included."""
    config = tiny_config(name, **overrides)
    frozen = {}
    if name in FROZEN:
        keyword, part_name, part_config = _frozen_part_spec(name, config)
        torch.manual_seed(seed + 1000)
        # a trained component in practice: perturbed, so no zero-initialised head (the base's eps
        # output) blocks every gradient of the part built on it (ControlNet's zero convolutions)
        frozen[keyword] = perturb(build_model(part_name, part_config), seed=seed + 1000)
    torch.manual_seed(seed)
    return build_model(name, config, **frozen)


def _frozen_part_spec(name: str, config: Any) -> tuple[str, str, Any]:
    """(build_model keyword, registry name, config) of the frozen part ``config`` describes, so that an
    override of the part's architecture (e.g. ``base={...}``) builds a matching part."""
    keyword, part_name = FROZEN[name]
    if name == "latent_diffusion":
        return keyword, part_name, config.autoencoder
    if name == "controlnet":
        return keyword, part_name, config.base
    if name == "superres" and config.base_model:
        return keyword, config.base_model, config.base_config
    return keyword, part_name, TINY[part_name]


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Move every weight (frozen parts too): zero-initialised output layers (diffusion's eps head,
    ControlNet's zero convolutions) would otherwise make equality checks trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.zeros((len(d.images), 28, 28), np.float32)
    img[:, 2:26, 2:26] = np.kron(d.images, np.ones((3, 3))) / 16.0  # 8x8 -> 24x24, centred
    return torch.from_numpy(img).unsqueeze(1) * 2 - 1, torch.from_numpy(d.target).long()


def digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` sklearn digits as (x (n, 1, 28, 28) in [-1, 1], y (n,) int64); fresh copies."""
    x, y = _all_digits()
    return x[:n].clone(), y[:n].clone()


def tiny_batch(name: str, n: int = 16) -> dict[str, torch.Tensor]:
    """A fixed batch with the keys ``name``'s train_step reads (x, y, txt; cond_img / x_b where needed)."""
    from condgen.models.controlnet import control_image
    from condgen.models.paired import edge_map

    x, y = digits(n)
    batch = {"x": x, "y": y, "txt": torch.randn(n, TEXT_DIM, generator=torch.Generator().manual_seed(3))}
    if name == "pix2pix":
        batch["cond_img"] = edge_map(x)
    elif name == "controlnet":
        batch["cond_img"] = control_image(x, "edges")
    elif name == "cyclegan":
        batch["x_b"] = -x.flip(0)  # domain B: inverted digits, in another order (unpaired)
    return batch


def rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in batch.items()}


def condition(name: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The condition ``sample`` takes for this batch (labels, text embeddings or an image)."""
    kind = getattr(model.config, "condition", "label")
    if name == "cyclegan":
        return batch["x"]  # a domain-A image
    if kind == "image":
        return batch["cond_img"]
    return batch["txt"] if kind == "text" else batch["y"]


def outputs(name: str, model: nn.Module, batch: dict[str, torch.Tensor],
            generator: torch.Generator | None = None) -> torch.Tensor:
    """What ``model`` produces for ``batch``, one row per batch row: ``sample(cond, generator)`` for
    generators (ControlNet with the batch's control image), for components their forward
    (classifiers: logits; the noisy classifier at t = row index), the autoencoder's latent and
    decoded reconstruction, the super-resolution stage's sample given the downsampled batch."""
    with torch.no_grad():
        if name == "classifier":
            return model(batch["x"])
        if name == "noisy_classifier":
            t = torch.arange(len(batch["x"])) % model.config.timesteps
            return model(batch["x"], t)
        if name == "autoencoder":
            z = model.encode(batch["x"])
            return torch.cat([z.flatten(1), model.decode(z).flatten(1)], 1)
        cond = condition(name, model, batch)
        if name == "controlnet":
            return model.sample(cond, generator, control=batch["cond_img"])
        if name == "superres":
            return model.sample(cond, generator, low=model.downsample(batch["x"]))
        return model.sample(cond, generator)


def make_optimizers(model: nn.Module) -> dict[str, torch.optim.Optimizer]:
    """As ``tasks/training/worker.py``'s ``make_optimizers``: Adam per group, trainable parameters only,
    the config's betas and learning rate (or the model's ``group_lr(name)``)."""
    cfg = model.config
    betas = tuple(getattr(cfg, "betas", (0.9, 0.999)))
    lr = getattr(model, "group_lr", lambda name: cfg.lr)
    return {name: torch.optim.Adam([p for p in params if p.requires_grad], lr=lr(name), betas=betas)
            for name, params in model.optimizer_groups().items()}


def opt_step_for(model: nn.Module, optimizers: dict[str, torch.optim.Optimizer] | None = None) -> OptStep:
    """opt_step(group, loss): zero_grad, backward, step (the driver's, without the all-reduce)."""
    opts = make_optimizers(model) if optimizers is None else optimizers

    def opt_step(name: str, loss: torch.Tensor) -> None:
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    return opt_step


def decode_png(b64: str):
    """A base64 PNG from the service as a loaded PIL image (mode and size as sent)."""
    import base64
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im
