"""A user's pretrained diffusers pipeline (Stable-Diffusion layout) as condgen parts.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (seed 003):
a frozen VAE maps images to latents, a U-Net predicts the noise of a latent given the hidden
states of a frozen CLIP text encoder, classifier-free guidance steers it.

``load(uri)`` reads a diffusers-layout folder (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), from a path or an ``s3://`` prefix that is downloaded once to
a cache folder through ``tasks.io.storage``. Weights are read from safetensors only: a folder
that carries ``.bin``/``.ckpt``/``.pt`` pickles is refused, because unpickling runs code.

``denoiser(p)`` is the U-Net under condgen's denoiser contract ``D(x, t, cond) -> eps``
(``models/diffusion/denoiser.py``) with ``cond`` the text encoder's hidden states (B, L, D), so
condgen's samplers (DDIM, DPM++), ``cfg`` with negative prompts, DDIM and null-text inversion and
SDEdit drive it unchanged; ``noise_schedule`` and ``timesteps`` turn the pipeline's scheduler
config into condgen's ``NoiseSchedule`` and diffusers' timestep spacing.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from condgen.models.diffusion import NoiseSchedule
from condgen.tasks.io import settings, storage

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")
PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
LOADS: Counter[str] = Counter()  # base.load calls per URI in this process (a serving replica reports it)


class LayoutError(ValueError):
    """A folder that is not a safetensors diffusers pipeline; the message says what to fix."""


def is_pipeline(uri: str) -> bool:
    """True when ``uri`` (path, ``file://`` or ``s3://``) holds a diffusers ``model_index.json``."""
    try:
        return storage.exists(storage.join(uri, "model_index.json"))
    except (ValueError, OSError):
        return False


def fetch(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local folder with the pipeline at ``uri``: the folder itself, or an ``s3://`` prefix downloaded to
    ``<cache_dir>/<hash of uri, keys, sizes, ETags>`` (default ``$CONDGEN_HOME/pretrained``), reused while
    the objects are unchanged. Pickled weights are refused before anything is downloaded."""
    if not storage.is_s3(uri):
        folder = storage.local_path(uri)
        check_layout([str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()], uri)
        return folder
    objects = storage.list_objects(uri)
    check_layout([key for key, _, _ in objects], uri)
    digest = hashlib.sha256(json.dumps([uri, objects]).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else settings.home() / "pretrained"
    folder = root / digest
    if not (folder / ".complete").exists():
        for key, _, _ in objects:
            dest = folder / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            storage.write_bytes(str(dest), storage.read_bytes(storage.join(uri, key)))
        (folder / ".complete").write_text(uri, encoding="utf-8")
    return folder


def check_layout(files: Sequence[str], uri: str) -> None:
    """Refuse pickled weights and missing components (relative file names of the pipeline folder)."""
    pickles = sorted(f for f in files if f.lower().endswith(PICKLES))
    if pickles:
        raise LayoutError(f"{uri} holds pickled weights ({pickles[0]}); condgen reads safetensors only: convert "
                          "them with diffusers' save_pretrained(..., safe_serialization=True)")
    if "model_index.json" not in files:
        raise LayoutError(f"{uri} has no model_index.json: point --base at a diffusers pipeline folder")
    for part in COMPONENTS:
        if not any(f.startswith(f"{part}/") for f in files):
            raise LayoutError(f"{uri} has no {part}/ folder: a Stable-Diffusion-layout pipeline needs {COMPONENTS}")
    for part in WEIGHTED:
        if not any(f.startswith(f"{part}/") and f.endswith(".safetensors") for f in files):
            raise LayoutError(f"{uri}/{part} has no .safetensors weights; save it with safe_serialization=True")


def component_fingerprint(folder: Path, part: str) -> str:
    """sha256 over a component's files (names and bytes), 16 hex digits: its identity for caches and cards."""
    h = hashlib.sha256()
    for path in sorted(p for p in (folder / part).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Pretrained:
    """The loaded parts of a pipeline; ``fingerprint`` names the whole base, ``fingerprints`` each part."""

    uri: str
    folder: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        joined = json.dumps(self.fingerprints, sort_keys=True).encode()
        return hashlib.sha256(joined).hexdigest()[:16]

    @property
    def schedule(self) -> NoiseSchedule:
        return noise_schedule(self.scheduler_config)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def load(uri: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         cache_dir: str | Path | None = None) -> Pretrained:
    """Load a diffusers-layout pipeline from a path or an ``s3://`` prefix (safetensors only), every part
    frozen and in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = fetch(uri, cache_dir)
    LOADS[uri] += 1
    kw = {"use_safetensors": True, "torch_dtype": dtype}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw)
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True, dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    fps = {part: component_fingerprint(folder, part) for part in (*WEIGHTED, "tokenizer")}
    return Pretrained(uri, folder, unet, vae, text_encoder, tokenizer, sched, fps)


# -- the scheduler config as condgen's schedule ---------------------------------------------------
def noise_schedule(config: dict[str, Any]) -> NoiseSchedule:
    """condgen's ``NoiseSchedule`` with the betas of a diffusers scheduler config (``linear``,
    ``scaled_linear`` = SD's linspace of sqrt(beta), ``squaredcos_cap_v2`` = Nichol & Dhariwal's cosine)."""
    T = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = (torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2).to(torch.float64)  # as diffusers
    elif kind == "squaredcos_cap_v2":
        def f(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported; use linear, scaled_linear or squaredcos_cap_v2")
    return NoiseSchedule(betas)


def timesteps(config: dict[str, Any], steps: int) -> list[int]:
    """The descending timesteps diffusers' DDIM/DPM schedulers use for ``steps`` (``timestep_spacing``
    "leading" + ``steps_offset`` as in SD 1.x, "trailing" or "linspace"), for a sampler's ``timesteps=``."""
    T = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "leading":
        ratio = T // steps
        ts = [i * ratio + int(config.get("steps_offset", 0)) for i in range(steps)]
    elif spacing == "trailing":
        ratio = T / steps
        ts = [round(T - i * ratio) - 1 for i in range(steps)][::-1]
    elif spacing == "linspace":
        ts = [round(v) for v in torch.linspace(0, T - 1, steps, dtype=torch.float64).tolist()]
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported; use leading, trailing or linspace")
    return sorted(set(ts), reverse=True)


# -- the parts under condgen's contracts -----------------------------------------------------------
@torch.no_grad()
def encode_prompts(p: Pretrained, prompts: Sequence[str]) -> torch.Tensor:
    """The text encoder's last hidden states (B, L, D) for ``prompts``, padded to the tokenizer's length
    (what SD's U-Net cross-attends to; "" is the unconditional / null prompt)."""
    ids = p.tokenizer(list(prompts), padding="max_length", max_length=p.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
    device = next(p.text_encoder.parameters()).device
    return p.text_encoder(ids.to(device))[0]


def denoiser(p: Pretrained, unet: torch.nn.Module | None = None):
    """``D(x, t, cond) -> eps`` over the pipeline's U-Net (or ``unet``, e.g. one with a LoRA adapter):
    x latents (B, 4, h, w), t (B,) timesteps, cond text hidden states (B, L, D). A v-prediction U-Net
    (Salimans & Ho 2022) is converted to eps = sqrt(a) v + sqrt(1 - a) x_t here, never in a sampler."""
    net = unet if unet is not None else p.unet
    kind = p.scheduler_config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {kind!r} is not supported; use epsilon or v_prediction")
    schedule = p.schedule

    def D(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            raise ValueError("the pretrained U-Net needs text hidden states as cond: pass encode_prompts(p, [''])")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        out = net(x.to(net.dtype), t, encoder_hidden_states=cond.to(net.dtype)).sample.to(x.dtype)
        if kind == "epsilon":
            return out
        a = schedule.alpha_bar_like(t, x)
        return a.sqrt() * out + (1 - a).sqrt() * x

    return D


@torch.no_grad()
def encode_images(p: Pretrained, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/f, W/f): a draw of the VAE posterior (its
    mode without ``generator``) times ``scaling_factor``, as SD's training scripts do."""
    dist = p.vae.encode(x.to(p.vae.dtype)).latent_dist
    z = dist.mode() if generator is None else dist.sample(generator)
    return z.float() * p.latent_scale


@torch.no_grad()
def decode_latents(p: Pretrained, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images (B, 3, H, W) in [-1, 1]."""
    return p.vae.decode((z / p.latent_scale).to(p.vae.dtype)).sample.float().clamp(-1, 1)


def initial_latents(p: Pretrained, batch: int, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """x_T ~ N(0, I) of shape (batch, C, size / f, size / f) for an image of ``size`` pixels, drawn like diffusers'
    pipelines draw it (one CPU ``randn`` call), so a seed gives the same start as ``StableDiffusionPipeline``."""
    f = 2 ** (len(p.vae.config.block_out_channels) - 1)
    shape = (batch, int(p.unet.config.in_channels), size // f, size // f)
    return torch.randn(shape, generator=generator, dtype=torch.float32)
