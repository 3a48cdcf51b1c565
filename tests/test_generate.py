"""tasks/generation/sampling.py (sample_images, edit_images), the `condgen sample` / `condgen edit` commands,
and Ray Train runs of the diffusion model and the noisy classifier. Tiny configs, seconds each
(the TorchTrainer runs are marked slow)."""
import numpy as np
import pytest
import torch
from PIL import Image

from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig, NoisyClassifier, NoisyClassifierConfig
from condgen.tasks.generation.sampling import edit_images, sample_images
from condgen.tasks.io import checkpoint as ckpt_io
from tests.tiny import perturb

TINY = dict(channels=(4, 8), timesteps=20, text_dim=12, sample_steps=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb(ConditionalDiffusion(DiffusionConfig(**TINY)), 0).eval()


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(1)
    return perturb(NoisyClassifier(NoisyClassifierConfig(channels=(4, 8), timesteps=20)), 1).eval()


def _encoder():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 12))  # stands in for CLIP's image tower


def _extra(guidance, classifier):
    if guidance == "classifier":
        return {"classifier": classifier, "scale": 2.0}
    if guidance == "clip":
        return {"clip_encoder": _encoder(), "clip_text": torch.randn(12), "scale": 2.0}
    if guidance == "cfg":
        return {"scale": 1.5}
    return {}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("guidance", ["none", "cfg", "classifier", "clip"])
