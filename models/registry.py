"""Explicit registry of model families: name -> (config dataclass, module class).

Models are never built from import strings; a checkpoint's ``model`` field must be
a key of ``MODELS``. New families add one line here.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from condgen.models.autoencoder import Autoencoder, AutoencoderConfig
from condgen.models.base import config_from_dict
from condgen.models.classifier import ClassifierConfig, DigitClassifier
from condgen.models.controlnet import ControlNet, ControlNetConfig
from condgen.models.cvae import CVAE, CVAEConfig
from condgen.models.cyclegan import CycleGAN, CycleGANConfig
from condgen.models.diffusion.ddpm import ConditionalDiffusion, DiffusionConfig, NoisyClassifier, NoisyClassifierConfig
from condgen.models.gan import ACGAN, CGAN, ACGANConfig, CGANConfig
from condgen.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from condgen.models.pix2pix import Pix2Pix, Pix2PixConfig
from condgen.models.superres import SuperRes, SuperResConfig

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "cvae": (CVAEConfig, CVAE),
    "diffusion": (DiffusionConfig, ConditionalDiffusion),
    "noisy_classifier": (NoisyClassifierConfig, NoisyClassifier),
    "cgan": (CGANConfig, CGAN),
    "acgan": (ACGANConfig, ACGAN),
    "pix2pix": (Pix2PixConfig, Pix2Pix),
    "cyclegan": (CycleGANConfig, CycleGAN),
    "classifier": (ClassifierConfig, DigitClassifier),
    "autoencoder": (AutoencoderConfig, Autoencoder),
    "latent_diffusion": (LatentDiffusionConfig, LatentDiffusion),
    "controlnet": (ControlNetConfig, ControlNet),
    "superres": (SuperResConfig, SuperRes),
}


def build_model(name: str, config: dict[str, Any] | Any | None = None) -> nn.Module:
    """Instantiate a registered model from a config dataclass or dict."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    cfg_cls, model_cls = MODELS[name]
    if config is None:
        config = cfg_cls()
    elif isinstance(config, dict):
        config = config_from_dict(cfg_cls, config)
    return model_cls(config)


def config_class(name: str) -> type:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    return MODELS[name][0]
