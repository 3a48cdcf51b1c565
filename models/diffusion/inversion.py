"""DDIM inversion and null-text inversion.

* ``ddim_invert``: run the deterministic DDIM update (Song et al. 2021, Eq. 12 with
  sigma = 0; the ODE view of §4.3 makes it reversible, used for encoding in §5.4)
  forwards, x_0 -> x_T. The step from level t' up to t needs eps(x_t, t), which is not
  known yet, so it is approximated by eps(x_{t'}, t): the network is evaluated at the
  *target* timestep on the current latent (seed 004 "DDIM Inversion"; Mokady et al.
  2023's reference implementation). The error vanishes as steps get small.
* ``null_text_inversion``: Mokady et al. 2023, "Null-text Inversion for Editing Real
  Images using Guided Diffusion Models", §3 and Algorithm 1. DDIM inversion with the
  condition only (their w = 1, our w = 0) gives pivots x*_T .. x*_0; then, walking
  back with CFG at weight w > 0, the null embedding is optimised per step so that

      min over null_t  || x*_{t-1} - x_{t-1}(x_bar_t, null_t, c) ||^2,

  and x_bar_{t-1} = x_{t-1}(x_bar_t, null_t, c), null_{t-1} initialised from null_t.
  Sampling from x*_T with CFG and the per-step nulls then reproduces the image while the
  condition can be edited (prompt-to-prompt style editing is out of scope here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from condgen.models.diffusion.denoiser import Callback, Denoiser
from condgen.models.diffusion.samplers.ddim import ddim_step
from condgen.models.diffusion.schedule import NoiseSchedule


@torch.no_grad()
def ddim_inversion_trajectory(
    denoiser: Denoiser,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    cond: torch.Tensor | None,
    steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    callback: Callback | None = None,
) -> dict[int, torch.Tensor]:
    """Deterministic DDIM run forwards; returns {t: x_t} for t in tau plus {-1: x_0}.

    ``steps`` / ``timesteps`` name the same descending sub-sequence tau the sampler will
    use, so ``sample_ddim(..., timesteps=tau)`` retraces it backwards.
    """
    tau = schedule.resolve(steps, timesteps)
    ascending = tau[::-1]
    x, t_cur = x0, -1
    trajectory = {-1: x0}
    for i, t_next in enumerate(ascending):
        t_b = torch.full((x.shape[0],), t_next, dtype=torch.long, device=x.device)  # (B,)
        eps = denoiser(x, t_b, cond)  # eps(x_{t'}, t) ~ eps(x_t, t)
        x = ddim_step(x, eps, schedule.alpha_bar(t_cur), schedule.alpha_bar(t_next))
        trajectory[t_next], t_cur = x, t_next
        if callback is not None:
            callback(i, len(ascending))
    return trajectory


def ddim_invert(
    denoiser: Denoiser,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    cond: torch.Tensor | None,
    steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """x_0 -> x_{tau_0} (x_T for the default tau) by deterministic DDIM inversion."""
    tau = schedule.resolve(steps, timesteps)
    trajectory = ddim_inversion_trajectory(denoiser, x0, schedule, cond=cond, timesteps=tau, callback=callback)
    return trajectory[tau[0]]


class PerStepCondition:
    """A condition that depends on the timestep: ``cond(t (B,)) -> tensor``; a ``cfg`` null_cond.

    Holds {timestep: tensor}; every row of t must be the same timestep (as samplers call it).
    """

    def __init__(self, by_timestep: dict[int, torch.Tensor]):
        self.by_timestep = by_timestep

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1)
        key = int(t[0])
        if bool((t != key).any()):
            raise ValueError("PerStepCondition needs one timestep per call")
        if key not in self.by_timestep:
            raise KeyError(f"no condition stored for timestep {key}; sample with the inversion's timesteps")
        return self.by_timestep[key]


@dataclass
class NullTextInversion:
    """Result of ``null_text_inversion``: start ``x_T``, per-step ``null_cond`` for ``cfg``, the ``timesteps`` tau."""

    x_T: torch.Tensor  # (B, C, H, W)
    null_cond: PerStepCondition
    timesteps: list[int]
    losses: list[float]  # per step: MSE(x_bar_{t-1}, pivot x*_{t-1}) with the optimised null; [-1] vs x_0


def null_text_inversion(
    denoiser: Denoiser,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    cond: torch.Tensor,
    null_cond: torch.Tensor,
    scale: float,
    steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    inner_steps: int = 10,
    lr: float = 1e-2,
    tol: float = 1e-5,
    callback: Callback | None = None,
) -> NullTextInversion:
    """Null-text inversion (Mokady et al. 2023, Algorithm 1) for CFG weight w = ``scale``.

    ``scale`` is in our (1 + w) convention: their w = 7.5 is our 6.5. ``null_cond`` is the
    float null *embedding* to start from, (1, E) or (B, E) (``model.null_embedding(B)``),
    and ``cond`` must be the same kind so the returned nulls batch with it in ``cfg``
    (``model.embed_condition(c)``). Per step: Adam on the null embedding for up to
    ``inner_steps`` iterations with learning rate lr * (1 - i / (2 n)) and early stop when
    the loss < tol + i * 2e-5 (the schedule of the authors' code, rescaled to n steps).
    Only the null embedding receives gradients; the denoiser's parameters are untouched.

    Usage: ``sample_ddim(cfg(D, scale, r.null_cond), r.x_T, schedule, cond=cond, timesteps=r.timesteps)``.
    """
    tau = schedule.resolve(steps, timesteps)
    pivots = ddim_inversion_trajectory(denoiser, x0, schedule, cond=cond, timesteps=tau)  # w = 0 pivots x*_t
    w, n = float(scale), len(tau)
    null = null_cond.detach().clone()
    if null.shape[0] == 1:
        null = null.expand(x0.shape[0], *null.shape[1:]).clone()
    x_bar = pivots[tau[0]]
    nulls, losses = {}, []
    for i, t in enumerate(tau):
        t_prev = tau[i + 1] if i + 1 < n else -1
        a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
        target = pivots[t_prev]  # x*_{t-1}
        t_b = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        with torch.no_grad():
            eps_c = denoiser(x_bar, t_b, cond)  # fixed during the inner loop
        null = null.detach().clone().requires_grad_(True)  # a fresh leaf: Adam updates it in place
        opt = torch.optim.Adam([null], lr=lr * (1 - i / (2 * n)))
        loss_value = float("nan")
        for _ in range(inner_steps):
            with torch.enable_grad():
                eps_u = denoiser(x_bar, t_b, null)
                x_prev = ddim_step(x_bar, (1 + w) * eps_c - w * eps_u, a_t, a_prev)
                loss = F.mse_loss(x_prev, target)
                (null.grad,) = torch.autograd.grad(loss, [null])
            opt.step()
            loss_value = loss.item()
            if loss_value < tol + i * 2e-5:
                break
        null = null.detach()
        nulls[t] = null  # owns its storage: the next step optimises a clone
        with torch.no_grad():
            eps = (1 + w) * eps_c - w * denoiser(x_bar, t_b, null)
            x_bar = ddim_step(x_bar, eps, a_t, a_prev)
            losses.append(F.mse_loss(x_bar, target).item())
        if callback is not None:
            callback(i, n)
    return NullTextInversion(x_T=pivots[tau[0]], null_cond=PerStepCondition(nulls), timesteps=tau, losses=losses)
