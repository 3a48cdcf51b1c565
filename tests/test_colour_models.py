"""Every registered model in colour: 3 channels at 32 and 64 px, on tests/tiny.py's configs.

For each name in ``condgen.models.registry.MODELS`` and each of (3 channels, 32 px) and (3 channels,
64 px): the tiny config with the colour geometry on top builds (its frozen part too, built in colour
here), one ``train_step`` on a colour batch gives finite logs, what the model produces has the colour
shape (samples (B, 3, H, W) in [-1, 1]) and a checkpoint round trip gives identical outputs. Plus
pix2pix's derived colorization pairing (grey -> colour), and the configs the training driver fits to a
shard set's manifest (tasks/training/data_config.py). Seconds in all, one CPU thread.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from condgen.models.autoencoder import AutoencoderConfig
from condgen.models.base import is_generator
from condgen.models.controlnet import control_image
from condgen.models.cvae import CVAE, CVAEConfig
from condgen.models.paired import LUMA, edge_map, greyscale
from condgen.models.registry import MODELS, build_model
from condgen.tasks.data.latents import encode_images
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.training import driver
from condgen.tasks.training.data_config import fit_to_data
from condgen.tasks.training.driver import TrainRequest
from condgen.tasks.training.grids import grid_conditions
from condgen.tasks.training.worker import labelled_rows
from tests.tiny import FROZEN, LOSS_KEY, TEXT_DIM, TINY, digits, opt_step_for, outputs, perturb

NAMES = sorted(MODELS)
GEOMETRIES = [(3, 32), (3, 64)]
B = 2  # rows per batch: train_step and sample only need to run


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def colour_config(name: str, channels: int, size: int) -> dict[str, Any]:
    """``TINY[name]`` with the image geometry set where that family keeps it (a frozen part's config for
    latent diffusion and ControlNet; the classifier is size-free)."""
    cfg = dict(TINY[name])
    geometry = {"in_channels": channels, "image_size": size}
    if name == "latent_diffusion":
        cfg["autoencoder"] = {**cfg["autoencoder"], **geometry}
    elif name == "controlnet":
        cfg["base"] = {**cfg["base"], **geometry}
    elif name == "classifier":
        cfg["in_channels"] = channels
    else:
        cfg.update(geometry)
    if name == "superres":
        cfg["low_size"] = size // 2
    return cfg


def build_colour(name: str, channels: int, size: int, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """As tests/tiny.py's ``build_tiny``, in colour: the frozen part is a perturbed colour model too."""
    frozen = {}
    if name in FROZEN:
        keyword, part = FROZEN[name]
        frozen[keyword] = perturb(build_colour(part, channels, size, seed + 1000), seed=seed + 1000)
    torch.manual_seed(seed)
    return build_model(name, {**colour_config(name, channels, size), **overrides}, **frozen)


def colour_batch(name: str, n: int, channels: int, size: int) -> dict[str, torch.Tensor]:
    """Real digits resized to ``size`` and tinted by class (red, green, blue, ...), in [-1, 1], with the keys
    ``name``'s train_step reads."""
    x, y = digits(n)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    tints = torch.tensor([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.25, 0.25, 1.0]])[:, :channels]
    x = ((x + 1) / 2 * tints[y % 3][:, :, None, None]) * 2 - 1  # (n, C, H, W)
    batch = {"x": x, "y": y, "txt": torch.randn(n, TEXT_DIM, generator=torch.Generator().manual_seed(3))}
    if name == "pix2pix":
        batch["cond_img"] = edge_map(x)
    elif name == "controlnet":
        batch["cond_img"] = control_image(x, "edges")
    elif name == "cyclegan":
        batch["x_b"] = -x.flip(0)
    return batch


def _check_outputs(name: str, model: torch.nn.Module, out: torch.Tensor, channels: int, size: int) -> None:
    if is_generator(model) or name == "superres":
        assert out.shape == (B, channels, size, size), (name, out.shape)
        assert torch.isfinite(out).all() and out.abs().max() <= 1, name
    elif name in ("classifier", "noisy_classifier"):
        assert out.shape == (B, model.config.num_classes) and torch.isfinite(out).all(), name
    else:  # the autoencoder: latent and reconstruction, flattened side by side
        c, h, w = model.config.latent_shape
        assert out.shape == (B, c * h * w + channels * size * size) and torch.isfinite(out).all(), name


