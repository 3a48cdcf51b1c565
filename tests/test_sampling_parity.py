"""`condgen sample` / `condgen edit` and the service's `/v1/generate` / `/v1/edit` give the same image.

One tiny label-conditioned diffusion model, a noise-aware classifier and a tiny CLIP are saved as
checkpoint folders; the CLI commands (``condgen.cli.main``) read them from disk and write PNGs, and
an in-process ``Service`` (no Ray Serve, no registry: checkpoint-folder URIs) loads the same
folders. For every guidance mode (none, cfg with a negative, classifier, CLIP), both samplers and
every edit method (DDIM inversion, null-text inversion, SDEdit), the two 8-bit images agree within
one grey level. Both run ``tasks.generation.sampling`` (the service through ``batching.sample_batch``
for generation), so this pins down the defaults and parameters each side resolves: SDEdit's
``ceil(strength * steps)`` steps with x0 clipping, null-text inversion's 10 inner steps, DDPM's
default of all T steps, the seed driving x_T and every sampler draw.
"""
from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from condgen.cli import main
from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig, NoisyClassifier, NoisyClassifierConfig
from condgen.serving import schema
from condgen.serving.config import ModelSpec, ServeConfig
from condgen.serving.service import Service
from condgen.tasks.clip.handle import new_clip, save_clip
from condgen.tasks.data.attributes import label_prompt
from condgen.tasks.io import checkpoint as ckpt_io
from tests.tiny import perturb

# channels (8, 16): group_norm(c) has gcd(8, c) groups, so with 4 or 8 channels every group is one
# channel and the block's normalisation removes the per-channel condition shift: labels and CFG
# would have (almost) no effect and the comparisons below would not tell the modes apart.
TINY = dict(channels=(8, 16), timesteps=20, sample_steps=4)
N, SEED, LABEL = 3, 7, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("parity")
    torch.manual_seed(0)
    ckpt_io.save_checkpoint(root / "diffusion", perturb(ConditionalDiffusion(DiffusionConfig(**TINY)), 0).eval())
    torch.manual_seed(1)
    clf = perturb(NoisyClassifier(NoisyClassifierConfig(channels=(4, 8), timesteps=TINY["timesteps"])), 1).eval()
    ckpt_io.save_checkpoint(root / "clf", clf)
    save_clip(new_clip("condgen-clip-test", seed=2), str(root / "clip"))
    return {"model": (root / "diffusion").as_uri(), "classifier": (root / "clf").as_uri(),
            "clip": str(root / "clip"), "root": str(root)}


@pytest.fixture(scope="module")
def service(folders):
    svc = Service(ServeConfig(models=[ModelSpec(uri=folders["model"], name="parity", classifier=folders["classifier"])],
                              clip=folders["clip"], poll_s=0, deny_list=[]))
    yield svc
    svc.close()


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def _b64(images: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in images]).astype(int)


def _cli_grid(path, n: int) -> np.ndarray:
    """The n images of a one-row grid written with --zoom 1 (tasks.io.images.grid: 2-pixel padding)."""
    grid = _png(path)
    return np.stack([grid[2:30, 2 + 30 * i: 30 + 30 * i] for i in range(n)])


def _assert_same(cli: np.ndarray, served: np.ndarray) -> None:
    assert cli.shape == served.shape
    assert np.abs(cli - served).max() <= 1, np.abs(cli - served).max()  # within one 8-bit grey level
    assert cli.std() > 5  # a real image, not a blank or saturated one: the comparison is not vacuous


# guidance, sampler, steps (None: the model's default for that sampler), eta, scale, negative label
GENERATE_CASES = {
    "none-ddim-default-steps": ("none", "ddim", None, None, None, None),
    "none-ddpm-default-steps": ("none", "ddpm", None, None, None, None),  # DDPM default: all T steps
    "cfg-negative-ddim-eta": ("cfg", "ddim", 5, 0.5, 2.0, 5),
    "cfg-ddpm": ("cfg", "ddpm", 5, None, 1.5, None),
    "classifier": ("classifier", "ddim", 4, None, 2.0, None),
    "clip": ("clip", "ddim", 4, None, 2.0, None),
}


def _generate_both(folders, service, tmp_path, case):
    guidance, sampler, steps, eta, scale, negative = case
    out = tmp_path / "grid.png"
    argv = ["sample", "--model", folders["model"], "--labels", str(LABEL), "--per-label", str(N), "--nrow", str(N),
            "--zoom", "1", "--seed", str(SEED), "--sampler", sampler, "--guidance", guidance, "--out", str(out),
            "--no-progress"]
    body = {"label": LABEL, "n": N, "seed": SEED, "guidance": guidance, "sampler": sampler}
    if steps is not None:
        argv += ["--steps", str(steps)]
        body["steps"] = steps
    if eta is not None:
        argv += ["--eta", str(eta)]
        body["eta"] = eta
    if scale is not None:
        argv += ["--scale", str(scale)]
        body["scale"] = scale
    if negative is not None:
        argv += ["--negative", str(negative)]
        body["negative_label"] = negative
    if guidance == "classifier":
        argv += ["--classifier", folders["classifier"]]
    if guidance == "clip":  # the service guides a label model towards the label's caption
        argv += ["--clip", folders["clip"], "--prompt", label_prompt(LABEL)]
    assert main(argv) == 0
    served = asyncio.run(service.generate(schema.GenerateV1(**body)))
    return _cli_grid(out, N), _b64(served["images"]), served


@pytest.mark.parametrize("name", list(GENERATE_CASES))
def test_condgen_sample_and_v1_generate_give_the_same_images(folders, service, tmp_path, name):
    case = GENERATE_CASES[name]
    cli, served, answer = _generate_both(folders, service, tmp_path, case)
    _assert_same(cli, served)
    guidance, sampler, steps = case[:3]
    want_steps = steps or (TINY["sample_steps"] if sampler == "ddim" else TINY["timesteps"])
    assert answer["parameters"]["steps"] == want_steps
    if guidance != "none":  # the guidance acts: the same seed unguided gives other images
        plain, _, _ = _generate_both(folders, service, tmp_path, ("none", sampler, steps, case[3], None, None))
        assert np.abs(plain - cli).max() > 1, name


def _input_png(path) -> str:
    """A smooth grey blob (a stand-in for a digit), saved as the CLI's input; returns its base64."""
    yy, xx = np.mgrid[0:28, 0:28]
    img = (255 * np.exp(-((yy - 14) ** 2 / 40 + (xx - 12) ** 2 / 15))).astype(np.uint8)
    Image.fromarray(img, mode="L").save(path)
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("method", ["ddim_inversion", "null_text", "sdedit"])
def test_condgen_edit_and_v1_edit_give_the_same_image(folders, service, tmp_path, method):
    src = tmp_path / "in.png"
    b64 = _input_png(src)
    out = tmp_path / "edited.png"
    assert main(["edit", str(src), "--model", folders["model"], "--method", method, "--source", "7", "--target", "1",
                 "--strength", "0.5", "--steps", "6", "--scale", "2", "--seed", "3", "--out", str(out),
                 "--no-progress"]) == 0
    served = asyncio.run(service.edit(schema.EditV1(image=b64, source_label=7, target_label=1, method=method,
                                                    strength=0.5, steps=6, scale=2.0, seed=3)))
    cli = _png(out)[None]
    _assert_same(cli, _b64([served["image"]]))
    assert np.abs(cli - _png(src)[None]).max() > 1  # the edit changed the image
