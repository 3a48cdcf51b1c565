"""Concatenation ("vectorisation") conditioning.

Mirza & Osindero 2014, "Conditional Generative Adversarial Nets" (seeds 000, 001):
repeat the condition embedding at every spatial position and stack it as extra
channels, so the next convolution sees image features and condition side by side.
"""
from __future__ import annotations

import torch
from torch import nn


class ConcatCondition(nn.Module):
    """h (B, C, H, W), e (B, D) -> (B, C + D, H, W).

    It has no parameters: the following layer learns how to mix the condition in,
    which is why ``out_channels`` differs from ``channels`` (the caller sizes its next
    convolution from it).
    """

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.channels = channels
        self.cond_dim = cond_dim
        self.out_channels = channels + cond_dim

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if e.dim() != 2:
            raise ValueError(f"concat conditioning expects a (B, D) embedding, got {tuple(e.shape)}")
        e_map = e[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])  # (B, D, H, W)
        return torch.cat([h, e_map.to(h.dtype)], 1)  # (B, C + D, H, W)
