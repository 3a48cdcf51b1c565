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


def diff_augment(x: torch.Tensor, policy: str = "translation,cutout", generator=None) -> torch.Tensor:
    """Differentiable augmentation of a discriminator's input (Zhao et al. 2020, DiffAugment).

    With a few thousand training images the discriminator memorises the real set and
    stops giving the generator a useful signal. DiffAugment applies the *same family* of
    random, differentiable transforms to real and generated images every time D sees
    them, so D cannot memorise and gradients still flow back into G. Policies
    (comma-separated): ``translation`` shifts by up to 1/8 of the side with zero fill,
    ``cutout`` zeroes a random square of half the side, ``brightness`` adds U(-0.5, 0.5),
    ``contrast`` scales the deviation from the mean by U(0.5, 1.5). Empty policy: x as is.
    x: (B, C, H, W) in [-1, 1]; the fill value is -1 (background), not 0. ``generator``: a torch generator, None
    (the global one), or a callable ``source(shape)`` of U[0, 1) draws (training: the step's ``BatchDraws``).
    """
    for op in filter(None, (p.strip() for p in policy.split(","))):
        if op not in _AUGMENTS:
            raise ValueError(f"unknown DiffAugment op {op!r}; choose from {sorted(_AUGMENTS)}")
        x = _AUGMENTS[op](x, generator)
    return x


def _rand(shape: tuple[int, ...], x: torch.Tensor, generator) -> torch.Tensor:
    """U[0, 1) of ``shape`` (per sample first): from a torch generator (on the CPU), the global one (None), or a
    callable ``source(shape)`` (a training step's ``BatchDraws``)."""
    if callable(generator):
        return generator(shape).to(x.device)
    return torch.rand(shape, generator=generator, device="cpu" if generator is not None else x.device).to(x.device)


def _brightness(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return x + (_rand((x.shape[0], 1, 1, 1), x, g) - 0.5)


def _contrast(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand((x.shape[0], 1, 1, 1), x, g) + 0.5) + mean


def _translation(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = (_rand((b,), x, g) * (2 * sh + 1)).long() - sh  # (B,) in [-sh, sh]
    dx = (_rand((b,), x, g) * (2 * sw + 1)).long() - sw
    padded = F.pad(x + 1, (sw, sw, sh, sh)) - 1  # pad with -1 (background)
    rows = (torch.arange(h, device=x.device)[None, :] - dy[:, None] + sh)  # (B, H)
    cols = (torch.arange(w, device=x.device)[None, :] - dx[:, None] + sw)  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    # top-left corner in [-ch/2, h - ch/2]: the square may hang over the border
    y0 = (_rand((b,), x, g) * (h + 1)).long() - ch // 2
    x0 = (_rand((b,), x, g) * (w + 1)).long() - cw // 2
    ys = torch.arange(h, device=x.device)[None, :, None] - y0[:, None, None]  # (B, H, 1)
    xs = torch.arange(w, device=x.device)[None, None, :] - x0[:, None, None]  # (B, 1, W)
    inside = (ys >= 0) & (ys < ch) & (xs >= 0) & (xs < cw)  # (B, H, W)
    return torch.where(inside[:, None], torch.full_like(x, -1.0), x)


_AUGMENTS = {"translation": _translation, "cutout": _cutout, "brightness": _brightness, "contrast": _contrast}
