"""Samplers: pure functions ``sample_<name>(denoiser, x, schedule, *, cond, generator | noise, callback, ...) -> x``.

One algorithm per file: DDIM (Song et al. 2021), DDPM ancestral sampling (Ho et al. 2020) and the
deterministic few-step DPM-Solver++(2M) (Lu et al. 2022, ``dpmpp_2m``) on DDIM's timesteps.
The RNG is always an argument (a ``generator``, or a noise sampler ``noise(i)`` that owns the
draws); the denoiser predicts eps.
"""
from condgen.models.diffusion.samplers.ddim import ddim_step, predicted_x0, sample_ddim
from condgen.models.diffusion.samplers.ddpm import sample_ddpm
from condgen.models.diffusion.samplers.dpmpp import dpmpp_2m_step, sample_dpmpp_2m

SAMPLERS = {"ddim": sample_ddim, "ddpm": sample_ddpm, "dpmpp_2m": sample_dpmpp_2m}

__all__ = ["SAMPLERS", "ddim_step", "dpmpp_2m_step", "predicted_x0", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m"]
