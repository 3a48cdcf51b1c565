"""DPM-Solver++(2M) vs DDIM: error against the exact ODE solution at 5 / 10 / 20 / 50 steps.

    python benchmarks/dpmpp_steps.py            # ~45 s of CPU (3.8 min wall on a busy 2-core machine)
    python benchmarks/dpmpp_steps.py --quick    # 128 samples, coarser reference: ~7 s

No network: the denoiser is the exact posterior mean of a Gaussian mixture (K components N(m_k, s^2 I)
in 64 dimensions, equal weights), so the only error is the solver's. Both samplers run on the same
timesteps (``schedule.timesteps(steps)``: T-1 down to 0, then the clean image) from the same x_T, one
network evaluation per step. The reference integrates the probability-flow ODE in lambda = log(alpha /
sigma) (y = x / sigma, dy/dlambda = e^lambda x0(x, lambda); Lu et al. 2022, Eq. 9) with classical RK4
from t = T-1 to t = 0 and then takes the data prediction at t = 0, the last step every sampler here
shares. Columns: RMS error of DDIM (eta = 0), of DPM-Solver++(2M) as served (``euler_at_final``: the
step onto t = 0 first order) and with that step second order too (diffusers' default on these
timesteps), and the ratio DDIM / DPM-Solver++. The reference's own error (RK4 at n vs 2n steps) is
printed above each table.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from condgen.models.diffusion.samplers import sample_ddim, sample_dpmpp_2m
from condgen.models.diffusion.samplers.dpmpp import half_log_snr
from condgen.models.diffusion.schedule import make_schedule

STEPS = (5, 10, 20, 50)
DIM = 64  # values per sample, shaped (1, 8, 8)


def mixture_x0(means: torch.Tensor, s: float):
    """x0(x, a) = E[x_0 | x_t = x] at alpha_bar a for data = equal mixture of N(m_k, s^2 I), means (K, DIM)."""

    def x0(x: torch.Tensor, a: float) -> torch.Tensor:
        xf = x.reshape(x.shape[0], -1)  # (B, DIM)
        var = a * s**2 + 1 - a  # of x_t given the component
        diff = xf[:, None, :] - math.sqrt(a) * means[None]  # (B, K, DIM)
        w = torch.softmax(-diff.pow(2).sum(-1) / (2 * var), dim=1)  # (B, K) responsibilities
        comp = means[None] + math.sqrt(a) * s**2 * diff / var  # (B, K, DIM) per-component posterior means
        return (w[..., None] * comp).sum(1).reshape(x.shape)

    return x0


def as_denoiser(x0, schedule):
    """The eps-denoiser D(x, t, cond) of an x0(x, a) posterior mean: eps = (x - sqrt(a) x0) / sqrt(1 - a)."""

    def eps(x, t, cond):
        a = schedule.alpha_bar(int(t[0]))
        return (x - math.sqrt(a) * x0(x, a)) / math.sqrt(1 - a)

    return eps


def reference(x0, schedule, x_T: torch.Tensor, n: int) -> torch.Tensor:
    """RK4 over n equal lambda steps from t = T-1 to t = 0 on y = x / sigma, then x0 at t = 0."""
    a_T, a_0 = schedule.alpha_bar(schedule.T - 1), schedule.alpha_bar(0)
    lam, lam_end = half_log_snr(a_T), half_log_snr(a_0)
    h = (lam_end - lam) / n

    def sigma(lm):
        return 1 / math.sqrt(1 + math.exp(2 * lm))

    def f(lm, y):
        return math.exp(lm) * x0(sigma(lm) * y, 1 / (1 + math.exp(-2 * lm)))

    y = x_T / sigma(lam)
    for _ in range(n):
        k1 = f(lam, y)
        k2 = f(lam + h / 2, y + h / 2 * k1)
        k3 = f(lam + h / 2, y + h / 2 * k2)
        k4 = f(lam + h, y + h * k3)
        y, lam = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam + h
    return x0(sigma(lam_end) * y, a_0)


def table(name: str, x0, schedule, x_T: torch.Tensor, n_ref: int) -> list[dict]:
    ref = reference(x0, schedule, x_T, n_ref)
    ref_err = float((ref - reference(x0, schedule, x_T, 2 * n_ref)).pow(2).mean().sqrt())
    D = as_denoiser(x0, schedule)
    print(f"\n{name}  (reference RK4 {n_ref} vs {2 * n_ref} steps: RMS {ref_err:.1e})")
    print(f"{'steps':>5} {'DDIM':>9} {'DPM++2M':>9} {'2M, 2nd-order to t=0':>21} {'DDIM/DPM++':>11}")
    rows = []
    for steps in STEPS:
        rms = {k: float((y - ref).pow(2).mean().sqrt()) for k, y in (
            ("ddim", sample_ddim(D, x_T, schedule, cond=None, steps=steps)),
            ("dpmpp_2m", sample_dpmpp_2m(D, x_T, schedule, cond=None, steps=steps)),
            ("dpmpp_2m_no_euler", sample_dpmpp_2m(D, x_T, schedule, cond=None, steps=steps, euler_at_final=False)),
        )}
        print(f"{steps:>5} {rms['ddim']:>9.2e} {rms['dpmpp_2m']:>9.2e} {rms['dpmpp_2m_no_euler']:>21.2e} "
              f"{rms['ddim'] / rms['dpmpp_2m']:>11.1f}")
        rows.append({"case": name, "steps": steps, **rms})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="128 samples, RK4 reference with 500 steps")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, n_ref = (128, 500) if args.quick else (args.samples, 1000)
    g = torch.Generator().manual_seed(0)
    cases = {
        "Gaussian N(mu, 0.5^2)": (0.5 * torch.randn(1, DIM, generator=g, dtype=torch.float64), 0.5),
        "mixture of 8, s = 0.1": (0.6 * torch.randn(8, DIM, generator=g, dtype=torch.float64), 0.1),
    }
    rows = []
    for schedule_name in ("linear", "cosine"):
        schedule = make_schedule(schedule_name, 1000)
        x_T = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
        for label, (means, s) in cases.items():
            rows += table(f"{label}, {schedule_name} schedule, T = 1000, {n} samples", mixture_x0(means, s),
                          schedule, x_T, n_ref)
    return rows


if __name__ == "__main__":
    main()
