"""Conditional DDPM with classifier-free guidance, and the noisy classifier for classifier guidance.

* ``ConditionalDiffusion``: eps-prediction diffusion model (Ho et al. 2020, Algorithm 1,
  L_simple of Eq. 14) trained jointly conditional/unconditional by dropping the
  condition to the learned null token with probability p_uncond (Ho & Salimans 2022,
  Algorithm 1), so one network serves both terms of classifier-free guidance.
  ``sample`` = DDIM (Song et al. 2021) with CFG at ``guidance_scale``. With ``ema_decay`` > 0
  it keeps an exponential moving average of the weights (Ho et al. 2020, App. B) that the
  denoiser uses in eval mode.
* ``NoisyClassifier``: p_phi(y | x_t, t), a time-conditioned CNN trained with cross-entropy
  on images noised by the same schedule (Dhariwal & Nichol 2021, §4.1), for
  ``guidance.classifier_guidance``.

Both follow ``models/base.py``: ``optimizer_groups``, ``train_step``, ``sample``.
The noise schedule is rebuilt from the config; it is not part of the state_dict.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from condgen.models.base import BatchDraws, OptStep, condition_from_batch, ema_update
from condgen.models.configs import LOSS_WEIGHTINGS, DiffusionConfig, NoisyClassifierConfig
from condgen.models.diffusion.clipping import clip_x0
from condgen.models.diffusion.denoiser import Callback, Denoiser, randn
from condgen.models.diffusion.guidance import cfg
from condgen.models.diffusion.samplers.ddim import sample_ddim
from condgen.models.diffusion.schedule import as_timesteps, make_schedule
from condgen.models.diffusion.unet import Downsample, ResBlock, UNet, group_norm, timestep_embedding


class ConditionalDiffusion(nn.Module):
    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        if config.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {config.prediction!r}")
        if config.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {config.loss_weighting!r}")
        if config.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {config.min_snr_gamma}")
        if config.min_snr_floor < 0:
            raise ValueError(f"min_snr_floor must be >= 0, got {config.min_snr_floor}")
        if config.condition not in ("label", "text"):
            raise ValueError(f"condition must be 'label' or 'text', got {config.condition!r}")
        if not 0.0 <= config.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {config.p_uncond}")
        self.schedule = make_schedule(config.schedule, config.timesteps)
        # alpha_bar as a float32 buffer for training (moves with .to(device)); samplers use the float64 schedule.
        self.register_buffer("alpha_bars", self.schedule.alpha_bars.float(), persistent=False)
        self.net = UNet(config.in_channels, config.channels, config.condition, config.num_classes,
                        config.text_dim, config.context_tokens, config.attention, config.coords, config.scale_shift)
        self.draws = BatchDraws()  # the training loop makes them the global batch's (scale-out, accumulation)
        self.ema: UNet | None = None
        if config.ema_decay > 0:
            self.ema = copy.deepcopy(self.net).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    @property
    def sampling_net(self) -> UNet:
        """The weights the denoiser uses: the EMA copy in eval mode when there is one, else the trained ones."""
        return self.ema if self.ema is not None and not self.training else self.net

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- d ema + (1 - d) net, d = min(ema_decay, (1 + n) / (10 + n)); a no-op without EMA."""
        if self.ema is None:
            return
        ema_update(self.ema, self.net, self.ema_updates, self.config.ema_decay)

    @property
    def cond_dim(self) -> int:
        """E, the width of a condition embedding (= the U-Net's time-embedding width)."""
        return self.net.emb_dim

    def _device(self) -> torch.device:
        return self.net.conv_in.weight.device

    # -- conditions -----------------------------------------------------------------------
    def embed_condition(self, c: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        """Raw condition -> embedding e (B, E): int64 labels (B,), float CLIP text (B, text_dim), or None = null."""
        if c is None:
            if batch is None:
                raise ValueError("embed_condition(None) needs batch=")
            return self.null_embedding(batch)
        return self.sampling_net.cond(c.to(self._device()))

    def null_embedding(self, batch: int) -> torch.Tensor:
        """The learned null token as an embedding, (batch, E): the starting point of null-text inversion."""
        dev, conf = self._device(), self.config
        if conf.condition == "label":
            return self.sampling_net.cond(torch.full((batch,), conf.num_classes, dtype=torch.long, device=dev))
        drop = torch.ones(batch, dtype=torch.bool, device=dev)
        return self.sampling_net.cond(torch.zeros(batch, conf.text_dim, device=dev), drop=drop)

    def null_cond(self, batch: int) -> torch.Tensor:
        """The null condition in the form the denoiser takes for this model, for ``cfg``:
        label models: int64 labels equal to num_classes (the extra embedding row);
        text models: the null embedding (B, E), to be paired with ``embed_condition(txt)``."""
        if self.config.condition == "label":
            return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=self._device())
        return self.null_embedding(batch)

    def _as_embedding(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        if cond is None:
            return self.null_embedding(batch)
        cond = cond.to(self._device())  # a no-op when it is already there
        if cond.dtype == torch.long:
            if self.config.condition != "label":
                raise TypeError("a text model's denoiser takes embeddings; labels are for label models")
            return self.sampling_net.cond(cond)
        if cond.shape != (batch, self.cond_dim):
            raise ValueError(
                f"float conditions given to the denoiser are embeddings of shape ({batch}, {self.cond_dim}), got "
                f"{tuple(cond.shape)}; embed raw CLIP text first with model.embed_condition(txt)"
            )
        return cond

    # -- the denoiser ---------------------------------------------------------------------
    def eps(self, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor | None) -> torch.Tensor:
        """eps_theta(x_t, t, cond), (B, C, H, W). cond: int64 labels (label models), float
        embeddings (B, E) from ``embed_condition``/``null_embedding``, or None (null token)."""
        b = x.shape[0]
        t = as_timesteps(t, b, x.device)
        return self.to_eps(self.sampling_net(x, t, self._as_embedding(cond, b)), x, t)

    def to_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps from the network's output ``out`` at (x_t, t): ``out`` itself for prediction="eps"; for "v"
        (Salimans & Ho 2022, §4: v = sqrt(a) eps - sqrt(1 - a) x0) eps = sqrt(a) v + sqrt(1 - a) x_t, so
        x0_hat = sqrt(a) x_t - sqrt(1 - a) v moves by at most the error of v. x_t is the first channels
        of the network input ``x`` (super-resolution appends the upsampled image)."""
        if self.config.prediction == "eps":
            return out
        a = self.alpha_bars[t].view(-1, *([1] * (out.dim() - 1))).to(out.dtype)
        return a.sqrt() * out + (1 - a).sqrt() * x[:, :out.shape[1]]

    def target(self, x0: torch.Tensor, eps: torch.Tensor, a_bar: torch.Tensor) -> torch.Tensor:
        """What the network regresses on: eps, or v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
        return eps if self.config.prediction == "eps" else a_bar.sqrt() * eps - (1 - a_bar).sqrt() * x0

    def denoiser(self) -> Denoiser:
        """The callable D(x, t, cond) -> eps of DESIGN.md's denoiser contract (no guidance)."""
        return self.eps

    # -- training -------------------------------------------------------------------------
    def loss(self, x0: torch.Tensor, c: torch.Tensor, *,
             eps_model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             p_uncond: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """L_simple = E_{t, eps} ||eps - eps_theta(sqrt(a_bar) x0 + sqrt(1 - a_bar) eps, t, c~)||^2
        (Ho et al. 2020, Eq. 14), with c~ = null w.p. p_uncond (Ho & Salimans 2022, Algorithm 1);
        with prediction="v" the same squared error on v instead of eps (``target``); with
        loss_weighting="min_snr" each sample's error weighted by ``loss_weights``.

        ``eps_model(x_t, t, e)`` replaces the U-Net for models that wrap it (ControlNet adds its
        residuals, super-resolution concatenates the upsampled low-resolution image); the
        noising, the condition dropout and the random draws stay the same."""
        b, dev, draw = x0.shape[0], x0.device, self.draws.take  # draws: the same for any worker count (BatchDraws)
        t = draw("t", b, lambda n: torch.randint(0, self.config.timesteps, (n,), device=dev))  # t ~ U({0..T-1})
        eps = draw("eps", b, lambda n: torch.randn((n, *x0.shape[1:]), dtype=x0.dtype, device=dev))
        a_bar = self.alpha_bars[t].view(b, 1, 1, 1)
        x_t = a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * eps
        p = self.config.p_uncond if p_uncond is None else p_uncond
        drop = draw("drop", b, lambda n: torch.rand(n, device=dev)) < p
        e = self.net.cond(c, drop=drop)  # (B, E)
        out, target = (eps_model or self.net)(x_t, t, e), self.target(x0, eps, a_bar)
        if self.config.loss_weighting == "none":
            loss = F.mse_loss(out, target)
        else:
            per_sample = ((out - target) ** 2).flatten(1).mean(1)  # (B,)
            loss = (self.loss_weights(a_bar.view(b)) * per_sample).mean()
        return loss, {"loss": loss.item()}

    def loss_weights(self, a_bar: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023) for the regression target, (B,) from alpha_bar (B,):
        min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v (SNR = a / (1 - a)); each equals
        min(SNR, gamma) on the x0 error, since ||eps err||^2 = SNR ||x0 err||^2 and ||v err||^2 = (SNR + 1) ||x0 err||^2.
        The x0 weight is min(SNR, gamma) + floor, the floor ``min_snr_floor`` (default 0: Hang et al.'s own), or 1
        with loss_weighting="min_snr_plus_one"."""
        snr = a_bar / (1 - a_bar)
        floor = 1.0 if self.config.loss_weighting == "min_snr_plus_one" else self.config.min_snr_floor
        x0_weight = snr.clamp(max=self.config.min_snr_gamma) + floor
        return x0_weight / snr if self.config.prediction == "eps" else x0_weight / (snr + 1)

    def optimizer_groups(self):
        return {"main": self.net.parameters()}  # the EMA copy is not optimised

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        loss, logs = self.loss(batch["x"], condition_from_batch(batch, self.config.condition))
        opt_step("main", loss)
        self.update_ema()  # after the all-reduced step, so every worker's EMA stays identical
        return logs

    # -- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_cond: torch.Tensor | None = None,
        eta: float | None = None,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """x_T ~ N(0, I), then DDIM (``sample_steps``, ``sample_eta``) with CFG (and x0 clipping when
        ``clip_denoised``); (B, C, H, W) clamped to [-1, 1].

        ``cond`` / ``negative_cond`` are raw conditions (labels (B,) or CLIP text (B, D));
        everything is embedded once up front, so the sampling loop only runs the U-Net.
        """
        conf = self.config
        x_T = randn((cond.shape[0], conf.in_channels, conf.image_size, conf.image_size), generator, self._device())
        x = self.sample_from(x_T, cond, generator, steps=steps, guidance_scale=guidance_scale,
                             negative_cond=negative_cond, eta=eta, callback=callback)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def sample_from(
        self,
        x_T: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_cond: torch.Tensor | None = None,
        eta: float | None = None,
        callback: Callback | None = None,
        denoiser: Denoiser | None = None,
    ) -> torch.Tensor:
        """DDIM with CFG (and x0 clipping when ``clip_denoised``) from a given x_T, no final clamp.

        ``sample`` in pixel space and latent diffusion (whose latents have no fixed range) share
        it, and so do the models that wrap this one's U-Net: ControlNet and super-resolution pass
        their own ``denoiser`` (the U-Net with a control branch / a bound low-resolution image),
        which takes the same embedded conditions as ``self.denoiser()``."""
        conf = self.config
        e = self.embed_condition(cond)  # (B, E)
        e_neg = None if negative_cond is None else self.embed_condition(negative_cond)
        w = conf.guidance_scale if guidance_scale is None else guidance_scale
        D = cfg(denoiser or self.denoiser(), w, self.null_embedding(1), e_neg)
        if conf.clip_denoised:
            D = clip_x0(D, self.schedule)
        return sample_ddim(D, x_T, self.schedule, cond=e, generator=generator, callback=callback,
                           steps=conf.sample_steps if steps is None else steps,
                           eta=conf.sample_eta if eta is None else eta)


class NoisyClassifier(nn.Module):
    """logits of p_phi(y | x_t, t): (B, C, H, W), (B,) -> (B, K).

    The U-Net's encoder half (residual blocks with the time embedding, stride-2 convs),
    pooling to a 3x3 grid and a linear head: a small version of ADM's classifier
    (Dhariwal & Nichol 2021, §4.1, which pools with attention). The 3x3 grid keeps the
    coarse layout that a global average would throw away (it matters for digits).
    """

    GENERATOR = False  # a component: trained and checkpointed, not judged as a generator (models.base)

    def __init__(self, config: NoisyClassifierConfig):
        super().__init__()
        self.config = c = config
        self.schedule = make_schedule(c.schedule, c.timesteps)
        self.register_buffer("alpha_bars", self.schedule.alpha_bars.float(), persistent=False)
        c0 = c.channels[0]
        self.emb_dim = E = 4 * c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, E), nn.SiLU(), nn.Linear(E, E))
        self.conv_in = nn.Conv2d(c.in_channels, c0, 3, padding=1)
        self.blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        c_prev = c0
        for ch in c.channels:
            self.blocks.append(ResBlock(c_prev, ch, E))
            self.downs.append(Downsample(ch))
            c_prev = ch
        self.norm_out = group_norm(c_prev)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.head = nn.Linear(c_prev * 9, c.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = as_timesteps(t, x.shape[0], x.device)
        emb = self.time_mlp(timestep_embedding(t, self.config.channels[0]))  # (B, E)
        h = self.conv_in(x)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, emb))
        return self.head(self.pool(F.silu(self.norm_out(h))).flatten(1))  # (B, K)

    def loss(self, x0: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of y given x_t ~ q(x_t | x0), t ~ Uniform({0..T-1})."""
        b = x0.shape[0]
        t = torch.randint(0, self.config.timesteps, (b,), device=x0.device)
        a_bar = self.alpha_bars[t].view(b, 1, 1, 1)
        x_t = a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * torch.randn_like(x0)
        logits = self(x_t, t)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.item(), "acc": (logits.argmax(-1) == y).float().mean().item()}

    def optimizer_groups(self):
        return {"main": self.parameters()}

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        loss, logs = self.loss(batch["x"], batch["y"])
        opt_step("main", loss)
        return logs

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError("NoisyClassifier is a guidance classifier, not a generator; "
                                  "use it through models.diffusion.guidance.classifier_guidance")
