"""Adaptive Instance Normalisation.

Huang & Belongie 2017, "Arbitrary Style Transfer in Real-time with Adaptive Instance
Normalization" (seed 000): AdaIN(x, y) = sigma(y) * (x - mu(x)) / sigma(x) + mu(y),
with mu, sigma per sample and channel (instance statistics). As in StyleGAN (Karras
et al. 2019) the target statistics sigma(y), mu(y) are predicted from the condition
embedding rather than measured on a style image. Unlike FiLM, the features are
instance-normalised first, so the condition fully sets each channel's mean and scale.
"""
from __future__ import annotations

import torch
from torch import nn


def instance_norm(h: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(h - mu(h)) / sigma(h) over the spatial dims of each (sample, channel)."""
    mu = h.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
    var = h.var((2, 3), keepdim=True, unbiased=False)
    return (h - mu) / torch.sqrt(var + eps)


class AdaIN(nn.Module):
    """h (B, C, H, W), e (B, D) -> (B, C, H, W).

    scale = 1 + s(e) so the block starts near plain instance normalisation.
    ``normalizes = True`` tells a layer stack it may drop its own norm before this block.
    """

    normalizes = True

    def __init__(self, channels: int, cond_dim: int, eps: float = 1e-5):
        super().__init__()
        self.channels = channels
        self.out_channels = channels
        self.eps = eps
        self.proj = nn.Linear(cond_dim, 2 * channels)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        d_sigma, mu = self.proj(e).chunk(2, -1)  # (B, C) each: sigma(y) - 1, mu(y)
        return (1 + d_sigma)[:, :, None, None] * instance_norm(h, self.eps) + mu[:, :, None, None]
