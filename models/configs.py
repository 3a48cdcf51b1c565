"""The config dataclasses of every model family, and the helpers that read and write them.

Torch-free on purpose: ``condgen`` checks a ``--set`` key or a parameter file's model config against
these fields before anything heavy is imported (``condgen/commands/checks.py``), and a checkpoint's
JSON is read back through them. Each model module re-exports its own config (``models.cvae.CVAEConfig``
is this module's class). Field defaults are what stored checkpoints were written against, so a better
recipe for new runs is ``models.registry.RECIPES``, never a changed default here.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

LOSS_WEIGHTINGS = ("none", "min_snr", "min_snr_plus_one")  # DiffusionConfig.loss_weighting
CONTROLS = ("edges", "mask")  # ControlNetConfig.control


def json_normalised(d: dict[str, Any]) -> Any:
    """``d`` as after a JSON round trip (tuples -> lists, keys sorted): for comparing configs."""
    return json.loads(json.dumps(d, sort_keys=True))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-able dict (tuples become lists)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a frozen config dataclass from a dict, rejecting unknown keys; lists → tuples."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**fixed)


def nested_config(cls: type, value: Any) -> Any:
    """A nested config field given as a dict (JSON form) as its dataclass ``cls``; a dataclass as it is."""
    return config_from_dict(cls, value) if isinstance(value, dict) else value


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a config dataclass to MLflow params (``a.b=value`` strings)."""
    out: dict[str, str] = {}
    for key, value in config_to_dict(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            for k2, v2 in value.items():
                out[f"{name}.{k2}"] = str(v2)
        else:
            out[name] = str(value)
    return out


@dataclass(frozen=True)
class DiffusionConfig:
    image_size: int = 28
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)  # U-Net width per level; resolution halves between levels
    num_classes: int = 10
    condition: str = "label"  # "label" | "text"
    text_dim: int = 64  # CLIP text embedding width (condition="text")
    context_tokens: int = 4  # cross-attention tokens made from the text embedding
    timesteps: int = 1000  # T
    schedule: str = "linear"  # "linear" | "cosine"
    p_uncond: float = 0.1  # condition dropout to the null token (Ho & Salimans 2022 use 0.1-0.2)
    lr: float = 1e-3  # small U-Net on 28x28: higher than DDPM's 2e-4 converges in fewer epochs
    # "eps" | "v": what the network outputs (``ConditionalDiffusion.to_eps``). "v" keeps x0_hat's error bounded at
    # low SNR, where an eps error is amplified sqrt((1 - a) / a) times (~157x at t = T-1): docs/results.md,
    # "Deterministic sampling gap". Models that call the U-Net directly (ControlNet) need an "eps" base.
    prediction: str = "eps"
    # "none": the plain mean squared error; "min_snr": Min-SNR-gamma (Hang et al. 2023, Eq. 10): the x0 error at
    # timestep t weighted by min(SNR_t, gamma), i.e. min(SNR, gamma) / SNR on the eps error and
    # min(SNR, gamma) / (SNR + 1) on the v error, so the easy high-SNR steps stop dominating the gradient.
    # "min_snr_plus_one": the x0 error weighted by min(SNR, gamma) + 1, i.e. the v error's own x0 weight SNR + 1
    # clipped at gamma + 1: plain v-prediction's weight at high noise (1 on x0, where Min-SNR's SNR -> 0 leaves
    # those steps almost untrained), Min-SNR's clipping at low noise (docs/results.md, "Keeping the weight of the
    # high-noise steps"). It is "min_snr" with min_snr_floor = 1.
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    # "min_snr": the x0 weight is min(SNR, gamma) + min_snr_floor, so the high-noise steps keep a weight of at least
    # the floor. 1 ("min_snr_plus_one") helps deterministic sampling on digits but blurs sharp colour shapes; 0.25
    # keeps both (docs/results.md, "A floor under the high-noise weight").
    min_snr_floor: float = 0.0
    attention: bool = False  # self-attention at the lowest resolution (``unet.SelfAttention``)
    coords: bool = False  # pixel coordinates after the input conv (CoordConv): lets text say where
    scale_shift: bool = False  # the time + condition embedding scales and shifts each block's GroupNorm (AdaGN)
    sample_steps: int = 50  # DDIM steps used by sample()
    sample_eta: float = 0.0  # DDIM eta used by sample(): 0 deterministic, 1 = DDPM ancestral on the same steps
    guidance_scale: float = 1.0  # CFG w in eps~ = (1 + w) eps(c) - w eps(null); 0 = no guidance
    clip_denoised: bool = True  # sample(): clamp x0_hat to [-1, 1] every step (Ho et al. 2020's sampler)
    # > 0: keep an exponential moving average of the weights and sample with it in eval mode (Ho et al.
    # 2020 use 0.9999), warmed up as min(decay, (1 + n) / (10 + n)) over n updates so short runs work.
    ema_decay: float = 0.0


