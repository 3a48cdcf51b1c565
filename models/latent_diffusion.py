"""Latent diffusion: the conditional DDPM of ``models.diffusion`` run on an autoencoder's latents.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(seed 004 "Latent Diffusion Models"): a frozen first stage (``models.autoencoder``,
KL- or VQ-regularised; Esser et al. 2021, van den Oord et al. 2017) maps x to
z = E(x) of H/f x W/f x c, and the diffusion model learns p(z | c) instead of p(x | c):

    L_LDM = E_{E(x), c, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, c) ||^2      (their Eq. 2, with c)

Sampling draws z_T ~ N(0, I) of the latent shape, runs any sampler / guidance, and
decodes once: x = D(z_0). z is scaled to unit variance by ``scale_factor`` (their
App. G; here 1 / the autoencoder's ``latent_std`` unless the config fixes it).

Composition, not copying: ``self.diffusion`` IS a ``ConditionalDiffusion`` whose
``image_size`` / ``in_channels`` are the latent's, so its U-Net, condition embedding
(null token), ``loss`` (L_simple with condition dropout), ``denoiser()`` and
``schedule`` are used as they are, and every function of ``models.diffusion`` that
takes a denoiser applies to latents unchanged, e.g.::

    z = ldm.encode(x)                                           # (B, 4, 7, 7)
    z_edit = sdedit(ldm.denoiser(), z, ldm.schedule, strength=0.6, cond=y_new)
    x_edit = ldm.decode(z_edit)
    z_T = ddim_invert(ldm.denoiser(), z, ldm.schedule, cond=y, steps=20)

``sample`` differs from ``ConditionalDiffusion.sample`` only at the two ends (latent
noise shape, decode instead of clamping the latent) and in never clipping x0_hat
(``models.diffusion.clipping`` clamps to the pixel range; latents have no fixed range).

The frozen autoencoder comes either as an object (``LatentDiffusion(config, autoencoder=ae)``)
or, when the config names its checkpoint in ``config.autoencoder_uri``, from the caller:
``models/`` reads no files or URIs, so whoever builds the model from such a config (the
training worker, ``tasks.io.model_store``) loads that checkpoint and hands the module in with
``attach_frozen(ae)`` (``tasks.io.model_store.attach_frozen_parts`` does both;
``missing_frozen_part()`` says what is missing, ``models.base.FrozenPart``). The weights are
part of this model's ``state_dict``: a saved latent diffusion model is self-contained, and
loading its checkpoint does not touch the autoencoder's URI again (the ``autoencoder_ready``
buffer records that the weights are real). Encoding, decoding, training and sampling without
them raise.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from condgen.models.autoencoder import Autoencoder
from condgen.models.base import (
    FrozenPart,
    OptStep,
    check_frozen_config,
    condition_from_batch,
    config_to_dict,
    freeze,
)
from condgen.models.configs import LatentDiffusionConfig
from condgen.models.diffusion.ddpm import ConditionalDiffusion
from condgen.models.diffusion.denoiser import Callback, Denoiser, randn
from condgen.models.diffusion.schedule import NoiseSchedule


# -- the model ------------------------------------------------------------------------------------
class LatentDiffusion(nn.Module):
    def __init__(self, config: LatentDiffusionConfig, autoencoder: Autoencoder | None = None):
        super().__init__()
        if autoencoder is not None:  # the object defines the architecture; the config records it
            config = dataclasses.replace(config, autoencoder=autoencoder.config)
        self.config = config
        self.autoencoder = freeze(autoencoder if autoencoder is not None else Autoencoder(config.autoencoder))
        # True once the autoencoder holds real weights (handed in, attach_frozen, or loaded with a checkpoint).
        self.register_buffer("autoencoder_ready", torch.tensor(int(autoencoder is not None)))  # int: gloo broadcasts it
        self.diffusion = ConditionalDiffusion(config.diffusion_config())

    def train(self, mode: bool = True) -> "LatentDiffusion":
        super().train(mode)
        self.autoencoder.eval()  # frozen: stays in eval mode
        return self

    # -- the frozen autoencoder (models.base.FrozenPart) -------------------------------------------
    @classmethod
    def trains_on_latents(cls, config: LatentDiffusionConfig) -> str | None:
        """The autoencoder checkpoint whose latents this model trains on (``models.base.trains_on_latents``)."""
        return config.autoencoder_uri or None

    def missing_frozen_part(self) -> FrozenPart | None:
        """The autoencoder checkpoint to load and ``attach_frozen``, while this model holds no weights for it."""
        if bool(self.autoencoder_ready) or not self.config.autoencoder_uri:
            return None
        return FrozenPart(self.config.autoencoder_uri, "autoencoder", config_to_dict(self.config.autoencoder))

    @torch.no_grad()
    def attach_frozen(self, autoencoder: Autoencoder) -> None:
        """Take a trained autoencoder of exactly ``config.autoencoder``'s architecture: its weights are copied
        into this model's frozen one in place (device and references stay)."""
        check_frozen_config(autoencoder, self.config.autoencoder, "autoencoder")
        self.autoencoder.load_state_dict(autoencoder.state_dict())
        self.autoencoder_ready.fill_(1)

    def _ensure_autoencoder(self) -> None:
        if not bool(self.autoencoder_ready):
            raise RuntimeError("this latent diffusion model has no autoencoder weights: pass autoencoder=, or load "
                               "the checkpoint at config.autoencoder_uri and attach_frozen() it "
                               "(tasks.io.model_store.attach_frozen_parts)")

    # -- latent space ------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """scale_factor applied to raw autoencoder latents (Rombach et al. 2022, App. G)."""
        if self.config.scale_factor:
            return float(self.config.scale_factor)
        self._ensure_autoencoder()
        return float(1.0 / self.autoencoder.latent_std)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.config.autoencoder.latent_shape

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> scaled latent z (B, c, h, w), the diffusion model's data."""
        self._ensure_autoencoder()
        return self.autoencoder.encode(x) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """scaled latent z (B, c, h, w) -> image (B, C, H, W) clamped to [-1, 1]."""
        self._ensure_autoencoder()
        return self.autoencoder.decode(z / self.scale).clamp(-1, 1)

    # -- the denoiser on latents (everything in models.diffusion takes these) ----------------------
    @property
    def schedule(self) -> NoiseSchedule:
        return self.diffusion.schedule

    def denoiser(self) -> Denoiser:
        """D(z_t, t, cond) -> eps on scaled latents (labels, embeddings or None, as ConditionalDiffusion)."""
        return self.diffusion.denoiser()

    def embed_condition(self, c: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        return self.diffusion.embed_condition(c, batch)

    def null_embedding(self, batch: int) -> torch.Tensor:
        return self.diffusion.null_embedding(batch)

    def null_cond(self, batch: int) -> torch.Tensor:
        return self.diffusion.null_cond(batch)

    # -- training -------------------------------------------------------------------------------
    def optimizer_groups(self):
        return {"main": self.diffusion.parameters()}  # the autoencoder is frozen

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        """L_LDM on z = scale * E(x). A batch may carry precomputed raw latents ``z`` (B, c, h, w) of the same
        autoencoder (``tasks.data.latents``); otherwise ``x`` is encoded here, with no gradient."""
        self._ensure_autoencoder()
        with torch.no_grad():
            if "z" in batch:
                z_raw = batch["z"].to(self.autoencoder_ready.device)
            else:
                z_raw = self.autoencoder.encode(batch["x"])
            z0 = z_raw * self.scale
        loss, logs = self.diffusion.loss(z0, condition_from_batch(batch, self.config.condition))
        opt_step("main", loss)
        return logs

    # -- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_latents(
        self,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_cond: torch.Tensor | None = None,
        eta: float = 0.0,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """z_T ~ N(0, I) of the latent shape, then DDIM with CFG (as ConditionalDiffusion.sample); scaled z_0."""
        conf, d = self.config, self.diffusion
        dev = self.autoencoder_ready.device
        z_T = randn((cond.shape[0], *self.latent_shape), generator, dev)
        return d.sample_from(z_T, cond, generator, negative_cond=negative_cond, eta=eta, callback=callback,
                             steps=conf.sample_steps if steps is None else steps,
                             guidance_scale=conf.guidance_scale if guidance_scale is None else guidance_scale)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1]: ``sample_latents`` (same keyword arguments), decoded once."""
        self._ensure_autoencoder()
        return self.decode(self.sample_latents(cond, generator, **kwargs))
