"""Every registered model in colour: 3 channels at 32 and 64 px, on tests/tiny.py's configs.

For each name in ``condgen.models.registry.MODELS`` and each of (3 channels, 32 px) and (3 channels,
64 px): the tiny config with the colour geometry on top builds (its frozen part too, built in colour
here), one ``train_step`` on a colour batch gives finite logs, what the model produces has the colour
shape (samples (B, 3, H, W) in [-1, 1]) and a checkpoint round trip gives identical outputs. Plus
pix2pix's derived colorization pairing (grey -> colour). Seconds in all, one CPU thread.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from condgen.models.base import is_generator
from condgen.models.controlnet import control_image
from condgen.models.cvae import CVAE, CVAEConfig
from condgen.models.paired import LUMA, edge_map, greyscale
from condgen.models.registry import MODELS, build_model
from condgen.tasks.io import checkpoint as ckpt_io
from tests.tiny import FROZEN, LOSS_KEY, TEXT_DIM, TINY, digits, opt_step_for, outputs, perturb

NAMES = sorted(MODELS)
GEOMETRIES = [(3, 32), (3, 64)]
B = 2  # rows per batch: train_step and sample only need to run


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