@dataclass(frozen=True)
class NoisyClassifierConfig:
    image_size: int = 28
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)  # width per level; resolution halves between levels
    num_classes: int = 10
    timesteps: int = 1000  # must match the diffusion model it guides
    schedule: str = "linear"
    lr: float = 1e-3


@dataclass(frozen=True)
class CVAEConfig:
    image_size: int = 28
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)  # one stride-2 conv per entry: 28 -> 14 -> 7 (image_size % 2^len == 0)
    latent_dim: int = 16
    cond_dim: int = 16
    num_classes: int = 10
    condition: str = "label"  # "label" | "text"
    text_dim: int = 64
    prior: str = "standard"  # "standard" | "learned"
    beta: float = 1.0
    lr: float = 2e-3
    block: str = "concat"  # "concat" | "film" | "adain" (any key of models.conditioning.BLOCKS)


@dataclass(frozen=True)
class CGANConfig:
    """Conditional GAN. The generic loop builds one ``Adam(group, lr=lr, betas=betas)`` per
    group of ``optimizer_groups()`` ({"disc", "gen"})."""

    image_size: int = 28
    in_channels: int = 1
    channels: tuple[int, ...] = (64, 128)  # D: one stride-2 conv per entry (28 -> 14 -> 7); G mirrors it
    latent_dim: int = 64
    cond_dim: int = 32  # generator's condition embedding size
    num_classes: int = 10
    condition: str = "label"  # "label" | "text" (a float CLIP embedding (B, text_dim))
    text_dim: int = 64
    block: str = "concat"  # generator conditioning: "concat" | "film" | "adain"
    # 5e-4 (not DCGAN's 2e-4) with G's EMA: on the 4k bundled digits in 20 epochs the cGAN's samples
    # follow the label >= 0.97 of the time (benchmarks/model_table.py; 0.69-0.72 before, half budget)
    lr: float = 5e-4
    d_lr: float | None = None  # the discriminator's learning rate when it differs from lr (TTUR)
    betas: tuple[float, float] = (0.5, 0.999)
    augment: str = ""  # DiffAugment policy for every image D sees, e.g. "translation,cutout"; "" = off
    # > 0: keep an exponential moving average of G's weights and generate with it in eval mode
    # (Yazici et al. 2019, "The unusual effectiveness of averaging in GAN training"; Karras et al.).
    ema_decay: float = 0.999


@dataclass(frozen=True)
class ACGANConfig(CGANConfig):
    """AC-GAN: ``acgan_term2`` keeps term 2 (generated data) in the generator loss."""

    acgan_term2: bool = True
    aux_weight: float = 1.0  # weight of the classification terms against the adversarial loss
    # Translation DiffAugment: without it G learns to satisfy q(c|x) with features no real digit
    # has (term 2 -> ~0.02 while a judge trained on real digits still rejects many samples); with
    # it the judge agrees with the label on 1.000 of the samples (benchmarks/model_table.py).
    augment: str = "translation"


@dataclass(frozen=True)
class Pix2PixConfig:
    """The generic loop builds one ``Adam(group, lr=lr, betas=betas)`` per group ({"disc", "gen"})."""

    image_size: int = 28
    in_channels: int = 1  # generated image x
    cond_channels: int = 1  # condition image (batch key "cond_img"), e.g. models.paired.edge_map
    pairing: str = "edges"  # condition derived from x when a batch has none: "edges" | "colorize" (grey -> colour)
    channels: tuple[int, ...] = (64, 128)  # one U-Net level / PatchGAN conv per entry: 28 -> 14 -> 7
    lambda_l1: float = 100.0
    condition: str = "image"  # the condition is batch["cond_img"] (B, cond_channels, H, W) in [-1, 1]
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)


