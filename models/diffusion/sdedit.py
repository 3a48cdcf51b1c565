"""SDEdit: Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations", §3 and Algorithm 1 (written there for the VE-SDE; this is the
VP / DDPM form).

Perturb the guide image x^(g) to an intermediate time t_0 = strength * T with the
forward marginal q(x_{t_0} | x_0) (Ho et al. 2020, Eq. 4), then run the reverse process
from t_0 with the new condition. strength trades faithfulness to the input (small) for
realism under the new condition (large); seed 003's "diffuse -> denoise" recipe.
"""
from __future__ import annotations

import math

import torch

from condgen.models.diffusion.denoiser import Callback, Denoiser, randn
from condgen.models.diffusion.samplers.ddim import sample_ddim
from condgen.models.diffusion.schedule import NoiseSchedule


@torch.no_grad()
def sdedit(
    denoiser: Denoiser,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    strength: float,
    cond: torch.Tensor | None,
    generator: torch.Generator | None = None,
    steps: int | None = None,
    eta: float = 1.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Edit x0 (B, C, H, W) in [-1, 1] towards ``cond``; ``strength`` in [0, 1], 0 returns x0.

    ``steps`` denoising steps evenly spaced over [0, t_0] (default: every timestep).
    ``eta = 1`` is the stochastic reverse process of the paper (DDPM ancestral);
    ``eta = 0`` gives a deterministic DDIM edit for a fixed noise draw.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if strength == 0:
        return x0.clone()
    t0 = min(schedule.T - 1, max(0, math.ceil(strength * schedule.T) - 1))
    tau = schedule.timesteps(steps, t_max=t0)
    z = randn(x0.shape, generator, x0.device, x0.dtype)
    a = schedule.alpha_bar(t0)
    x_t0 = math.sqrt(a) * x0 + math.sqrt(1 - a) * z  # x_{t_0} ~ q(x_{t_0} | x_0)
    return sample_ddim(denoiser, x_t0, schedule, cond=cond, generator=generator, callback=callback,
                       timesteps=tau, eta=eta)
