"""Latent-space tools: linear maps between two models' latent spaces, GAN inversion,
interpolation, attribute directions and disentangled edits. Pure torch (no I/O).

* Linear map between latent spaces (Asperti & Tonelli 2023, "Comparing the latent space
  of generative models", seed 000): a **bias-free** linear map W with z_b ≈ z_a W, fitted
  on a small *support set* of points known in both spaces. Two fits, as in the paper:
  the closed-form least squares (here with an optional ridge term, which the fit needs
  when the support set has fewer points than z_a has dimensions) and a gradient fit of a
  bias-free dense layer with a light L2 penalty.
* GAN inversion by optimisation (Creswell & Bharath 2018; Zhu et al. 2016): the latent of
  a given image is argmin_z ||G(z, c) - x||^2 (+ a small pull towards the prior's shell).
* Interpolation: ``lerp`` and ``slerp`` (Shoemake 1985; White 2016 for Gaussian latents).
* Attribute directions (InterFaceGAN, Shen et al. 2020, seed 000): regress an attribute on
  z; the coefficient vector is the direction along which the attribute grows. Editing one
  attribute moves the others too (entanglement); projecting each direction orthogonally to
  the others' normals removes that first-order leakage (the seed's "conditional
  manipulation": n1' = n1 - (n1 . n2) n2 for unit normals).

Shapes: latents are (N, d) float tensors; a map W is (d_a, d_b); directions are (K, d).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

Tensorish = torch.Tensor | np.ndarray


def _t(a: Tensorish, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(a)) if isinstance(a, np.ndarray) else a.detach()).to(dtype)


# -- linear maps between latent spaces ----------------------------------------------------
def fit_linear_map(z_a: Tensorish, z_b: Tensorish, ridge: float = 0.0) -> torch.Tensor:
    """Bias-free least squares W = argmin ||z_a W - z_b||^2 + ridge ||W||^2, (d_a, d_b) float32.

    Closed form W = (Z_a^T Z_a + ridge I)^{-1} Z_a^T Z_b, solved in float64. With ridge = 0
    and fewer support points than dimensions the minimum-norm solution is returned
    (``lstsq`` with the ``gelsd`` driver), so the fit is defined for any support size.
    """
    a, b = _t(z_a), _t(z_b)  # (N, d_a), (N, d_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"z_a and z_b must be (N, d_a) and (N, d_b), got {tuple(a.shape)} and {tuple(b.shape)}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if ridge == 0:
        w = torch.linalg.lstsq(a, b, driver="gelsd").solution
    else:
        gram = a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype)
        w = torch.linalg.solve(gram, a.T @ b)
    return w.float()  # (d_a, d_b)


def fit_linear_map_gd(z_a: Tensorish, z_b: Tensorish, *, steps: int = 2000, lr: float = 1e-2,
                      weight_decay: float = 1e-4, batch_size: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's gradient variant: a bias-free dense layer z_a -> z_b trained with Adam
    on the MSE plus ``weight_decay * ||W||^2`` (a light L2 that plays the ridge's role).
    Full-batch by default (support sets are small). Returns W (d_a, d_b) float32."""
    a, b = _t(z_a, torch.float32), _t(z_b, torch.float32)
    n, d_a = a.shape
    layer = torch.nn.Linear(d_a, b.shape[1], bias=False)
    with torch.no_grad():  # deterministic init from the caller's RNG (small: the L2 pulls towards 0)
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * d_a**-0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        if batch_size is None or batch_size >= n:
            xa, xb = a, b
        else:
            idx = torch.randint(0, n, (batch_size,), generator=generator)
            xa, xb = a[idx], b[idx]
        loss = ((layer(xa) - xb) ** 2).sum(-1).mean() + weight_decay * layer.weight.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return layer.weight.detach().T.contiguous()  # nn.Linear stores (d_b, d_a)


def apply_map(z: Tensorish, w: torch.Tensor) -> torch.Tensor:
    """z (N, d_a) -> z W (N, d_b)."""
    return _t(z, w.dtype).to(w.device) @ w


