"""Conditional VAE: encoder Q(z|X,c), decoder P(X|z,c).

Kingma et al. 2014, "Semi-Supervised Learning with Deep Generative Models" and
Sohn et al. 2015, "Learning Structured Output Representation using Deep
Conditional Generative Models" (seeds 000-002). Two priors, selectable by config:

* ``prior="standard"``: the condition-independent N(0, I);
* ``prior="learned"``: a learned Gaussian per condition p(z|c) = N(mu_c, diag sigma_c^2),
  the ELBO  E_q[log p(x|z,c)] - KL(q(z|x,c) || p(z|c)).

How the condition enters is chosen by ``block``:

* ``"concat"`` ("vectorisation", seed 001): the embedding is broadcast as extra input
  channels for the encoder and concatenated to z for the decoder;
* ``"film"`` / ``"adain"`` (Perez et al. 2018 / Huang & Belongie 2017): every encoder and
  decoder layer is modulated per channel by the embedding (see models/conditioning);
  z alone feeds the decoder, so the condition reaches it only through modulation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condgen.models.base import BatchDraws, OptStep, condition_from_batch
from condgen.models.conditioning import BLOCKS
from condgen.models.conditioning.conv_stack import CondConvStack
from condgen.models.conditioning.embedding import ConditionEmbedding
from condgen.models.configs import CVAEConfig


def _gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) summed over latent dims, (B,)."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(-1)


class CVAE(nn.Module):
    def __init__(self, config: CVAEConfig):
        super().__init__()
        self.config = cfg = config
        self.draws = BatchDraws()
        if cfg.prior not in ("standard", "learned"):
            raise ValueError(f"prior must be 'standard' or 'learned', got {cfg.prior!r}")
        if cfg.block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {cfg.block!r}")
        if cfg.image_size % 2 ** len(cfg.channels):  # the decoder mirrors the halvings: they must be exact
            raise ValueError(f"image_size {cfg.image_size} is not divisible by 2^{len(cfg.channels)} "
                             f"(channels={cfg.channels})")
        self.cond = ConditionEmbedding(cfg.condition, cfg.num_classes, cfg.text_dim, cfg.cond_dim)
        self.feat = cfg.image_size // 2 ** len(cfg.channels)
        flat = cfg.channels[-1] * self.feat * self.feat
        dec_channels = list(reversed(cfg.channels[:-1])) + [cfg.channels[0]]
        if cfg.block == "concat":
            enc, c_in = [], cfg.in_channels + cfg.cond_dim
            for c_out in cfg.channels:
                enc += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.GroupNorm(min(4, c_out), c_out), nn.SiLU()]
                c_in = c_out
            self.encoder = nn.Sequential(*enc)
            self.to_stats = nn.Linear(flat, 2 * cfg.latent_dim)
            self.from_z = nn.Linear(cfg.latent_dim + cfg.cond_dim, flat)
            dec, c_in = [], cfg.channels[-1]
            for c_out in dec_channels:
                dec += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.GroupNorm(min(4, c_out), c_out), nn.SiLU()]
                c_in = c_out
            dec += [nn.Conv2d(c_in, cfg.in_channels, 3, 1, 1)]
            self.decoder = nn.Sequential(*dec)
        else:
            # Modulated variant: the condition acts on every layer instead of the inputs.
            self.encoder = CondConvStack(cfg.in_channels, cfg.channels, cfg.cond_dim, cfg.block, transpose=False)
            self.to_stats = nn.Linear(self.encoder.out_channels * self.feat * self.feat, 2 * cfg.latent_dim)
            self.from_z = nn.Linear(cfg.latent_dim, flat)
            self.decoder = CondConvStack(cfg.channels[-1], dec_channels, cfg.cond_dim, cfg.block, transpose=True)
            self.to_out = nn.Conv2d(self.decoder.out_channels, cfg.in_channels, 3, 1, 1)
        if cfg.prior == "learned":
            # p(z|c): mean and log-variance from the condition embedding, initialised at N(0, I).
            self.prior_net = nn.Linear(cfg.cond_dim, 2 * cfg.latent_dim)
            nn.init.zeros_(self.prior_net.weight)
            nn.init.zeros_(self.prior_net.bias)

    # -- pieces -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Q(z|X,c): (B,C,H,W), cond -> mu, logvar (B, latent)."""
        e = self.cond(c)  # (B, cond_dim)
        if self.config.block == "concat":
            h = torch.cat([x, e[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])], 1)
            h = self.encoder(h)
        else:
            h = self.encoder(x, e)  # (B, C_last, feat, feat)
        mu, logvar = self.to_stats(h.flatten(1)).chunk(2, -1)
        return mu, logvar.clamp(-10, 10)

    def decode_logits(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """P(X|z,c) as Bernoulli logits over pixels in [0, 1], (B, C, H, W)."""
        e = self.cond(c)  # (B, cond_dim)
        if self.config.block == "concat":
            h = self.from_z(torch.cat([z, e], -1))
            h = h.view(-1, self.config.channels[-1], self.feat, self.feat)
            return self.decoder(h)
        h = self.from_z(z).view(-1, self.config.channels[-1], self.feat, self.feat)
        return self.to_out(self.decoder(h, e))

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z, c)) * 2 - 1  # [-1, 1]

    def prior(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z|c) parameters (mu, logvar), (B, latent)."""
        b, d = c.shape[0], self.config.latent_dim
        if self.config.prior == "standard":
            zeros = torch.zeros(b, d, device=c.device)
            return zeros, zeros
        mu, logvar = self.prior_net(self.cond(c)).chunk(2, -1)
        return mu, logvar.clamp(-6, 4)

    # -- training -----------------------------------------------------------------------
    def loss(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Negative ELBO per image (nats): BCE reconstruction + beta * KL(q(z|x,c) || p(z|c))."""
        mu, logvar = self.encode(x, c)
        # reparameterisation trick; eps drawn for the global batch (BatchDraws): the same for any worker count
        eps = self.draws.take("eps", mu.shape[0], lambda n: torch.randn_like(mu.new_empty((n, *mu.shape[1:]))))
        z = mu + eps * (0.5 * logvar).exp()
        logits = self.decode_logits(z, c)
        target = (x + 1) / 2
        rec = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(-1)
        kl = _gaussian_kl(mu, logvar, *self.prior(c))
        loss = (rec + self.config.beta * kl).mean()
        return loss, {"loss": loss.item(), "rec": rec.mean().item(), "kl": kl.mean().item()}

    def optimizer_groups(self):
        return {"main": self.parameters()}

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        loss, logs = self.loss(batch["x"], condition_from_batch(batch, self.config.condition))
        opt_step("main", loss)
        return logs

    # -- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ p(z|c), x = mean of P(X|z,c); (B, C, H, W) in [-1, 1]."""
        mu, logvar = self.prior(cond)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        return self.decode(mu + eps * (0.5 * logvar).exp(), cond)

    @torch.no_grad()
    def latent_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """N(0, I) latents for exploration tools, (n, latent)."""
        return torch.randn(n, self.config.latent_dim, generator=generator)


def bits_per_dim(nll_nats: float, config: CVAEConfig) -> float:
    return nll_nats / (math.log(2) * config.in_channels * config.image_size**2)
