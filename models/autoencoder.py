"""The first stage of latent diffusion: a convolutional autoencoder with a KL or VQ latent.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", §3.1
and App. G (seed 004 "Latent Diffusion Modeling"): an encoder E downsamples an image
x (H, W, C) by a factor f to z = E(x) (H/f, W/f, c), a decoder D maps back, and one of
two mild regularisers keeps the latent space well behaved for the diffusion model:

    KL-reg.:  L = L_rec + beta * L_KL(q(z | x) || N(0, I))        (Kingma & Welling 2014)
    VQ-reg.:  L = L_rec + L_VQ                                     (van den Oord et al. 2017, Eq. 3)
              L_VQ = ||sg[z_e] - e||^2 + commitment * ||z_e - sg[e]||^2, straight-through gradient

each optionally + lambda * L_GAN with a patch discriminator and the adaptive weight of
Esser et al. 2021 ("Taming Transformers", VQGAN, Eq. 7):

    lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta),   G_L = the decoder's last layer,

so the adversarial gradient reaching the decoder is never larger than the reconstruction's.

For MNIST, 28 x 28 x 1 -> 7 x 7 x 4 with f = 4 (``channels`` has one entry per halving),
which Rombach et al. find the sweet spot (LDM-4, §4.1) between compression and detail.

Latents for diffusion: ``encode`` returns the KL posterior *mean* (deterministic, so
latents precomputed once equal latents computed on the fly) and, for VQ, the
*pre-quantisation* z_e; ``decode`` quantises first, i.e. the VQ layer is "absorbed by
the decoder" (Rombach et al. 2022, §3.1). The running std of encoded latents is kept in
a buffer (``latent_std``) so a latent diffusion model can rescale them to unit variance
(their "scale_factor", App. G) from the checkpoint alone, identically on every worker.

Model contract (models/base.py): ``optimizer_groups`` ({"ae"}, plus {"disc"} with the
GAN term), ``train_step``, and ``sample`` raising NotImplementedError: an autoencoder is
not a conditional generator (tasks/training/driver.py's sample grid skips it).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from condgen.models.adversarial import frozen, hinge_d_loss, hinge_g_loss
from condgen.models.base import OptStep
from condgen.models.configs import AutoencoderConfig


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class _ResBlock(nn.Module):
    """GN-SiLU-conv, GN-SiLU-conv, residual (the LDM autoencoder's ResnetBlock without time input)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _gn(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _gn(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, out, H/f, W/f): conv, [res, stride-2 conv] per level, res, GN-SiLU-conv."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c_prev = channels[0]
        for c in channels:
            blocks += [_ResBlock(c_prev, c), nn.Conv2d(c, c, 3, stride=2, padding=1)]
            c_prev = c
        self.blocks = nn.Sequential(*blocks)
        self.mid = _ResBlock(c_prev, c_prev)
        self.norm_out, self.conv_out = _gn(c_prev), nn.Conv2d(c_prev, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.blocks(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, c, H/f, W/f) -> (B, C, H, W): conv, res, [nearest-upsample to the encoder's size, conv, res]
    per level, GN-SiLU-conv. Upsampling to exact sizes handles 7 -> 14 -> 28 and odd sizes alike."""

    def __init__(self, latent_channels: int, channels: tuple[int, ...], out_channels: int, sizes: list[int]):
        super().__init__()
        self.sizes = sizes  # output size of each up level, e.g. [14, 28]
        self.conv_in = nn.Conv2d(latent_channels, channels[-1], 3, padding=1)
        self.mid = _ResBlock(channels[-1], channels[-1])
        self.up_convs, self.blocks = nn.ModuleList(), nn.ModuleList()
        c_prev = channels[-1]
        for c in reversed(channels):
            self.up_convs.append(nn.Conv2d(c_prev, c_prev, 3, padding=1))
            self.blocks.append(_ResBlock(c_prev, c))
            c_prev = c
        self.norm_out, self.conv_out = _gn(c_prev), nn.Conv2d(c_prev, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for size, up, block in zip(self.sizes, self.up_convs, self.blocks):
            h = block(up(F.interpolate(h, size=(size, size), mode="nearest")))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W), unbounded: clamp for images


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with the straight-through estimator (van den Oord et al. 2017, §3.1-3.2).

    z_e (B, c, h, w) -> z_q (B, c, h, w) with z_q = e_k, k = argmin_j ||z_e - e_j||; the forward value is
    z_q, the gradient passes to z_e unchanged: z_e + sg[z_q - z_e].
    """

    def __init__(self, codebook_size: int, dim: int, commitment: float):
        super().__init__()
        self.commitment = commitment
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1 / codebook_size, 1 / codebook_size)  # as the VQ-VAE reference

    def indices(self, z_e: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) -> int64 (B, h, w) codebook indices."""
        b, c, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, c)  # (BHW, c)
        e = self.codebook.weight  # (K, c)
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]  # ||z - e||^2, (BHW, K)
        return d.argmin(1).view(b, h, w)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return self.codebook(idx).permute(0, 3, 1, 2)  # (B, c, h, w)

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q with straight-through gradient, L_VQ, indices)."""
        idx = self.indices(z_e)
        z_q = self.lookup(idx)
        loss = F.mse_loss(z_q, z_e.detach()) + self.commitment * F.mse_loss(z_e, z_q.detach())  # Eq. 3
        return z_e + (z_q - z_e).detach(), loss, idx


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017) as in VQGAN: (B, C, H, W) -> (B, 1, H', W') logits."""

    def __init__(self, in_channels: int, channels: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        c_prev = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_prev, c, 4, 2, 1), nn.Identity() if i == 0 else _gn(c), nn.LeakyReLU(0.2)]
            c_prev = c
        layers.append(nn.Conv2d(c_prev, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AELoss(NamedTuple):
    total: torch.Tensor  # L_rec + regulariser (the GAN term is added in train_step)
    rec: torch.Tensor  # L_rec
    x_hat: torch.Tensor  # (B, C, H, W) reconstruction, unclamped
    z: torch.Tensor  # (B, c, h, w) what encode(x) returns (detached)
    logs: dict[str, float]


class Autoencoder(nn.Module):
    GENERATOR = False  # a component: trained and checkpointed, not judged as a generator (models.base)

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c = self.config = config
        if c.regularization not in ("kl", "vq"):
            raise ValueError(f"regularization must be 'kl' or 'vq', got {c.regularization!r}")
        if c.rec_loss not in ("mse", "l1"):
            raise ValueError(f"rec_loss must be 'mse' or 'l1', got {c.rec_loss!r}")
        if not c.channels:
            raise ValueError("channels must name at least one level")
        sizes, s = [], c.image_size
        for _ in c.channels:
            sizes.append(s)
            s = -(-s // 2)
        zc = c.latent_channels
        self.encoder = Encoder(c.in_channels, c.channels, 2 * zc if c.regularization == "kl" else zc)
        self.decoder = Decoder(zc, c.channels, c.in_channels, sizes[::-1])
        self.quantizer = VectorQuantizer(c.codebook_size, zc, c.commitment) if c.regularization == "vq" else None
        self.disc = PatchDiscriminator(c.in_channels, c.disc_channels) if c.gan_weight > 0 else None
        # step counter (gan_start, EMA debiasing) and EMA of E[z], E[z^2] of encode(x): persistent,
        # so a checkpoint carries the latent scale the diffusion stage needs.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("latent_moments", torch.zeros(2))

    # -- the two maps ----------------------------------------------------------------------
    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KL posterior q(z | x) = N(mean, exp(logvar)): (B, c, h, w) each."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as LDM's DiagonalGaussianDistribution

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> z (B, c, H/f, W/f): the KL posterior mean, or VQ's pre-quantisation z_e."""
        if self.quantizer is not None:
            return self.encoder(x)
        return self._moments(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, c, h, w) -> x_hat (B, C, H, W), unclamped; a VQ model quantises z first."""
        if self.quantizer is not None:
            z = self.quantizer.lookup(self.quantizer.indices(z))
        return self.decoder(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)).clamp(-1, 1)

    @property
    def latent_std(self) -> torch.Tensor:
        """Running std of ``encode(x)`` over training (EMA, bias-corrected); 1 before any step."""
        n = int(self.step)
        if n == 0:
            return torch.ones((), device=self.latent_moments.device)
        debias = 1 - self.config.latent_momentum**n
        mean, sq = self.latent_moments / debias
        return (sq - mean**2).clamp_min(1e-12).sqrt()

    # -- training ------------------------------------------------------------------------------
    def _rec(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x_hat, x) if self.config.rec_loss == "mse" else F.l1_loss(x_hat, x)

    def loss(self, x: torch.Tensor) -> AELoss:
        """L_rec + the KL or VQ regulariser (no GAN term: that needs D, see ``train_step``)."""
        c, logs = self.config, {}
        if self.quantizer is None:
            mean, logvar = self._moments(x)
            z_enc = mean
            z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)  # reparameterised z ~ q(z | x)
            # KL(N(mean, var) || N(0, I)) summed over the latent, per pixel of the image (so beta is scale-free).
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean() / x[0].numel()
            reg = c.beta * kl
            logs["kl"] = kl.item()
        else:
            z_enc = self.encoder(x)
            z, reg, idx = self.quantizer(z_enc)
            counts = torch.bincount(idx.flatten(), minlength=c.codebook_size).float()
            p = counts / counts.sum()
            logs["vq"] = reg.item()
            logs["perplexity"] = float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))  # effective codes in use
        x_hat = self.decoder(z)
        rec = self._rec(x_hat, x)
        logs.update(rec=rec.item(), mse=F.mse_loss(x_hat.detach(), x).item())
        return AELoss(rec + reg, rec, x_hat, z_enc.detach(), logs)

    @torch.no_grad()
    def _track_latents(self, z: torch.Tensor) -> None:
        m = self.config.latent_momentum
        stats = torch.stack([z.float().mean(), z.float().pow(2).mean()])
        self.latent_moments.mul_(m).add_((1 - m) * stats)

    def adaptive_weight(self, rec: torch.Tensor, g: torch.Tensor, delta: float = 1e-4) -> torch.Tensor:
        """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta) (Esser et al. 2021, Eq. 7),
        clipped to [0, 1e4] and detached, times ``gan_weight``."""
        last = self.decoder.conv_out.weight
        (g_rec,) = torch.autograd.grad(rec, last, retain_graph=True)
        (g_gan,) = torch.autograd.grad(g, last, retain_graph=True)
        lam = g_rec.norm() / (g_gan.norm() + delta)
        return self.config.gan_weight * lam.clamp(0.0, 1e4).detach()

    def optimizer_groups(self):
        ae = [p for n, p in self.named_parameters() if not n.startswith("disc.")]
        groups = {"ae": ae}
        if self.disc is not None:
            groups["disc"] = list(self.disc.parameters())
        return groups

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        x = batch["x"]
        self.step += 1
        loss, rec, x_hat, z, logs = self.loss(x)
        self._track_latents(z)
        gan_on = self.disc is not None and int(self.step) > self.config.gan_start
        if gan_on:
            with frozen(self.disc):  # G's step: no gradient into D's weights
                g = hinge_g_loss(self.disc(x_hat))
            lam = self.adaptive_weight(rec, g)
            loss = loss + lam * g
            logs.update(g_loss=g.item(), gan_lambda=lam.item())
        opt_step("ae", loss)
        if self.disc is not None:
            # D trains from gan_start too (taming's disc_factor); before that a zero loss keeps the
            # contract of one opt_step per group and leaves D unchanged (Adam with zero gradients).
            d = hinge_d_loss(self.disc(x), self.disc(x_hat.detach()))
            opt_step("disc", d * float(gan_on))
            logs["d_loss"] = d.item()
        logs["loss"] = loss.item()
        return logs

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError("an autoencoder is not a conditional generator: use encode/decode/reconstruct, "
                                  "or train a latent_diffusion model on its latents")
