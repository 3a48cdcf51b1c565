"""Conditioning blocks, selectable by a config string through an explicit dict.

Every block has the signature ``Block(channels, cond_dim)`` and
``forward(h (B, C, H, W), e (B, D)) -> (B, block.out_channels, H, W)``; only concat
changes the channel count. LoRA is not a block (it adapts weights, not features):
see ``models.conditioning.lora``.
"""
from __future__ import annotations

from torch import nn

from condgen.models.conditioning.adain import AdaIN
from condgen.models.conditioning.concat import ConcatCondition
from condgen.models.conditioning.cross_attention import CrossAttention
from condgen.models.conditioning.film import FiLM

BLOCKS: dict[str, type[nn.Module]] = {
    "concat": ConcatCondition,
    "film": FiLM,
    "adain": AdaIN,
    "cross_attention": CrossAttention,
}


def make_block(name: str, channels: int, cond_dim: int) -> nn.Module:
    """The conditioning block called ``name`` for ``channels`` feature maps and a (B, cond_dim) condition."""
    if name not in BLOCKS:
        raise ValueError(f"unknown conditioning block {name!r}; choose one of {sorted(BLOCKS)}")
    return BLOCKS[name](channels, cond_dim)
