"""Cascaded generation: a conditional diffusion super-resolution stage, low_size -> image_size
(14 x 14 -> 28 x 28 for digits, 32 -> 64 for colour; any channel count).

Saharia et al. 2022, "Image Super-Resolution via Iterative Refinement" (SR3, §2): a
DDPM whose U-Net sees the bicubic/bilinear-upsampled low-resolution image concatenated
to x_t along channels, eps_theta([x_t, up(x_low)], t). Chained after a base model this
is the cascade of Imagen (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion
Models with Deep Language Understanding", §2.4: base 64 -> SR 256 -> SR 1024, each stage
conditioned on the same text) and of Ho et al. 2022 ("Cascaded Diffusion Models"), and
the diffusion counterpart of StackGAN's two stages (Zhang et al. 2017, "StackGAN":
Stage-I sketches shape and colour at low resolution, Stage-II, conditioned on the
Stage-I image and the same text, adds detail; seed 003).

Noise conditioning augmentation (Ho et al. 2022 §4.2; Imagen §2.5): in training the
low-res input gets Gaussian noise of a random std in [0, ``cond_noise``], so the stage
tolerates the artefacts of a generated (not downsampled-real) low-res image. The
augmentation level is not fed to the network here; sampling uses a clean input.

Reuse: ``self.diffusion`` is a ``ConditionalDiffusion`` with 2 input channels whose output
conv is replaced by one producing the image's channels; its condition embedding (null token
for CFG), ``eps`` and ``schedule`` and the samplers / ``cfg`` of ``models.diffusion`` are
used unchanged through ``denoiser(low)``, which binds the low-res image.

``cascade_sample(base, sr, cond, generator)`` chains after ANY model of the contract: the
base's sample is resized (area) to ``low_size`` when it is not already that size. For
``sample(cond, generator)`` to work alone (tasks/training/worker.py's grid, tasks/judging/evaluate.py), a
base can be embedded, frozen and saved in this model's ``state_dict``:
``models.registry.build_model("superres", config, base=model)`` (the registry names the base's
family in ``config.base_model``), or a config with ``base_model`` + ``base_config`` (the registry
builds that architecture) + ``base_uri``, whose checkpoint the caller loads and hands in with
``attach_frozen(base)`` (``tasks.io.model_store.attach_frozen_parts``; ``models/`` reads no files),
like the autoencoder of ``models.latent_diffusion``. Without a base, ``sample`` needs ``low=`` and
otherwise raises NotImplementedError.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from condgen.models.base import (
    FrozenPart,
    OptStep,
    check_frozen_config,
    condition_from_batch,
    config_to_dict,
    freeze,
)
from condgen.models.configs import SuperResConfig
from condgen.models.diffusion.ddpm import ConditionalDiffusion
from condgen.models.diffusion.denoiser import Callback, Denoiser, randn
from condgen.models.diffusion.schedule import NoiseSchedule


class SuperRes(nn.Module):
    GENERATOR = False  # a component: trained and checkpointed, not judged as a generator (models.base)

    def __init__(self, config: SuperResConfig, base: nn.Module | None = None, *,
                 untrained_base: nn.Module | None = None):
        """``base``: a trained first stage to embed (its weights are used as they are); ``config.base_model``
        must name its registry family. ``untrained_base``: the architecture ``config.base_model`` /
        ``base_config`` describe, without weights yet (``attach_frozen`` or a checkpoint's state dict bring
        them). ``models.registry.build_model`` passes whichever applies."""
        super().__init__()
        if base is not None:
            if not config.base_model:
                raise ValueError("SuperRes(config, base=model) needs the base's registry name in config.base_model; "
                                 "models.registry.build_model('superres', config, base=model) fills it in")
            config = dataclasses.replace(config, base_config=config_to_dict(base.config))
        elif config.base_model and untrained_base is None:
            raise ValueError(f"config.base_model={config.base_model!r}: build this model with "
                             "models.registry.build_model, which builds the embedded base's architecture")
        self.config = c = config
        self.diffusion = ConditionalDiffusion(c.diffusion_config())  # U-Net input: [x_t, up(x_low)]
        net = self.diffusion.net
        net.conv_out = nn.Conv2d(net.c0, c.in_channels, 3, padding=1)  # output: eps of x_t only
        nn.init.zeros_(net.conv_out.weight)  # as the U-Net's own output conv: start at eps = 0
        nn.init.zeros_(net.conv_out.bias)
        self.base: nn.Module | None = None
        if base is not None or c.base_model:
            self.base = freeze(base if base is not None else untrained_base)
        self.register_buffer("base_ready", torch.tensor(int(base is not None)))  # int: gloo broadcasts it

    def train(self, mode: bool = True) -> "SuperRes":
        super().train(mode)
        if self.base is not None:
            self.base.eval()
        return self

    # -- the embedded base (models.base.FrozenPart) --------------------------------------------------
    def missing_frozen_part(self) -> FrozenPart | None:
        """The base checkpoint to load and ``attach_frozen``, while the embedded base has no weights."""
        if self.base is None or bool(self.base_ready) or not self.config.base_uri:
            return None
        return FrozenPart(self.config.base_uri, self.config.base_model, dict(self.config.base_config))

    @torch.no_grad()
    def attach_frozen(self, base: nn.Module) -> None:
        """Take a trained ``config.base_model`` of exactly ``config.base_config``'s architecture: its weights are
        copied into the embedded base in place."""
        if self.base is None:
            raise ValueError("this super-resolution stage embeds no base (config.base_model is empty)")
        check_frozen_config(base, self.config.base_config, f"{self.config.base_model} base")
        self.base.load_state_dict(base.state_dict())
        self.base_ready.fill_(1)

    def _ensure_base(self) -> nn.Module:
        if self.base is None:
            raise NotImplementedError("a super-resolution stage without a base needs low=; use "
                                      "cascade_sample(base, sr, cond, generator) or embed a base")
        if not bool(self.base_ready):
            raise RuntimeError("the embedded base has no weights: pass base=, or load the checkpoint at "
                               "config.base_uri and attach_frozen() it (tasks.io.model_store.attach_frozen_parts)")
        return self.base

    # -- resolution changes --------------------------------------------------------------------
    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, low, low), area averaging (= 2x2 mean pooling for 28 -> 14)."""
        return F.interpolate(x, size=(self.config.low_size,) * 2, mode="area")

    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, H, W), bilinear (SR3 uses bicubic; bilinear does not overshoot [-1, 1])."""
        return F.interpolate(low, size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False)

    # -- the denoiser ---------------------------------------------------------------------------
    @property
    def schedule(self) -> NoiseSchedule:
        return self.diffusion.schedule

    def denoiser(self, low: torch.Tensor) -> Denoiser:
        """D(x, t, cond) -> eps with the low-res image (B', C, h, w) bound; B a multiple of B' (CFG doubles it)."""
        up = self.upsample(low.to(self.base_ready.device).float())

        def D(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
            u = up if up.shape[0] == x.shape[0] else up.repeat(x.shape[0] // up.shape[0], 1, 1, 1)
            return self.diffusion.eps(torch.cat([x, u.to(x.dtype)], 1), t, cond)

        return D

    # -- training -------------------------------------------------------------------------------
    def optimizer_groups(self):
        return {"main": self.diffusion.parameters()}  # an embedded base stays frozen

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        """L_simple of x given [x_t, up(down(x) + aug noise)] and the condition (SR3 Eq. 6 with eps)."""
        if self.base is not None:
            self._ensure_base()  # unused here, but required so every checkpoint saved from training carries it
        x0 = batch["x"]
        b = x0.shape[0]
        low = self.downsample(x0)
        if self.config.cond_noise > 0:
            sigma = torch.rand(b, 1, 1, 1, device=x0.device) * self.config.cond_noise
            low = low + sigma * torch.randn_like(low)
        up = self.upsample(low)

        def eps_model(x_t: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            return self.diffusion.net(torch.cat([x_t, up], 1), t, e)

        loss, logs = self.diffusion.loss(x0, condition_from_batch(batch, self.config.condition), eps_model=eps_model,
                                         p_uncond=self.config.p_uncond)
        opt_step("main", loss)
        return logs

    # -- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        low: torch.Tensor | None = None,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_cond: torch.Tensor | None = None,
        eta: float = 0.0,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] given ``low`` (B, C, low, low) in [-1, 1]; without ``low``, the embedded
        base's sample is upsampled (``cascade_sample``)."""
        if low is None:
            return cascade_sample(self._ensure_base(), self, cond, generator, steps=steps,
                                  guidance_scale=guidance_scale, negative_cond=negative_cond, eta=eta,
                                  callback=callback)
        conf = self.config
        x_T = randn((cond.shape[0], conf.in_channels, conf.image_size, conf.image_size), generator,
                    self.base_ready.device)
        x = self.diffusion.sample_from(x_T, cond, generator, steps=steps, guidance_scale=guidance_scale,
                                       negative_cond=negative_cond, eta=eta, callback=callback,
                                       denoiser=self.denoiser(low))
        return x.clamp(-1, 1)


@torch.no_grad()
def cascade_sample(base: nn.Module, sr: SuperRes, cond: torch.Tensor, generator: torch.Generator | None = None,
                   *, base_kwargs: dict[str, Any] | None = None, **sr_kwargs: Any) -> torch.Tensor:
    """base.sample(cond) -> resize to sr's low_size if needed -> sr.sample(cond, low=...): (B, C, H, W) in [-1, 1].

    ``base`` is any model of the contract (diffusion, latent diffusion, a GAN, a CVAE, ...). Both stages
    get the same condition (Imagen §2.4) and draw from the same generator, one after the other.
    """
    low = base.sample(cond, generator, **(base_kwargs or {}))
    if low.shape[-1] != sr.config.low_size or low.shape[-2] != sr.config.low_size:
        low = sr.downsample(low)
    return sr.sample(cond, generator, low=low, **sr_kwargs)
