"""Sampling and editing with a trained ``ConditionalDiffusion``: the one request-level library.

``condgen sample`` / ``condgen edit`` (``condgen/commands/diffusion.py``), the serving app
(``serving/service.py``) and batch generation (``tasks/generation/batch.py``, through
``tasks/generation/batching.py``) all call these functions, so the same request gives the
same image everywhere:

* ``sample_from``: THE diffusion sampling path: x_T -> guided denoiser (+ x0 clipping) ->
  sampler (DDIM, Song et al. 2021; DDPM ancestral, Ho et al. 2020) -> images. Guidance scales
  may be one per row and the sampler noise may come from one generator per request
  (``models.diffusion.rows_noise``), which is how ``batching.sample_batch`` runs many
  requests in one forward per step;
* ``sample_images``: conditions (labels or CLIP text embeddings) -> images, seeded, in chunks;
* ``edit_images``: images -> edited images by DDIM inversion, null-text inversion
  (Mokady et al. 2023) or SDEdit (Meng et al. 2022).

They only compose the pieces of ``models.diffusion`` (samplers, guidance wrappers,
inversion); they add conditions, defaults, seeding and tqdm progress bars fed by the
samplers' ``callback``. Images are tensors (B, C, H, W) in [-1, 1].

Conventions (seed 004 and Ho & Salimans 2022): the CFG weight w is used as
eps~ = (1 + w) eps(c) - w eps(null), so w = 0 is the plain conditional model; the
classifier / CLIP guidance scale s multiplies the score correction, s = 0 is no guidance.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from condgen.models.diffusion import (
    SAMPLERS,
    ConditionalDiffusion,
    cfg,
    classifier_guidance,
    clip_guidance,
    clip_x0,
    ddim_invert,
    null_text_inversion,
    sample_ddim,
    sdedit,
)
from condgen.models.diffusion.denoiser import Callback, Denoiser, NoiseSampler, randn
from condgen.models.diffusion.guidance import Scale, unguided

GUIDANCE = ("none", "cfg", "classifier", "clip")
EDIT_METHODS = ("ddim_inversion", "null_text", "sdedit")
NULL_TEXT_INNER_STEPS = 10  # Adam steps per timestep of null-text inversion (`condgen edit --inner-steps`)
CondInput = torch.Tensor | Sequence[int] | Sequence[Sequence[float]]


# -- helpers --------------------------------------------------------------------------------
def as_condition(model: ConditionalDiffusion, c: CondInput | None, batch: int | None = None) -> torch.Tensor | None:
    """Labels (int64 (B,)) or raw CLIP text embeddings (float (B, D)) as a tensor for ``model``.

    A single label / embedding is repeated to ``batch`` rows when ``batch`` is given.
    """
    if c is None:
        return None
    t = c if torch.is_tensor(c) else torch.as_tensor(c)
    if model.config.condition == "label":
        if t.is_floating_point():
            raise TypeError("a label-conditioned model takes int64 class labels")
        t = t.long().reshape(-1)
        if bool(((t < 0) | (t >= model.config.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {model.config.num_classes})")
    else:
        if not t.is_floating_point():
            raise TypeError("a text-conditioned model takes float CLIP text embeddings (B, text_dim)")
        t = t.float().reshape(-1, model.config.text_dim)
    if batch is not None and t.shape[0] == 1 and batch > 1:
        t = t.expand(batch, *t.shape[1:])
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"condition has {t.shape[0]} rows, expected {batch} (or 1)")
    return t


@contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A sampler ``callback(i, n)`` that advances one tqdm bar over ``total`` network steps."""
    if not enabled:
        yield lambda i, n: None
        return
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    try:
        yield lambda i, n: bar.update(1)
    finally:
        bar.close()


def _check_classifier(model: ConditionalDiffusion, classifier: Any) -> None:
    conf = getattr(classifier, "config", None)
    if conf is None:
        return  # a plain callable: the caller vouches for its schedule
    for name in ("timesteps", "schedule"):
        if getattr(conf, name, None) != getattr(model.config, name):
            raise ValueError(f"classifier {name}={getattr(conf, name, None)!r} does not match the diffusion "
                             f"model's {getattr(model.config, name)!r}: it must be trained on the same noise schedule")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _unconditional(denoiser: Denoiser) -> Denoiser:
    """The same network with the null token whatever ``cond`` says (``cond`` only feeds guidance)."""
    return lambda x, t, cond: denoiser(x, t, None)


