"""Feature-wise Linear Modulation.

Perez et al. 2018, "FiLM: Visual Reasoning with a General Conditioning Layer"
(seeds 000, 001): the condition predicts a per-channel scale gamma and shift beta,
FiLM(h | c) = gamma(c) * h + beta(c). Less invasive than generating weights, and
gamma = 1, beta = 0 is exactly the identity.
"""
from __future__ import annotations

import torch
from torch import nn


def film(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """gamma * h + beta with per-channel (B, C) parameters broadcast over (B, C, H, W)."""
    return gamma[:, :, None, None] * h + beta[:, :, None, None]


class FiLM(nn.Module):
    """h (B, C, H, W), e (B, D) -> (B, C, H, W).

    The projection predicts (delta_gamma, beta) and gamma = 1 + delta_gamma, so a
    zeroed projection is the identity and a freshly initialised one stays close to it
    (the network starts as if unconditioned and learns how much to modulate).
    """

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.channels = channels
        self.out_channels = channels
        self.proj = nn.Linear(cond_dim, 2 * channels)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        d_gamma, beta = self.proj(e).chunk(2, -1)  # (B, C) each
        return film(h, 1 + d_gamma, beta)