def test_sample_images_every_guidance_and_sampler_is_seeded(model, classifier, guidance, sampler):
    y = torch.tensor([1, 7, 3])
    kw = dict(sampler=sampler, steps=3, guidance=guidance, progress=False, **_extra(guidance, classifier))
    a = sample_images(model, y, seed=0, **kw)
    b = sample_images(model, y, seed=0, **kw)
    c = sample_images(model, y, seed=1, **kw)
    assert a.shape == (3, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1 and torch.isfinite(a).all()


def _gaussian_data_model(s=0.5):
    """A tiny model whose eps is the exact E[eps | x_t] for data x_0 ~ N(mu(e), s^2 I), with the mean
    a fixed function of the condition embedding e: an untrained U-Net's samples saturate at +-1 after
    clamping, which would hide every difference between guidance modes."""
    torch.manual_seed(0)
    m = ConditionalDiffusion(DiffusionConfig(**TINY)).eval()
    W = torch.randn(m.cond_dim, 28 * 28) / m.cond_dim ** 0.5

    def eps(x, t, cond):
        mu = 0.5 * torch.tanh(m._as_embedding(cond, x.shape[0]) @ W).view(-1, 1, 28, 28)
        a = m.schedule.alpha_bar_like(t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    m.eps = eps  # model.denoiser() returns it
    return m


def test_sample_images_matches_model_sample_and_guidance_changes_the_result(classifier):
    model = _gaussian_data_model()
    y = torch.tensor([0, 4, 9, 2])
    # default guidance is the model's own: cfg at config.guidance_scale with config.sample_steps DDIM steps
    assert torch.equal(sample_images(model, y, seed=3, progress=False),
                       model.sample(y, torch.Generator().manual_seed(3)))
    plain = sample_images(model, y, guidance="none", seed=3, progress=False)
    assert (plain.abs() < 1).float().mean() > 0.5  # mostly unclamped: differences below are visible
    assert torch.equal(plain, sample_images(model, y, guidance="cfg", scale=0.0, seed=3, progress=False))
    outs = [plain]
    for kw in ({"guidance": "cfg", "scale": 2.0}, {"guidance": "cfg", "scale": 2.0, "negative": [5]},
               {"guidance": "classifier", "scale": 3.0, "classifier": classifier},
               {"guidance": "classifier", "scale": 3.0, "classifier": classifier, "conditional": False},
               {"guidance": "none", "sampler": "ddpm", "steps": 4}):
        outs.append(sample_images(model, y, seed=3, progress=False, **kw))
        assert not any(torch.allclose(outs[-1], o, atol=1e-3) for o in outs[:-1]), kw
    # the same seed gives the same images whatever the batch size, as long as the batches match
    assert torch.equal(sample_images(model, y, seed=3, batch_size=4, progress=False),
                       sample_images(model, y, seed=3, batch_size=64, progress=False))
    assert sample_images(model, y, seed=3, batch_size=3, progress=False).shape == (4, 1, 28, 28)


def test_sample_images_rejects_mismatched_inputs(model, classifier):
    with pytest.raises(ValueError):
        sample_images(model, [1], guidance="classifier", progress=False)  # no classifier
    with pytest.raises(ValueError):
        sample_images(model, [1], guidance="none", negative=[2], progress=False)  # negative needs cfg
    with pytest.raises(ValueError):
        sample_images(model, [10], progress=False)  # label out of range (10 is the null row)
    other = NoisyClassifier(NoisyClassifierConfig(channels=(4, 8), timesteps=30))
    with pytest.raises(ValueError):
        sample_images(model, [1], guidance="classifier", classifier=other, progress=False)  # wrong schedule


def test_sample_images_text_model_with_cfg_and_clip():
    torch.manual_seed(0)
    text_model = perturb(ConditionalDiffusion(DiffusionConfig(**TINY, condition="text")), 3).eval()
    txt = torch.randn(2, 12)
    a = sample_images(text_model, txt, guidance="cfg", scale=2.0, negative=torch.randn(1, 12), progress=False)
    b = sample_images(text_model, txt, guidance="clip", clip_encoder=_encoder(), scale=1.0, progress=False)
    assert a.shape == b.shape == (2, 1, 28, 28)
    with pytest.raises(TypeError):
        sample_images(text_model, [1, 2], progress=False)


def _images(n=2):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 1, 28, 28, generator=g) * 2 - 1


@pytest.mark.parametrize("method", ["ddim_inversion", "null_text", "sdedit"])
def test_edit_images_each_method_returns_images_of_the_input_shape(model, method):
    x = _images()
    out = edit_images(model, x, method=method, source_cond=[3, 4], target_cond=[8, 8], strength=0.5, steps=3,
                      scale=2.0, inner_steps=2, progress=False)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() <= 1
    again = edit_images(model, x, method=method, source_cond=[3, 4], target_cond=[8, 8], strength=0.5, steps=3,
                        scale=2.0, inner_steps=2, progress=False)
    assert torch.equal(out, again)  # seeded (SDEdit's noise) or deterministic (inversions)


def test_sdedit_strength_zero_returns_the_input(model):
    x = _images(3)
    assert torch.equal(edit_images(model, x, method="sdedit", target_cond=[1], strength=0.0, progress=False), x)
    assert not torch.equal(edit_images(model, x, method="sdedit", target_cond=[1], strength=0.3, steps=4,
                                       progress=False), x)


def test_edit_images_needs_conditions(model):
    with pytest.raises(ValueError):
        edit_images(model, _images(), method="ddim_inversion", target_cond=[1, 2], progress=False)
    with pytest.raises(ValueError):
        edit_images(model, torch.zeros(2, 1, 14, 14), method="sdedit", target_cond=[1, 2], progress=False)


def test_clip_x0_clamps_the_denoised_estimate_and_leaves_in_range_ones_alone():
    from condgen.models.diffusion import clip_x0, make_schedule

    sched = make_schedule("linear", 50)
    # float64 and seeded: at t=49, 1/sqrt(alpha_bar) ~ 360 magnifies float32 rounding to ~4e-5,
    # too close to the tolerance on some CPUs; in float64 it is ~1e-13 everywhere.
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 25, 49])
    a = sched.alpha_bar_like(t, x).double()

    def denoiser_for(x0):  # the eps whose implied x0_hat is exactly x0
        return lambda x, t, c: (x - a.sqrt() * x0) / (1 - a).sqrt()

    inside = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 1.8 - 0.9
    assert torch.allclose(clip_x0(denoiser_for(inside), sched)(x, t, None), denoiser_for(inside)(x, t, None),
                          atol=1e-4)
    outside = 3 * torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = clip_x0(denoiser_for(outside), sched)(x, t, None)
    assert torch.allclose((x - (1 - a).sqrt() * eps) / a.sqrt(), outside.clamp(-1, 1), atol=1e-4)


def test_model_sample_clips_by_default_and_the_flag_turns_it_off(model):
    y = torch.tensor([1, 2])
    clipped = sample_images(model, y, seed=0, progress=False)
    assert torch.equal(clipped, sample_images(model, y, seed=0, clip_denoised=True, progress=False))
    assert not torch.equal(clipped, sample_images(model, y, seed=0, clip_denoised=False, progress=False))


