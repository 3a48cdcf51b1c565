"""Walking between two latents of a generator (``POST /v1/interpolate``).

CVAE: z = mu_c + eps * sigma_c, decoded; GAN: G(z, c); diffusion: the x_T are interpolated
and each frame is sampled from its x_T by ``sampling.sample_from`` (deterministic DDIM,
Song et al. 2021, eta = 0, with CFG), so a frame is a function of its latent only.
"""
from __future__ import annotations

import torch
from torch import nn

from condgen.tasks.generation.batching import model_kind
from condgen.tasks.generation.sampling import sample_from

INTERPOLATIONS = ("linear", "slerp")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation along the great circle (Shoemake 1985; the usual choice for
    Gaussian latents, whose mass lies near a sphere). Falls back to lerp for parallel vectors."""
    af, bf = a.flatten(), b.flatten()
    cos = torch.dot(af, bf) / (af.norm() * bf.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if float(omega) < 1e-6:
        return (1 - t) * a + t * b
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def latent_shape(model: nn.Module) -> tuple[int, ...]:
    kind = model_kind(model)
    if kind in ("cvae", "gan"):
        return (model.config.latent_dim,)
    if kind == "diffusion":
        c = model.config
        return (c.in_channels, c.image_size, c.image_size)
    raise ValueError(f"{type(model).__name__} has no latent space to interpolate")


def seed_latent(model: nn.Module, seed: int) -> torch.Tensor:
    """The latent a seed gives: eps ~ N(0, I) of ``latent_shape`` (the CVAE's z before the prior's affine)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, *latent_shape(model)), generator=g)[0]


@torch.no_grad()
def interpolate(model: nn.Module, cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, frames: int,
                method: str = "slerp", steps: int = 20, scale: float = 0.0) -> torch.Tensor:
    """Decode ``frames`` latents between a and b (inclusive) under one condition ``cond`` (1 row)."""
    if method not in INTERPOLATIONS:
        raise ValueError(f"method must be one of {INTERPOLATIONS}, got {method!r}")
    kind = model_kind(model)
    shape = latent_shape(model)
    if tuple(a.shape) != shape or tuple(b.shape) != shape:
        raise ValueError(f"latents must have shape {list(shape)}, got {list(a.shape)} and {list(b.shape)}")
    ts = [i / (frames - 1) for i in range(frames)] if frames > 1 else [0.0]
    z = torch.stack([slerp(a, b, t) if method == "slerp" else (1 - t) * a + t * b for t in ts])
    dev = next(model.parameters()).device
    c = cond.to(dev).expand(frames, *cond.shape[1:]) if cond.shape[0] == 1 else cond.to(dev)
    z = z.to(dev)
    if kind == "cvae":
        mu, logvar = model.prior(c)
        return model.decode(mu + z * (0.5 * logvar).exp(), c)
    if kind == "gan":
        return model.generate(z, c)
    return sample_from(model, z, c, sampler="ddim", steps=steps, eta=0.0, guidance="cfg", scale=float(scale))
