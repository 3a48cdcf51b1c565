"""Latent diffusion, its autoencoder, ControlNet and the super-resolution cascade. Tiny configs, seconds each."""
import functools
import math

import numpy as np
import pytest
import torch

from condgen.models.autoencoder import Autoencoder, AutoencoderConfig
from condgen.models.controlnet import ControlNet, ControlNetConfig, control_image
from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig, cfg, ddim_invert, sample_ddim, sdedit
from condgen.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from condgen.models.registry import build_model
from condgen.models.superres import SuperRes, SuperResConfig, cascade_sample
from condgen.tasks.io import checkpoint as ckpt_io

AE = dict(channels=(4, 8), latent_channels=4)  # 28 x 28 x 1 -> 7 x 7 x 4
DIFF = dict(channels=(4, 8), timesteps=20, text_dim=12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=1)
def _all_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.zeros((len(d.images), 28, 28), np.float32)
    img[:, 2:26, 2:26] = np.kron(d.images, np.ones((3, 3))) / 16.0  # 8x8 -> 24x24, centred
    return torch.from_numpy(img).unsqueeze(1) * 2 - 1, torch.from_numpy(d.target).long()


def _digits(n=64):
    x, y = _all_digits()
    return x[:n].clone(), y[:n].clone()


def _adam(params, lr):
    opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=lr)

    def opt_step(_, loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    return opt_step


def _adam_groups(model, lr):
    """One Adam per optimizer group, exactly as tasks/training/worker.py's make_optimizers (requires_grad only)."""
    opts = {k: torch.optim.Adam([p for p in ps if p.requires_grad], lr=lr)
            for k, ps in model.optimizer_groups().items()}

    def opt_step(name, loss):
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()

    return opt_step


def _perturb(model, seed=0, scale=0.1):
    """Zero-initialised output convs would make every equality trivially true: move all weights."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _base(condition="label", seed=0) -> ConditionalDiffusion:
    torch.manual_seed(seed)
    return _perturb(ConditionalDiffusion(DiffusionConfig(**DIFF, condition=condition)), seed).eval()


def _ae(reg="kl", seed=0, **kw) -> Autoencoder:
    torch.manual_seed(seed)
    return Autoencoder(AutoencoderConfig(**AE, regularization=reg, **kw))


def _ldm(ae=None, **kw) -> LatentDiffusion:
    torch.manual_seed(0)
    return LatentDiffusion(LatentDiffusionConfig(**DIFF, **kw), autoencoder=ae if ae is not None else _ae())


# -- autoencoder ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("reg", ["kl", "vq"])
def test_autoencoder_losses_fall_and_shapes(reg):
    ae = _ae(reg)
    x, _ = _digits(32)

    def fixed():
        torch.manual_seed(123)
        with torch.no_grad():
            return ae.loss(x)[0].item(), ((ae.reconstruct(x) - x) ** 2).mean().item()

    loss0, mse0 = fixed()
    opt_step = _adam_groups(ae, 1e-2)
    for _ in range(25):
        logs = ae.train_step({"x": x}, opt_step)
    loss1, mse1 = fixed()
    assert loss1 < 0.5 * loss0 and mse1 < 0.5 * mse0, (loss0, loss1, mse0, mse1)
    assert ({"kl"} if reg == "kl" else {"vq", "perplexity"}) <= set(logs)
    z = ae.encode(x[:3])
    assert z.shape == (3, 4, 7, 7) and ae.decode(z).shape == (3, 1, 28, 28)
    assert ae.config.compression()["dims"] == 4.0
    if reg == "vq":
        assert ae.config.compression()["bits"] == 784 * 8 / (49 * 8)  # K = 256: 8-bit indices
        # decode quantises: any z and its nearest code decode identically
        zq = ae.quantizer.lookup(ae.quantizer.indices(z))
        assert torch.equal(ae.decode(z), ae.decode(zq))
    assert int(ae.step) == 25 and 0 < float(ae.latent_std) < 10
    with pytest.raises(NotImplementedError):
        ae.sample(torch.tensor([1]))


def test_autoencoder_gan_term_uses_the_adaptive_weight():
    ae = _ae("vq", gan_weight=0.5, gan_start=1, disc_channels=(4, 8))
    x, _ = _digits(8)
    groups = ae.optimizer_groups()
    assert set(groups) == {"ae", "disc"}
    assert not {id(p) for p in groups["ae"]} & {id(p) for p in groups["disc"]}
    # lambda = gan_weight * ||grad_GL L_rec|| / (||grad_GL L_GAN|| + 1e-4), on the decoder's last layer
    _, rec, x_hat, _, _ = ae.loss(x)
    g = -ae.disc(x_hat).mean()
    last = ae.decoder.conv_out.weight
    expected = 0.5 * torch.autograd.grad(rec, last, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g, last, retain_graph=True)[0].norm() + 1e-4)
    assert torch.allclose(ae.adaptive_weight(rec, g), expected)

    disc_before = [p.clone() for p in ae.disc.parameters()]
    opt_step = _adam_groups(ae, 1e-3)
    first = ae.train_step({"x": x}, opt_step)  # step 1 <= gan_start: no GAN term, D unchanged
    assert "gan_lambda" not in first
    assert all(torch.equal(a, b) for a, b in zip(disc_before, ae.disc.parameters()))
    second = ae.train_step({"x": x}, opt_step)
    assert math.isfinite(second["gan_lambda"]) and second["gan_lambda"] > 0 and "d_loss" in second
    assert not all(torch.equal(a, b) for a, b in zip(disc_before, ae.disc.parameters()))


# -- latent diffusion ----------------------------------------------------------------------------------
def test_latent_diffusion_loss_falls_and_samples_decode():
    ldm = _ldm()
    x, y = _digits(32)

    def fixed():
        torch.manual_seed(123)
        with torch.no_grad():
            return ldm.diffusion.loss(ldm.encode(x), y)[0].item()

    before = fixed()
    ae_before = ckpt_io.state_fingerprint(ldm.autoencoder)
    opt_step = _adam_groups(ldm, 1e-2)
    for _ in range(15):
        ldm.train_step({"x": x, "y": y}, opt_step)
    assert fixed() < 0.7 * before
    assert ckpt_io.state_fingerprint(ldm.autoencoder) == ae_before  # frozen
    g = torch.Generator().manual_seed(0)
    z = ldm.sample_latents(y[:3], g, steps=3)
    assert z.shape == (3, 4, 7, 7)
    s = ldm.sample(y[:3], torch.Generator().manual_seed(0), steps=3)
    assert s.shape == (3, 1, 28, 28) and s.abs().max() <= 1
    assert torch.equal(s, ldm.decode(z))  # sampling = latent sampling, decoded once
    assert ldm.diffusion.config.clip_denoised is False  # x0-clipping is for the pixel range, not latents


def test_latent_diffusion_precomputed_latents_equal_encoding_on_the_fly():
    ldm = _ldm()
    x, y = _digits(8)
    losses = []
    for batch in ({"x": x, "y": y}, {"x": x, "y": y, "z": ldm.autoencoder.encode(x).detach()}):
        torch.manual_seed(5)
        losses.append(ldm.train_step(batch, lambda n, l: None)["loss"])
    assert losses[0] == losses[1]


def test_latent_diffusion_scale_factor_normalises_latents():
    ae = _ae()
    x, _ = _digits(64)
    opt_step = _adam_groups(ae, 1e-2)
    for _ in range(5):
        ae.train_step({"x": x}, opt_step)
    ldm = _ldm(ae)
    assert ldm.scale == pytest.approx(1 / float(ae.latent_std))
    assert 0.5 < ldm.encode(x).std().item() < 2.0
    assert _ldm(ae, scale_factor=0.5).scale == 0.5


def test_every_sampler_guidance_and_editing_method_works_on_latents():
    ldm = _perturb(_ldm(), 1).eval()
    x, y = _digits(2)
    D, sched = ldm.denoiser(), ldm.schedule
    z = ldm.encode(x)  # (2, 4, 7, 7)
    guided = cfg(D, 2.0, ldm.null_cond(1))
    assert cfg(D, 0.0, ldm.null_cond(1)) is D
    z_T = ddim_invert(D, z, sched, cond=y, steps=4)  # (an untrained net: no round-trip accuracy to expect)
    back = sample_ddim(guided, z_T, sched, cond=y, steps=4)
    assert z_T.shape == back.shape == z.shape and torch.isfinite(back).all()
    edited = sdedit(guided, z, sched, strength=0.5, cond=torch.tensor([5, 6]),
                    generator=torch.Generator().manual_seed(0), steps=3)
    assert edited.shape == z.shape and not torch.allclose(edited, z)
    assert ldm.decode(edited).shape == (2, 1, 28, 28)
    # sample() is DDIM + CFG on latents with the model's condition embedding, decoded
    w = 1.5
    z_T = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(3))
    ref = sample_ddim(cfg(D, w, ldm.null_embedding(1)), z_T, sched, cond=ldm.embed_condition(y), steps=3)
    out = ldm.sample(y, torch.Generator().manual_seed(3), steps=3, guidance_scale=w)
    assert torch.allclose(out, ldm.decode(ref), atol=1e-6)


def test_latent_diffusion_gets_its_autoencoder_from_a_uri_through_the_tasks_layer(tmp_path):
    from condgen.tasks.data.latents import latent_diffusion_config
    from condgen.tasks.io.model_store import attach_frozen_parts

    ae = _perturb(_ae("vq"), 2)
    ckpt_io.save_checkpoint(tmp_path / "ae", ae)
    uri = (tmp_path / "ae").as_uri()
    cfg_dict = latent_diffusion_config(uri, **DIFF)
    ldm = build_model("latent_diffusion", cfg_dict)
    assert int(ldm.autoencoder_ready) == 0  # nothing read at construction
    x, y = _digits(4)
    with pytest.raises(RuntimeError, match="autoencoder"):  # models/ never reads the URI itself
        ldm.train_step({"x": x, "y": y}, lambda n, l: None)
    assert attach_frozen_parts(ldm) is ldm  # tasks/ loads the checkpoint and hands it in
    ldm.train_step({"x": x, "y": y}, _adam_groups(ldm, 1e-3))
    assert int(ldm.autoencoder_ready) == 1
    assert ckpt_io.state_fingerprint(ldm.autoencoder) == ckpt_io.state_fingerprint(ae)
    assert all(not p.requires_grad for p in ldm.autoencoder.parameters())
    # a saved LDM is self-contained: loading it never reads the autoencoder's URI again
    ckpt_io.save_checkpoint(tmp_path / "ldm", ldm)
    (tmp_path / "ae" / "model.safetensors").unlink()
    loaded, _ = ckpt_io.load_checkpoint(tmp_path / "ldm")
    assert torch.equal(loaded.sample(y, torch.Generator().manual_seed(0), steps=2),
                       ldm.eval().sample(y, torch.Generator().manual_seed(0), steps=2))
    # wrong architecture for the checkpoint, and no autoencoder at all
    ckpt_io.save_checkpoint(tmp_path / "ae", ae)
    bad = build_model("latent_diffusion", {**cfg_dict, "autoencoder": {**cfg_dict["autoencoder"], "codebook_size": 8}})
    with pytest.raises(ValueError, match="config"):
        attach_frozen_parts(bad)
    with pytest.raises(RuntimeError, match="autoencoder"):
        build_model("latent_diffusion", DIFF).sample(y)


def test_checkpoints_saved_without_their_frozen_part_get_it_when_loaded_from_storage(tmp_path):
    """model_store.load_trained attaches what a checkpoint lacks from its config's URI, and refuses a
    checkpoint of another family there."""
    from condgen.tasks.data.latents import latent_diffusion_config
    from condgen.tasks.io.model_store import attach_frozen_parts, load_trained

    ae = _perturb(_ae(), 3)
    ckpt_io.save_checkpoint(tmp_path / "ae", ae)
    ldm = build_model("latent_diffusion", latent_diffusion_config((tmp_path / "ae").as_uri(), **DIFF))
    ckpt_io.save_checkpoint(tmp_path / "ldm", ldm)  # never attached: autoencoder_ready == 0 in the checkpoint
    loaded, meta = load_trained((tmp_path / "ldm").as_uri())
    assert meta["model"] == "latent_diffusion" and int(loaded.autoencoder_ready) == 1
    assert ckpt_io.state_fingerprint(loaded.autoencoder) == ckpt_io.state_fingerprint(ae)
    ckpt_io.save_checkpoint(tmp_path / "diffusion", _base())
    wrong = build_model("latent_diffusion", {**DIFF, "autoencoder": AE,
                                             "autoencoder_uri": (tmp_path / "diffusion").as_uri()})
    with pytest.raises(ValueError, match="holds a 'diffusion' checkpoint"):
        attach_frozen_parts(wrong)
    assert int(wrong.autoencoder_ready) == 0


def test_precomputed_latents_are_cached_by_autoencoder_fingerprint(tiny_shards):
    from condgen.tasks.data.latents import load_latent_split, precompute_latents
    from condgen.tasks.data.splits import load_split
    from condgen.tasks.io.images import from_uint8

    ae = _ae()
    first = precompute_latents(tiny_shards, ae)
    assert len(first.computed) == 3 and not first.skipped and first.n_samples == 600
    assert first.uri.endswith(f"latents/{first.fingerprint[:16]}")
    again = precompute_latents(tiny_shards, ae)
    assert again.computed == [] and len(again.skipped) == 3
    test = load_latent_split(tiny_shards, "test", first.fingerprint[:16])
    ref = ae.encode(from_uint8(load_split(tiny_shards, "test")["x"][:5]))
    assert test["z"].shape[1:] == (4, 7, 7) and np.allclose(test["z"][:5], ref.detach().numpy(), atol=1e-5)
    other = precompute_latents(tiny_shards, _ae(seed=1))  # another autoencoder: its own folder
    assert other.fingerprint != first.fingerprint and len(other.computed) == 3


# -- ControlNet -------------------------------------------------------------------------------------
@pytest.mark.parametrize("condition,lora", [("label", 0), ("text", 0), ("label", 2)])
def test_controlnet_at_init_equals_the_frozen_base_exactly(condition, lora):
    base = _base(condition)
    net = ControlNet(ControlNetConfig(lora_rank=lora), base=base)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([2, 9, 19])
    cond = torch.tensor([1, 4, 7]) if condition == "label" else base.embed_condition(torch.randn(3, 12)).detach()
    c = control_image(_digits(3)[0])
    with torch.no_grad():
        ref = base.eps(x, t, cond)
        assert torch.equal(net.eps(x, t, cond, c), ref)
        e = base.embed_condition(cond) if condition == "label" else cond
        zeros = [torch.zeros_like(s) for s in base.net.encode(x, t, e)[1]]
        # zero residuals leave the locked network's output unchanged, bit for bit
        assert torch.equal(base.net(x, t, e, zeros, torch.zeros_like(base.net.encode(x, t, e)[2])), ref)
        assert torch.equal(net.eps(x, t, None, c), base.eps(x, t, None))
    y = torch.tensor([1, 4, 7]) if condition == "label" else torch.randn(3, 12)
    a = net.sample(y, torch.Generator().manual_seed(0), control=c, steps=3, guidance_scale=1.5)
    b = base.sample(y, torch.Generator().manual_seed(0), steps=3, guidance_scale=1.5)
    assert torch.equal(a, b)  # the whole sampling path, including the base's x0 clipping
    # the branch is wired: non-zero zero-convs change the output
    with torch.no_grad():
        for z in [*net.zero_convs, net.zero_mid, net.hint[-1]]:
            z.weight.normal_(0, 0.1)
        assert not torch.allclose(net.eps(x, t, cond, c), ref)
        assert torch.equal(net.eps(x, t, cond, None), ref)  # control=None switches the branch off


@pytest.mark.parametrize("lora", [0, 2])
def test_controlnet_training_changes_only_the_control_branch(lora):
    base = _base()
    net = ControlNet(ControlNetConfig(lora_rank=lora), base=base)
    base_hash = ckpt_io.state_fingerprint(base)
    copy_before = {k: v.clone() for k, v in net.control.state_dict().items()}
    zero_before = [z.weight.clone() for z in net.zero_convs]
    x, y = _digits(16)
    opt_step = _adam_groups(net, 1e-2)
    net.train()
    logs = [net.train_step({"x": x, "y": y}, opt_step) for _ in range(3)]  # cond_img derived from x (edges)
    net.train_step({"x": x, "y": y, "cond_img": control_image(x, "mask")}, opt_step)
    assert all(math.isfinite(l["loss"]) for l in logs)
    assert ckpt_io.state_fingerprint(net.base) == base_hash  # the locked model is untouched
    assert all(p.grad is None for p in base.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(zero_before, (z.weight for z in net.zero_convs)))
    after = net.control.state_dict()
    changed = {k for k, v in copy_before.items() if not torch.equal(v, after[k])}
    if lora:
        assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)
    else:
        assert any(k.startswith("down_blocks") for k in changed)
    s = net.sample(y[:2], torch.Generator().manual_seed(0), control=control_image(x[:2]), steps=2)
    assert s.shape == (2, 1, 28, 28)


def test_controlnet_gets_its_base_from_a_uri_and_copies_it(tmp_path):
    from condgen.tasks.data.latents import controlnet_config
    from condgen.tasks.io.model_store import attach_frozen_parts

    base = _base()
    ckpt_io.save_checkpoint(tmp_path / "base", base)
    net = build_model("controlnet", controlnet_config((tmp_path / "base").as_uri(), lora_rank=2))
    assert int(net.base_ready) == 0
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 11]), torch.tensor([0, 9])
    with pytest.raises(RuntimeError, match="base"):  # models/ never reads the URI itself
        net.denoiser(control_image(_digits(2)[0]))
    attach_frozen_parts(net)  # loads the base, then theta_c = theta
    D = net.denoiser(control_image(_digits(2)[0]))
    assert ckpt_io.state_fingerprint(net.base) == ckpt_io.state_fingerprint(base)
    with torch.no_grad():
        assert torch.equal(D(x, t, y), base.eps(x, t, y))


# -- cascade --------------------------------------------------------------------------------------------
def test_superres_loss_falls_and_cascades_after_any_base():
    torch.manual_seed(0)
    sr = SuperRes(SuperResConfig(**DIFF))
    x, y = _digits(32)

    def fixed():
        torch.manual_seed(123)
        return sr.train_step({"x": x, "y": y}, lambda n, l: None)["loss"]

    before = fixed()
    opt_step = _adam_groups(sr, 1e-2)
    for _ in range(15):
        sr.train_step({"x": x, "y": y}, opt_step)
    assert fixed() < 0.7 * before
    sr.eval()
    low = sr.downsample(x[:3])
    assert low.shape == (3, 1, 14, 14)
    out = sr.sample(y[:3], torch.Generator().manual_seed(0), low=low, steps=3, guidance_scale=1.0)
    assert out.shape == (3, 1, 28, 28) and out.abs().max() <= 1
    with pytest.raises(NotImplementedError):  # no base, no low-res input
        sr.sample(y[:3])
    for base in (_base(), _ldm(), build_model("cvae", {"channels": [4, 8], "latent_dim": 4, "cond_dim": 4})):
        s = cascade_sample(base.eval(), sr, y[:2], torch.Generator().manual_seed(0), steps=2)
        assert s.shape == (2, 1, 28, 28) and s.abs().max() <= 1
    # an embedded base makes sample(cond, generator) the whole cascade
    base = _base()
    chained = build_model("superres", sr.config, base=base)  # the registry names the base's family
    chained.diffusion.load_state_dict(sr.diffusion.state_dict())
    assert chained.config.base_model == "diffusion"
    assert torch.equal(chained.sample(y[:2], torch.Generator().manual_seed(1), steps=2),
                       cascade_sample(base, sr, y[:2], torch.Generator().manual_seed(1), steps=2))
    with pytest.raises(ValueError, match="base_model"):  # models/ cannot name a family: the registry does
        SuperRes(sr.config, base=base)


def test_superres_gets_its_embedded_base_from_a_uri(tmp_path):
    from condgen.tasks.data.latents import superres_config
    from condgen.tasks.io.model_store import attach_frozen_parts

    base = _ldm()
    ckpt_io.save_checkpoint(tmp_path / "base", base)
    sr = build_model("superres", superres_config((tmp_path / "base").as_uri(), **DIFF))
    assert sr.config.base_model == "latent_diffusion" and isinstance(sr.base, LatentDiffusion)
    assert int(sr.base_ready) == 0
    y = torch.tensor([2, 7])
    with pytest.raises(RuntimeError, match="base"):
        sr.sample(y, steps=2)
    with pytest.raises(ValueError, match="registry"):  # the embedded base's architecture comes from the registry
        SuperRes(sr.config)
    attach_frozen_parts(sr)
    assert int(sr.base_ready) == 1
    assert ckpt_io.state_fingerprint(sr.base) == ckpt_io.state_fingerprint(base)
    assert torch.equal(sr.sample(y, torch.Generator().manual_seed(1), steps=2),
                       cascade_sample(base, sr, y, torch.Generator().manual_seed(1), steps=2))


# -- registry and checkpoints -----------------------------------------------------------------------
def _outputs(model, name):
    g = torch.Generator().manual_seed(0)
    x, y = _digits(2)
    if name == "autoencoder":
        return model.reconstruct(x)
    if name == "controlnet":
        return model.sample(y, g, control=control_image(x), steps=2)
    if name == "superres":
        return model.sample(y, g, low=model.downsample(x), steps=2)
    return model.sample(y, g, steps=2)


@pytest.mark.parametrize("name", ["autoencoder", "latent_diffusion", "controlnet", "superres", "superres+base"])
def test_save_load_gives_identical_outputs(tmp_path, name):
    if name == "autoencoder":
        model = _ae("vq")
    elif name == "latent_diffusion":
        model = _ldm(_ae("vq"))
    elif name == "controlnet":
        model = ControlNet(ControlNetConfig(lora_rank=2), base=_base())
    elif name == "superres":
        model = SuperRes(SuperResConfig(**DIFF))
    else:
        model = build_model("superres", SuperResConfig(**DIFF), base=_ldm())
    model = _perturb(model, 4, 0.05).eval()
    ckpt_io.save_checkpoint(tmp_path, model)  # safetensors + config JSON
    loaded, meta = ckpt_io.load_checkpoint(tmp_path)
    assert meta["model"] == name.split("+")[0] and loaded.config == model.config
    assert ckpt_io.state_fingerprint(loaded) == ckpt_io.state_fingerprint(model)
    assert torch.equal(_outputs(model, name.split("+")[0]), _outputs(loaded, name.split("+")[0]))
    if name == "superres+base":  # the embedded base came with the checkpoint
        y = torch.tensor([3, 8])
        assert torch.equal(model.sample(y, torch.Generator().manual_seed(2), steps=2),
                           loaded.sample(y, torch.Generator().manual_seed(2), steps=2))


def test_registry_builds_the_new_families_from_json_like_dicts():
    ae = build_model("autoencoder", {"channels": [4, 8], "regularization": "vq", "codebook_size": 16})
    assert ae.config.channels == (4, 8) and ae.config.latent_shape == (4, 7, 7)
    ldm = build_model("latent_diffusion",
                      {"channels": [4, 8], "autoencoder": {"channels": [4, 8], "latent_channels": 3}})
    assert ldm.config.autoencoder.channels == (4, 8) and ldm.diffusion.config.in_channels == 3
    assert ldm.diffusion.config.image_size == 7
    net = build_model("controlnet", {"base": {"channels": [4, 8], "condition": "text", "text_dim": 12}})
    assert net.config.condition == "text" and net.config.base.channels == (4, 8)
    sr = build_model("superres", {"channels": [4, 8]})
    assert sr.config.channels == (4, 8) and sr.base is None
    from condgen.models.base import flatten_params

    params = flatten_params(ldm.config)
    assert params["autoencoder.latent_channels"] == "3"
    with pytest.raises(ValueError):
        build_model("autoencoder", {"regularization": "gumbel"})


# -- the pipeline: Ray Train loop and evaluation --------------------------------------------------------
@pytest.mark.slow
def test_new_families_train_and_evaluate_through_the_pipeline(tiny_shards, local_ray):
    """autoencoder -> latent_diffusion, diffusion -> controlnet / superres, each through tasks.train.train
    (TorchTrainer, one worker; frozen components read from the first stage's checkpoint URI inside the
    worker) and scored by tasks.evaluate.evaluate_run, as the retrain flow does."""
    from condgen.tasks.data.latents import controlnet_config, latent_diffusion_config, superres_config
    from condgen.tasks.io.model_store import load_trained
    from condgen.tasks.judging.evaluate import evaluate_run
    from condgen.tasks.training.driver import TrainRequest, train

    def run(name, config, epochs=1):
        res = train(TrainRequest(model=name, shards_uri=tiny_shards, model_config=config, epochs=epochs,
                                 batch_size=64, num_workers=1, run_name=f"test-{name}"))
        assert len(res.history) == epochs and all(math.isfinite(h["loss"]) for h in res.history), res.history
        return res

    tiny = {"channels": [4, 8], "timesteps": 20, "sample_steps": 2}
    ae = run("autoencoder", {"channels": [4, 8], "lr": 5e-3}, epochs=2)
    assert ae.history[-1]["loss"] < ae.history[0]["loss"]
    base = run("diffusion", tiny)
    for name, config in (("latent_diffusion", latent_diffusion_config(ae.checkpoint_uri, **tiny)),
                         ("controlnet", controlnet_config(base.checkpoint_uri)),
                         ("superres", superres_config(base.checkpoint_uri, **tiny))):
        res = run(name, config)
        model, meta = load_trained(res.checkpoint_uri)
        assert meta["model"] == name
        metrics = evaluate_run(res.run_id, res.checkpoint_uri, tiny_shards, n_per_class=2, judge_epochs=1)
        assert 0 <= metrics["eval/cond_accuracy"] <= 1 and math.isfinite(metrics["eval/fid"])
    frozen = load_trained(base.checkpoint_uri)[0]
    assert ckpt_io.state_fingerprint(model.base) == ckpt_io.state_fingerprint(frozen)  # superres's embedded base
