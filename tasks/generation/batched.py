"""Sampling many independent requests in one forward pass per step (serving and batch generation).

Requests for the same model that differ only in labels, seeds, guidance scales or
negative prompts are *compatible*: they share the sampler, the timesteps and eta, so
their rows can be stacked. ``sample_batch`` runs a list of compatible requests as one
batch and returns each request's images, identical to running it alone:

* every request owns its RNG: its initial noise (and every per-step noise of DDPM /
  DDIM with eta > 0) is drawn from its own seeded ``torch.Generator`` in the same order
  as a lone run, then the rows are concatenated;
* conditions are embedded per request, and CFG (Ho & Salimans 2022, Eq. 6) is applied
  per row: the guided rows' unconditional halves ride in the same forward as every
  row's conditional half, ``net([x; x_g], [t; t_g], [e_c; e_u,g])``, with per-row
  coefficients (1 + w_i) and w_i cast to float32 as a Python scalar would be; rows with
  w = 0 take eps_c directly, as ``guidance.cfg`` returns the bare denoiser for w = 0.
* the sampler loops are ``sample_ddim`` / ``sample_ddpm`` step for step (the same
  ``ddim_step`` and the same arithmetic), only the noise source is per request.

A lone request through ``sample_batch`` equals ``ConditionalDiffusion.sample`` for
DDIM + CFG bit for bit (tests/test_serving_v1.py). Batched vs lone: the noise and the
arithmetic are the same, but CPU GEMM/convolution kernels pick their blocking by batch
size, so one forward differs by float32 rounding (~1e-7); after a sampler run that is
~1e-4 at worst in [-1, 1], below the 1/255 step of the returned 8-bit images. A pixel
that sits on a rounding boundary can still land one grey level apart, so the tests check
the floats within 2e-3 and the PNGs within one level on a rare pixel, not bit equality.

Pure torch and numpy: no Ray, MLflow or I/O; the serving app and ``flows/batch_generate``
both call it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from condgen.models.cvae import CVAE
from condgen.models.diffusion.clipping import clip_x0
from condgen.models.diffusion.ddpm import ConditionalDiffusion
from condgen.models.diffusion.denoiser import randn
from condgen.models.diffusion.guidance import cfg
from condgen.models.diffusion.inversion import ddim_invert, null_text_inversion
from condgen.models.diffusion.samplers.ddim import ddim_step, sample_ddim
from condgen.models.diffusion.sdedit import sdedit
from condgen.models.gan import _ConditionalGAN

GUIDANCE = ("none", "cfg", "classifier", "clip")
SAMPLERS = ("ddim", "ddpm")
EDIT_METHODS = ("ddim_inversion", "null_text", "sdedit")
INTERPOLATIONS = ("linear", "slerp")


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
    clip_text: torch.Tensor | None = None  # (n, D) unit text embeddings for CLIP guidance
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
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.negative is not None and self.negative.shape[0] != self.n:
            raise ValueError("negative needs one row per image")

    def generators(self, device: torch.device | str = "cpu") -> list[tuple[torch.Generator, int]]:
        return [(torch.Generator(device="cpu").manual_seed(int(s)), int(c)) for s, c in self.segments]


def compat_key(kind: str, req: SampleRequest) -> tuple:
    """Requests with equal keys (for the same loaded model) can share one batch."""
    if kind != "diffusion":
        return ("direct",)
    # CFG and no guidance mix (w = 0 rows); classifier / CLIP guidance need gradients: own groups.
    g = "free" if req.guidance in ("none", "cfg") else req.guidance
    eta = float(req.eta) if req.sampler == "ddim" else None
    return (req.sampler, int(req.steps), eta, g)


def _noise(gens: Sequence[tuple[torch.Generator, int]], shape: tuple[int, ...], device, dtype=torch.float32):
    """Rows drawn from each generator in turn, concatenated: (sum counts, *shape)."""
    return torch.cat([randn((c, *shape), g, device, dtype) for g, c in gens])


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
    elif kind == "cvae":
        x = _sample_cvae(model, requests)
    elif kind == "gan":
        x = _sample_gan(model, requests)
    else:  # any other generator with sample(cond, generator): one call per segment, no shared batch
        outs = []
        for r in requests:
            row = 0
            for g, c in r.generators():
                outs.append(model.sample(r.cond[row:row + c], generator=g))
                row += c
        x = torch.cat(outs)
    return list(x.split(sizes))


# -- CVAE / GAN: one decoder pass ----------------------------------------------------------------
def _sample_cvae(model: nn.Module, requests: Sequence[SampleRequest]) -> torch.Tensor:
    """As ``CVAE.sample``: z = mu_c + eps * sigma_c, eps ~ N(0, I) from each request's generator."""
    dev = next(model.parameters()).device
    cond = torch.cat([r.cond for r in requests]).to(dev)
    mu, logvar = model.prior(cond)  # (B, latent)
    # drawn on each request's (CPU) generator, then moved: the same noise on every device
    eps = torch.cat([_noise(r.generators(), (mu.shape[1],), mu.device) for r in requests])
    return model.decode(mu + eps * (0.5 * logvar).exp(), cond)


