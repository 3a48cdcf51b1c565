"""Clipping the denoised estimate: a denoiser wrapper (DESIGN.md: x0 handling lives in wrappers,
never inside samplers).

Ho et al. 2020's reference sampler clips x0_hat to the data range at every step
(``clip_denoised=True``; diffusers' ``clip_sample``): with eps-prediction,
x0_hat = (x_t - sqrt(1 - a_bar) eps) / sqrt(a_bar) amplifies an eps error by
sqrt((1 - a_bar) / a_bar), ~160x at the last step of the linear schedule (a_bar ~ 4e-5), so
a small network's slight bias at high noise otherwise drives the whole chain out of range.
The wrapper returns the eps that is consistent with the clipped estimate,

    eps' = (x_t - sqrt(a_bar) clip(x0_hat)) / sqrt(1 - a_bar),

so any eps-sampler (DDIM, DDPM) then steps towards the clipped x0_hat. Not for DDIM
inversion: clipping breaks the symmetry between the inversion and the regeneration paths.
"""
from __future__ import annotations

import torch

from condgen.models.diffusion.denoiser import Denoiser
from condgen.models.diffusion.schedule import NoiseSchedule, as_timesteps


def clip_x0(denoiser: Denoiser, schedule: NoiseSchedule, lo: float = -1.0, hi: float = 1.0) -> Denoiser:
    """``denoiser`` whose implied x0_hat is clamped to [lo, hi] (the data range)."""

    def clipped(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        t = as_timesteps(t, x.shape[0], x.device)
        eps = denoiser(x, t, cond)
        a = schedule.alpha_bar_like(t, x)  # (B, 1, 1, 1)
        x0_hat = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(lo, hi)
        return (x - a.sqrt() * x0_hat) / (1 - a).sqrt()

    return clipped
