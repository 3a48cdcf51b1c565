"""A small conditional U-Net eps_theta(x_t, t, c) for square images of any size and channel count
(28x28 greyscale digits, 32 or 64 px colour: ``in_channels``; odd sizes halve with ceil).

Architecture after Ho et al. 2020 (DDPM, App. B: a PixelCNN++-style U-Net with
GroupNorm residual blocks and a sinusoidal time embedding, Vaswani et al. 2017 §3.5)
and Dhariwal & Nichol 2021 (ADM, §3: the class embedding is *added* to the time
embedding). For text conditioning the pooled CLIP embedding additionally feeds a
cross-attention layer at the lowest resolution (Rombach et al. 2022, latent diffusion,
§3.3; seed 004 "Latent Diffusion Models").

The network takes an **already embedded** condition e (B, E): embedding a label or a
text vector happens in ``self.cond`` (``ConditionEmbedding``, whose extra row / null
vector is the learned null token of classifier-free guidance). Taking e lets null-text
inversion (Mokady et al. 2023) optimise the null embedding directly. The cross-attention
context tokens are computed from e, so the null token also reaches that path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condgen.models.conditioning.cross_attention import CrossAttention
from condgen.models.conditioning.embedding import ConditionEmbedding


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017 §3.5; DDPM App. B), (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + projected embedding, GN-SiLU-conv, residual (DDPM / ADM residual block).

    ``scale_shift``: the embedding sets a per-channel scale and shift of the second GroupNorm instead of
    being added before it, AdaGN(h, e) = (1 + y_s) GroupNorm(h) + y_b (Dhariwal & Nichol 2021, §3, "adaptive
    group normalization", which their ablation finds better than addition). The second conv starts at zero
    so each block begins as the identity (ADM's zero init).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        e = self.emb(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """h + W_o softmax(Q K^T / sqrt(d)) V over the H*W positions of a feature map (DDPM, Ho et al. 2020,
    App. B: self-attention at the 16x16 level; ADM, Dhariwal & Nichol 2021, §2: at the low resolutions).
    The output projection starts at zero, so the block begins as the identity."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        q, k, v = self.qkv(self.norm(h)).view(b, 3, self.heads, c // self.heads, hh * ww).unbind(1)
        # (B, heads, HW, C / heads) each
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return h + self.out(out.transpose(-1, -2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, c, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # nearest to the skip's exact size: 7 -> 14 -> 28 (or odd sizes) without checkerboards
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def coordinate_grid(x: torch.Tensor) -> torch.Tensor:
    """(1, 2, H, W): the x and y coordinate of each pixel of ``x`` (B, C, H, W), from -1 to 1."""
    h, w = x.shape[-2:]
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy])[None]


class UNet(nn.Module):
    """eps_theta(x_t, t, e): (B, C, H, W), (B,) int64, (B, E) -> (B, C, H, W).

    ``channels[i]`` is the width at level i; resolution halves between levels
    (28 -> 14 -> 7 for three levels). One residual block per level on the way down
    and up, a middle block (res, [self-attention], [cross-attention], res) at the lowest resolution.
    E = 4 * channels[0] is the width of the time (and condition) embedding.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, ...] = (32, 64),
        condition: str = "label",
        num_classes: int = 10,
        text_dim: int = 64,
        context_tokens: int = 4,
        attention: bool = False,
        coords: bool = False,
        scale_shift: bool = False,
    ):
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one level")
        self.c0 = c0 = channels[0]
        c_low = channels[-1]
        self.emb_dim = E = 4 * c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, E), nn.SiLU(), nn.Linear(E, E))
        self.cond = ConditionEmbedding(condition, num_classes, text_dim, E)
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        # CoordConv (Liu et al. 2018): convolutions are translation-equivariant, so a U-Net with only
        # global conditions (time, label, pooled text) learns "in the top left" only from padding
        # effects. A 1x1 projection of the (x, y) pixel coordinates, added after the input conv, tells
        # every position where it is. Zero-initialised: the network starts as it would without it.
        self.coords = nn.Conv2d(2, c0, 1) if coords else None
        if self.coords is not None:
            nn.init.zeros_(self.coords.weight)
            nn.init.zeros_(self.coords.bias)

        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        c_prev = c0
        for i, c in enumerate(channels):
            self.down_blocks.append(ResBlock(c_prev, c, E, scale_shift))
            self.downsamples.append(Downsample(c) if i < len(channels) - 1 else nn.Identity())
            c_prev = c

        self.mid1 = ResBlock(c_low, c_low, E, scale_shift)
        # self-attention between the middle blocks (``attention``), before the text cross-attention
        self.self_attn = SelfAttention(c_low, heads=c_low // 32 if c_low % 32 == 0 else 1) if attention else None
        self.context_tokens = context_tokens
        if condition == "text":
            # One pooled CLIP vector -> L context tokens, so attention has something to choose between.
            self.to_context = nn.Linear(E, context_tokens * E)
            self.attn = CrossAttention(c_low, E, heads=c_low // 32 if c_low % 32 == 0 else 1)
        else:
            self.to_context, self.attn = None, None
        self.mid2 = ResBlock(c_low, c_low, E, scale_shift)

        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        c_prev = c_low
        for i in reversed(range(len(channels))):
            c = channels[i]
            self.upsamples.append(Upsample(c_prev) if i < len(channels) - 1 else nn.Identity())
            self.up_blocks.append(ResBlock(c_prev + c, c, E, scale_shift))
            c_prev = c

        self.norm_out = group_norm(c0)
        self.conv_out = nn.Conv2d(c0, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start by predicting eps = 0
        nn.init.zeros_(self.conv_out.bias)

    def encode(self, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, hint: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The way down: (emb (B, E), the skip after each level, the middle block's output).
        ``hint`` is added after the input conv (ControlNet's Z(c)). ``models.controlnet``'s
        trainable copy runs this same code on its own copies of these layers."""
        emb = self.time_mlp(timestep_embedding(t, self.c0)) + e  # (B, E)
        h = self.conv_in(x)  # (B, c0, H, W)
        if self.coords is not None:
            h = h + self.coords(coordinate_grid(x))
        if hint is not None:
            h = h + hint
        skips = []
        for block, down in zip(self.down_blocks, self.downsamples):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid1(h, emb)  # (B, c_low, h, w)
        if self.self_attn is not None:
            h = self.self_attn(h)
        if self.attn is not None:
            context = self.to_context(e).view(e.shape[0], self.context_tokens, -1)  # (B, L, E)
            h = self.attn(h, context)
        return emb, skips, self.mid2(h, emb)

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """The way up from the middle block's output, consuming the skips deepest first."""
        skips = list(skips)
        for block, up in zip(self.up_blocks, self.upsamples):
            skip = skips.pop()
            h = up(h, skip.shape[-2:]) if isinstance(up, Upsample) else h
            h = block(torch.cat([h, skip], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor,
                down_res: list[torch.Tensor] | None = None, mid_res: torch.Tensor | None = None) -> torch.Tensor:
        """eps. ``down_res`` / ``mid_res``: residuals added to the skips and to the middle block's
        output (ControlNet, Zhang et al. 2023, Fig. 3); None leaves the network as it is."""
        emb, skips, h = self.encode(x, t, e)
        if mid_res is not None:
            h = h + mid_res
        if down_res is not None:
            skips = [s + r for s, r in zip(skips, down_res)]
        return self.decode(h, skips, emb)
