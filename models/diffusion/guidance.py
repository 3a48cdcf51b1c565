"""Guidance wrappers: each takes a denoiser and returns a denoiser ``D(x, t, cond) -> eps``
with the same signature, so they compose with every sampler and with each other.
A scale meaning "no guidance" (0) returns the wrapped denoiser object itself.

Every scale is a float or one per row, a tensor (B,): one batch can then mix requests with
different guidance weights (rows with scale 0 get exactly the unguided prediction).

* ``cfg``: classifier-free guidance, Ho & Salimans 2022, Eq. 6 and Algorithm 2:
  eps_tilde = (1 + w) eps(x_t, c) - w eps(x_t, null); with a negative prompt
  eps(x_t, c_neg) replaces eps(x_t, null) (seed 004, "Negative prompt").
* ``classifier_guidance``: Dhariwal & Nichol 2021, Algorithm 2 / Eq. 14 (the DDIM form):
  eps_bar = eps - s * sqrt(1 - alpha_bar_t) * grad_{x_t} log p_phi(y | x_t).
* ``clip_guidance``: the same score correction with log p(text | x_t) replaced by the
  cosine similarity of CLIP(x0_hat) and a text embedding (Nichol et al. 2022, GLIDE §2.4,
  evaluated on the denoised estimate x0_hat so an ordinary, non-noise-aware CLIP works).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from condgen.models.diffusion.denoiser import Denoiser
from condgen.models.diffusion.schedule import NoiseSchedule, as_timesteps

# A condition for the null/negative branch: a fixed tensor, or a function of the timesteps
# (B,) -> tensor, e.g. the per-step null embeddings of null-text inversion.
CondLike = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
# A guidance weight: one float for every row, or one per row, (B,).
Scale = float | torch.Tensor


def _batched(c: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a (1, ...) condition to (batch, ...)."""
    if c.shape[0] == batch:
        return c
    if c.shape[0] == 1:
        return c.expand(batch, *c.shape[1:])
    raise ValueError(f"condition batch {c.shape[0]} does not match x batch {batch}")


def unguided(scale: Scale) -> bool:
    """True when every row's scale is 0: the wrapper would be the identity."""
    return not bool(torch.as_tensor(scale).ne(0).any())


def _row_scale(scale: Scale, x: torch.Tensor) -> torch.Tensor:
    """``scale`` as a float64 (B,) CPU tensor: 1 + w is then rounded once, to x's dtype, exactly as
    with a Python float (and MPS has no float64)."""
    if torch.is_tensor(scale):
        s = scale.detach().to("cpu", torch.float64)
    else:
        s = torch.tensor(float(scale), dtype=torch.float64)  # not via float32: 1 + w as in Python
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"a per-row guidance scale must have shape ({x.shape[0]},), got {tuple(s.shape)}")
    return s


def _per_row(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) float64 -> (B, 1, ..., 1) in x's dtype and device, to scale per-row image tensors."""
    return s.to(x.dtype).to(x.device).view(-1, *([1] * (x.dim() - 1)))


