"""Discrete-time variance-preserving noise schedules (DDPM).

Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), §2:
forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), with
alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s, so that (Eq. 4)

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).

Indexing: timesteps are 0-based, ``t = 0 .. T-1`` (the paper's ``t = 1 .. T``), and
``alpha_bar(-1) == 1`` stands for the clean image x_0 (the "final alpha" of DDIM).
Song et al. 2021 (DDIM) write ``alpha_t`` for what is ``alpha_bar_t`` here.

Coefficients are kept in float64: samplers and inversion combine them step by step,
and DDIM inversion is only as exact as this arithmetic.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def linear_betas(T: int, beta_1: float = 1e-4, beta_T: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020 §4: beta linear from 1e-4 to 0.02 for T = 1000.

    For other T the endpoints are scaled by 1000 / T (Nichol & Dhariwal 2021,
    "Improved DDPM", their ``get_named_beta_schedule``) so that alpha_bar_T stays near 0
    with a short chain (tests use T ~ 20-50); betas are clipped to 0.999.
    """
    scale = 1000.0 / T
    return torch.linspace(scale * beta_1, scale * beta_T, T, dtype=torch.float64).clamp(max=0.999)


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped to 0.999 to avoid a singularity at t = T."""
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


class NoiseSchedule:
    """beta_t, alpha_t, alpha_bar_t for t = 0 .. T-1, float64 on the CPU."""

    def __init__(self, betas: torch.Tensor):
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.betas = betas.to(torch.float64)  # (T,)
        self.alphas = 1 - self.betas  # (T,)
        self.alpha_bars = torch.cumprod(self.alphas, 0)  # (T,)

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t as a Python float; ``t = -1`` is the clean image (alpha_bar = 1)."""
        if t < 0:
            return 1.0
        return float(self.alpha_bars[t])

    def alpha_bar_like(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """alpha_bar at per-row timesteps t (B,), shaped (B, 1, ..., 1) like x, in x's dtype/device."""
        t = as_timesteps(t, x.shape[0], x.device)
        a = self.alpha_bars.to(dtype=x.dtype).to(x.device)[t.clamp(min=0)]  # cast first: no float64 on MPS
        a = torch.where(t < 0, torch.ones_like(a), a)
        return a.view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, Eq. 4 reparameterised)."""
        a = self.alpha_bar_like(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def timesteps(self, steps: int | None = None, t_max: int | None = None) -> list[int]:
        """``steps`` timesteps evenly spaced from ``t_max`` (default T-1) down to 0, descending.

        Starting at T-1 ("trailing" spacing) makes the first step start from the noisiest
        level the model was trained on (Lin et al. 2024, "Common Diffusion Noise Schedules
        and Sample Steps are Flawed", §3.3). ``steps=None`` means every timestep.
        """
        t_max = self.T - 1 if t_max is None else t_max
        if not 0 <= t_max < self.T:
            raise ValueError(f"t_max must be in [0, {self.T - 1}], got {t_max}")
        n = t_max + 1 if steps is None else min(int(steps), t_max + 1)
        if n < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if n == 1:
            return [t_max]
        return [round(t_max - i * t_max / (n - 1)) for i in range(n)]

    def resolve(self, steps: int | None, timesteps: Sequence[int] | None) -> list[int]:
        """The descending timestep sub-sequence tau a sampler runs over (Song et al. 2021, §4.2)."""
        if timesteps is None:
            return self.timesteps(steps)
        if steps is not None:
            raise ValueError("pass either steps or timesteps, not both")
        tau = sorted({int(t) for t in timesteps}, reverse=True)
        if not tau or tau[0] >= self.T or tau[-1] < 0:
            raise ValueError(f"timesteps must be a non-empty subset of [0, {self.T - 1}]")
        return tau


def make_schedule(name: str, T: int) -> NoiseSchedule:
    """The named beta schedule ("linear" | "cosine") with T steps."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
    return NoiseSchedule(BETA_SCHEDULES[name](T))


def as_timesteps(t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """A timestep argument (int, 0-d or (B,) tensor) as an int64 (B,) tensor on ``device``."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}")
    return t.long()
