"""A user's pretrained diffusers pipeline in condgen (issue #21): a tiny random SD-layout pipeline built
offline (``condgen.tasks.pretrained.tiny``) is loaded (safetensors only), driven by condgen's samplers
and guidance (diffusers' own ``StableDiffusionPipeline`` as the oracle), LoRA-fine-tuned through Ray
Train, registered, and applied back onto the base."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from condgen.models.diffusion import SAMPLERS, cfg, ddim_invert, null_text_inversion, sample_ddim, sdedit
from condgen.tasks.pretrained import base, cache, lora
from condgen.tasks.pretrained.tiny import build_tiny_pipeline

PROMPTS = ["a red circle", "blue square"]
NEGATIVE = ["blue", "red circle"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: one intra-op thread is ~40x faster than two contending on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe", seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    """24 captioned RGB shapes at 32 px (bundled:shapes)."""
    from condgen.tasks.data.ingest import ingest

    out = str(tmp_path_factory.mktemp("shapes") / "shards")
    ingest("bundled:shapes", out, limit=24, image_size=32, shard_size=40)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> base.Pretrained:
    return base.load(str(tiny_dir))


def test_layout_refuses_pickles_and_missing_parts_in_one_line(tiny_dir, tmp_path):
    base.fetch(str(tiny_dir))  # the real layout passes
    files = [str(p.relative_to(tiny_dir)) for p in tiny_dir.rglob("*") if p.is_file()]
    with pytest.raises(base.LayoutError, match="safetensors only") as e:
        base.check_layout([*files, "unet/diffusion_pytorch_model.bin"], "x")
    assert "\n" not in str(e.value) and "safe_serialization=True" in str(e.value)
    with pytest.raises(base.LayoutError, match="no tokenizer/"):
        base.check_layout([f for f in files if not f.startswith("tokenizer/")], "x")
    with pytest.raises(base.LayoutError, match="no model_index.json"):
        base.check_layout([f for f in files if f != "model_index.json"], "x")
    assert base.is_pipeline(str(tiny_dir)) and not base.is_pipeline(str(tmp_path))


def test_fingerprints_name_the_weights(tiny, tiny_dir, tmp_path):
    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    fp_other = {part: base.component_fingerprint(other, part) for part in tiny.fingerprints}
    assert fp_other["tokenizer"] == tiny.fingerprints["tokenizer"]  # same files
    assert all(fp_other[p] != tiny.fingerprints[p] for p in base.WEIGHTED)  # other random weights
    assert base.component_fingerprint(tiny_dir, "unet") == tiny.fingerprints["unet"]  # stable


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_condgen_ddim_with_cfg_and_negative_prompts_equals_diffusers(tiny_dir, tmp_path, prediction_type):
    from diffusers import StableDiffusionPipeline

    folder = tiny_dir if prediction_type == "epsilon" else build_tiny_pipeline(tmp_path / "v", prediction_type="v_prediction")
    p = base.load(str(folder))
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    steps, g, size = 6, 4.0, 32
    x_T = base.initial_latents(p, 2, size, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=g, latents=x_T.clone(),
                   output_type="pt", return_dict=True).images  # (2, 3, 32, 32) in [0, 1]
        ref_z = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=g,
                     latents=x_T.clone(), output_type="latent").images
    # condgen: w = g - 1 (our (1 + w) eps_c - w eps_neg is diffusers' eps_neg + g (eps_c - eps_neg))
    D = cfg(base.denoiser(p), g - 1, base.encode_prompts(p, [""]), negative_cond=base.encode_prompts(p, NEGATIVE))
    z = sample_ddim(D, x_T.clone(), p.schedule, cond=base.encode_prompts(p, PROMPTS),
                    timesteps=base.timesteps(p.scheduler_config, steps))
    scale = ref_z.abs().max()
    assert torch.allclose(z, ref_z, atol=1e-5 * scale, rtol=0), (z - ref_z).abs().max() / scale
    img = (base.decode_latents(p, z) + 1) / 2
    assert torch.allclose(img, ref.clamp(0, 1), atol=1e-4)
    # the negative prompt matters: without it the result differs (the test can fail)
    plain = sample_ddim(cfg(base.denoiser(p), g - 1, base.encode_prompts(p, [""])), x_T.clone(), p.schedule,
                        cond=base.encode_prompts(p, PROMPTS), timesteps=base.timesteps(p.scheduler_config, steps))
    assert (plain - ref_z).abs().max() > 1e-3 * scale


def test_timesteps_match_diffusers_spacings():
    from diffusers import DDIMScheduler

    for spacing, offset in (("leading", 1), ("trailing", 0), ("linspace", 0)):
        s = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        s.set_timesteps(7)
        assert base.timesteps(dict(s.config), 7) == s.timesteps.tolist(), spacing
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = base.noise_schedule(dict(sched.config)).alpha_bars
    assert torch.allclose(ours, sched.alphas_cumprod.double(), rtol=1e-5)


def _smooth(p: base.Pretrained) -> base.Pretrained:
    """The same base with its U-Net output shrunk 100x: a random net's eps is large and rough, which makes
    the DDIM ODE stiff; a small eps keeps inversion's error at its discretisation level."""
    import copy

    q = copy.copy(p)
    q.unet = copy.deepcopy(p.unet)
    with torch.no_grad():
        q.unet.conv_out.weight.mul_(0.01)
        q.unet.conv_out.bias.mul_(0.01)
    return q