def cfg(
    denoiser: Denoiser,
    scale: Scale,
    null_cond: CondLike,
    negative_cond: CondLike | None = None,
) -> Denoiser:
    """Classifier-free guidance with weight w = ``scale`` >= 0 (Ho & Salimans 2022, Eq. 6).

    ``null_cond`` is the null token in the same form the denoiser takes ``cond`` (for
    ``ConditionalDiffusion``: ``model.null_cond(B)``); ``negative_cond``, if given, takes
    its place. Both may be (1, ...) or (B, ...), or a callable of the timesteps. The
    conditional and unconditional predictions come from ONE forward on the batch
    [x; x] with conditions [c; null], so each step costs one (2B) network call.
    A per-row ``scale`` (B,) runs the unconditional branch only for the rows with w != 0
    (one forward on B + #guided rows); the rows with w = 0 take eps(x_t, c) unchanged.
    """
    if unguided(scale):
        return denoiser
    uncond = null_cond if negative_cond is None else negative_cond

    def guided(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            raise ValueError("cfg needs a condition to guide towards; got cond=None")
        b = x.shape[0]
        t = as_timesteps(t, b, x.device)  # (B,)
        w = _row_scale(scale, x)  # (B,)
        u = _batched(uncond(t) if callable(uncond) else uncond, b)
        if u.dtype != cond.dtype:
            raise TypeError(
                f"cfg batches cond ({cond.dtype}) and null/negative ({u.dtype}) in one forward, so they must be "
                "the same kind: both labels or both embeddings (see ConditionalDiffusion.embed_condition)"
            )
        guided_rows = None if bool(w.ne(0).all()) else w.ne(0).nonzero().squeeze(1)  # None: every row
        rows = None if guided_rows is None else guided_rows.to(x.device)

        def sel(v: torch.Tensor) -> torch.Tensor:
            return v if rows is None else v[rows]

        out = denoiser(torch.cat([x, sel(x)]), torch.cat([t, sel(t)]), torch.cat([cond, sel(u)]))
        eps_c, eps_u = out[:b], out[b:]
        w = w if guided_rows is None else w[guided_rows]
        guided_eps = _per_row(1 + w, x) * sel(eps_c) - _per_row(w, x) * eps_u
        if rows is None:
            return guided_eps
        eps = eps_c.clone()
        eps[rows] = guided_eps
        return eps

    return guided


def classifier_guidance(
    denoiser: Denoiser,
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scale: Scale,
    schedule: NoiseSchedule,
) -> Denoiser:
    """Classifier guidance with a noise-aware classifier p_phi(y | x_t, t) (Dhariwal & Nichol 2021, Algorithm 2).

    ``classifier(x_t, t) -> logits (B, K)`` (e.g. ``NoisyClassifier``) must be trained on the
    same schedule. The target y is the ``cond`` passed at call time: int64 labels (B,).
    Raising p_phi(y|x_t) to the power s sharpens towards the classifier's modes; ``scale``: s, a
    float or one per row (B,).
    """
    if unguided(scale):
        return denoiser

    def guided(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None or cond.dtype != torch.long:
            raise TypeError("classifier guidance needs int64 class labels y as cond")
        t = as_timesteps(t, x.shape[0], x.device)
        eps = denoiser(x, t, cond)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_p = F.log_softmax(classifier(x_in, t).float(), -1)  # (B, K)
            selected = log_p.gather(1, cond[:, None]).sum()  # sum_i log p_phi(y_i | x_t,i): rows independent
            (grad,) = torch.autograd.grad(selected, x_in)  # grad_{x_t} log p_phi(y | x_t), (B, C, H, W)
        alpha_bar_t = schedule.alpha_bar_like(t, x)
        return eps - _per_row(_row_scale(scale, x), x) * (1 - alpha_bar_t).sqrt() * grad

    return guided


def clip_guidance(
    denoiser: Denoiser,
    image_encoder: Callable[[torch.Tensor], torch.Tensor],
    text_embedding: torch.Tensor,
    scale: Scale,
    schedule: NoiseSchedule,
) -> Denoiser:
    """CLIP guidance on the denoised estimate:
    eps_bar = eps - s sqrt(1 - alpha_bar_t) grad_{x_t} cos(E_img(x0_hat), e_txt).

    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t)) / sqrt(alpha_bar_t) (DDPM Eq. 15 /
    DDIM Eq. 12); the gradient flows through eps_theta as well, at the cost of one backward
    pass through the denoiser per step. ``image_encoder``: (B, C, H, W) in [-1, 1] -> (B, D)
    (the pipeline adapts an open_clip visual tower); ``text_embedding``: (D,), (1, D) or (B, D);
    ``scale``: s, a float or one per row (B,).
    """
    if unguided(scale):
        return denoiser

    def guided(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        t = as_timesteps(t, x.shape[0], x.device)
        alpha_bar_t = schedule.alpha_bar_like(t, x)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            eps = denoiser(x_in, t, cond)
            x0_hat = (x_in - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()  # (B, C, H, W)
            img = image_encoder(x0_hat)  # (B, D)
            sim = F.cosine_similarity(img.float(), text_embedding.to(img.device).float().expand_as(img), dim=-1)
            (grad,) = torch.autograd.grad(sim.sum(), x_in)  # rows independent, so the sum's grad is per-row
        return eps.detach() - _per_row(_row_scale(scale, x), x) * (1 - alpha_bar_t).sqrt() * grad

    return guided
