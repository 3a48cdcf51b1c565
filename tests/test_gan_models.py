"""cGAN, AC-GAN, pix2pix and CycleGAN on their tiny configs (tests/tiny.py) and sklearn digits."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from condgen.models.base import GenerativeModel
from condgen.models.paired import edge_map
from condgen.models.registry import MODELS, build_model
from tests.tiny import LOSS_KEY, TEXT_DIM, opt_step_for, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """32 sklearn digits (8x8, shipped with the wheel) upsampled to 28x28 in [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:32], dtype=torch.float32)[:, None] / 16  # (32, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=28, mode="bilinear", align_corners=False) * 2 - 1
    return x, torch.tensor(d.target[:32])


def _batch(kind: str) -> dict[str, torch.Tensor]:
    x, y = _digits()
    batch = {"x": x, "y": y, "txt": torch.randn(len(y), TEXT_DIM, generator=torch.Generator().manual_seed(3))}
    if kind == "pix2pix":
        batch["cond_img"] = edge_map(x)
    if kind == "cyclegan":
        batch["x_b"] = -x.flip(0)  # domain B: inverted digits, in another order (unpaired)
    return batch


# What the generic loop does: one Adam per named group (config lr / d_lr and betas), zero_grad / backward / step.
_opt_step = opt_step_for


def _build(kind: str, **overrides):
    """The tiny config with ``overrides``, initialised from the global RNG (the tests seed it)."""
    if kind not in KINDS:
        raise KeyError(kind)
    return MODELS[kind][1](tiny_config(kind, **overrides))


def _cond(kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return {"cgan": batch["y"], "acgan": batch["y"], "pix2pix": batch.get("cond_img"), "cyclegan": batch["x"]}[kind]


KINDS = ["cgan", "acgan", "pix2pix", "cyclegan"]
# The loss each family is expected to drive down in a few dozen steps on one batch:
# D's hinge loss (it quickly tells digits from early fakes), AC-GAN's term 1 (the
# classifier learns the real labels), pix2pix's L1 and CycleGAN's cycle loss.
FALLING = {kind: LOSS_KEY[kind] for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls_on_a_digits_batch(kind):
    model, batch = _build(kind), _batch(kind)
    step = _opt_step(model)
    logs = [model.train_step(batch, step) for _ in range(40)]
    assert all(isinstance(v, float) for v in logs[0].values())
    key = FALLING[kind]
    first = sum(log[key] for log in logs[:5]) / 5
    last = sum(log[key] for log in logs[-5:]) / 5
    assert last < 0.7 * first, (key, first, last)


@pytest.mark.parametrize("kind", KINDS)
def test_train_step_calls_each_group_once_discriminator_first(kind):
    model = _build(kind)
    calls = []
    model.train_step(_batch(kind), lambda name, loss: calls.append((name, loss.requires_grad)))
    assert calls == [("disc", True), ("gen", True)]
    assert set(model.optimizer_groups()) == {"disc", "gen"}
    assert isinstance(model, GenerativeModel)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_gives_identical_samples(kind, tmp_path):
    model, batch = _build(kind), _batch(kind)
    step = _opt_step(model)
    for _ in range(2):  # move away from the init, spectral-norm vectors included
        model.train_step(batch, step)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(123)  # a different init, so only the loaded weights can make them equal
    clone = _build(kind)
    clone.load_state_dict(load_file(tmp_path / "model.safetensors"))
    cond = _cond(kind, batch)[:6]
    a = model.sample(cond, torch.Generator().manual_seed(7))
    b = clone.sample(cond, torch.Generator().manual_seed(7))
    assert a.shape == (6, 1, 28, 28)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)


@pytest.mark.parametrize("block", ["concat", "film", "adain"])
@pytest.mark.parametrize("kind", ["cgan", "acgan"])
def test_generator_blocks_follow_the_condition_and_the_rng(kind, block):
    model = _build(kind, block=block)
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    threes, sevens = torch.full((4,), 3), torch.full((4,), 7)
    assert torch.equal(model.sample(threes, g(0)), model.sample(threes, g(0)))
    assert not torch.allclose(model.sample(threes, g(0)), model.sample(threes, g(1)))
    assert not torch.allclose(model.sample(threes, g(0)), model.sample(sevens, g(0)))
    model.train_step(_batch(kind), _opt_step(model))  # every block trains


def test_generate_is_batch_independent_and_differentiable_in_z():
    model = _build("cgan")
    z = torch.randn(5, model.latent_dim, requires_grad=True)
    c = torch.arange(5)
    x = model.generate(z, c)
    torch.testing.assert_close(model.generate(z[2:3], c[2:3]), x[2:3])  # batched == single
    x.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert model.latent_sample(3, torch.Generator().manual_seed(0)).shape == (3, model.latent_dim)


def test_cgan_text_condition_uses_clip_embeddings():
    model = _build("cgan", condition="text", text_dim=TEXT_DIM)
    batch = _batch("cgan")
    logs = model.train_step(batch, _opt_step(model))
    assert set(logs) >= {"d_loss", "g_loss"}
    t1, t2 = batch["txt"][:2], batch["txt"][2:4]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert not torch.allclose(model.sample(t1, g()), model.sample(t2, g()))
    with pytest.raises(TypeError):
        model.sample(torch.tensor([1, 2]))


def test_acgan_term2_flag_changes_only_the_generator_loss():
    with_t2 = _build("acgan", acgan_term2=True)
    without = _build("acgan", acgan_term2=False)
    without.load_state_dict(with_t2.state_dict())
    batch, noop = _batch("acgan"), lambda name, loss: None
    torch.manual_seed(5)
    a = with_t2.train_step(batch, noop)
    torch.manual_seed(5)
    b = without.train_step(batch, noop)
    assert a["d_loss"] == pytest.approx(b["d_loss"])
    assert a["term2"] == pytest.approx(b["term2"]) and a["term2"] > 0
    assert a["g_loss"] == pytest.approx(b["g_loss"] + with_t2.config.aux_weight * a["term2"], rel=1e-5)


def test_acgan_rejects_text_conditions():
    with pytest.raises(ValueError, match="label"):
        _build("acgan", condition="text")


def test_edge_map_marks_the_outline_of_a_square():
    x = -torch.ones(2, 1, 12, 12)
    x[:, :, 4:8, 4:8] = 1
    e = edge_map(x)
    assert e.shape == (2, 1, 12, 12)
    assert set(e.unique().tolist()) == {-1.0, 1.0}
    assert e[0, 0, 0, 0] == -1 and e[0, 0, 4, 4] == 1  # flat background / the square's corner
    assert (edge_map(torch.zeros(1, 3, 12, 12)) == -1).all()  # a flat image has no edges


def test_pix2pix_and_cyclegan_check_their_batch_keys_and_directions():
    x, _ = _digits()
    # Without paired data pix2pix derives its condition: the digit's edge map.
    p2p = _build("pix2pix")
    from condgen.models.paired import edge_map

    assert torch.equal(p2p.condition_image(x[:2]), edge_map(x[:2]))
    called = []
    p2p.train_step({"x": x[:2]}, lambda n, l: called.append(n))
    assert called == ["disc", "gen"]
    cyc = _build("cyclegan")
    with pytest.raises(KeyError, match="x_b"):
        cyc.train_step({"x": x[:2]}, lambda n, l: None)
    assert cyc.translate(x[:2], "a2b").shape == cyc.translate(x[:2], "b2a").shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="direction"):
        cyc.translate(x[:2], "sideways")


