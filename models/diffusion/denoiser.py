"""The denoiser and noise contracts shared by samplers, guidance wrappers and inversion (DESIGN.md).

A denoiser is any callable ``D(x, t, cond) -> eps``:

* ``x``    (B, C, H, W) noisy image x_t;
* ``t``    int64 (B,) timesteps in [0, T) of the ``NoiseSchedule`` (or a Python int);
* ``cond`` whatever the wrapped network accepts, batched along dim 0 with ``x``.
  For ``ConditionalDiffusion.denoiser()``: int64 (B,) labels, float (B, E) condition
  *embeddings*, or None (the learned null token).

It returns the noise prediction eps_theta(x_t, t, cond), (B, C, H, W). Other
parameterisations (v, x_0) belong in a wrapper that converts to eps, never in samplers.

A noise sampler is a callable ``noise(i) -> z_i``: the fresh N(0, I) draw of sampler step i,
shaped like x (k-diffusion's ``noise_sampler(sigma, sigma_next)``, indexed by step instead).
Stochastic samplers (DDPM, DDIM with eta > 0) take one, so the caller owns the RNG:
``generator_noise`` is what a ``generator=`` argument means, and ``rows_noise`` gives each
block of rows its own generator (one per request of a served batch) with no copy of a
sampler loop.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

Callback = Callable[[int, int], None]  # callback(i, total) after step i of total
NoiseSampler = Callable[[int], torch.Tensor]  # noise(i) -> z_i ~ N(0, I) shaped like x, for sampler step i


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


def generator_noise(
    generator: torch.Generator | None,
    shape: torch.Size | tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> NoiseSampler:
    """``noise(i)``: the next ``shape`` draw of ``generator`` (call order, the step index is not used)."""
    return lambda i: randn(shape, generator, device, dtype)


def rows_noise(
    generators: Sequence[tuple[torch.Generator | None, int]],
    shape: torch.Size | tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> NoiseSampler:
    """``noise(i)``: ``count`` rows of ``shape`` from each (generator, count) in turn, concatenated,
    (sum of counts, *shape). Each generator sees the same sequence of draws as a lone run on its rows."""
    return lambda i: torch.cat([randn((count, *shape), g, device, dtype) for g, count in generators])


def resolve_noise(noise: NoiseSampler | None, generator: torch.Generator | None, x: torch.Tensor) -> NoiseSampler:
    """A sampler's noise source: ``noise`` if given, else draws like x from ``generator`` (both: an error)."""
    if noise is not None:
        if generator is not None:
            raise ValueError("pass either generator or noise, not both")
        return noise
    return generator_noise(generator, x.shape, x.device, x.dtype)
