"""Text-to-image sampling and image edits on a loaded pretrained pipeline, for many requests at once.

One function per operation, shared by the multi-adapter service (``serving/pretrained_service.py``)
and anyone holding a ``base.Pretrained``: the adapter a caller wants must already be active
(``lora.activate``), so a batch of rows that share an adapter is one forward pass per step.

Generation is docs/pretrained.md's recipe applied row-wise: x_T drawn per row from its own seed
(``base.initial_latents``, as diffusers' pipeline draws it, so a row's image does not depend on
the batch it shares), classifier-free guidance with weight w = g - 1 per row (diffusers'
``guidance_scale`` g; g <= 1 is unguided) towards the prompt and away from the row's negative
prompt or the empty prompt (Ho & Salimans 2022), then DDIM (Song et al. 2021) or DPM-Solver++(2M)
(Lu et al. 2022) over diffusers' timestep spacing. Edits are SDEdit (Meng et al. 2022) or a DDIM
inversion of the image under the source prompt re-sampled under the target prompt.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from condgen.models.diffusion import SAMPLERS, cfg, ddim_invert, sample_ddim, sdedit
from condgen.tasks.pretrained import base

GENERATE_SAMPLERS = ("ddim", "dpmpp_2m")
EDIT_METHODS = ("sdedit", "ddim_inversion")


@dataclass(frozen=True)
class Row:
    """One request's share of a batch: ``n`` images of ``prompt`` from seeds ``seed``, ``seed`` + 1, ... ."""

    prompt: str
    negative_prompt: str = ""
    guidance: float = 7.5
    seed: int = 0
    n: int = 1


def image_size(p: base.Pretrained) -> int:
    """The pipeline's native image size in pixels (the U-Net's latent size times the VAE's factor)."""
    return int(p.unet.config.sample_size) * vae_factor(p)


def vae_factor(p: base.Pretrained) -> int:
    return 2 ** (len(p.vae.config.block_out_channels) - 1)


def _device(p: base.Pretrained) -> torch.device:
    return next(p.unet.parameters()).device


@torch.no_grad()
def generate(p: base.Pretrained, rows: Sequence[Row], *, steps: int, sampler: str = "ddim",
             size: int | None = None) -> list[torch.Tensor]:
    """Images (n, 3, size, size) in [-1, 1] per row, all rows sampled together with the active adapter.

    Row i's k-th image starts from ``initial_latents(p, 1, size, Generator(seed_i + k))``, so an image
    depends on its own seed, never on its neighbours in the batch (up to float rounding)."""
    if sampler not in GENERATE_SAMPLERS:
        raise ValueError(f"sampler must be one of {GENERATE_SAMPLERS}, got {sampler!r}")
    size = int(size or image_size(p))
    if size % vae_factor(p):
        raise ValueError(f"size {size} is not a multiple of the VAE's factor {vae_factor(p)}")
    device = _device(p)
    flat = [(r, r.seed + k) for r in rows for k in range(r.n)]
    prompts = list(dict.fromkeys([r.prompt for r in rows] + [r.negative_prompt for r in rows]))
    emb = dict(zip(prompts, base.encode_prompts(p, prompts).float()))
    cond = torch.stack([emb[r.prompt] for r, _ in flat])
    uncond = torch.stack([emb[r.negative_prompt] for r, _ in flat])
    w = torch.tensor([max(float(r.guidance) - 1.0, 0.0) for r, _ in flat], dtype=torch.float64)
    x_T = torch.cat([base.initial_latents(p, 1, size, torch.Generator().manual_seed(int(s))) for _, s in flat])
    D = cfg(base.denoiser(p), w, uncond)
    z = SAMPLERS[sampler](D, x_T.to(device), p.schedule, cond=cond,
                          timesteps=base.timesteps(p.scheduler_config, steps))
    images = base.decode_latents(p, z).cpu()
    return list(images.split([r.n for r in rows]))


@torch.no_grad()
def edit(p: base.Pretrained, image: torch.Tensor, *, prompt: str, source_prompt: str = "",
         method: str = "sdedit", strength: float = 0.6, steps: int = 20, guidance: float = 1.0,
         seed: int = 0) -> torch.Tensor:
    """Edit ``image`` (1, 3, H, W) in [-1, 1] towards ``prompt`` with the active adapter; (1, 3, H, W).

    ``sdedit``: noise the image's latent to ``strength`` * T and denoise it under ``prompt`` (its
    randomness from ``seed``). ``ddim_inversion``: invert the latent to x_T under ``source_prompt``
    (unguided, Song et al. 2021 §5.4) and sample it back with ``prompt``: the image keeps its
    layout where the prompts agree. ``guidance`` > 1 guides the re-sampling (CFG)."""
    if method not in EDIT_METHODS:
        raise ValueError(f"method must be one of {EDIT_METHODS}, got {method!r}")
    device = _device(p)
    z0 = base.encode_images(p, image.to(device))
    tgt, src, null = base.encode_prompts(p, [prompt, source_prompt, ""]).float().split(1)
    D = base.denoiser(p)
    guided = cfg(D, max(float(guidance) - 1.0, 0.0), null)
    tau = base.timesteps(p.scheduler_config, steps)
    if method == "sdedit":
        z = sdedit(guided, z0, p.schedule, strength=float(strength), cond=tgt,
                   generator=torch.Generator().manual_seed(int(seed)), steps=steps)
    else:
        z_T = ddim_invert(D, z0, p.schedule, cond=src, timesteps=tau)
        z = sample_ddim(guided, z_T, p.schedule, cond=tgt, timesteps=tau)
    return base.decode_latents(p, z).cpu()
