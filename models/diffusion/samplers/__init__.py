"""Samplers: pure functions ``sample_<name>(denoiser, x, schedule, *, cond, generator | noise, callback, ...) -> x``.

One algorithm per file: DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020).
The RNG is always an argument (a ``generator``, or a noise sampler ``noise(i)`` that owns the
draws); the denoiser predicts eps.
"""
from condgen.models.diffusion.samplers.ddim import ddim_step, sample_ddim
from condgen.models.diffusion.samplers.ddpm import sample_ddpm

SAMPLERS = {"ddim": sample_ddim, "ddpm": sample_ddpm}

__all__ = ["SAMPLERS", "ddim_step", "sample_ddim", "sample_ddpm"]
