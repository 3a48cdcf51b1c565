"""Explicit registry of model families: name -> (config dataclass, module class).

Models are never built from import strings; a checkpoint's ``model`` field must be
a key of ``MODELS``. New families add one line here.

Frozen parts (``models.base.FrozenPart``) are handed in as keyword arguments of
``build_model`` (``autoencoder=`` for latent diffusion, ``base=`` for a ControlNet or a
super-resolution stage). A super-resolution stage may embed any registered family, so the
registry names that family for it, or builds its architecture from the config.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from condgen.models.autoencoder import Autoencoder
from condgen.models.classifier import JudgeClassifier
from condgen.models.configs import CONFIGS, config_from_dict
from condgen.models.controlnet import ControlNet
from condgen.models.cvae import CVAE
from condgen.models.cyclegan import CycleGAN
from condgen.models.diffusion.ddpm import ConditionalDiffusion, NoisyClassifier
from condgen.models.gan import ACGAN, CGAN
from condgen.models.latent_diffusion import LatentDiffusion
from condgen.models.pix2pix import Pix2Pix
from condgen.models.superres import SuperRes

# name -> module class; the config classes are ``models.configs.CONFIGS`` (torch-free, so the CLI checks a
# config before importing torch), and a family missing from either is a KeyError here, at import.
_CLASSES: dict[str, type[nn.Module]] = {
    "cvae": CVAE,
    "diffusion": ConditionalDiffusion,
    "noisy_classifier": NoisyClassifier,
    "cgan": CGAN,
    "acgan": ACGAN,
    "pix2pix": Pix2Pix,
    "cyclegan": CycleGAN,
    "classifier": JudgeClassifier,
    "autoencoder": Autoencoder,
    "latent_diffusion": LatentDiffusion,
    "controlnet": ControlNet,
    "superres": SuperRes,
}
if set(_CLASSES) != set(CONFIGS):
    raise KeyError(f"models.configs.CONFIGS and models.registry._CLASSES name different families: "
                   f"{sorted(set(_CLASSES) ^ set(CONFIGS))}")
MODELS: dict[str, tuple[type, type[nn.Module]]] = {name: (CONFIGS[name], _CLASSES[name]) for name in CONFIGS}


# What a NEW training run of a family starts from, under the fields its spec sets (``recipe_config``). The
# config dataclasses' own defaults stay what stored checkpoints were written against: an older checkpoint's
# JSON lacks the fields added since, and must keep meaning what it meant, so a better recipe is never a
# changed dataclass default. The diffusion recipe was chosen by ``benchmarks/diffusion_recipe.py``
# (docs/results.md, "Diffusion training recipe"): v-prediction (Salimans & Ho 2022), Min-SNR-5 weighting
# (Hang et al. 2023) with a floor of 0.25 under the x0 weight (min(SNR, 5) + 0.25: the high-noise steps, where
# Min-SNR's weight goes to 0, keep some; a floor of 1 raised deterministic DDIM 25 on digits but blurred the
# edges of colour shapes, label accuracy 0.60 against 0.77; 0.25 keeps the digits' gain and the shapes' 0.78),
# self-attention at the lowest resolution and EMA weights for sampling, on the linear schedule (the cosine
# schedule measured no better with them, and worse alone). The cGAN's discriminator sees
# every image through a translation DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for
# Data-Efficient GAN Training"): on the 3,976 bundled training digits it otherwise wins within a few epochs on
# some seeds (d_loss 0.003 by epoch 6, accuracy 0.755); with it three seeds score 0.936-0.977 where they scored
# 0.755-0.923 (``benchmarks/scale_out.py --set``, docs/results.md "Scaling out").
RECIPES: dict[str, dict[str, Any]] = {
    "diffusion": {"prediction": "v", "loss_weighting": "min_snr", "min_snr_floor": 0.25, "attention": True,
                  "ema_decay": 0.999},
    "cgan": {"augment": "translation"},
}
# ... and what a new run adds for one kind of condition. A text-conditioned pixel U-Net gets its pixel
# coordinates (CoordConv, ``unet.UNet``): a global text vector cannot say "in the top left" to a
# translation-equivariant network; on ``bundled:shapes`` position went from 27% to 94% (docs/results.md).
CONDITION_RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("diffusion", "text"): {"coords": True},
}


def recipe_config(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A new run's config for family ``name``: its recipe (``RECIPES``, then ``CONDITION_RECIPES`` for the
    spec's ``condition``), then the spec's own fields on top."""
    config = dict(config or {})
    name = _known(name)
    extra = CONDITION_RECIPES.get((name, str(config.get("condition", ""))), {})
    return {**RECIPES.get(name, {}), **extra, **config}


def build_model(name: str, config: dict[str, Any] | Any | None = None, **frozen: nn.Module) -> nn.Module:
    """Instantiate a registered model from a config dataclass or dict. ``frozen``: trained components
    handed in (``autoencoder=`` for latent diffusion, ``base=`` for a ControlNet or a super-resolution
    stage); a frozen part that the config only names by URI is attached by the caller
    (``tasks.io.model_store.attach_frozen_parts``)."""
    cfg_cls, model_cls = MODELS[_known(name)]
    if config is None:
        config = cfg_cls()
    elif isinstance(config, dict):
        config = config_from_dict(cfg_cls, config)
    if model_cls is SuperRes:  # its base may be any registered family: named, or built, here
        if frozen.get("base") is not None:
            config = dataclasses.replace(config, base_model=model_name(frozen["base"]))
        elif config.base_model:
            frozen["untrained_base"] = build_model(config.base_model, config.base_config)
    return model_cls(config, **frozen)


def model_name(model: nn.Module) -> str:
    """The registry name of a model's family."""
    for name, (_, cls) in MODELS.items():
        if type(model) is cls:
            return name
    raise KeyError(f"{type(model).__name__} is not in models.registry.MODELS")


def config_class(name: str) -> type:
    return MODELS[_known(name)][0]


def model_class(name: str) -> type[nn.Module]:
    """The module class of a registered family (for class-level capabilities: ``models.base.is_generator``,
    ``models.base.trains_on_latents``)."""
    return MODELS[_known(name)][1]


def _known(name: str) -> str:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    return name
