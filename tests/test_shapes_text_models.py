"""benchmarks/shapes_text_models.py: the --steps budget, text batches, the direct loops and the plain sampler."""
from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest
import torch

from benchmarks.shapes_text_models import STEPS, build, parse_steps, plain_sampler, text_batches, train_model

SIZE, N, K, D = 8, 16, 3, 6  # image side, images, phrasings per image, text width


def data(seed: int = 0) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_uint8 = torch.randint(0, 256, (N, SIZE, SIZE, 3), generator=g, dtype=torch.uint8).numpy()
    x = torch.from_numpy(x_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x_uint8, x, torch.randn(N, K, D, generator=g)


def bench_args(**kw) -> Namespace:
    return Namespace(**{"size": SIZE, "batch": 4, "seed": 0, "context_tokens": 2, "p_uncond": 0.1, "lr": 1e-3,
                        "sample_steps": 2, **kw})


def test_parse_steps_defaults_one_count_and_per_model():
    models = ["diffusion", "cvae", "cgan"]
    assert parse_steps(None, models, STEPS["quick"]) == {m: STEPS["quick"][m] for m in models}
    assert parse_steps("500", models, STEPS["full"]) == {"diffusion": 500, "cvae": 500, "cgan": 500}
    # per model: the named ones change, the others keep their defaults; a model not run is ignored
    got = parse_steps("cvae=20, cgan=30,ldm=7", models, STEPS["full"])
    assert got == {"diffusion": STEPS["full"]["diffusion"], "cvae": 20, "cgan": 30}


@pytest.mark.parametrize("spec", ["0", "-3", "many", "vae=10", "cvae=", "cvae=1.5"])
def test_parse_steps_rejects_bad_counts_and_names(spec):
    with pytest.raises(ValueError, match="--steps"):
        parse_steps(spec, ["cvae", "cgan"], STEPS["quick"])


def test_text_batches_pick_one_phrasing_of_the_same_image_seeded():
    _, x, txt = data()
    z = torch.arange(N, dtype=torch.float32)[:, None] * torch.ones(N, 2)  # row i of z is i: tracks the image index
    sample = text_batches(x, txt, 64, z)
    a, b = sample(np.random.default_rng(5)), sample(np.random.default_rng(5))
    for key in ("x", "txt", "z"):
        assert torch.equal(a[key], b[key])  # seeded by the rng alone
    idx = a["z"][:, 0].long()
    assert torch.equal(a["x"], x[idx])
    # each row's text is one of ITS image's phrasings, and over 64 draws more than one phrasing is used
    match = (a["txt"][:, None, :] == txt[idx]).all(-1)  # (64, K)
    assert match.any(1).all()
    assert len(set(match.float().argmax(1).tolist())) > 1
    assert set(text_batches(x, txt, 4)(np.random.default_rng(0))) == {"x", "txt"}


def test_cgan_loop_steps_discriminator_and_generator():
    x_uint8, x, txt = data()
    args = bench_args()
    torch.manual_seed(args.seed)
    fresh = build("cgan", size=SIZE, text_dim=D, args=args, quick=True)
    model, record = train_model("cgan", x_uint8, x, txt, args=args, quick=True, steps=2, ae_steps=1)
    assert not model.training and record["steps"] == 2
    assert {"d_loss", "g_loss"} <= set(record["last"])
    for part in ("D", "G"):  # both optimiser groups stepped
        before = torch.cat([p.flatten() for p in getattr(fresh, part).parameters()])
        after = torch.cat([p.flatten() for p in getattr(model, part).parameters()])
        assert not torch.allclose(before, after, atol=1e-7), part


def test_ldm_trains_its_autoencoder_first_and_samples_rgb():
    x_uint8, x, txt = data()
    model, record = train_model("ldm", x_uint8, x, txt, args=bench_args(), quick=True, steps=1, ae_steps=2)
    assert record["autoencoder"]["steps"] == 2 and np.isfinite(record["autoencoder"]["test"]["mse"])
    out = model.sample(txt[:3, 0], generator=torch.Generator().manual_seed(0), guidance_scale=2.0)
    assert out.shape == (3, 3, SIZE, SIZE) and torch.isfinite(out).all()


def test_plain_sampler_is_seeded_rgb_uint8_and_refuses_negative_prompts():
    _, _, txt = data()
    torch.manual_seed(0)
    model = build("cvae", size=SIZE, text_dim=D, args=bench_args(), quick=True).eval()
    table = {f"p{i}": txt[i, 0] for i in range(4)}

    def encode(prompts):
        return torch.stack([table[p] for p in prompts])

    prompts = ["p0", "p1", "p2", "p3"]
    a, b = plain_sampler(model, encode, seed=3)(prompts), plain_sampler(model, encode, seed=3)(prompts)
    assert a.dtype == np.uint8 and a.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, plain_sampler(model, encode, seed=4)(prompts))
    with pytest.raises(ValueError, match="no negative prompts"):
        plain_sampler(model, encode)(prompts, ["red"] * 4)
    with pytest.raises(ValueError, match="one of cvae, cgan, ldm"):
        build("diffusion", size=SIZE, text_dim=D, args=bench_args(), quick=True)


def test_shapes_text_cli_resolves_models_and_budgets(capsys):
    from benchmarks.shapes_text import parse_args

    args = parse_args(["--quick", "--models", "cvae", "cgan", "cvae", "--steps", "cgan=7"])
    assert args.models == ["cvae", "cgan"]  # a repeated model is trained once
    assert args.steps == {"cvae": STEPS["quick"]["cvae"], "cgan": 7} and args.ae_steps == 40
    default = parse_args([])
    assert default.models == ["diffusion"] and default.steps == {"diffusion": STEPS["full"]["diffusion"]}
    assert parse_args(["--steps", "6000"]).steps == {"diffusion": 6000}  # the single-model form of earlier runs
    with pytest.raises(SystemExit):
        parse_args(["--models", "cvae", "--steps", "gan=10"])
    assert "--steps names 'gan'" in capsys.readouterr().err
