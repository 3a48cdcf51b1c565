"""Samplers: pure functions ``sample_<name>(denoiser, x, schedule, *, cond, generator, callback, ...) -> x``.

One algorithm per file; the RNG is always an argument; the denoiser predicts eps.
"""
from condgen.models.diffusion.samplers.ddim import ddim_step, sample_ddim
from condgen.models.diffusion.samplers.ddpm import sample_ddpm

SAMPLERS = {"ddim": sample_ddim, "ddpm": sample_ddpm}

__all__ = ["SAMPLERS", "ddim_step", "sample_ddim", "sample_ddpm"]
