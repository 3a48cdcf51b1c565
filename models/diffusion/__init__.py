"""Conditional diffusion as small composable pieces (pure PyTorch).

schedule   NoiseSchedule, make_schedule            beta_t / alpha_bar_t (Ho et al. 2020)
unet       UNet                                    eps_theta(x_t, t, e)
ddpm       DiffusionConfig, ConditionalDiffusion   model contract of models/base.py, CFG training
           NoisyClassifierConfig, NoisyClassifier  p_phi(y | x_t, t) for classifier guidance
samplers   sample_ddpm, sample_ddim                sample_<name>(D, x, schedule, *, cond, generator | noise, callback)
denoiser   Denoiser, NoiseSampler, rows_noise      the contracts: D(x, t, cond) -> eps; noise(i) -> z_i
guidance   cfg, classifier_guidance, clip_guidance denoiser -> denoiser wrappers (scale: float or per row (B,))
clipping   clip_x0                                 denoiser wrapper: x0_hat clamped to the data range
inversion  ddim_invert, null_text_inversion        x_0 -> x_T (+ per-step null embeddings)
sdedit     sdedit                                  noise to strength * T, denoise with a new condition
"""
from condgen.models.diffusion.clipping import clip_x0
from condgen.models.diffusion.ddpm import ConditionalDiffusion, DiffusionConfig, NoisyClassifier, NoisyClassifierConfig
from condgen.models.diffusion.denoiser import Denoiser, NoiseSampler, generator_noise, rows_noise
from condgen.models.diffusion.guidance import cfg, classifier_guidance, clip_guidance
from condgen.models.diffusion.inversion import (
    NullTextInversion,
    PerStepCondition,
    ddim_inversion_trajectory,
    ddim_invert,
    null_text_inversion,
)
from condgen.models.diffusion.samplers import SAMPLERS, sample_ddim, sample_ddpm
from condgen.models.diffusion.schedule import NoiseSchedule, make_schedule
from condgen.models.diffusion.sdedit import sdedit

__all__ = [
    "SAMPLERS",
    "ConditionalDiffusion",
    "Denoiser",
    "DiffusionConfig",
    "NoiseSampler",
    "NoiseSchedule",
    "NoisyClassifier",
    "NoisyClassifierConfig",
    "NullTextInversion",
    "PerStepCondition",
    "cfg",
    "classifier_guidance",
    "clip_guidance",
    "clip_x0",
    "ddim_inversion_trajectory",
    "ddim_invert",
    "generator_noise",
    "make_schedule",
    "null_text_inversion",
    "rows_noise",
    "sample_ddim",
    "sample_ddpm",
    "sdedit",
]
