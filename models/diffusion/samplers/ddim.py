"""DDIM sampling: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models".

Generalised generative step, Eq. 12 (their alpha_t is our alpha_bar_t):

    x_{t-1} = sqrt(alpha_bar_{t-1}) * x0_hat                       # "predicted x_0"
            + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) * eps_theta      # "direction pointing to x_t"
            + sigma_t * z,                                            # random noise, z ~ N(0, I)
    x0_hat  = (x_t - sqrt(1 - alpha_bar_t) * eps_theta(x_t, t)) / sqrt(alpha_bar_t),

with sigma_t(eta) = eta * sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_{t-1})
(Eq. 16). eta = 0 is the deterministic DDIM (an ODE discretisation, §4.3); eta = 1 is
DDPM ancestral sampling (§4.1). Any decreasing sub-sequence tau of [0, T) may be used,
with "t-1" meaning the next element of tau (§4.2, accelerated generation); after the
last element the chain lands on the clean image (alpha_bar = 1).

The sigma_t z noise comes from a noise sampler ``noise(i)`` (``models.diffusion.denoiser``) or,
by default, from ``generator``: a served batch gives every request its own generator with
``rows_noise`` and runs this same loop.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from condgen.models.diffusion.denoiser import Callback, Denoiser, NoiseSampler, resolve_noise
from condgen.models.diffusion.schedule import NoiseSchedule


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t): the denoised estimate implied by an eps
    prediction (Song et al. 2021, Eq. 12's "predicted x_0"; DPM-Solver++'s data prediction x_theta)."""
    return (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    sigma_t: float = 0.0,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update (Song et al. 2021, Eq. 12) from level alpha_bar_t to alpha_bar_prev. Also runs
    "uphill" (alpha_bar_prev < alpha_bar_t) with sigma_t = 0, which is DDIM inversion's step."""
    x0_hat = predicted_x0(x_t, eps, alpha_bar_t)
    x_prev = math.sqrt(alpha_bar_prev) * x0_hat + math.sqrt(max(1 - alpha_bar_prev - sigma_t**2, 0.0)) * eps
    if sigma_t > 0:
        x_prev = x_prev + sigma_t * z
    return x_prev


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev) (Song et al. 2021, Eq. 16):
    0 is deterministic DDIM, 1 DDPM's ancestral step."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    cond: torch.Tensor | None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    eta: float = 0.0,
    noise: NoiseSampler | None = None,
) -> torch.Tensor:
    """Run DDIM (Song et al. 2021, Eq. 12 and 16) from x = x_{tau_0} (pure noise for tau_0 = T-1) down to x_0.

    ``steps`` evenly spaced timesteps (default: all T) or an explicit ``timesteps``
    sub-sequence. The sigma_t z noise of step i is ``noise(i)`` or, without ``noise``, a draw
    from ``generator`` (unused when eta = 0).
    """
    tau = schedule.resolve(steps, timesteps)
    noise = resolve_noise(noise, generator, x)
    for i, t in enumerate(tau):
        t_prev = tau[i + 1] if i + 1 < len(tau) else -1
        a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
        t_b = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
        eps = denoiser(x, t_b, cond)  # (B, C, H, W)
        sigma = ddim_sigma(a_t, a_prev, eta)
        z = noise(i) if sigma > 0 else None
        x = ddim_step(x, eps, a_t, a_prev, sigma, z)
        if callback is not None:
            callback(i, len(tau))
    return x