@pytest.mark.parametrize("name", KINDS)
def test_registry_builds_from_json_like_dicts(name):
    assert name in MODELS
    cfg = {"channels": [4, 8]}
    if name == "cyclegan":
        cfg["disc_channels"] = [4, 8]
    model = build_model(name, cfg)
    assert model.config.channels == (4, 8)


def test_generator_ema_follows_its_formula_and_is_what_eval_samples_from():
    model = _build("cgan", ema_decay=0.5)
    before = [p.detach().clone() for p in model.G_ema.parameters()]
    model.train_step(_batch("cgan"), _opt_step(model))
    d = min(0.5, 1 / 10)  # warm-up: min(decay, (1 + n) / (10 + n)) at n = 0
    for p0, p_ema, p in zip(before, model.G_ema.parameters(), model.G.parameters()):
        torch.testing.assert_close(p_ema, d * p0 + (1 - d) * p.detach())
    assert int(model.ema_updates) == 1
    c, g = torch.arange(4), lambda: torch.Generator().manual_seed(0)  # noqa: E731
    z = model.latent_sample(4, g())
    assert torch.equal(model.train().sample(c, g()), model.G(z, c))
    assert torch.equal(model.eval().sample(c, g()), model.G_ema(z, c))
    assert not torch.allclose(model.G(z, c), model.G_ema(z, c))
    assert _build("cgan", ema_decay=0.0).G_ema is None


def test_discriminator_learning_rate_can_differ_from_the_generator_s():
    from condgen.tasks.training.worker import make_optimizers

    opts = make_optimizers(_build("acgan", lr=1e-4, d_lr=4e-4))
    assert opts["disc"].param_groups[0]["lr"] == 4e-4 and opts["gen"].param_groups[0]["lr"] == 1e-4
    opts = make_optimizers(_build("cgan", lr=1e-4))
    assert opts["disc"].param_groups[0]["lr"] == opts["gen"].param_groups[0]["lr"] == 1e-4


def test_diff_augment_keeps_shape_range_and_gradient_and_is_seedable():
    from condgen.models.adversarial import diff_augment

    x, _ = _digits()
    x = x[:8].clone().requires_grad_(True)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for policy in ("translation", "cutout", "translation,cutout"):
        a = diff_augment(x, policy, g())
        assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
        assert torch.equal(a, diff_augment(x, policy, g()))  # same generator, same transform
        assert not torch.equal(a, x)
    diff_augment(x, "translation,cutout,brightness,contrast").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable: G learns through it
    # translation moves a centred blob without changing it
    blob = torch.full((16, 1, 28, 28), -1.0)
    blob[:, :, 12:16, 12:16] = 1
    moved = diff_augment(blob, "translation", g())
    assert torch.equal((moved > 0).sum(dim=(1, 2, 3)), torch.full((16,), 16))
    assert not torch.equal(moved, blob)
    assert torch.equal(diff_augment(blob, ""), blob)
    with pytest.raises(ValueError, match="unknown DiffAugment op"):
        diff_augment(blob, "rotate")