def test_inversion_null_text_sdedit_and_dpmpp_drive_the_pretrained_unet(tiny):
    p = _smooth(tiny)
    D, S = base.denoiser(p), p.schedule
    c, null = base.encode_prompts(p, ["a red circle"]), base.encode_prompts(p, [""])
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z0 = base.encode_images(p, x)
    tau = base.timesteps(p.scheduler_config, 20)
    z_T = ddim_invert(D, z0, S, cond=c, timesteps=tau)
    rec = sample_ddim(D, z_T, S, cond=c, timesteps=tau)
    err = (rec - z0).abs().max() / z0.abs().max()
    other = sample_ddim(D, ddim_invert(D, z0.flip(-1), S, cond=c, timesteps=tau), S, cond=c, timesteps=tau)
    other_err = float((other - z0).abs().max() / z0.abs().max())
    print(f"inversion round trip: max error {float(err):.4f} of max |z0| (another image's start: {other_err:.3f})")
    assert err < 0.1 and other_err > 0.5, (err, other_err)  # DDIM inversion round trip (Song et al. 2021, §5.4)
    tau5 = tau[::4]
    guided = sample_ddim(cfg(D, 6.5, null), ddim_invert(D, z0, S, cond=c, timesteps=tau5), S, cond=c, timesteps=tau5)
    r = null_text_inversion(D, z0, S, cond=c, null_cond=null, scale=6.5, timesteps=tau5, inner_steps=5, lr=1e-2)
    nti = sample_ddim(cfg(D, 6.5, r.null_cond), r.x_T, S, cond=c, timesteps=r.timesteps)
    mse_nti, mse_guided = (nti - z0).pow(2).mean(), (guided - z0).pow(2).mean()
    print(f"CFG 7.5 from the inversion: MSE {float(mse_guided):.3g}; with null-text inversion: {float(mse_nti):.3g}")
    assert mse_nti < mse_guided  # the per-step nulls undo CFG's drift (Mokady et al. 2023)
    assert torch.equal(sdedit(D, z0, S, strength=0.0, cond=c), z0)
    edit = sdedit(D, z0, S, strength=0.6, cond=base.encode_prompts(p, ["blue square"]),
                  generator=torch.Generator().manual_seed(0), steps=4)
    assert torch.isfinite(edit).all() and not torch.allclose(edit, z0, atol=1e-3)
    x_T = base.initial_latents(p, 1, 32, torch.Generator().manual_seed(1))
    a = sample_ddim(cfg(D, 2.0, null), x_T, S, cond=c, timesteps=tau)
    b = SAMPLERS["dpmpp_2m"](cfg(D, 2.0, null), x_T, S, cond=c, timesteps=tau)
    gap = float((a - b).abs().max() / a.abs().max())
    print(f"DPM-Solver++(2M) vs DDIM, 20 steps: max gap {gap:.4f} of max |x_0|")
    assert gap < 0.05  # two solvers of the same ODE agree


def test_caches_are_computed_once_per_fingerprint_and_dtype(tiny, tmp_path):
    from condgen.tasks.data.ingest import ingest

    shards = str(tmp_path / "shapes")
    ingest("bundled:shapes", shards, limit=12, image_size=32, shard_size=40)
    uri, reused = cache.latents(tiny, shards, size=32)
    assert not reused and cache.latents(tiny, shards, size=32) == (uri, True)
    bf_uri, bf_reused = cache.latents(tiny, shards, size=32, dtype="bfloat16")
    assert bf_uri != uri and not bf_reused
    lat = cache.read(uri)
    from condgen.tasks.data.splits import load_split

    x = cache.images(load_split(shards, "train", keys=("x",)), 32)
    assert torch.allclose(lat["mean"], base.encode_images(tiny, x), atol=1e-5)
    assert (lat["std"] > 0).all()
    t_uri, t_reused = cache.text(tiny, shards)
    assert not t_reused and cache.text(tiny, shards) == (t_uri, True)
    txt = cache.read(t_uri)
    captions = [str(c) for c in load_split(shards, "train", keys=("caption",))["caption"]]
    got = txt["emb"][txt["index"][0]]
    assert torch.allclose(got, base.encode_prompts(tiny, [captions[0]])[0], atol=1e-5)
    assert torch.allclose(txt["null"], base.encode_prompts(tiny, [""]), atol=1e-5)