@pytest.mark.parametrize("channels,size", GEOMETRIES, ids=[f"{c}ch-{s}px" for c, s in GEOMETRIES])
@pytest.mark.parametrize("name", NAMES)
def test_every_model_trains_samples_and_round_trips_in_colour(name, channels, size, tmp_path):
    model = build_colour(name, channels, size).train()
    batch = colour_batch(name, B, channels, size)
    torch.manual_seed(0)
    logs = model.train_step(batch, opt_step_for(model))
    assert LOSS_KEY.get(name, "loss") in logs, logs
    assert all(isinstance(v, float) and math.isfinite(v) for v in logs.values()), (name, logs)

    model.eval()
    out = outputs(name, model, batch, torch.Generator().manual_seed(7))
    _check_outputs(name, model, out, channels, size)
    if name == "autoencoder":
        assert model.decode(model.encode(batch["x"])).shape == batch["x"].shape

    ckpt_io.save_checkpoint(tmp_path, model)
    loaded, meta = ckpt_io.load_checkpoint(tmp_path)
    assert meta["model"] == name and loaded.config == model.config
    assert torch.equal(outputs(name, loaded.eval(), batch, torch.Generator().manual_seed(7)), out)


# -- pix2pix colorization: the condition is the greyscale of the colour target ------------------------
def test_greyscale_is_the_luma_of_rgb_and_keeps_the_range():
    x = torch.tensor([[-1.0, 1.0, 0.5]]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    g = greyscale(x)
    want = (LUMA[0] * -1.0 + LUMA[1] * 1.0 + LUMA[2] * 0.5)
    assert g.shape == (1, 1, 2, 2) and torch.allclose(g, torch.full_like(g, want))
    assert greyscale(torch.ones(1, 3, 2, 2)).eq(1).all() and greyscale(-torch.ones(1, 3, 2, 2)).eq(-1).all()
    grey = torch.rand(2, 1, 4, 4)
    assert greyscale(grey) is grey  # already grey


@pytest.mark.parametrize("size", [32, 64])
def test_pix2pix_colorize_learns_grey_to_colour(size):
    model = build_colour("pix2pix", 3, size, pairing="colorize").train()
    batch = colour_batch("pix2pix", 4, 3, size)
    grey = greyscale(batch["x"])
    assert torch.equal(model.condition_image(batch["x"]), grey)
    seen = []
    original = model.G.forward
    model.G.forward = lambda c: seen.append(c) or original(c)  # what G is conditioned on
    logs = model.train_step(batch, opt_step_for(model))  # the batch's edge-map cond_img is not this pairing's
    assert all(math.isfinite(v) for v in logs.values())
    assert torch.equal(seen[0], grey)
    model.eval()
    out = model.sample(grey, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, size, size) and out.abs().max() <= 1


def test_pix2pix_colorize_needs_grey_in_and_colour_out():
    with pytest.raises(ValueError, match="colorize"):
        build_model("pix2pix", {**TINY["pix2pix"], "pairing": "colorize"})  # in_channels=1: nothing to colour
    with pytest.raises(ValueError, match="pairing"):
        build_model("pix2pix", {**TINY["pix2pix"], "pairing": "sketch"})


def test_cvae_rejects_a_size_its_decoder_cannot_restore():
    with pytest.raises(ValueError, match="divisible"):
        CVAE(CVAEConfig(image_size=28, channels=(4, 8, 16)))  # 28 -> 14 -> 7 -> 3, mirrored to 24
    assert CVAE(CVAEConfig(image_size=64, in_channels=3, channels=(4, 8, 16))).feat == 8


# -- configs from the data: channels, size and classes come from the manifest -------------------------
DIGITS = {"channels": 1, "image_size": 28, "num_classes": 10}
COLOUR = {"channels": 3, "image_size": 64, "num_classes": 3}


@pytest.mark.parametrize("name", NAMES)
def test_a_digits_manifest_gives_exactly_todays_configs(name):
    for spec in ({}, dict(TINY[name])):
        assert fit_to_data(name, spec, DIGITS) == spec
        assert build_model(name, fit_to_data(name, spec, DIGITS)).config == build_model(name, spec).config


def test_a_colour_manifest_fills_channels_size_and_classes():
    for name in ("cvae", "cgan", "diffusion", "autoencoder", "cyclegan", "noisy_classifier"):
        cfg = build_model(name, fit_to_data(name, dict(TINY[name]), COLOUR)).config
        assert (cfg.in_channels, cfg.image_size, getattr(cfg, "num_classes", 3)) == (3, 64, 3), name
    judge = build_model("classifier", fit_to_data("classifier", {}, COLOUR)).config
    assert (judge.in_channels, judge.num_classes) == (3, 3)
    sr = fit_to_data("superres", {}, COLOUR)
    assert (sr["image_size"], sr["low_size"], sr["in_channels"]) == (64, 32, 3)
    ldm = build_model("latent_diffusion", fit_to_data("latent_diffusion", {}, COLOUR)).config
    assert (ldm.autoencoder.in_channels, ldm.autoencoder.image_size, ldm.num_classes) == (3, 64, 3)
    cn = build_model("controlnet", fit_to_data("controlnet", {"base": {"channels": (4, 8)}}, COLOUR)).config
    assert (cn.base.in_channels, cn.base.image_size, cn.num_classes, cn.base.channels) == (3, 64, 3, (4, 8))
    assert fit_to_data("cvae", {}, {"channels": 3, "image_size": 0, "num_classes": 0}) == {"in_channels": 3}


def test_a_config_that_contradicts_the_data_is_an_error():
    with pytest.raises(ValueError, match=r"in_channels=1 but the data has in_channels=3"):
        fit_to_data("cvae", {"in_channels": 1}, COLOUR, where="file:///shards")
    with pytest.raises(ValueError, match="num_classes=10 but the data has num_classes=3"):
        fit_to_data("classifier", {"num_classes": 10}, COLOUR)
    with pytest.raises(ValueError, match="controlnet's base"):
        fit_to_data("controlnet", {"base": {"image_size": 32}}, COLOUR)
    assert fit_to_data("cvae", {"in_channels": 3, "image_size": 64}, COLOUR) == {
        "in_channels": 3, "image_size": 64, "num_classes": 3}


def test_a_frozen_part_named_by_uri_brings_its_architecture_and_must_fit_the_data():
    ae = {"model": "autoencoder", "config": {**dataclasses.asdict(AutoencoderConfig(in_channels=3, image_size=64))}}
    metas = {"file:///ae": ae, "file:///grey-ae": {"model": "autoencoder", "config": dataclasses.asdict(
        AutoencoderConfig())}, "file:///cvae": {"model": "cvae", "config": {}}}
    read = metas.__getitem__
    cfg = fit_to_data("latent_diffusion", {"autoencoder_uri": "file:///ae"}, COLOUR, read_meta=read)
    assert cfg["autoencoder"] == ae["config"] and cfg["num_classes"] == 3
    with pytest.raises(ValueError, match=r"autoencoder \(file:///grey-ae\).*in_channels=1 but the data has"):
        fit_to_data("latent_diffusion", {"autoencoder_uri": "file:///grey-ae"}, COLOUR, read_meta=read)
    with pytest.raises(ValueError, match="holds a 'cvae' checkpoint"):
        fit_to_data("latent_diffusion", {"autoencoder_uri": "file:///cvae"}, COLOUR, read_meta=read)
    sr = fit_to_data("superres", {"base_uri": "file:///cvae"}, {**COLOUR, "num_classes": 10}, read_meta=read)
    assert sr["base_model"] == "cvae" and sr["base_config"] == {}


def test_the_driver_rejects_a_mismatch_before_ray_starts(monkeypatch):
    infos = {"file:///colour": {**COLOUR, "class_names": ["r", "g", "b"]}, "file:///grey": DIGITS}
    monkeypatch.setattr(driver, "dataset_info", infos.__getitem__)
    monkeypatch.setattr(driver.tracking, "configure", lambda experiment: "0")
    monkeypatch.setattr(driver, "ensure_ray", lambda: pytest.fail("Ray started before the config was checked"))
    with pytest.raises(ValueError, match="in_channels=1 but the data has in_channels=3"):
        driver.train(TrainRequest("cvae", "file:///colour", {"in_channels": 1}))
    with pytest.raises(ValueError, match="the two domains differ in channels"):
        driver.train(TrainRequest("cyclegan", "file:///colour", shards_b_uri="file:///grey"))


def test_label_models_train_on_labelled_samples_only_and_grids_use_classes_present():
    arrays = {"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.array([0, -1, 2, -1])}
    cvae = build_model("cvae", TINY["cvae"])
    assert labelled_rows(cvae, arrays)["y"].tolist() == [0, 2] and len(labelled_rows(cvae, arrays)["x"]) == 2
    text = build_model("cvae", {**TINY["cvae"], "condition": "text", "text_dim": TEXT_DIM})
    assert labelled_rows(text, arrays) is arrays
    p2p = build_colour("pix2pix", 3, 32, pairing="colorize")
    rgb = {"x": np.zeros((3, 32, 32, 3), np.uint8), "y": np.array([0, 2, 2])}  # no class 1 in this split
    cond = grid_conditions(p2p, rgb, per_class=2)
    assert cond.shape == (3, 1, 32, 32)  # class 0 once, class 2 twice; class 1 skipped, not an IndexError


def test_latents_of_colour_images_need_a_colour_autoencoder():
    rgb = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    z = encode_images(build_colour("autoencoder", 3, 32), rgb)
    assert z.shape == (3, 4, 8, 8) and np.isfinite(z).all()
    with pytest.raises(ValueError, match="images of 3 channel"):
        encode_images(build_model("autoencoder", TINY["autoencoder"]), rgb)