def _scale(scale: Scale, default: float) -> Scale:
    """A float, or a per-row tensor (B,) kept as it is; None -> ``default``."""
    if scale is None:
        return float(default)
    return scale if torch.is_tensor(scale) and scale.dim() > 0 else float(scale)


def default_steps(model: ConditionalDiffusion, sampler: str) -> int:
    """Sampler steps when a request names none: DDIM and DPM-Solver++(2M) ``config.sample_steps``, DDPM all T."""
    return int(model.config.sample_steps if sampler in ("ddim", "dpmpp_2m") else model.config.timesteps)


def guided_denoiser(
    model: ConditionalDiffusion,
    cond: torch.Tensor,
    *,
    guidance: str = "none",
    scale: Scale | None = None,
    negative: torch.Tensor | None = None,
    negative_rows: torch.Tensor | None = None,
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    clip_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    clip_text: torch.Tensor | None = None,
    conditional: bool = True,
) -> tuple[Denoiser, torch.Tensor]:
    """(denoiser, the cond to pass it) for one guidance mode; ``cond`` / ``negative`` are raw conditions.

    cfg: conditions are embedded once here (labels stay labels for classifier guidance,
    which reads them as its target y). ``scale`` is a float or one weight per row (B,);
    ``negative_rows`` (B,) bool says which rows use ``negative`` instead of the null token
    (default: all), so a batch can mix requests with and without a negative prompt.
    """
    if guidance not in GUIDANCE:
        raise ValueError(f"guidance must be one of {GUIDANCE}, got {guidance!r}")
    D = model.denoiser()
    if guidance == "cfg":
        w = _scale(scale, model.config.guidance_scale)
        # conditional=False: eps~ = (1 + w) eps(null) - w eps(negative), steered only away from the negative
        e = model.embed_condition(cond) if conditional else model.null_embedding(cond.shape[0])  # (B, E)
        null = model.null_embedding(1)
        e_neg = None if negative is None else model.embed_condition(negative)
        if e_neg is not None and negative_rows is not None:
            e_neg = torch.where(negative_rows.to(e_neg.device)[:, None], e_neg, null.expand_as(e_neg))
        return cfg(D, w, null, e_neg), e
    if negative is not None:
        raise ValueError("a negative prompt needs guidance='cfg'")
    # labels go to the denoiser as they are; raw CLIP text is embedded once, here
    c_in = cond if cond.dtype == torch.long else model.embed_condition(cond)
    base = D if conditional else _unconditional(D)
    if guidance == "none":
        if scale is not None and not unguided(scale):
            raise ValueError("guidance='none' takes no scale")
        return base, c_in
    s = _scale(scale, 1.0)
    if guidance == "classifier":
        if classifier is None:
            raise ValueError("guidance='classifier' needs classifier= (a NoisyClassifier trained on the same schedule)")
        if cond.dtype != torch.long:
            raise TypeError("classifier guidance steers towards class labels: pass int64 labels")
        _check_classifier(model, classifier)
        return classifier_guidance(base, classifier, s, model.schedule), cond
    # clip
    if clip_encoder is None:
        raise ValueError("guidance='clip' needs clip_encoder= (images in [-1, 1] -> CLIP image embeddings)")
    if clip_text is None:
        if not cond.is_floating_point():
            raise ValueError("guidance='clip' on a label model needs clip_text= (the CLIP text embedding to follow)")
        clip_text = cond  # a text model's condition is the CLIP text embedding itself
    return clip_guidance(base, clip_encoder, clip_text, s, model.schedule), c_in


