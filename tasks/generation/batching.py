"""Many independent sampling requests in one forward pass per step (serving and batch generation).

Requests for the same model that differ only in conditions, seeds, guidance scales or
negative prompts are *compatible* (``compat_key``): they share the sampler, the steps and
eta, so their rows can be stacked. ``sample_batch`` runs a list of compatible requests as
ONE call of ``sampling.sample_from`` — the function ``condgen sample`` runs — and returns
each request's images, equal to running it alone:

* every request owns its RNG: its x_T and every per-step noise (DDPM, DDIM with eta > 0)
  come from its own seeded generators through ``models.diffusion.rows_noise``, in the same
  order as a lone run (and as ``sample_images`` with that seed);
* guidance scales are per row (``models.diffusion.guidance``: CFG, Ho & Salimans 2022,
  runs the unconditional branch only for the rows with w != 0); rows without a negative
  prompt keep the null token;
* classifier and CLIP guidance need gradients: they batch only with their own kind.

A lone request equals ``ConditionalDiffusion.sample`` for DDIM + CFG bit for bit
(tests/test_serving_v1.py). Batched vs lone: the noise and the arithmetic are the same, but
CPU GEMM/convolution kernels pick their blocking by batch size, so one forward differs by
float32 rounding (~1e-7); after a sampler run that is ~1e-4 at worst in [-1, 1], below the
1/255 step of the returned 8-bit images, so a pixel on a rounding boundary can land one grey
level apart.

Pure torch: no Ray, MLflow or I/O; the serving app and ``tasks/generation/batch.py`` call it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from condgen.models.cvae import CVAE
from condgen.models.diffusion.ddpm import ConditionalDiffusion
from condgen.models.diffusion.denoiser import rows_noise
from condgen.models.gan import _ConditionalGAN
from condgen.tasks.generation.inputs import mode_of, model_geometry
from condgen.tasks.generation.sampling import EDIT_METHODS, GUIDANCE, SAMPLERS, sample_from


class Cancelled(RuntimeError):
    """Every request of a batch was cancelled (timed out); the loop stopped early."""


def model_kind(model: nn.Module) -> str:
    """"diffusion" | "cvae" | "gan" | "other" — what the sampling code can do with a model."""
    if isinstance(model, ConditionalDiffusion):
        return "diffusion"
    if isinstance(model, CVAE):
        return "cvae"
    if isinstance(model, _ConditionalGAN):
        return "gan"
    return "other"


@dataclass
class SampleRequest:
    """One request: ``cond`` raw conditions, one row per image (labels (n,) int64 or CLIP text (n, D)).

    ``segments`` says which generator draws which rows: [(seed, count), ...] summing to n;
    a single (seed, n) is "one seed for the request", n × (seed_i, 1) is "one seed per image".
    """

    cond: torch.Tensor
    segments: list[tuple[int, int]]
    guidance: str = "none"
    scale: float = 0.0
    negative: torch.Tensor | None = None  # raw, like cond (n rows), for CFG's unconditional branch
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    clip_text: torch.Tensor | None = None  # (1 or n, D) unit text embeddings for CLIP guidance
    cancelled: Callable[[], bool] = field(default=lambda: False, repr=False)

    @property
    def n(self) -> int:
        return int(self.cond.shape[0])

    def __post_init__(self) -> None:
        if sum(c for _, c in self.segments) != self.n:
            raise ValueError(f"segments cover {sum(c for _, c in self.segments)} rows, cond has {self.n}")
        if self.guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {GUIDANCE}, got {self.guidance!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if self.negative is not None and self.negative.shape[0] != self.n:
            raise ValueError("negative needs one row per image")

    def generators(self) -> list[tuple[torch.Generator, int]]:
        """(CPU generator, rows) per segment: the same noise on every device (``models.diffusion.randn``)."""
        return [(torch.Generator(device="cpu").manual_seed(int(s)), int(c)) for s, c in self.segments]


def compat_key(kind: str, req: SampleRequest) -> tuple:
    """Requests with equal keys (for the same loaded model) can share one batch."""
    if kind != "diffusion":
        return ("direct",)
    # CFG and no guidance mix (w = 0 rows); classifier / CLIP guidance need gradients: own groups.
    g = "free" if req.guidance in ("none", "cfg") else req.guidance
    eta = float(req.eta) if req.sampler == "ddim" else None
    return (req.sampler, int(req.steps), eta, g)


@torch.no_grad()
def sample_batch(model: nn.Module, requests: Sequence[SampleRequest], *, classifier: nn.Module | None = None,
                 clip_tower: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Images for each request, (n_i, C, H, W) in [-1, 1]; the requests must share ``compat_key``."""
    if not requests:
        return []
    kind = model_kind(model)
    keys = {compat_key(kind, r) for r in requests}
    if len(keys) != 1:
        raise ValueError(f"requests are not compatible: {sorted(map(str, keys))}")
    sizes = [r.n for r in requests]
    if kind == "diffusion":
        x = _sample_diffusion(model, requests, classifier=classifier, clip_tower=clip_tower)
    elif kind in ("cvae", "gan"):
        x = _sample_latent(model, kind, requests)
    else:  # any other generator with sample(cond, generator): one call per segment, no shared batch
        outs = []
        for r in requests:
            row = 0
            for g, c in r.generators():
                outs.append(model.sample(r.cond[row:row + c], generator=g))
                row += c
        x = torch.cat(outs)
    return list(x.split(sizes))


