"""Cross-attention from spatial features to a condition sequence.

Vaswani et al. 2017, "Attention Is All You Need"; used for text conditioning in
AttnGAN (Xu et al. 2018) and latent diffusion (Rombach et al. 2022, seed 003):
queries come from the image features, keys and values from the condition tokens,
Output = softmax(Q K^T / sqrt(d)) V, added back residually.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """h (B, C, H, W), e (B, D) or (B, L, D) -> (B, C, H, W) = h + Attn(norm(h), e).

    A (B, D) embedding (one CLIP text vector) is a sequence of length 1; then every
    position receives the same value vector, which is still a learned, condition-
    dependent update. ``mask`` (B, L) bool marks the tokens to attend to (True = keep).
    """

    def __init__(self, channels: int, cond_dim: int, heads: int = 1, groups: int = 4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.channels = channels
        self.out_channels = channels
        self.heads = heads
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(cond_dim, channels, bias=False)
        self.to_v = nn.Linear(cond_dim, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor, e: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hh, ww = h.shape
        if e.dim() == 2:
            e = e[:, None, :]  # (B, 1, D)
        q = self.to_q(self.norm(h).flatten(2).transpose(1, 2))  # (B, HW, C)
        k, v = self.to_k(e), self.to_v(e)  # (B, L, C)
        # split heads: (B, heads, N, C / heads)
        q, k, v = (t.view(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, HW, C / heads)
        out = self.to_out(out.transpose(1, 2).reshape(b, hh * ww, c))  # (B, HW, C)
        return h + out.transpose(1, 2).view(b, c, hh, ww)