# -- sampling -------------------------------------------------------------------------------
@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Sample in eval mode (EMA weights, no dropout), and leave the model as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_from(
    model: ConditionalDiffusion,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    noise: NoiseSampler | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float | None = None,
    guidance: str = "cfg",
    scale: Scale | None = None,
    negative: torch.Tensor | None = None,
    negative_rows: torch.Tensor | None = None,
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    clip_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    clip_text: torch.Tensor | None = None,
    conditional: bool = True,
    clip_denoised: bool | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Denoise x_T (B, C, H, W) under raw conditions ``cond`` (B rows, on the model's device): the
    guided denoiser of ``guided_denoiser``, x0 clipping (``clip_denoised``, default
    ``config.clip_denoised``) and ``sampler`` over ``steps`` (default ``default_steps``) with
    ``eta`` (DDIM; default ``config.sample_eta``). Stochastic steps draw from ``generator`` or
    the noise sampler ``noise(i)``. Returns (B, C, H, W) clamped to [-1, 1], on the model's device.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    conf = model.config
    steps = default_steps(model, sampler) if steps is None else int(steps)
    with _eval_mode(model):
        D, c_in = guided_denoiser(model, cond, guidance=guidance, scale=scale, negative=negative,
                                  negative_rows=negative_rows, classifier=classifier, clip_encoder=clip_encoder,
                                  clip_text=clip_text, conditional=conditional)
        if getattr(conf, "clip_denoised", False) if clip_denoised is None else clip_denoised:
            D = clip_x0(D, model.schedule)
        kw = {"eta": getattr(conf, "sample_eta", 0.0) if eta is None else float(eta)} if sampler == "ddim" else {}
        x = SAMPLERS[sampler](D, x_T, model.schedule, cond=c_in, generator=generator, noise=noise,
                              callback=callback, steps=steps, **kw)
    return x.clamp(-1, 1)


def sample_images(
    model: ConditionalDiffusion,
    labels_or_embeddings: CondInput,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float | None = None,
    guidance: str = "cfg",
    scale: float | None = None,
    negative: CondInput | None = None,
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    clip_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    clip_text: torch.Tensor | None = None,
    conditional: bool = True,
    clip_denoised: bool | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """One sample per condition row, (B, C, H, W) in [-1, 1] on the CPU.

    sampler   "ddim" (Song et al. 2021; ``eta`` 0 = deterministic, 1 = ancestral; default
              ``config.sample_eta``), "ddpm" (Ho et al. 2020, Algorithm 2; ``eta`` is ignored) or
              "dpmpp_2m" (deterministic DPM-Solver++(2M), Lu et al. 2022, on DDIM's timesteps; ``eta`` ignored).
              ``steps``: DDIM / dpmpp_2m default ``config.sample_steps``, DDPM default every one of the T timesteps.
    guidance  "none": the conditional model; "cfg": classifier-free (Ho & Salimans 2022) with weight
              ``scale`` (default ``config.guidance_scale``) and optional ``negative`` condition in place
              of the null token; "classifier": ``classifier(x_t, t) -> logits`` (a
              ``NoisyClassifier``) with scale s (default 1); "clip": ``clip_encoder`` and
              ``clip_text`` (default: the text condition itself) with scale s (default 1).
    conditional  False runs the network with the null token (the condition then only acts
              through guidance: classifier guidance on the unconditional model, as in
              Dhariwal & Nichol 2021; with cfg it makes ``negative`` the only steer).
    clip_denoised  clamp x0_hat to [-1, 1] at every step (``models.diffusion.clip_x0``, applied to
              the guided prediction); default ``config.clip_denoised``, as ``model.sample`` does.
    seed      one ``torch.Generator`` drives x_T and every sampler noise draw: the same seed,
              conditions and ``batch_size`` give the same images (and the same as a served request
              with that seed and n = the number of conditions, ``batching.sample_batch``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    cond = as_condition(model, labels_or_embeddings)
    n = cond.shape[0]
    neg = as_condition(model, negative, n)
    conf, dev = model.config, _device(model)
    steps = default_steps(model, sampler) if steps is None else steps
    n_steps = len(model.schedule.timesteps(steps))
    g = torch.Generator().manual_seed(seed)
    out = []
    with _progress(n_steps * math.ceil(n / batch_size), f"{sampler} {guidance}", progress) as cb:
        for i in range(0, n, batch_size):
            c = cond[i:i + batch_size].to(dev)
            x_T = randn((c.shape[0], conf.in_channels, conf.image_size, conf.image_size), g, dev)
            x = sample_from(model, x_T, c, generator=g, sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                            scale=scale, negative=None if neg is None else neg[i:i + batch_size].to(dev),
                            classifier=classifier, clip_encoder=clip_encoder, clip_text=clip_text,
                            conditional=conditional, clip_denoised=clip_denoised, callback=cb)
            out.append(x.cpu())
    return torch.cat(out)


# -- editing --------------------------------------------------------------------------------
def edit_images(
    model: ConditionalDiffusion,
    images: torch.Tensor,
    *,
    method: str = "ddim_inversion",
    source_cond: CondInput | None = None,
    target_cond: CondInput | None = None,
    strength: float = 0.6,
    steps: int | None = None,
    scale: float | None = None,
    seed: int = 0,
    inner_steps: int = NULL_TEXT_INNER_STEPS,
    progress: bool = True,
) -> torch.Tensor:
    """Edit ``images`` (B, C, H, W) in [-1, 1] from ``source_cond`` towards ``target_cond``.

    method
      "ddim_inversion"  x_0 -> x_T by deterministic DDIM inversion under the source condition
                        (no guidance: inversion under CFG drifts, Mokady et al. 2023 §3), then
                        DDIM back with CFG at weight ``scale`` towards the target.
      "null_text"       null-text inversion (Mokady et al. 2023, Algorithm 1) at CFG weight
                        ``scale``: per-step null embeddings make the guided reverse path retrace
                        the inversion pivots, so target == source reconstructs the image even at
                        large ``scale``; a new target then edits it. ``inner_steps`` Adam steps/step.
      "sdedit"          SDEdit (Meng et al. 2022): noise to t_0 = strength * T, then the
                        stochastic reverse process (eta = 1) with CFG towards the target (and
                        x0 clipping if ``config.clip_denoised``); ``strength`` 0 returns the input
                        unchanged. ``source_cond`` is unused.
              The inversions never clip x0: their regeneration must mirror the inversion exactly.
    steps     DDIM steps over the whole chain (default ``config.sample_steps``); SDEdit runs the
              ``strength`` fraction of them.
    scale     CFG weight w (default ``config.guidance_scale``).
    target_cond defaults to ``source_cond`` (a reconstruction).
    """
    if method not in EDIT_METHODS:
        raise ValueError(f"method must be one of {EDIT_METHODS}, got {method!r}")
    conf, dev = model.config, _device(model)
    x0 = images.float()
    if x0.dim() == 3:
        x0 = x0.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    b = x0.shape[0]
    if tuple(x0.shape[1:]) != (conf.in_channels, conf.image_size, conf.image_size):
        raise ValueError(f"images must be (B, {conf.in_channels}, {conf.image_size}, {conf.image_size}), "
                         f"got {tuple(x0.shape)}")
    source = as_condition(model, source_cond, b)
    target = as_condition(model, target_cond, b) if target_cond is not None else source
    if target is None:
        raise ValueError("edit_images needs target_cond (or source_cond to reconstruct)")
    if method != "sdedit" and source is None:
        raise ValueError(f"method={method!r} inverts under the source condition: pass source_cond")
    steps = conf.sample_steps if steps is None else int(steps)
    w = conf.guidance_scale if scale is None else float(scale)
    x0, g, D = x0.to(dev), torch.Generator().manual_seed(seed), model.denoiser()
    with _eval_mode(model):
        with torch.no_grad():
            e_tgt = model.embed_condition(target.to(dev))  # (B, E)
            null = model.null_embedding(1)
            if method == "sdedit":
                if strength == 0:
                    return images.clone()
                n = max(1, math.ceil(strength * steps))
                G = cfg(D, w, null)
                if getattr(conf, "clip_denoised", False):
                    G = clip_x0(G, model.schedule)
                with _progress(n, "sdedit", progress) as cb:
                    x = sdedit(G, x0, model.schedule, strength=strength, cond=e_tgt, generator=g,
                               steps=n, eta=1.0, callback=cb)
                return x.clamp(-1, 1).cpu()
            e_src = model.embed_condition(source.to(dev))
        tau = model.schedule.timesteps(steps)
        if method == "ddim_inversion":
            with _progress(2 * len(tau), "ddim inversion", progress) as cb:
                x_T = ddim_invert(D, x0, model.schedule, cond=e_src, timesteps=tau, callback=cb)
                x = sample_ddim(cfg(D, w, null), x_T, model.schedule, cond=e_tgt, timesteps=tau, callback=cb)
            return x.clamp(-1, 1).cpu()
        # null_text
        with _progress(2 * len(tau), "null-text inversion", progress) as cb:
            r = null_text_inversion(D, x0, model.schedule, cond=e_src, null_cond=null, scale=w, timesteps=tau,
                                    inner_steps=inner_steps, callback=cb)
            x = sample_ddim(cfg(D, w, r.null_cond), r.x_T, model.schedule, cond=e_tgt, timesteps=r.timesteps,
                            callback=cb)
        return x.clamp(-1, 1).cpu()
