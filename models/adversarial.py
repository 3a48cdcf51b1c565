"""Adversarial losses and small helpers shared by the GAN families.

* hinge loss (Lim & Ye 2017; Miyato et al. 2018, SN-GAN): the stable default for
  class-conditional GANs with a spectrally normalised discriminator;
* non-saturating BCE (Goodfellow et al. 2014), as in pix2pix (Isola et al. 2017);
* least squares (Mao et al. 2017, LSGAN), as in CycleGAN (Zhu et al. 2017).

Each ``*_d_loss(real_logits, fake_logits)`` is the discriminator's loss, each
``*_g_loss(fake_logits)`` the generator's; logits may be (B, 1) or patch maps.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def bce_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # 0.5: pix2pix halves D's objective so D learns slower than G.
    return 0.5 * (
        F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    )


def bce_g_loss(fake: torch.Tensor) -> torch.Tensor:
    # Non-saturating: maximise log D(G(z)) instead of minimising log(1 - D(G(z))).
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def lsgan_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (((real - 1) ** 2).mean() + (fake**2).mean())


def lsgan_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return ((fake - 1) ** 2).mean()


def sn(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Spectral normalisation (Miyato et al. 2018) of a layer's weight, or the layer unchanged."""
    return spectral_norm(module) if enabled else module


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients into ``modules`` (the discriminators during the generator step).

    Saves the backward pass through D's weights and keeps G's loss from leaving stale
    gradients in D; restores each parameter's previous ``requires_grad``.
    """
    params = [p for m in modules for p in m.parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
