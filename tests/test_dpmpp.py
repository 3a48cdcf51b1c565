"""DPM-Solver++(2M) (``models/diffusion/samplers/dpmpp.py``, Lu et al. 2022, Algorithm 2).

The oracle is diffusers' ``DPMSolverMultistepScheduler`` (a test dependency only), driven by the same
model output as our sampler: the exact denoiser of Gaussian data x_0 ~ N(mu, s^2 I) (an eps- or a
v-predictor), in float64 from the same x_T on the same betas and timesteps. diffusers keeps its sigma
table in float32 (``set_timesteps`` casts it), so the test replaces that table by the same values in
float64; its ``step`` still rounds the sample to float32 before the update (an explicit upcast in
diffusers), which bounds the agreement at ~1e-6 (measured max 8.2e-7 over the cases below, |x| <= 3):
hence atol 5e-6 + rtol 1e-5, while the two end-of-chain variants differ from each other by >= 0.03.

For Gaussian data the probability-flow ODE is known in closed form (the standardised coordinate
(x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a) is constant along it), which gives the exact answer the
samplers approximate: the ODE from t = T-1 to t = 0, then the data prediction at t = 0 (the last step
every sampler here shares).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from condgen.cli import main as condgen_main
from condgen.models.diffusion import SAMPLERS, ConditionalDiffusion, DiffusionConfig, clip_x0
from condgen.models.diffusion.samplers import ddim_step, dpmpp_2m_step, predicted_x0, sample_ddim, sample_dpmpp_2m
from condgen.models.diffusion.schedule import make_schedule
from condgen.serving import schema
from condgen.tasks.generation.sampling import default_steps, sample_images

S = 0.5  # std of the toy data
ATOL, RTOL = 5e-6, 1e-5  # diffusers rounds the sample to float32 inside step(): see the module docstring


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _gaussian(schedule, mu, s=S):
    """(eps, v) exact predictors of data N(mu, s^2 I): E[x_0 | x_t] = mu + sqrt(a) s^2 (x_t - sqrt(a) mu) /
    (a s^2 + 1 - a), eps = (x_t - sqrt(a) x0) / sqrt(1 - a), v = sqrt(a) eps - sqrt(1 - a) x0."""

    def eps(x, t, cond):
        a = schedule.alpha_bar_like(t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    def v(x, t, cond):
        a = schedule.alpha_bar_like(t, x)
        x0 = mu + a.sqrt() * s**2 * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)
        return a.sqrt() * eps(x, t, cond) - (1 - a).sqrt() * x0

    return eps, v


def _v_to_eps(v_denoiser, schedule):
    """eps = sqrt(a) v + sqrt(1 - a) x_t: a v-predictor under the eps contract (the conversion belongs in a
    wrapper, never in a sampler: models/diffusion/denoiser.py)."""

    def eps(x, t, cond):
        a = schedule.alpha_bar_like(t, x)
        return a.sqrt() * v_denoiser(x, t, cond) + (1 - a).sqrt() * x

    return eps


def _exact(schedule, mu, x_T, s=S):
    """The closed-form probability-flow ODE from t = T-1 to t = 0, then E[x_0 | x_{t=0}]."""
    a_T, a_0 = schedule.alpha_bar(schedule.T - 1), schedule.alpha_bar(0)
    z = (x_T - math.sqrt(a_T) * mu) / math.sqrt(a_T * s**2 + 1 - a_T)
    x_t0 = math.sqrt(a_0) * mu + math.sqrt(a_0 * s**2 + 1 - a_0) * z
    return mu + math.sqrt(a_0) * s**2 * (x_t0 - math.sqrt(a_0) * mu) / (a_0 * s**2 + 1 - a_0)


def _sigmas64(schedule, tau):
    """diffusers' sigma = sqrt((1 - a_bar) / a_bar) at ``tau``, in float64."""
    a = schedule.alpha_bars[torch.tensor(tau)]
    return ((1 - a) / a).sqrt()