def _eps(p: base.Pretrained, prompt: str = "a red circle") -> torch.Tensor:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return base.denoiser(p)(x, torch.tensor([400]), base.encode_prompts(p, [prompt]))


def _random_adapter(tiny_dir: Path, out: Path, seed: int, text: bool) -> None:
    p = base.load(str(tiny_dir))
    settings = lora.settings(2, None, text, p)
    params = lora.inject(p, settings)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in params:
            prm.add_(0.05 * torch.randn(prm.shape, generator=g))
    lora.save(str(out), p, settings)


def test_adapters_apply_and_switch_on_one_loaded_base(tiny_dir, tmp_path):
    _random_adapter(tiny_dir, tmp_path / "a", seed=1, text=True)
    _random_adapter(tiny_dir, tmp_path / "b", seed=2, text=False)
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter.json", "adapter.safetensors"]
    p = base.load(str(tiny_dir))
    before = {k: v.clone() for k, v in p.unet.state_dict().items()}
    e0 = _eps(p)
    lora.apply_adapter(p, str(tmp_path / "a"), "a")
    e_a = _eps(p)
    lora.apply_adapter(p, str(tmp_path / "b"), "b")
    e_b = _eps(p)
    assert (e_a - e0).abs().max() > 1e-3 and (e_b - e_a).abs().max() > 1e-3
    lora.activate(p, "a")
    assert torch.allclose(_eps(p), e_a, atol=1e-6)
    lora.activate(p, None)
    assert torch.allclose(_eps(p), e0, atol=1e-6)  # the base, untouched
    after = {k.replace(".base_layer", ""): v for k, v in p.unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    other = base.load(str(build_tiny_pipeline(tmp_path / "other", seed=5)))
    with pytest.raises(ValueError, match="trained on base"):
        lora.apply_adapter(other, str(tmp_path / "a"))


def _loop_config(p: base.Pretrained, **kw) -> dict:
    return {"seed": 0, "batch_size": 4, "cond_dropout": 0.25, "mixed_precision": "no", "max_grad_norm": 1.0,
            "ema_decay": 0.9, "lr": 1e-2, "adapter": lora.settings(2, None, False, p), **kw}


def test_resume_from_a_checkpoint_takes_the_same_steps(tiny_dir, tiny, shapes, tmp_path):
    import ray.train

    from condgen.tasks.pretrained import train

    lat, _ = cache.latents(tiny, shapes, size=32)
    txt, _ = cache.text(tiny, shapes)
    data = {**cache.read(lat), **cache.read(txt)}
    device = torch.device("cpu")

    def fresh():
        torch.manual_seed(0)
        p = base.load(str(tiny_dir))
        config = _loop_config(p)
        params = lora.inject(p, config["adapter"])
        opt = torch.optim.AdamW(params, lr=config["lr"])
        return p, config, params, opt, [prm.detach().clone() for prm in params]

    p, config, params, opt, ema = fresh()
    losses = [train.train_step(p, data, params, opt, ema, config, s, device)["loss"] for s in range(4)]
    assert all(np.isfinite(losses))
    p2, config, params2, opt2, ema2 = fresh()
    for s in range(2):
        train.train_step(p2, data, params2, opt2, ema2, config, s, device)
    train._save(str(tmp_path), p2, config, params2, ema2, opt2, 2)
    p3, config, params3, opt3, ema3 = fresh()
    assert train._resume(ray.train.Checkpoint.from_directory(str(tmp_path)), params3, ema3, opt3) == 2
    resumed = [train.train_step(p3, data, params3, opt3, ema3, config, s, device)["loss"] for s in (2, 3)]
    assert resumed == losses[2:]
    assert all(torch.equal(a, b) for a, b in zip(params, params3))
    assert all(torch.equal(a, b) for a, b in zip(ema, ema3))
    assert not torch.equal(params[0], params2[0])  # the straight run did move on after step 2


def test_bf16_autocast_and_text_encoder_lora_train(tiny_dir, tiny, shapes):
    from condgen.tasks.pretrained import train

    data = {**cache.read(cache.latents(tiny, shapes, size=32)[0]), **cache.read(cache.text(tiny, shapes)[0])}
    torch.manual_seed(0)
    p = base.load(str(tiny_dir))
    config = _loop_config(p, mixed_precision="bf16", ema_decay=0.0, adapter=lora.settings(2, None, True, p))
    params = lora.inject(p, config["adapter"])
    text_params = [prm for n, prm in p.text_encoder.named_parameters() if "lora_B" in n]
    opt = torch.optim.AdamW(params, lr=config["lr"])
    out = train.train_step(p, data, params, opt, None, config, 0, torch.device("cpu"))
    assert np.isfinite(out["loss"]) and out["grad_norm"] > 0
    assert text_params and any(prm.abs().sum() > 0 for prm in text_params)  # B left 0: the text encoder trained


@pytest.mark.slow
def test_adapt_pretrained_under_ray_registers_an_adapter_that_changes_the_output(tiny_dir, shapes, local_ray):
    from condgen.tasks.io.model_store import downloaded
    from condgen.tasks.pretrained.adapt import PretrainedAdaptRequest, adapt_pretrained

    res = adapt_pretrained(PretrainedAdaptRequest(
        base=str(tiny_dir), shards_uri=shapes, steps=4, batch_size=4, lr=1e-2, rank=2, checkpoint_every=2, num_workers=2,
        validate_every=4, validation_prompts=["red circle"], validation_seeds=[0], validation_steps=2,
        ema_decay=0.5, register_as="test-tiny-sd-lora", run_name="test-pretrained"))
    assert res.version == "1" and np.isfinite(res.metrics["loss"]) and res.metrics["step"] == 4
    card = res.card
    assert card["base_fingerprint"] == base.load(str(tiny_dir)).fingerprint and card["steps"] == 4
    assert card["data"]["samples"] > 0 and 0 < card["share_of_unet"] < 0.1
    client = mlflow.MlflowClient()
    arts = sorted(a.path for a in client.list_artifacts(res.run_id, "adapter"))
    assert arts == ["adapter/README.md", "adapter/adapter.json", "adapter/adapter.safetensors",
                    "adapter/model_card.json"]
    assert any("validation" in a.path for a in client.list_artifacts(res.run_id, "images"))
    run = client.get_run(res.run_id)
    assert run.data.tags["condgen.kind"] == "adapter" and run.data.params["num_workers"] == "2"
    assert run.data.params["cache.latents"].endswith("-float32-32px.safetensors")
    with downloaded("models:/test-tiny-sd-lora@latest-adapter", artifact_path="adapter") as (local, _):
        assert (local / "adapter.safetensors").is_file()
    p = base.load(str(tiny_dir))
    e0 = _eps(p)
    lora.apply_adapter(p, "models:/test-tiny-sd-lora@latest-adapter")
    assert (_eps(p) - e0).abs().max() > 1e-5  # the trained adapter is used


@pytest.mark.slow
def test_a_pipeline_on_s3_is_downloaded_once_and_pickles_are_refused_before_download(tiny_dir, s3_uri, tmp_path):
    from condgen.tasks.io import storage

    for f in sorted(tiny_dir.rglob("*")):
        if f.is_file():
            storage.write_bytes(storage.join(s3_uri, str(f.relative_to(tiny_dir))), f.read_bytes())
    assert base.is_pipeline(s3_uri)
    p = base.load(s3_uri, cache_dir=tmp_path / "cache")
    assert p.fingerprints == base.load(str(tiny_dir)).fingerprints
    assert base.fetch(s3_uri, tmp_path / "cache") == p.folder  # reused, not downloaded again
    storage.write_bytes(storage.join(s3_uri, "unet", "diffusion_pytorch_model.bin"), b"not a pickle, but named one")
    with pytest.raises(base.LayoutError, match="pickled weights"):
        base.fetch(s3_uri, tmp_path / "cache2")
    assert not (tmp_path / "cache2").exists()


def test_condgen_adapt_checks_a_pipeline_base_before_ray(tiny_dir, tmp_path):
    from tests.test_cli import assert_fails_fast, condgen

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    res = condgen("adapt", "--base", str(tiny_dir), "--shards", str(shards), "--evaluate", home=tmp_path)
    assert_fails_fast(res, "--evaluate", "validation images")
    res = condgen("adapt", "--base", str(tiny_dir), "--shards", str(shards), "--ema", "1.5", home=tmp_path)
    assert_fails_fast(res, "--ema", "[0, 1)")
    pickled = tmp_path / "pickled"
    build_tiny_pipeline(pickled)
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    res = condgen("adapt", "--base", str(pickled), "--shards", str(shards), home=tmp_path)
    assert_fails_fast(res, "pickled weights", "safe_serialization=True")