def _per_row(requests: Sequence[SampleRequest], value: Callable[[SampleRequest], Any], dtype: torch.dtype
             ) -> torch.Tensor:
    """One value per request, repeated over its rows: (sum n_i,)."""
    return torch.tensor([value(r) for r in requests for _ in range(r.n)], dtype=dtype)


def _sample_diffusion(model: ConditionalDiffusion, requests: Sequence[SampleRequest], *,
                      classifier: nn.Module | None, clip_tower: Callable | None) -> torch.Tensor:
    r0 = requests[0]
    conf, dev = model.config, model._device()
    gens = [g for r in requests for g in r.generators()]
    noise = rows_noise(gens, (conf.in_channels, conf.image_size, conf.image_size), dev)
    x_T = noise(-1)  # each request's first draw, as in a lone run
    cond = torch.cat([r.cond for r in requests]).to(dev)
    guidance = r0.guidance if r0.guidance in ("classifier", "clip") else "cfg"  # "none" rows: CFG at w = 0
    scale = _per_row(requests, lambda r: float(r.scale) if r.guidance != "none" else 0.0, torch.float64)
    negative = negative_rows = clip_text = None
    if any(r.negative is not None for r in requests):
        negative = torch.cat([r.cond if r.negative is None else r.negative for r in requests]).to(dev)
        negative_rows = _per_row(requests, lambda r: r.negative is not None, torch.bool)
    if guidance == "clip":
        if any(r.clip_text is None for r in requests):
            raise ValueError("CLIP guidance needs a text embedding (a prompt or a label with a class name)")
        clip_text = torch.cat([r.clip_text.expand(r.n, -1) for r in requests]).to(dev)

    def check_cancelled(i: int = -1, n: int = 0) -> None:
        if all(r.cancelled() for r in requests):
            raise Cancelled("every request in this batch was cancelled")

    check_cancelled()
    return sample_from(model, x_T, cond, noise=noise, sampler=r0.sampler, steps=int(r0.steps), eta=float(r0.eta),
                       guidance=guidance, scale=scale, negative=negative, negative_rows=negative_rows,
                       classifier=classifier, clip_encoder=clip_tower, clip_text=clip_text, callback=check_cancelled)


def _sample_latent(model: nn.Module, kind: str, requests: Sequence[SampleRequest]) -> torch.Tensor:
    """As ``CVAE.sample`` (z = mu_c + eps * sigma_c) or ``_ConditionalGAN.sample`` (x = G(z, c)), with
    eps / z ~ N(0, I) drawn from each request's (CPU) generators: the same noise on every device."""
    dev = next(model.parameters()).device
    cond = torch.cat([r.cond for r in requests]).to(dev)
    gens = [g for r in requests for g in r.generators()]
    if kind == "cvae":
        mu, logvar = model.prior(cond)  # (B, latent)
        eps = rows_noise(gens, (mu.shape[1],), mu.device)(0)
        return model.decode(mu + eps * (0.5 * logvar).exp(), cond)
    z = rows_noise(gens, (model.config.latent_dim,), dev)(0)
    return model.generate(z, cond)


def describe(model: nn.Module) -> dict[str, Any]:
    """What a loaded model can do, for ``GET /v1/models``."""
    kind = model_kind(model)
    conf = model.config
    channels, size = model_geometry(model)
    out: dict[str, Any] = {
        "kind": kind,
        "condition": getattr(conf, "condition", "label"),
        "num_classes": int(getattr(conf, "num_classes", 10)),
        "image_size": size,
        "channels": channels,  # the PNGs out (and uploads, once decoded) are L for 1 channel, RGB for 3
        "mode": mode_of(channels),
        "guidance": ["none"],
        "samplers": [],
        "edit_methods": [],
        "interpolate": kind in ("cvae", "gan", "diffusion"),
    }
    if kind == "diffusion":
        out.update(guidance=list(GUIDANCE), samplers=sorted(SAMPLERS), edit_methods=list(EDIT_METHODS),
                   timesteps=int(conf.timesteps), default_steps=int(conf.sample_steps),
                   default_guidance_scale=float(conf.guidance_scale))
    if kind in ("cvae", "gan"):
        out["latent_dim"] = int(conf.latent_dim)
    return out