def _sample_gan(model: nn.Module, requests: Sequence[SampleRequest]) -> torch.Tensor:
    """As ``_ConditionalGAN.sample``: x = G(z, c), z ~ N(0, I) from each request's generator."""
    dev = next(model.parameters()).device
    cond = torch.cat([r.cond for r in requests]).to(dev)
    d = model.config.latent_dim
    z = torch.cat([_noise(r.generators(), (d,), dev) for r in requests])
    return model.generate(z, cond)


# -- diffusion ------------------------------------------------------------------------------------
@dataclass
class _Rows:
    """Everything per row that the batched denoiser needs, built once before the loop."""

    e_c: torch.Tensor  # (B, E) condition embeddings
    e_u: torch.Tensor  # (G, E) unconditional / negative embeddings of the guided rows
    guided: torch.Tensor  # (G,) int64 row indices with w != 0
    coef_c: torch.Tensor  # (G, 1, 1, 1) 1 + w
    coef_u: torch.Tensor  # (G, 1, 1, 1) w
    scale: torch.Tensor  # (B, 1, 1, 1) classifier / CLIP guidance scale per row
    labels: torch.Tensor | None  # (B,) labels (classifier guidance)
    clip_text: torch.Tensor | None  # (B, D)


def _rows(model: nn.Module, requests: Sequence[SampleRequest]) -> _Rows:
    dev = model._device()
    e_c, e_u, guided, cu, ws, scales, labels, texts = [], [], [], [], [], [], [], []
    row = 0
    for r in requests:
        e = model.embed_condition(r.cond)  # (n, E), embedded per request as a lone run does
        e_c.append(e)
        w = float(r.scale) if r.guidance == "cfg" else 0.0
        if w != 0:
            u = model.embed_condition(r.negative) if r.negative is not None else model.null_embedding(1).expand(r.n, -1)
            e_u.append(u)
            guided.extend(range(row, row + r.n))
            cu += [1 + w] * r.n
            ws += [w] * r.n
        s = float(r.scale) if r.guidance in ("classifier", "clip") else 0.0
        scales += [s] * r.n
        if r.guidance == "classifier":
            if r.cond.dtype != torch.long:
                raise ValueError("classifier guidance needs class labels (a label-conditioned model)")
            labels.append(r.cond)
        if r.guidance == "clip":
            if r.clip_text is None:
                raise ValueError("CLIP guidance needs a text embedding (a prompt or a label with a class name)")
            texts.append(r.clip_text.expand(r.n, -1) if r.clip_text.shape[0] == 1 else r.clip_text)
        row += r.n
    E = e_c[0].shape[1]
    view = (-1, 1, 1, 1)
    return _Rows(
        e_c=torch.cat(e_c),
        e_u=torch.cat(e_u) if e_u else torch.zeros(0, E, device=dev),
        guided=torch.tensor(guided, dtype=torch.long, device=dev),
        # Python floats -> float32 exactly as ``(1 + w) * eps_c`` with a Python scalar rounds them.
        coef_c=torch.tensor(cu, dtype=torch.float32, device=dev).view(view),
        coef_u=torch.tensor(ws, dtype=torch.float32, device=dev).view(view),
        scale=torch.tensor(scales, dtype=torch.float32, device=dev).view(view),
        labels=torch.cat(labels).to(dev) if labels else None,
        clip_text=torch.cat(texts).to(dev) if texts else None,
    )