# -- GAN inversion -----------------------------------------------------------------------
def invert_generator(generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                     c: torch.Tensor, steps: int = 200, lr: float = 0.05,
                     generator: torch.Generator | None = None, *, latent_dim: int | None = None,
                     z_init: torch.Tensor | None = None, restarts: int = 1, prior_weight: float = 1e-3,
                     batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """z* = argmin_z  mean_pixels (G(z, c) - x)^2 + prior_weight * (||z||^2 / d - 1)^2, by Adam.

    ``generate`` is G(z, c) (e.g. ``gan.generate``; its module is never updated), ``x`` the
    target images (N, C, H, W) in [-1, 1]. Each image is inverted independently (Adam is
    per coordinate and the loss is a sum over images), so batching does not change the
    result. ``restarts`` > 1 starts from several random z and keeps each image's best. The
    prior term keeps ||z||^2 near d, the shell where N(0, I) puts its mass, so the inverted
    latents stay where the generator (and a latent map fitted on them) was trained.

    ``latent_dim`` defaults to the generating module's ``latent_dim`` (bound method).
    Returns (z (N, d) float32, per-image reconstruction MSE (N,)).
    """
    if latent_dim is None and z_init is None:
        latent_dim = getattr(getattr(generate, "__self__", None), "latent_dim", None)
        if latent_dim is None:
            raise ValueError("latent_dim is needed when generate is not a bound method of a model with latent_dim")
    x = x.detach()
    n = x.shape[0]
    d = z_init.shape[1] if z_init is not None else int(latent_dim)
    best_z = torch.zeros(n, d)
    best_err = torch.full((n,), float("inf"))
    for r in range(max(1, restarts)):
        if z_init is not None and r == 0:
            z0 = z_init.detach().float().cpu()
        else:
            z0 = torch.randn(n, d, generator=generator)
        for i in range(0, n, batch_size):
            z, err = _invert_batch(generate, x[i:i + batch_size], c[i:i + batch_size], z0[i:i + batch_size],
                                   steps, lr, prior_weight)
            better = err < best_err[i:i + batch_size]
            best_err[i:i + batch_size] = torch.where(better, err, best_err[i:i + batch_size])
            best_z[i:i + batch_size][better] = z[better]
    return best_z, best_err


def _invert_batch(generate, x, c, z0, steps, lr, prior_weight):
    device = x.device
    z = z0.clone().to(device).requires_grad_(True)
    d = z.shape[1]
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        rec = (generate(z, c) - x).pow(2).flatten(1).mean(-1)  # (B,)
        prior = (z.pow(2).sum(-1) / d - 1).pow(2)  # (B,)
        loss = (rec + prior_weight * prior).sum()
        # Gradient w.r.t. z only: the generator's weights get no .grad (it need not be frozen).
        (z.grad,) = torch.autograd.grad(loss, z)
        opt.step()
    with torch.no_grad():
        err = (generate(z, c) - x).pow(2).flatten(1).mean(-1)
    return z.detach().float().cpu(), err.float().cpu()


# -- interpolation --------------------------------------------------------------------------
def lerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """(1 - t) a + t b; ``t`` a float or a (T,) tensor (then the result is (T, *a.shape))."""
    if torch.is_tensor(t) and t.ndim == 1:
        t = t.view(-1, *([1] * a.ndim)).to(a.dtype)
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of two latents along the great circle through them, with the
    norm interpolated linearly (so the endpoints are exactly a and b even if |a| != |b|).
    Falls back to ``lerp`` for (anti)parallel vectors. a, b: (d,) or (..., d) row-wise."""
    if torch.is_tensor(t) and t.ndim == 1:
        return torch.stack([slerp(a, b, float(ti), eps) for ti in t])
    t = float(t)
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(eps), b / nb.clamp_min(eps)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    small = so.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(so), so)
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / safe
    out = direction * ((1 - t) * na + t * nb)
    return torch.where(small, lerp(a, b, t), out)


# -- attribute directions and edits -----------------------------------------------------------
def attribute_directions(z: Tensorish, attributes: Tensorish, ridge: float = 1e-3) -> torch.Tensor:
    """Per-attribute linear regression a_k ≈ beta_k . z + b_k on standardised attributes.

    z (N, d), attributes (N, K) -> (K, d) float32: row k is beta_k, the gradient of the
    predicted attribute k (in units of its standard deviation) with respect to z. Its
    direction is the attribute's normal (InterFaceGAN); a step Δz changes the predicted
    attribute k by beta_k . Δz standard deviations.
    """
    zz, aa = _t(z), _t(attributes)
    if aa.ndim == 1:
        aa = aa[:, None]
    aa = (aa - aa.mean(0)) / aa.std(0).clamp_min(1e-12)  # (N, K) standardised
    zc = zz - zz.mean(0)  # centring = fitting the intercept
    return fit_linear_map(zc, aa, ridge=ridge).T.contiguous()  # (K, d)


def orthogonalize(directions: Tensorish, method: str = "projection") -> torch.Tensor:
    """Disentangle K directions (K, d).

    * ``"projection"`` (the seed's conditional manipulation, generalised to K > 2): each
      direction is projected onto the orthogonal complement of the span of the *other*
      directions, so moving along it leaves every other attribute's linear prediction
      unchanged. Norms are not rescaled (see :func:`calibrate`).
    * ``"gram_schmidt"``: an orthonormal set in the given order (order-dependent: the first
      direction is kept, later ones lose what they share with earlier ones).
    """
    dirs = _t(directions)
    k = dirs.shape[0]
    if method == "gram_schmidt":
        out = []
        for v in dirs:
            for u in out:
                v = v - (v @ u) * u
            out.append(v / v.norm().clamp_min(1e-12))
        return torch.stack(out).float()
    if method != "projection":
        raise ValueError(f"method must be 'projection' or 'gram_schmidt', got {method!r}")
    out = []
    for i in range(k):
        others = torch.cat([dirs[:i], dirs[i + 1:]])  # (K-1, d)
        if len(others) == 0:
            out.append(dirs[i])
            continue
        q, _ = torch.linalg.qr(others.T)  # (d, K-1) orthonormal basis of the others' span
        v = dirs[i] - q @ (q.T @ dirs[i])
        out.append(v)
    return torch.stack(out).float()


def calibrate(directions: Tensorish, normals: Tensorish) -> torch.Tensor:
    """Rescale each direction so that normals_k . direction_k = 1: a unit strength then
    predicts a change of one standard deviation in attribute k, before and after
    :func:`orthogonalize` alike (so edits of both kinds are compared at equal strength)."""
    d, n = _t(directions), _t(normals)
    gain = (d * n).sum(-1, keepdim=True)  # (K, 1)
    return (d / torch.where(gain.abs() < 1e-12, torch.ones_like(gain), gain)).float()


def edit(z: torch.Tensor, direction: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
    """z + strength * direction. z (N, d), direction (d,); strength a float, (N,) per row,
    or (S,) strengths for a single z (1, d) or (d,) giving (S, d)."""
    direction = direction.to(z.dtype).to(z.device)
    if torch.is_tensor(strength) and strength.ndim == 1:
        s = strength.to(z.dtype).to(z.device)
        if z.ndim == 1 or z.shape[0] == 1:
            return z.reshape(1, -1) + s[:, None] * direction
        return z + s[:, None] * direction
    return z + float(strength) * direction


def optimize_latent(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                    score: Callable[[torch.Tensor], torch.Tensor], *, steps: int = 50, lr: float = 0.1,
                    prior_weight: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """Gradient ascent on a differentiable image score (seed 000, CLIP-guided optimisation):

        w_{t+1} = w_t + lr * d/dw [ Score(decode(w)) - prior_weight * ||w||^2 / 2 ]

    ``score`` maps images (B, C, H, W) to (B,) scores. Plain gradient steps, as in the seed's
    update rule; the optional prior term keeps w from drifting off the latent distribution.
    Returns (z_T (B, d), the mean score before each step and after the last).
    """
    w = z.detach().clone().requires_grad_(True)
    history: list[float] = []
    for _ in range(steps):
        s = score(decode(w))  # (B,)
        history.append(float(s.detach().mean()))
        objective = s.sum() - prior_weight * 0.5 * w.pow(2).sum()
        (grad,) = torch.autograd.grad(objective, w)
        with torch.no_grad():
            w += lr * grad
    with torch.no_grad():
        history.append(float(score(decode(w)).mean()))
    return w.detach(), history