@dataclass(frozen=True)
class CycleGANConfig:
    """The generic loop builds one ``Adam(group, lr=lr, betas=betas)`` per group ({"disc", "gen"})."""

    image_size: int = 28
    in_channels: int = 1  # both domains have this many channels
    channels: tuple[int, ...] = (32, 64)  # stem width, then one stride-2 conv per further entry: 28 -> 14
    n_res: int = 3  # residual blocks at the lowest resolution
    disc_channels: tuple[int, ...] = (32, 64)  # PatchGAN: 28 -> 14 -> 7 patches
    lambda_cyc: float = 10.0
    lambda_id: float = 0.0  # Zhu et al. use 0.5 * lambda_cyc for photo <-> painting; 0 disables it
    condition: str = "image"  # the condition of ``sample`` is a domain-A image (batch key "x")
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)
    feature_dim: int = 128
    num_classes: int = 10
    dropout: float = 0.25
    lr: float = 1e-3


@dataclass(frozen=True)
class AutoencoderConfig:
    image_size: int = 28
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)  # width per halving: len 2 -> f = 4 (28 -> 14 -> 7)
    latent_channels: int = 4  # c of the latent z (H/f, W/f, c)
    regularization: str = "kl"  # "kl" | "vq"
    beta: float = 1e-5  # KL weight (per-pixel units); small, so the latent stays informative (LDM uses 1e-6)
    codebook_size: int = 256  # K, VQ only
    commitment: float = 0.25  # beta of van den Oord et al. 2017, Eq. 3
    rec_loss: str = "mse"  # "mse" | "l1"
    gan_weight: float = 0.0  # 0 = no adversarial term; else the factor in front of the adaptive lambda
    gan_start: int = 0  # optimisation step at which the GAN term (and D's training) starts
    disc_channels: tuple[int, ...] = (32, 64)  # PatchGAN widths (GAN only)
    latent_momentum: float = 0.99  # EMA momentum of the latent statistics buffer
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)  # Esser et al. use (0.5, 0.9) with the GAN term

    @property
    def downsampling_factor(self) -> int:
        return 2 ** len(self.channels)

    @property
    def latent_size(self) -> int:
        size = self.image_size
        for _ in self.channels:
            size = -(-size // 2)  # stride-2 conv with padding 1: ceil(H / 2)
        return size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    def compression(self) -> dict[str, float]:
        """How much smaller the latent is than the image: in dimensions (floats), and for VQ in bits
        (8-bit pixels vs log2(K)-bit codebook indices)."""
        pixels = self.in_channels * self.image_size**2
        c, h, w = self.latent_shape
        out = {"dims": pixels / (c * h * w)}
        if self.regularization == "vq":
            out["bits"] = pixels * 8 / (h * w * math.log2(self.codebook_size))
        return out


@dataclass(frozen=True)
class LatentDiffusionConfig:
    """Fields shared with ``DiffusionConfig`` are forwarded to the latent U-Net by ``diffusion_config``;
    ``image_size`` / ``in_channels`` there come from the autoencoder's latent shape."""

    autoencoder_uri: str = ""  # checkpoint of a trained "autoencoder" (loaded by the caller: attach_frozen)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # its architecture
    scale_factor: float = 0.0  # z -> scale_factor * z before diffusion; 0 = 1 / autoencoder.latent_std
    channels: tuple[int, ...] = (32, 64)  # latent U-Net widths: 7 -> 4 (ceil) -> 7
    num_classes: int = 10
    condition: str = "label"  # "label" | "text"
    text_dim: int = 64
    context_tokens: int = 4
    timesteps: int = 1000
    schedule: str = "linear"
    p_uncond: float = 0.1
    lr: float = 1e-3
    prediction: str = "eps"
    sample_steps: int = 50
    guidance_scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "autoencoder", nested_config(AutoencoderConfig, self.autoencoder))

    def diffusion_config(self) -> DiffusionConfig:
        shared = {f.name for f in dataclasses.fields(DiffusionConfig)} & {f.name for f in dataclasses.fields(self)}
        c, h, _ = self.autoencoder.latent_shape
        # clip_denoised=False: x0-clipping clamps to the data range [-1, 1], and latents have no fixed range
        return DiffusionConfig(image_size=h, in_channels=c, clip_denoised=False,
                               **{k: getattr(self, k) for k in shared})


