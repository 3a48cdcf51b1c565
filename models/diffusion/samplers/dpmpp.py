"""DPM-Solver++(2M): Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling
of Diffusion Probabilistic Models" (arXiv:2211.01095), Algorithm 2 (multistep second-order solver in the
data-prediction form, §4.2).

The probability-flow ODE of the VP diffusion, written in lambda_t = log(alpha_t / sigma_t) (half the
log-SNR; alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)), has the exact solution (Eq. 9)

    x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^lambda x_theta(x_lambda, lambda) d lambda,

with the data prediction x_theta = (x_t - sigma_t eps_theta) / alpha_t (``ddim.predicted_x0``, the same
conversion as DDIM's "predicted x_0"). Over the timesteps t_0 > t_1 > ... > t_M, h_i = lambda_{t_i} -
lambda_{t_{i-1}}, Algorithm 2 steps

    first step:  x_{t_1} = (sigma_{t_1} / sigma_{t_0}) x_{t_0} - alpha_{t_1} (e^{-h_1} - 1) x_theta(x_{t_0}, t_0)
    then:        r_i = h_{i-1} / h_i,
                 D_i = (1 + 1 / (2 r_i)) x_theta(x_{t_{i-1}}, t_{i-1}) - 1 / (2 r_i) x_theta(x_{t_{i-2}}, t_{i-2}),
                 x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,

one network evaluation per step (the previous data prediction is reused). The first-order step is
exactly deterministic DDIM (§3.2 of the paper; ``ddim_step`` with eta = 0).

Timesteps: the same sub-sequence as DDIM, ``schedule.resolve(steps, timesteps)`` (``steps`` evenly
spaced from T-1 down to 0, "trailing", or an explicit ``timesteps``), and after its last element the
chain lands on the clean image (alpha_bar = 1, sigma = 0), so ``steps`` is the number of network
evaluations, as for DDIM. At sigma = 0, lambda = inf and h = inf: the second-order correction is
undefined and the first-order step returns the data prediction itself, so the step onto the clean
image is always first order (diffusers' ``final_sigmas_type="zero"``).

Lower order at the end (``euler_at_final``, default True): on this spacing the step that lands on the
last timestep (t = 0 for ``steps``) is by far the longest in lambda (linear schedule, T = 1000, 20
steps: lambda 1.7 -> 4.6, 30% of the whole range -5.1 -> 4.6, after a previous step of 0.66), and the
multistep extrapolation over it (r_i = 0.23, weight 1/(2 r_i) = 2.2 on the slope) made 20 steps
*worse* than DDIM on Gaussian data (RMS error 0.12 vs 0.07); so that step is first order too. This is diffusers'
``lower_order_final`` / ``euler_at_final`` idea moved one step earlier, because our chain evaluates
the model at t = 0 and then lands on the clean image: it equals diffusers'
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
final_sigmas_type="sigma_min", euler_at_final=True)`` on ``timesteps=tau[:-1]`` (the last level
sigma_min is tau[-1] = 0's) followed by our one first-order step t = 0 -> clean, and with
``euler_at_final=False`` it equals that scheduler on ``timesteps=tau`` with
``final_sigmas_type="zero"`` (whatever ``lower_order_final`` says: with ``solver_order=2`` that flag
only lowers the final step, which is first order anyway). ``tests/test_dpmpp.py`` checks both;
``benchmarks/dpmpp_steps.py`` measures the errors.

The denoiser predicts eps (``models.diffusion.denoiser``); x0 clipping comes, as for DDIM, from the
``clip_x0`` wrapper: this sampler then builds its data predictions from the clipped estimate
(diffusers' ``thresholding=True`` with ``sample_max_value=1``). The solver is deterministic:
``generator`` and ``noise`` are accepted for the samplers' common signature and never drawn from.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from condgen.models.diffusion.denoiser import Callback, Denoiser, NoiseSampler
from condgen.models.diffusion.samplers.ddim import predicted_x0
from condgen.models.diffusion.schedule import NoiseSchedule


def half_log_snr(alpha_bar: float) -> float:
    """lambda = log(alpha / sigma) = log(alpha_bar / (1 - alpha_bar)) / 2 (Lu et al. 2022, §2)."""
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar))


def dpmpp_2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    alpha_bar_cur: float,
    alpha_bar_next: float,
    x0_last: torch.Tensor | None = None,
    alpha_bar_last: float | None = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) update (Lu et al. 2022, Algorithm 2) of x at level ``alpha_bar_cur`` with data
    prediction ``x0`` to level ``alpha_bar_next`` (less noisy). With the previous step's prediction
    ``x0_last`` at ``alpha_bar_last`` it is the second-order multistep update, without it the first-order
    one (= deterministic DDIM); ``alpha_bar_next = 1`` (the clean image) returns ``x0``."""
    if alpha_bar_next >= 1:
        return x0  # the first-order step at sigma = 0: (0 / sigma_s) x + alpha (1 - e^{-inf}) x0
    lam_cur, lam_next = half_log_snr(alpha_bar_cur), half_log_snr(alpha_bar_next)
    h = lam_next - lam_cur
    d = x0
    if x0_last is not None:
        r = (lam_cur - half_log_snr(alpha_bar_last)) / h  # r_i = h_{i-1} / h_i
        d = x0 + (x0 - x0_last) / (2 * r)  # D_i = (1 + 1/(2 r_i)) x0 - 1/(2 r_i) x0_last
    sigma_ratio = math.sqrt((1 - alpha_bar_next) / (1 - alpha_bar_cur))
    return sigma_ratio * x - math.sqrt(alpha_bar_next) * math.expm1(-h) * d


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    cond: torch.Tensor | None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    steps: int | None = None,
    timesteps: Sequence[int] | None = None,
    noise: NoiseSampler | None = None,
    euler_at_final: bool = True,
) -> torch.Tensor:
    """Run DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from x = x_{tau_0} (pure noise for tau_0 = T-1)
    down to x_0 over DDIM's timesteps: ``steps`` evenly spaced (default all T) or an explicit ``timesteps``
    sub-sequence, one denoiser call per timestep. The first step is first order, the last (onto the clean
    image) too, and with ``euler_at_final`` also the one onto the last timestep (module docstring).
    Deterministic: ``generator`` / ``noise`` are unused (the samplers' common signature)."""
    tau = schedule.resolve(steps, timesteps)
    x0_last, a_last = None, None
    for i, t in enumerate(tau):
        t_next = tau[i + 1] if i + 1 < len(tau) else -1
        a_t, a_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
        t_b = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
        x0 = predicted_x0(x, denoiser(x, t_b, cond), a_t)  # (B, C, H, W) data prediction x_theta
        first_order = euler_at_final and i == len(tau) - 2  # the step onto the last timestep tau[-1]
        x = dpmpp_2m_step(x, x0, a_t, a_next, None if first_order else x0_last, a_last)
        x0_last, a_last = x0, a_t
        if callback is not None:
            callback(i, len(tau))
    return x
