"""The denoiser contract shared by samplers, guidance wrappers and inversion (DESIGN.md).

A denoiser is any callable ``D(x, t, cond) -> eps``:

* ``x``    (B, C, H, W) noisy image x_t;
* ``t``    int64 (B,) timesteps in [0, T) of the ``NoiseSchedule`` (or a Python int);
* ``cond`` whatever the wrapped network accepts, batched along dim 0 with ``x``.
  For ``ConditionalDiffusion.denoiser()``: int64 (B,) labels, float (B, E) condition
  *embeddings*, or None (the learned null token).

It returns the noise prediction eps_theta(x_t, t, cond), (B, C, H, W). Other
parameterisations (v, x_0) belong in a wrapper that converts to eps, never in samplers.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

Callback = Callable[[int, int], None]  # callback(i, total) after step i of total


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...


def randn(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """N(0, I) drawn on the generator's own device, then moved to ``device``: a CPU generator
    drives a GPU model, and a seed gives the same noise on every device."""
    g_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=g_device, dtype=dtype).to(device)
