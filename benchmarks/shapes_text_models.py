"""The text-conditioned models of ``benchmarks/shapes_text.py`` besides pixel diffusion: CVAE, cGAN, latent diffusion.

Issue #15 item 3. Each reads the same embedded-CLIP caption embeddings as the pixel diffusion model (one random
phrasing of each image's captions per step) and trains by a direct loop over its own ``train_step`` with the
pipeline's optimisers (``tasks.training.worker.make_optimizers``: one Adam per ``optimizer_groups()`` entry at the
config's rate and betas), so the cGAN steps D then G exactly as on Ray Train:

* ``cvae``: the CVAE of Sohn et al. 2015 (``models/cvae.py``), the condition concatenated to the encoder's input
  and to z, standard prior; sampled z ~ N(0, I) -> the decoder's mean. No CFG, no inversion.
* ``cgan``: the projection-discriminator cGAN (Mirza & Osindero 2014; Miyato & Koyama 2018; ``models/gan.py``),
  hinge loss, spectral norm, samples from G's EMA. No CFG, no inversion.
* ``ldm``: latent diffusion (Rombach et al. 2022, ``models/latent_diffusion.py``): a KL autoencoder (f = 4) trained
  first for ``ae_steps``, the train set encoded once, then the latent U-Net with cross-attention on the text
  embedding; CFG and negative prompts as for pixel diffusion. Edits by inversion are measured for pixel diffusion
  only (``tasks.generation.sampling.edit_images`` takes a pixel ``ConditionalDiffusion``).

``--steps`` is one count for every model or per model (``parse_steps``); the defaults are ``STEPS``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

MODELS = ("diffusion", "cvae", "cgan", "ldm")
GUIDED = ("diffusion", "ldm")  # classifier-free guidance: a CFG sweep and the negative-prompt test apply
EDITABLE = ("diffusion",)  # DDIM / null-text inversion and SDEdit apply
# Adam steps (a GAN step = one D and one G step) per model; --quick keeps all four well under a minute on one core.
STEPS = {"quick": {"diffusion": 40, "cvae": 150, "cgan": 150, "ldm": 40},
         "full": {"diffusion": 3000, "cvae": 3000, "cgan": 3000, "ldm": 3000}}
AE_STEPS = {"quick": 40, "full": 600}  # the latent diffusion model's autoencoder
# widths per model (stride-2 levels; the pixel diffusion U-Net's come from --channels). Full: what trains at
# ~0.3 s per batch-64 step on one busy core (the cGAN's MNIST default (64, 128) costs 2.5x that).
WIDTHS = {"quick": {"cvae": (16, 32), "cgan": (16, 32), "ldm": (8, 16), "ae": (8, 16)},
          "full": {"cvae": (32, 64), "cgan": (32, 64), "ldm": (32, 64), "ae": (16, 32)}}


def parse_steps(spec: str | None, models: Sequence[str], defaults: dict[str, int]) -> dict[str, int]:
    """Adam steps per model from ``--steps``: None -> ``defaults``; ``"N"`` -> N for every model;
    ``"cvae=2000,cgan=4000"`` -> those, the others' defaults."""
    steps = {m: defaults[m] for m in models}
    if not spec:
        return steps
    if "=" not in spec:
        return {m: _positive(spec, "--steps") for m in models}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in MODELS:
            raise ValueError(f"--steps names {name!r}; use one of {', '.join(MODELS)}, e.g. --steps cvae=2000,cgan=4000")
        if name in steps:
            steps[name] = _positive(value, f"--steps {name}")
    return steps