def _diffusers(schedule, model, x, tau, *, prediction, final, **config):
    """diffusers' DPM-Solver++(2M) over ``tau`` ending at sigma 0 (``final="zero"``) or at t = 0's
    sigma (``"sigma_min"``); ``model(x, t) -> eps or v``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notices
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=schedule.T, trained_betas=schedule.betas.numpy(), solver_order=2,
            algorithm_type="dpmsolver++", solver_type="midpoint", prediction_type=prediction,
            final_sigmas_type=final, **config)
    sched.set_timesteps(timesteps=list(tau))
    assert sched.timesteps.tolist() == list(tau)
    last = torch.zeros(1, dtype=torch.float64) if final == "zero" else _sigmas64(schedule, [0])
    assert float(sched.sigmas[-1]) == pytest.approx(float(last[0]), rel=1e-3)  # the float32 table it replaces
    sched.sigmas = torch.cat([_sigmas64(schedule, tau), last])
    for t in sched.timesteps:
        x = sched.step(model(x, int(t)), t, x).prev_sample
    return x


def _setup(schedule_name, T=1000, shape=(4, 3, 8, 8), seed=0, mu_scale=0.5):
    schedule = make_schedule(schedule_name, T)
    g = torch.Generator().manual_seed(seed)
    mu = mu_scale * torch.randn(1, *shape[1:], generator=g, dtype=torch.float64)
    x_T = torch.randn(*shape, generator=g, dtype=torch.float64)
    return schedule, mu, x_T


# -- the algorithm ---------------------------------------------------------------------------
def test_first_order_step_is_deterministic_ddim_and_two_steps_equal_ddim():
    """Lu et al. 2022 §3.2: the first-order DPM-Solver++ step is DDIM (eta = 0); with 2 steps (T-1, then 0,
    then the clean image) every step is first order."""
    schedule, mu, x = _setup("linear", T=50)
    eps, _ = _gaussian(schedule, mu)
    for t, t_next in ((49, 30), (30, 7), (7, 0)):
        a, a_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
        e = eps(x, torch.tensor(t), None)
        torch.testing.assert_close(dpmpp_2m_step(x, predicted_x0(x, e, a), a, a_next), ddim_step(x, e, a, a_next),
                                   rtol=0, atol=1e-12)
    torch.testing.assert_close(sample_dpmpp_2m(eps, x, schedule, cond=None, steps=2),
                               sample_ddim(eps, x, schedule, cond=None, steps=2), rtol=0, atol=1e-12)
    calls = []
    sample_dpmpp_2m(eps, x, schedule, cond=None, steps=5, callback=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(5)] and SAMPLERS["dpmpp_2m"] is sample_dpmpp_2m


STEPS = [5, 10, 20, [999, 800, 640, 420, 300, 150, 90, 31, 5, 0]]  # the last: an uneven explicit sub-sequence


@pytest.mark.parametrize("steps", STEPS, ids=["5", "10", "20", "uneven"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_equals_diffusers_dpmsolver_multistep(schedule_name, prediction, steps):
    """Ours with ``euler_at_final`` (default) == diffusers on tau[:-1] ending at sigma_min (t = 0's level) with
    ``euler_at_final=True``, then one first-order step onto the clean image; ours with
    ``euler_at_final=False`` == diffusers on tau ending at sigma 0, with ``lower_order_final`` either way."""
    schedule, mu, x_T = _setup(schedule_name)
    eps, v = _gaussian(schedule, mu)
    raw = eps if prediction == "epsilon" else v
    D = eps if prediction == "epsilon" else _v_to_eps(v, schedule)
    kw = {"timesteps": steps} if isinstance(steps, list) else {"steps": steps}
    tau = schedule.resolve(kw.get("steps"), kw.get("timesteps"))
    model = lambda x, t: raw(x, torch.tensor(t), None)

    ours = sample_dpmpp_2m(D, x_T, schedule, cond=None, **kw)
    ref = _diffusers(schedule, model, x_T, tau[:-1], prediction=prediction, final="sigma_min", euler_at_final=True)
    ref = predicted_x0(ref, eps(ref, torch.tensor(0), None), schedule.alpha_bar(0))
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL)

    plain = sample_dpmpp_2m(D, x_T, schedule, cond=None, euler_at_final=False, **kw)
    for lower_order_final in (True, False):
        ref0 = _diffusers(schedule, model, x_T, tau, prediction=prediction, final="zero",
                          lower_order_final=lower_order_final)
        torch.testing.assert_close(plain, ref0, rtol=RTOL, atol=ATOL)
    assert (ours - plain).abs().max() > 1e-2  # the tolerance tells the two end-of-chain orders apart
    assert ours.abs().max() < 5


def test_clip_x0_wrapper_equals_diffusers_clipping():
    """x0 clipping reaches this sampler as it reaches DDIM, through the ``clip_x0`` denoiser wrapper: equal to
    diffusers' ``thresholding=True`` with ``sample_max_value=1`` (its dynamic threshold s is clamped to
    [1, 1], i.e. a plain clip of x0 to [-1, 1])."""
    schedule, _, x_T = _setup("linear")
    mu = 0.9 * torch.sign(torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    eps, _ = _gaussian(schedule, mu)
    tau = schedule.timesteps(10)
    ours = sample_dpmpp_2m(clip_x0(eps, schedule), x_T, schedule, cond=None, steps=10, euler_at_final=False)
    ref = _diffusers(schedule, lambda x, t: eps(x, torch.tensor(t), None), x_T, tau, prediction="epsilon",
                     final="zero", thresholding=True, sample_max_value=1.0)
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL)
    assert ours.abs().max() <= 1 + 1e-12
    unclipped = sample_dpmpp_2m(eps, x_T, schedule, cond=None, steps=10, euler_at_final=False)
    assert (ours - unclipped).abs().max() > 0.1


# -- accuracy --------------------------------------------------------------------------------
def test_many_steps_converge_to_ddim_and_to_the_exact_ode_solution():
    """Both samplers discretise the same ODE: as the steps grow DPM-Solver++ approaches the exact solution
    and DDIM's result. Measured max |error| (linear, T = 1000, 512 x 64 values) at 50 / 200 / 1000 steps:
    DPM-Solver++(2M) 6.7e-3 / 1.9e-3 / 1.1e-4, DDIM 1.2e-1 / 3.0e-2 / 6.0e-3; their gap 1.3e-1 / 3.2e-2 /
    6.2e-3 (DDIM's own first-order error)."""
    schedule, mu, x_T = _setup("linear", shape=(512, 1, 8, 8))
    eps, _ = _gaussian(schedule, mu)
    exact = _exact(schedule, mu, x_T)
    err, gap = [], []
    for steps in (50, 200, 1000):
        dpm = sample_dpmpp_2m(eps, x_T, schedule, cond=None, steps=steps)
        ddim = sample_ddim(eps, x_T, schedule, cond=None, steps=steps)
        err.append(float((dpm - exact).abs().max()))
        gap.append(float((dpm - ddim).abs().max()))
        assert err[-1] < 0.1 * float((ddim - exact).abs().max())
    assert err[0] > err[1] > err[2] and err[2] < 3e-4
    assert gap[0] > gap[1] > gap[2] and gap[2] < 1e-2


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_20_steps_land_near_the_exact_answer(schedule_name):
    """20 steps on Gaussian data (4096 samples of 64 values, mu ~ 0.5 N(0, 1), s = 0.5). Measured: RMS error
    against the exact ODE solution linear 2.3e-2 (DDIM 7.0e-2), cosine 1.6e-3 (DDIM 3.9e-2); max |sample
    mean - mu| 0.021 / 0.024, as for the exact solution (the sampling error of 4096 draws, s / 64 = 0.008
    per value); mean variance linear 0.227 (DDIM 0.185), cosine 0.249 (DDIM 0.213), data 0.25."""
    schedule, mu, x_T = _setup(schedule_name, shape=(4096, 1, 8, 8))
    eps, _ = _gaussian(schedule, mu)
    exact = _exact(schedule, mu, x_T)
    dpm = sample_dpmpp_2m(eps, x_T, schedule, cond=None, steps=20)
    ddim = sample_ddim(eps, x_T, schedule, cond=None, steps=20)
    rms = float((dpm - exact).pow(2).mean().sqrt())
    assert rms < {"linear": 4e-2, "cosine": 5e-3}[schedule_name]
    assert rms < 0.5 * float((ddim - exact).pow(2).mean().sqrt())
    assert float((dpm.mean(0) - mu).abs().max()) < 0.04
    assert abs(float(dpm.var(0).mean()) - S**2) < {"linear": 0.03, "cosine": 0.005}[schedule_name]


# -- plumbing --------------------------------------------------------------------------------
def test_sampling_api_service_schema_and_cli_accept_dpmpp_2m(capsys, monkeypatch):
    torch.manual_seed(0)
    model = ConditionalDiffusion(DiffusionConfig(channels=(4, 8), timesteps=20, sample_steps=4)).eval()
    assert default_steps(model, "dpmpp_2m") == 4
    kw = {"sampler": "dpmpp_2m", "guidance": "cfg", "scale": 1.5, "progress": False}
    a = sample_images(model, [1, 7], seed=0, **kw)
    assert a.shape == (2, 1, 28, 28) and torch.equal(a, sample_images(model, [1, 7], seed=0, **kw))
    assert not torch.equal(a, sample_images(model, [1, 7], seed=1, **kw))  # the seed drives x_T
    assert schema.GenerateV1(label=1, sampler="dpmpp_2m").sampler == "dpmpp_2m"
    monkeypatch.setenv("COLUMNS", "200")  # the help table on one line per option
    assert condgen_main(["sample", "--help"]) == 0
    assert "dpmpp_2m" in capsys.readouterr().out