@dataclass(frozen=True)
class ControlNetConfig:
    base_uri: str = ""  # checkpoint of a trained "diffusion" model (loaded by the caller: attach_frozen)
    base: DiffusionConfig = field(default_factory=DiffusionConfig)  # its architecture
    control: str = "edges"  # how cond_img is derived from x when a batch lacks it: "edges" | "mask"
    control_channels: int = 1
    hint_channels: int = 16  # width of the small conv encoder of the control image
    lora_rank: int = 0  # > 0: keep the copy frozen too and train rank-r LoRA adapters on it
    lora_alpha: float = 4.0
    p_uncond: float = 0.5  # class dropout during ControlNet training (Zhang et al. 2023 §3.3: 50%)
    control_scale: float = 1.0  # multiplier on the control residuals at sampling time
    lr: float = 1e-3

    def __post_init__(self):
        object.__setattr__(self, "base", nested_config(DiffusionConfig, self.base))
        if self.control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {self.control!r}")

    # read by tasks/training/worker.py and tasks/judging/evaluate.py (grid and evaluation conditions)
    @property
    def condition(self) -> str:
        return self.base.condition

    @property
    def num_classes(self) -> int:
        return self.base.num_classes


@dataclass(frozen=True)
class SuperResConfig:
    """Fields shared with ``DiffusionConfig`` are forwarded to the U-Net by ``diffusion_config``."""

    image_size: int = 28
    low_size: int = 14
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)
    num_classes: int = 10
    condition: str = "label"  # "label" | "text": the same condition as the base stage
    text_dim: int = 64
    context_tokens: int = 4
    timesteps: int = 1000
    schedule: str = "linear"
    p_uncond: float = 0.1
    lr: float = 1e-3
    prediction: str = "eps"
    sample_steps: int = 50
    guidance_scale: float = 1.0
    clip_denoised: bool = True  # sample(): clamp x0_hat to [-1, 1] every step (models.diffusion.clipping)
    cond_noise: float = 0.1  # max std of the Gaussian augmentation of the low-res input in training
    # Optional embedded first stage, so sample(cond, generator) is a full cascade:
    base_model: str = ""  # a key of models.registry.MODELS
    base_uri: str = ""  # its checkpoint (loaded by the caller: attach_frozen)
    base_config: dict[str, Any] = field(default_factory=dict)  # its config (JSON form)

    def __post_init__(self):
        object.__setattr__(self, "base_config", json_normalised(dict(self.base_config)))
        if self.low_size >= self.image_size:
            raise ValueError(f"low_size ({self.low_size}) must be below image_size ({self.image_size})")

    def diffusion_config(self) -> DiffusionConfig:
        shared = {f.name for f in dataclasses.fields(DiffusionConfig)} & {f.name for f in dataclasses.fields(self)}
        return DiffusionConfig(**{**{k: getattr(self, k) for k in shared}, "in_channels": 2 * self.in_channels})


# name -> config class; ``models.registry.MODELS`` pairs each with its module class.
CONFIGS: dict[str, type] = {
    "cvae": CVAEConfig,
    "diffusion": DiffusionConfig,
    "noisy_classifier": NoisyClassifierConfig,
    "cgan": CGANConfig,
    "acgan": ACGANConfig,
    "pix2pix": Pix2PixConfig,
    "cyclegan": CycleGANConfig,
    "classifier": ClassifierConfig,
    "autoencoder": AutoencoderConfig,
    "latent_diffusion": LatentDiffusionConfig,
    "controlnet": ControlNetConfig,
    "superres": SuperResConfig,
}
