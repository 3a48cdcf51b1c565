"""pix2pix: paired image-to-image translation with a conditional GAN.

Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks"
(seed 003): a U-Net generator (Ronneberger et al. 2015; skips carry the condition
image's high frequencies, e.g. edges, past the bottleneck) and a PatchGAN
discriminator that judges overlapping patches of the (condition, image) pair.

    G* = arg min_G max_D  L_cGAN(G, D) + lambda * E ||x - G(c)||_1

L1 fixes the global structure, the patch discriminator the local texture. The
original's dropout noise is omitted: Isola et al. report G largely ignores it, and
without it ``sample`` is a deterministic function of the condition image.

Without paired shards the condition is derived from the target on the fly
(``pairing``, ``models.paired.PAIRINGS``): ``"edges"`` (edges -> image, the default) or
``"colorize"`` (the greyscale of a colour target -> the colour image, Isola et al.'s
"automatic colorization", §4). A colorize model always derives its condition, so a batch's
own ``cond_img`` (another pairing) never reaches it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condgen.models.adversarial import bce_d_loss, bce_g_loss, frozen, sn
from condgen.models.base import OptStep
from condgen.models.configs import Pix2PixConfig
from condgen.models.paired import PAIRINGS, paired_condition


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(4, c), c)


class UNet(nn.Module):
    """(B, in_channels, H, W) -> (B, out_channels, H, W) in [-1, 1], one skip per resolution."""

    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...], image_size: int):
        super().__init__()
        if image_size % 2 ** len(channels):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(channels)}")
        self.downs = nn.ModuleList()
        c_in = in_channels
        for i, c in enumerate(channels):
            # no norm on the first layer, as in pix2pix: keep the input's own statistics
            self.downs.append(nn.Sequential(nn.Conv2d(c_in, c, 4, 2, 1), nn.Identity() if i == 0 else _gn(c), nn.LeakyReLU(0.2)))
            c_in = c
        self.mid = nn.Sequential(nn.Conv2d(c_in, c_in, 3, 1, 1), _gn(c_in), nn.ReLU())
        self.ups = nn.ModuleList()
        for i in reversed(range(len(channels))):
            c_out = channels[i - 1] if i > 0 else channels[0]
            self.ups.append(nn.Sequential(nn.ConvTranspose2d(c_in + channels[i], c_out, 4, 2, 1), _gn(c_out), nn.ReLU()))
            c_in = c_out
        self.out = nn.Conv2d(c_in + in_channels, out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, h = [x], x
        for down in self.downs:
            h = down(h)
            skips.append(h)  # (B, c_i, H / 2^(i+1), W / 2^(i+1))
        h = self.mid(h)
        for up in self.ups:
            h = up(torch.cat([h, skips.pop()], 1))
        return torch.tanh(self.out(torch.cat([h, skips.pop()], 1)))


class PatchDiscriminator(nn.Module):
    """(B, in_channels, H, W) -> (B, 1, H / 2^n, W / 2^n) real/fake logits, one per patch.

    Spectrally normalised convolutions (Miyato et al. 2018) instead of the original's
    BatchNorm: no batch dependence and a steadier D on tiny images.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...]):
        super().__init__()
        layers, c_in = [], in_channels
        for c in channels:
            layers += [sn(nn.Conv2d(c_in, c, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c_in = c
        layers += [sn(nn.Conv2d(c_in, 1, 3, 1, 1))]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Pix2Pix(nn.Module):
    def __init__(self, config: Pix2PixConfig):
        super().__init__()
        self.config = cfg = config
        if cfg.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {sorted(PAIRINGS)}, got {cfg.pairing!r}")
        if cfg.pairing == "colorize" and (cfg.in_channels, cfg.cond_channels) != (3, 1):
            raise ValueError("pairing='colorize' translates greyscale (cond_channels=1) to colour (in_channels=3); "
                             f"got in_channels={cfg.in_channels}, cond_channels={cfg.cond_channels}")
        self.G = UNet(cfg.cond_channels, cfg.in_channels, cfg.channels, cfg.image_size)
        self.D = PatchDiscriminator(cfg.cond_channels + cfg.in_channels, cfg.channels)

    def condition_image(self, x: torch.Tensor) -> torch.Tensor:
        """The condition image paired with an image when the data has none: its edge map, or (colorize) its grey."""
        return paired_condition(x, self.config.pairing)

    def translate(self, cond_img: torch.Tensor) -> torch.Tensor:
        """G(c): (B, cond_channels, H, W) -> (B, in_channels, H, W) in [-1, 1]; differentiable."""
        return self.G(cond_img)

    def optimizer_groups(self):
        return {"disc": self.D.parameters(), "gen": self.G.parameters()}

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        x = batch["x"]
        # Paired shards carry their own condition image (cond.png); otherwise (and always for colorize) derive it.
        c = batch["cond_img"] if "cond_img" in batch and self.config.pairing != "colorize" else self.condition_image(x)
        fake = self.G(c)  # (B, C, H, W)
        # D judges (condition, image) pairs: a realistic image that ignores c is still fake.
        d_loss = bce_d_loss(self.D(torch.cat([c, x], 1)), self.D(torch.cat([c, fake.detach()], 1)))
        opt_step("disc", d_loss)
        with frozen(self.D):
            adv = bce_g_loss(self.D(torch.cat([c, fake], 1)))
        l1 = F.l1_loss(fake, x)
        g_loss = adv + self.config.lambda_l1 * l1
        opt_step("gen", g_loss)
        return {"d_loss": d_loss.item(), "g_loss": g_loss.item(), "g_adv": adv.item(), "l1": l1.item()}

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """G(cond_img), (B, C, H, W) in [-1, 1]. Deterministic: ``generator`` is accepted for the
        model contract and unused (no noise input, see the module docstring)."""
        return self.G(cond)
