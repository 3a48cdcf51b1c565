"""DDPM ancestral sampling: Ho, Jain & Abbeel 2020, Algorithm 2.

    x_{t-1} = 1/sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_theta(x_t, t)) + sigma_t z,

with sigma_t^2 = beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t, the variance of the
posterior q(x_{t-1} | x_t, x_0) (Eq. 7; §3.2 reports it and sigma^2 = beta_t give similar samples).

On a sub-sequence tau of timesteps the same step is taken between consecutive elements
s > t' with the effective alpha = alpha_bar_s / alpha_bar_{t'} and beta = 1 - alpha (the
"respacing" of Nichol & Dhariwal 2021, §4); after the last element the chain lands on x_0.
This equals DDIM with eta = 1 (Song et al. 2021, §4.1). The z of step i is ``noise(i)``
(``models.diffusion.denoiser``'s noise sampler) or, by default, a draw from ``generator``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from condgen.models.diffusion.denoiser import Callback, Denoiser, NoiseSampler, resolve_noise
from condgen.models.diffusion.schedule import NoiseSchedule


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    cond: torch.Tensor | None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    noise: NoiseSampler | None = None,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) from x = x_{tau_0} down to x_0 over ``steps`` /
    ``timesteps`` (default all T); z of step i is ``noise(i)``, or a draw from ``generator``."""
    tau = schedule.resolve(steps, timesteps)
    noise = resolve_noise(noise, generator, x)
    for i, t in enumerate(tau):
        t_prev = tau[i + 1] if i + 1 < len(tau) else -1
        alpha_bar_t, alpha_bar_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
        alpha_t = alpha_bar_t / alpha_bar_prev  # effective alpha of the (possibly skipped) step
        beta_t = 1 - alpha_t
        t_b = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
        eps = denoiser(x, t_b, cond)  # (B, C, H, W)
        x = (x - beta_t / math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_t)  # posterior mean, Eq. 11
        sigma_t = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t)  # sqrt(beta_tilde_t), Eq. 7
        if sigma_t > 0:
            x = x + sigma_t * noise(i)
        if callback is not None:
            callback(i, len(tau))
    return x