def test_ema_weights_follow_training_and_are_what_eval_mode_samples_with(tmp_path):
    torch.manual_seed(0)
    m = ConditionalDiffusion(DiffusionConfig(**TINY, ema_decay=0.9))
    opt = torch.optim.Adam(m.optimizer_groups()["main"], lr=1e-2)
    assert all(p.requires_grad for p in opt.param_groups[0]["params"])
    assert len(opt.param_groups[0]["params"]) == len(list(m.net.parameters()))  # the EMA copy is not optimised

    def opt_step(_, loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    x, y, t = _images(4), torch.tensor([0, 1, 2, 3]), torch.tensor([3, 7, 11, 15])
    for _ in range(3):
        m.train().train_step({"x": x, "y": y}, opt_step)
    assert int(m.ema_updates) == 3
    with torch.no_grad():
        train_eps, eval_eps = m.train().eps(x, t, y), m.eval().eps(x, t, y)
        assert not torch.allclose(train_eps, eval_eps)  # eval mode runs the averaged weights
        assert torch.allclose(eval_eps, m.ema(x, t, m.ema.cond(y)))
    ckpt_io.save_checkpoint(tmp_path, m)
    loaded, _ = ckpt_io.load_checkpoint(tmp_path)
    assert torch.equal(sample_images(loaded, y, steps=2, progress=False), sample_images(m, y, steps=2, progress=False))


# -- command line ------------------------------------------------------------------------------
def test_condgen_sample_and_edit_commands_write_pngs(model, classifier, tmp_path):
    from condgen.cli import main

    ckpt_io.save_checkpoint(tmp_path / "diffusion", model)
    ckpt_io.save_checkpoint(tmp_path / "clf", classifier)
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tmp_path / "diffusion"), "--labels", "0,1,2", "--per-label", "2",
                 "--steps", "2", "--guidance", "classifier", "--classifier", (tmp_path / "clf").as_uri(),
                 "--scale", "1", "--out", str(out), "--no-progress"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.ndim == 2 and grid.shape[0] > 28 and grid.shape[1] > 3 * 28

    src = tmp_path / "in.png"
    Image.fromarray(np.full((28, 28), 200, np.uint8), mode="L").save(src)
    edited = tmp_path / "edited.png"
    assert main(["edit", str(src), "--model", str(tmp_path / "diffusion"), "--method", "sdedit", "--target", "4",
                 "--strength", "0.4", "--steps", "3", "--out", str(edited), "--no-progress"]) == 0
    assert np.asarray(Image.open(edited)).shape == (28, 28)


# -- Ray Train ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,config", [
    ("diffusion", {"channels": [4, 8], "timesteps": 50, "sample_steps": 5, "lr": 3e-3}),
    ("noisy_classifier", {"channels": [4, 8], "timesteps": 50, "lr": 5e-3}),
])
def test_torchtrainer_trains_diffusion_and_noisy_classifier(tiny_shards, local_ray, name, config):
    from condgen.tasks.io.model_store import load_trained
    from condgen.tasks.training.driver import TrainRequest, train

    res = train(TrainRequest(model=name, shards_uri=tiny_shards, model_config=config, epochs=2, batch_size=32,
                             num_workers=1, run_name=f"test-{name}"))
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 2 and losses[-1] < losses[0], res.history
    loaded, meta = load_trained(res.checkpoint_uri)
    assert meta["model"] == name and tuple(meta["config"]["channels"]) == (4, 8)
    if name == "diffusion":
        assert sample_images(loaded, [0, 1], steps=2, progress=False).shape == (2, 1, 28, 28)
    else:
        assert loaded(torch.zeros(2, 1, 28, 28), 10).shape == (2, 10)


def test_command_choices_match_the_api():
    from condgen.commands import diffusion as cmd
    from condgen.tasks.generation import sampling as generate

    assert cmd.GUIDANCE == generate.GUIDANCE and cmd.EDIT_METHODS == generate.EDIT_METHODS
    assert cmd.NULL_TEXT_INNER_STEPS == generate.NULL_TEXT_INNER_STEPS
