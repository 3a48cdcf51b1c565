"""A stack of stride-2 (transposed) convolutions, each followed by a conditioning block.

Shared by the CVAE (encoder and decoder when ``block != "concat"``) and the GAN
generator, so that "concat", "film" and "adain" are swappable by a config string.
One layer is  conv -> norm -> block(h, e) -> act : FiLM acts after the norm as in
Perez et al. 2018; AdaIN normalises itself, so the norm is skipped before it; concat
adds D channels that the *next* convolution reads.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from condgen.models.conditioning import make_block


class CondConvStack(nn.Module):
    """(B, in_channels, H, W), e (B, cond_dim) -> (B, out_channels, H * 2^±n, W * 2^±n).

    ``transpose=False`` halves the resolution per layer (Conv2d 4/2/1); ``True``
    doubles it (ConvTranspose2d 4/2/1).
    """

    def __init__(
        self,
        in_channels: int,
        channels: list[int] | tuple[int, ...],
        cond_dim: int,
        block: str,
        *,
        transpose: bool,
        act: Callable[[], nn.Module] = nn.SiLU,
        groups: int = 4,
    ):
        super().__init__()
        conv_cls = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.convs, self.norms, self.blocks, self.acts = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c_in = in_channels
        for c_out in channels:
            blk = make_block(block, c_out, cond_dim)
            self.convs.append(conv_cls(c_in, c_out, 4, 2, 1))
            self.norms.append(nn.Identity() if getattr(blk, "normalizes", False) else nn.GroupNorm(min(groups, c_out), c_out))
            self.blocks.append(blk)
            self.acts.append(act())
            c_in = blk.out_channels
        self.out_channels = c_in

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        for conv, norm, blk, act in zip(self.convs, self.norms, self.blocks, self.acts):
            h = act(blk(norm(conv(h)), e))
        return h