def _positive(value: str, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{what} must be a positive whole number of steps, not {value!r}")
    return n


def text_batches(x: torch.Tensor, txt: torch.Tensor, batch: int, z: torch.Tensor | None = None
                 ) -> Callable[[np.random.Generator], dict[str, torch.Tensor]]:
    """``sample(rng)`` -> a training batch: ``batch`` images drawn with replacement, each with one random phrasing
    of its captions (``txt`` (N, n_captions, D)), and their cached latents ``z`` when given."""
    def sample(rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(rng.integers(0, len(x), batch))
        pick = torch.from_numpy(rng.integers(0, txt.shape[1], batch))
        out = {"x": x[idx], "txt": txt[idx, pick]}
        if z is not None:
            out["z"] = z[idx]
        return out

    return sample


def build(name: str, *, size: int, text_dim: int, args: Any, quick: bool, autoencoder=None) -> torch.nn.Module:
    """A text-conditioned ``cvae``, ``cgan`` or ``ldm`` for RGB ``size`` px shapes (18 classes)."""
    from condgen.models.registry import build_model

    w = WIDTHS["quick" if quick else "full"]
    common = {"image_size": size, "in_channels": 3, "num_classes": 18, "condition": "text", "text_dim": text_dim}
    if name == "cvae":
        return build_model("cvae", {**common, "channels": w["cvae"], "latent_dim": 16, "cond_dim": 32})
    if name == "cgan":
        return build_model("cgan", {**common, "channels": w["cgan"], "latent_dim": 64, "cond_dim": 32})
    if name == "ldm":
        return build_model("latent_diffusion", {
            "channels": w["ldm"], "num_classes": 18, "condition": "text", "text_dim": text_dim,
            "context_tokens": args.context_tokens, "p_uncond": args.p_uncond, "lr": args.lr,
            "sample_steps": args.sample_steps}, autoencoder=autoencoder)
    raise ValueError(f"no direct-loop build for {name!r}; one of cvae, cgan, ldm")


def train_autoencoder(x_uint8: np.ndarray, *, size: int, quick: bool, steps: int, batch: int, seed: int):
    """The latent diffusion model's KL autoencoder (f = 4), by ``benchmarks/autoencoder.py``'s loop."""
    from benchmarks.autoencoder import evaluate_autoencoder
    from benchmarks.autoencoder import train_autoencoder as train_ae

    cfg = {"image_size": size, "in_channels": 3, "channels": list(WIDTHS["quick" if quick else "full"]["ae"]),
           "latent_channels": 4, "regularization": "kl", "lr": 2e-3}
    ae, run = train_ae(x_uint8, cfg, steps=steps, batch_size=batch, seed=seed)
    run["test"] = evaluate_autoencoder(ae, x_uint8[:500])
    return ae, run


@torch.no_grad()
def encode_latents(ae: torch.nn.Module, x: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """Raw latents E(x) of the train images, once, so the latent U-Net never runs the encoder."""
    ae.eval()
    return torch.cat([ae.encode(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def train_model(name: str, x_uint8: np.ndarray, x: torch.Tensor, txt: torch.Tensor, *, args: Any, quick: bool,
                steps: int, ae_steps: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build ``name`` and train it for ``steps`` ``train_step`` calls on batches of ``text_batches``; returns the
    model in eval mode and a record (seconds, ms per step, last logs, config, the autoencoder's run for ldm)."""
    from benchmarks.autoencoder import fit
    from condgen.models.base import config_to_dict

    record: dict[str, Any] = {}
    ae, z = None, None
    if name == "ldm":
        ae, record["autoencoder"] = train_autoencoder(x_uint8, size=args.size, quick=quick, steps=ae_steps,
                                                      batch=args.batch, seed=args.seed)
        z = encode_latents(ae, x)
        print(f"[ldm] autoencoder {ae_steps} steps in {record['autoencoder']['seconds']:.0f}s, train MSE "
              f"{record['autoencoder']['test']['mse']:.4f}, latents {tuple(z.shape[1:])}", flush=True)
    torch.manual_seed(args.seed)
    model = build(name, size=args.size, text_dim=txt.shape[-1], args=args, quick=quick, autoencoder=ae)
    run = fit(model, text_batches(x, txt, args.batch, z), steps, args.seed, max(steps // 4, 1), name)
    record.update(run, config={k: str(v) for k, v in config_to_dict(model.config).items()})
    return model.eval(), record


def plain_sampler(model: torch.nn.Module, encode: Callable[[Sequence[str]], torch.Tensor], *, seed: int = 0):
    """A CVAE or cGAN as a ``shapes_eval`` sampler: prompts -> CLIP text embeddings -> ``model.sample``, seeded
    once. Negative prompts need classifier-free guidance, which these models do not have."""
    from condgen.tasks.io.images import to_uint8

    g = torch.Generator().manual_seed(seed)

    def sample(prompts: Sequence[str], negatives: Sequence[str | None] | None = None) -> np.ndarray:
        if negatives is not None and any(n is not None for n in negatives):
            raise ValueError("a CVAE or cGAN has no negative prompts (no classifier-free guidance); use diffusion")
        with torch.no_grad():
            return to_uint8(model.sample(encode(list(prompts)).float(), generator=g))

    return sample
