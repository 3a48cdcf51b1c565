"""benchmarks/diffusion_paths.py's hybrid runs: ancestral steps (eta = 1) at t >= cut, deterministic DDIM below.
At the two extremes they must be exactly the committed DDIM sampler with eta = 0 and eta = 1."""
from __future__ import annotations

import torch

from benchmarks.diffusion_paths import hybrid
from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig, clip_x0
from condgen.models.diffusion.samplers.ddim import sample_ddim
from tests.tiny import perturb


def test_hybrid_is_ddim_above_the_chain_and_ancestral_below_it():
    torch.manual_seed(0)
    model = perturb(ConditionalDiffusion(DiffusionConfig(channels=(4, 8), timesteps=50, prediction="v"))).eval()
    D = clip_x0(model.denoiser(), model.schedule)
    x_T, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 5, 9])

    def run(cut=None, eta=None):
        g = torch.Generator().manual_seed(7)
        if cut is not None:
            return hybrid(D, x_T.clone(), model.schedule, y, 10, cut, g)
        return sample_ddim(D, x_T.clone(), model.schedule, cond=y, generator=g, steps=10, eta=eta)

    deterministic, ancestral = run(eta=0.0), run(eta=1.0)
    assert torch.allclose(run(cut=50), deterministic, atol=1e-6)  # no step at t >= 50: all eta = 0
    assert torch.allclose(run(cut=0), ancestral, atol=1e-6)  # every step stochastic, the same draws
    middle = run(cut=25)
    assert not torch.allclose(middle, deterministic, atol=1e-3) and not torch.allclose(middle, ancestral, atol=1e-3)
