"""ControlNet: spatial control of a frozen conditional diffusion model.

Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models" (seed 004 "ControlNet"). The pre-trained network F(.; theta) is locked; a
trainable copy F(.; theta_c) of its encoder (theta_c = theta at the start) sees the
control image c through a zero-initialised convolution, and its features return
through zero-initialised 1x1 convolutions Z (weight and bias 0), their Eq. 2:

    y_c = F(x; theta) + Z(F(x + Z(c; theta_z1); theta_c); theta_z2)

Applied as in their §3.2 (Stable Diffusion): the copy covers the U-Net's input conv,
every down level and the middle block; one zero conv per skip connection and one for
the middle output add into the locked decoder path. The control image passes a small
conv "hint" encoder ending in a zero conv (their tiny encoder E(c_i), Eq. 9) and is added
after the copy's input conv. Because every Z starts at zero, the output at
initialisation is exactly the locked model's, and the first gradient steps cannot
damage it ("no harmful noise", §3.1). Only the copy, the hint encoder and the zero convs
train, optionally with LoRA adapters on the copy instead (Hu et al. 2021,
``models.conditioning.lora``); the locked base never receives a gradient.

Control images (batch key ``cond_img``, (B, 1, H, W) in [-1, 1]) are computed from ``x``
inside ``train_step`` when absent: ``control="edges"`` -> ``models.paired.edge_map``,
``"mask"`` -> foreground mask (x > 0). During training the class condition is dropped to
the null token with probability ``p_uncond`` (0.5, as the paper replaces 50% of prompts
with empty strings, §3.3, so the branch learns to read the control image itself).

``sample(cond, generator, control=None)``: with a control image the branch is applied
(scaled by ``control_scale``); with ``control=None`` the branch is OFF and the result is
exactly the frozen base's sample. A blank (all -1) edge map is not "no control" but the
control "no edges anywhere", so it is not used as the default. The generic evaluation
(``tasks.evaluate``, labels only) therefore scores the base; the control effect is
measured by edge IoU (``benchmarks/latent_vs_pixel.py``).

The base comes as an object (``ControlNet(config, base=model)``) or, when the config names a
"diffusion" checkpoint in ``config.base_uri``, from the caller, who loads it and hands it in with
``attach_frozen(base)`` (``tasks.io.model_store.attach_frozen_parts``; ``models/`` reads no
files), as the autoencoder of ``models.latent_diffusion``. Either way theta_c = theta, and the
base is stored in this model's ``state_dict`` (self-contained).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from condgen.models.base import (
    FrozenPart,
    OptStep,
    check_frozen_config,
    condition_from_batch,
    config_to_dict,
    freeze,
)
from condgen.models.conditioning.lora import freeze_base, inject_lora
from condgen.models.configs import CONTROLS, ControlNetConfig
from condgen.models.diffusion.ddpm import ConditionalDiffusion
from condgen.models.diffusion.denoiser import Callback, Denoiser, randn
from condgen.models.diffusion.schedule import NoiseSchedule, as_timesteps
from condgen.models.diffusion.unet import UNet
from condgen.models.paired import edge_map


def control_image(x: torch.Tensor, kind: str = "edges") -> torch.Tensor:
    """A spatial control computed from images in [-1, 1]: (B, C, H, W) -> (B, 1, H, W) in {-1, 1}."""
    if kind == "edges":
        return edge_map(x)
    if kind == "mask":
        return torch.where(x.mean(1, keepdim=True) > 0, 1.0, -1.0).to(x.dtype)
    raise ValueError(f"unknown control kind {kind!r}; choose one of {CONTROLS}")


def zero_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """Z: a 1x1 convolution with weight and bias initialised to 0 (Zhang et al. 2023, §3.1)."""
    conv = nn.Conv2d(c_in, c_out, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlEncoder(nn.Module):
    """The trainable copy F(.; theta_c): the U-Net's time MLP, input conv, down levels and middle block,
    deep-copied from the locked base (same attribute names, so the base's weights map 1:1 onto it)."""

    def __init__(self, net: UNet):
        super().__init__()
        self.c0, self.context_tokens = net.c0, net.context_tokens
        for name in ("time_mlp", "conv_in", "coords", "down_blocks", "downsamples", "mid1", "self_attn", "to_context", "attn", "mid2"):
            setattr(self, name, copy.deepcopy(getattr(net, name)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, hint: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features after each down level (the skips) and after the middle block."""
        # UNet.encode reads only the attributes copied above: the copy runs the base's own code.
        _, skips, mid = UNet.encode(self, x, t, e, hint)  # x + Z(c) after the input conv (as in SD's ControlNet)
        return skips, mid


class ControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig, base: ConditionalDiffusion | None = None):
        super().__init__()
        if base is not None:
            config = dataclasses.replace(config, base=base.config)
        self.config = c = config
        self.base = freeze(base if base is not None else ConditionalDiffusion(c.base))
        self.register_buffer("base_ready", torch.tensor(int(base is not None)))  # int: gloo broadcasts it
        net = self.locked
        widths = c.base.channels
        self.control = ControlEncoder(net).requires_grad_(True)  # theta_c = theta, trainable (the base is frozen)
        self.hint = nn.Sequential(  # c -> features at the input conv's width, ending in Z(.; theta_z1)
            nn.Conv2d(c.control_channels, c.hint_channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c.hint_channels, c.hint_channels, 3, padding=1), nn.SiLU(),
            zero_conv(c.hint_channels, widths[0]),
        )
        self.zero_convs = nn.ModuleList(zero_conv(w, w) for w in widths)  # Z(.; theta_z2), one per skip
        self.zero_mid = zero_conv(widths[-1], widths[-1])
        if c.lora_rank > 0:
            inject_lora(self.control, [nn.Conv2d, nn.Linear], rank=c.lora_rank, alpha=c.lora_alpha)
            freeze_base(self.control)  # only lora_A / lora_B of the copy train

    @property
    def locked(self) -> nn.Module:
        """The locked U-Net: the base's sampling weights, i.e. its EMA copy when it keeps one (what the base
        itself samples with), else its trained weights."""
        return self.base.ema if self.base.ema is not None else self.base.net

    def train(self, mode: bool = True) -> "ControlNet":
        super().train(mode)
        self.base.eval()  # locked
        return self

    # -- the locked base (models.base.FrozenPart) ----------------------------------------------------
    def missing_frozen_part(self) -> FrozenPart | None:
        """The base checkpoint to load and ``attach_frozen``, while this model holds no weights for it."""
        if bool(self.base_ready) or not self.config.base_uri:
            return None
        return FrozenPart(self.config.base_uri, "diffusion", config_to_dict(self.config.base))

    @torch.no_grad()
    def attach_frozen(self, base: ConditionalDiffusion) -> None:
        """Take a trained base of exactly ``config.base``'s architecture: its weights are copied into the locked
        base in place, and theta_c = theta again."""
        check_frozen_config(base, self.config.base, "diffusion base")
        self.base.load_state_dict(base.state_dict())
        # theta_c = theta again, in place (an optimiser may already hold these parameters). A LoRA-wrapped
        # layer keeps its weight under ".base."; its adapter (B = 0) keeps its fresh initialisation.
        src = self.locked.state_dict()
        for name, tensor in self.control.state_dict().items():
            if not name.endswith(("lora_A", "lora_B")):
                tensor.copy_(src[name.replace(".base.", ".")])
        self.base_ready.fill_(1)

    def _ensure_base(self) -> None:
        if not bool(self.base_ready):
            raise RuntimeError("this ControlNet has no base weights: pass base=, or load the 'diffusion' checkpoint "
                               "at config.base_uri and attach_frozen() it (tasks.io.model_store.attach_frozen_parts)")

    # -- the controlled denoiser --------------------------------------------------------------------
    @property
    def schedule(self) -> NoiseSchedule:
        return self.base.schedule

    def control_image(self, x: torch.Tensor) -> torch.Tensor:
        return control_image(x, self.config.control)

    def residuals(self, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, control: torch.Tensor, scale: float = 1.0
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Z(F(x + Z(c); theta_c)) for every skip and the middle block."""
        skips, mid = self.control(x, t, e, self.hint(control))
        down = [scale * z(h) for z, h in zip(self.zero_convs, skips)]
        return down, scale * self.zero_mid(mid)

    def eps(self, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor | None,
            control: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
        """eps(x_t, t, cond; c) (B, C, H, W). cond as for ``ConditionalDiffusion.eps``; ``control`` (B', 1, H, W)
        with B a multiple of B' (CFG doubles the batch), or None for the locked base alone."""
        b = x.shape[0]
        t = as_timesteps(t, b, x.device)
        # labels / embeddings / None (null) exactly as the base's denoiser takes them (its own conversion)
        e = self.base._as_embedding(cond, b)
        if control is None:
            out = self.locked(x, t, e)  # branch off: the locked model itself
        else:
            control = control.to(x.device, x.dtype)
            if control.shape[0] != b:
                control = control.repeat(b // control.shape[0], 1, 1, 1)
            out = self.locked(x, t, e, *self.residuals(x, t, e, control, scale))
        return self.base.to_eps(out, x, t)  # the base's parameterisation (eps or v) to eps

    def denoiser(self, control: torch.Tensor | None, scale: float | None = None) -> Denoiser:
        """D(x, t, cond) -> eps with the control image bound: composes with every sampler / guidance wrapper."""
        self._ensure_base()
        s = self.config.control_scale if scale is None else scale
        return lambda x, t, cond: self.eps(x, t, cond, control, s)

    # -- training -------------------------------------------------------------------------------
    def optimizer_groups(self):
        return {"main": [p for p in self.parameters() if p.requires_grad]}  # never the locked base

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        """L_simple with the control branch (Zhang et al. 2023, Eq. 10), base frozen."""
        self._ensure_base()
        x0 = batch["x"]
        c = batch["cond_img"] if "cond_img" in batch else self.control_image(x0)
        y = condition_from_batch(batch, self.config.condition)
        c = c.to(x0.dtype)

        def eps_model(x_t: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            # e: the base's frozen condition table, so no gradient reaches it
            return self.locked(x_t, t, e, *self.residuals(x_t, t, e, c))

        loss, logs = self.base.loss(x0, y, eps_model=eps_model, p_uncond=self.config.p_uncond)
        opt_step("main", loss)
        return logs

    # -- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        control: torch.Tensor | None = None,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        control_scale: float | None = None,
        eta: float = 0.0,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1]; DDIM + CFG (+ x0 clipping when the base's config asks) as the base samples,
        with ``control`` (B, 1, H, W) applied to both CFG branches. ``control=None``: the branch is off, i.e.
        exactly the base's sample."""
        self._ensure_base()
        bc = self.base.config
        x_T = randn((cond.shape[0], bc.in_channels, bc.image_size, bc.image_size), generator, self.base_ready.device)
        x = self.base.sample_from(x_T, cond, generator, steps=steps, guidance_scale=guidance_scale, eta=eta,
                                  callback=callback, denoiser=self.denoiser(control, control_scale))
        return x.clamp(-1, 1)

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"trainable={n}, control={self.config.control!r}, lora_rank={self.config.lora_rank}"