def _free_eps(model: nn.Module, rows: _Rows, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps with per-row CFG; cond and uncond halves of the guided rows in ONE forward."""
    g = rows.guided
    if g.numel() == 0:
        return model.net(x, t, rows.e_c)
    b = x.shape[0]
    out = model.net(torch.cat([x, x[g]]), torch.cat([t, t[g]]), torch.cat([rows.e_c, rows.e_u]))
    eps_c, eps_u = out[:b], out[b:]
    eps = eps_c.clone()
    eps[g] = rows.coef_c * eps_c[g] - rows.coef_u * eps_u
    return eps


def _guided_eps(model: nn.Module, rows: _Rows, guidance: str, x: torch.Tensor, t: torch.Tensor, *,
                classifier: nn.Module | None, clip_tower: Callable | None) -> torch.Tensor:
    """Classifier guidance (Dhariwal & Nichol 2021, Eq. 14) or CLIP guidance (GLIDE §2.4) with a
    per-row scale: eps_bar = eps - s_i sqrt(1 - alpha_bar_t) grad_i (rows are independent)."""
    a = model.schedule.alpha_bar_like(t, x)
    if guidance == "classifier":
        if classifier is None:
            raise ValueError("classifier guidance needs a noise-aware classifier; none is configured for this model")
        eps = _free_eps(model, rows, x, t)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_p = F.log_softmax(classifier(x_in, t).float(), -1)  # (B, K)
            (grad,) = torch.autograd.grad(log_p.gather(1, rows.labels[:, None]).sum(), x_in)
        return eps - rows.scale * (1 - a).sqrt() * grad
    if clip_tower is None:
        raise ValueError("CLIP guidance needs a CLIP model; none is configured for this service")
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        eps = _free_eps(model, rows, x_in, t)
        x0_hat = (x_in - (1 - a).sqrt() * eps) / a.sqrt()
        img = clip_tower(x0_hat)  # (B, D)
        sim = F.cosine_similarity(img.float(), rows.clip_text.float(), dim=-1)
        (grad,) = torch.autograd.grad(sim.sum(), x_in)
    return eps.detach() - rows.scale * (1 - a).sqrt() * grad


def _sample_diffusion(model: nn.Module, requests: Sequence[SampleRequest], *, classifier, clip_tower) -> torch.Tensor:
    r0 = requests[0]
    conf, dev = model.config, model._device()
    shape = (conf.in_channels, conf.image_size, conf.image_size)
    gens = [g for r in requests for g in r.generators()]
    x = _noise(gens, shape, dev)  # x_T, (B, C, H, W): each request's first draw, as in a lone run
    rows = _rows(model, requests)
    guidance = "free" if r0.guidance in ("none", "cfg") else r0.guidance

    def raw_eps(x: torch.Tensor, t_b: torch.Tensor, _cond=None) -> torch.Tensor:
        if guidance == "free":
            return _free_eps(model, rows, x, t_b)
        return _guided_eps(model, rows, guidance, x, t_b, classifier=classifier, clip_tower=clip_tower)

    # The same x0 clipping wrapper as ConditionalDiffusion.sample, so a batch equals lone runs.
    clipped = clip_x0(raw_eps, model.schedule) if getattr(conf, "clip_denoised", False) else raw_eps

    def eps_fn(x: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
        return clipped(x, t_b, None)

    def check_cancelled() -> None:
        if all(r.cancelled() for r in requests):
            raise Cancelled("every request in this batch was cancelled")

    schedule = model.schedule
    tau = schedule.resolve(int(r0.steps), None)
    for i, t in enumerate(tau):
        check_cancelled()
        t_prev = tau[i + 1] if i + 1 < len(tau) else -1
        t_b = torch.full((x.shape[0],), t, dtype=torch.long, device=dev)  # (B,)
        eps = eps_fn(x, t_b)
        if r0.sampler == "ddim":  # sample_ddim, with z from each request's generator
            a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
            sigma = r0.eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # Eq. 16
            z = _noise(gens, shape, dev, x.dtype) if sigma > 0 else None
            x = ddim_step(x, eps, a_t, a_prev, sigma, z)
        else:  # sample_ddpm
            alpha_bar_t, alpha_bar_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
            alpha_t = alpha_bar_t / alpha_bar_prev
            beta_t = 1 - alpha_t
            x = (x - beta_t / math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_t)
            sigma_t = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t)
            if sigma_t > 0:
                x = x + sigma_t * _noise(gens, shape, dev, x.dtype)
    return x.clamp(-1, 1)


# -- editing (diffusion) ----------------------------------------------------------------------------
@torch.no_grad()
def edit(model: nn.Module, x0: torch.Tensor, source: torch.Tensor, target: torch.Tensor, *, method: str,
         strength: float = 0.6, scale: float = 0.0, steps: int = 20, seed: int = 0,
         inner_steps: int = 5) -> torch.Tensor:
    """Edit images x0 (B, C, H, W) in [-1, 1] from condition ``source`` to ``target`` (raw conditions).

    * ``ddim_inversion``: x_T = DDIM-invert(x0 | source), then DDIM from x_T with CFG towards target;
    * ``null_text``: null-text inversion (Mokady et al. 2023) at CFG weight ``scale`` > 0, then
      sampling from x_T with the per-step nulls and the target condition;
    * ``sdedit``: noise to ``strength`` * T, denoise towards target (Meng et al. 2022).
    """

    if model_kind(model) != "diffusion":
        raise ValueError("editing needs a diffusion model")
    if method not in EDIT_METHODS:
        raise ValueError(f"method must be one of {EDIT_METHODS}, got {method!r}")
    b = x0.shape[0]
    x0 = x0.to(model._device())
    e_src, e_tgt = model.embed_condition(source), model.embed_condition(target)
    null = model.null_embedding(1)
    D, sched = model.denoiser(), model.schedule
    if method == "ddim_inversion":
        x_T = ddim_invert(D, x0, sched, cond=e_src, steps=steps)
        out = sample_ddim(cfg(D, scale, null), x_T, sched, cond=e_tgt, steps=steps)
    elif method == "null_text":
        if scale <= 0:
            raise ValueError("null_text inversion needs a CFG scale > 0 (it optimises the unconditional branch)")
        with torch.enable_grad():
            inv = null_text_inversion(D, x0, sched, cond=e_src, null_cond=null.expand(b, -1), scale=scale,
                                      steps=steps, inner_steps=inner_steps)
        out = sample_ddim(cfg(D, scale, inv.null_cond), inv.x_T, sched, cond=e_tgt, timesteps=inv.timesteps)
    else:
        g = torch.Generator().manual_seed(int(seed))
        out = sdedit(cfg(D, scale, null), x0, sched, strength=strength, cond=e_tgt, generator=g, steps=steps)
    return out.clamp(-1, 1)


# -- interpolation ------------------------------------------------------------------------------------
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
    if kind == "cvae":
        return (model.config.latent_dim,)
    if kind == "gan":
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
    """Decode ``frames`` latents between a and b (inclusive) under one condition ``cond`` (1 row).

    CVAE: z = mu_c + eps * sigma_c, decode; GAN: G(z, c); diffusion: x_T interpolated, then
    deterministic DDIM (eta = 0) with CFG — so each frame is a function of its latent only.
    """
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

    D = cfg(model.denoiser(), scale, model.null_embedding(1))
    return sample_ddim(D, z, model.schedule, cond=model.embed_condition(c), steps=steps).clamp(-1, 1)


def describe(model: nn.Module) -> dict[str, Any]:
    """What a loaded model can do, for ``GET /v1/models``."""
    kind = model_kind(model)
    conf = model.config
    out: dict[str, Any] = {
        "kind": kind,
        "condition": getattr(conf, "condition", "label"),
        "num_classes": int(getattr(conf, "num_classes", 10)),
        "image_size": int(getattr(conf, "image_size", 28)),
        "guidance": ["none"],
        "samplers": [],
        "edit_methods": [],
        "interpolate": kind in ("cvae", "gan", "diffusion"),
    }
    if kind == "diffusion":
        out.update(guidance=list(GUIDANCE), samplers=list(SAMPLERS), edit_methods=list(EDIT_METHODS),
                   timesteps=int(conf.timesteps), default_steps=int(conf.sample_steps),
                   default_guidance_scale=float(conf.guidance_scale))
    if kind in ("cvae", "gan"):
        out["latent_dim"] = int(conf.latent_dim)
    return out
