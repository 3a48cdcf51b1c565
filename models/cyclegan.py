"""CycleGAN: unpaired image-to-image translation.

Zhu et al. 2017, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks" (seed 003). Two generators G: A -> B and F: B -> A, two
discriminators D_B (on B images) and D_A (on A images), and

    L(G, F, D_A, D_B) = L_GAN(G, D_B) + L_GAN(F, D_A) + lambda_cyc * L_cyc(G, F) [+ lambda_id * L_id]
    L_cyc = E_a ||F(G(a)) - a||_1 + E_b ||G(F(b)) - b||_1
    L_id  = E_b ||G(b) - b||_1 + E_a ||F(a) - a||_1   (optional; keeps colours/intensity)

with the least-squares GAN loss (Mao et al. 2017) of the paper. The paper's history
buffer of past fakes (Shrivastava et al. 2017) is left out: it is training state
outside the state_dict, and on 28x28 digits D trains stably without it.
Batches carry ``x`` (domain A) and ``x_b`` (domain B), unpaired, same shape.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import l1_loss  # not `F`: F is the paper's B -> A generator

from condgen.models.adversarial import frozen, lsgan_d_loss, lsgan_g_loss
from condgen.models.base import OptStep
from condgen.models.configs import CycleGANConfig
from condgen.models.pix2pix import PatchDiscriminator


def _inorm(c: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(c, affine=True)  # per-image statistics, as in the paper


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), _inorm(c), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), _inorm(c))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


class ResnetGenerator(nn.Module):
    """(B, C, H, W) -> (B, C, H, W) in [-1, 1]: stem, downsample, residual blocks, upsample.

    No U-Net skips, unlike pix2pix: with unpaired data a skip lets G copy its input and
    satisfy the cycle loss trivially.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], n_res: int, image_size: int):
        super().__init__()
        if image_size % 2 ** (len(channels) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(channels) - 1}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 7, 1, 3), _inorm(channels[0]), nn.ReLU()]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), _inorm(c_out), nn.ReLU()]
        layers += [ResidualBlock(channels[-1]) for _ in range(n_res)]
        for c_in, c_out in zip(reversed(channels[1:]), reversed(channels[:-1])):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), _inorm(c_out), nn.ReLU()]
        layers += [nn.Conv2d(channels[0], in_channels, 7, 1, 3), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CycleGAN(nn.Module):
    def __init__(self, config: CycleGANConfig):
        super().__init__()
        self.config = cfg = config
        self.G = ResnetGenerator(cfg.in_channels, cfg.channels, cfg.n_res, cfg.image_size)  # A -> B
        self.F = ResnetGenerator(cfg.in_channels, cfg.channels, cfg.n_res, cfg.image_size)  # B -> A
        self.D_A = PatchDiscriminator(cfg.in_channels, cfg.disc_channels)
        self.D_B = PatchDiscriminator(cfg.in_channels, cfg.disc_channels)

    def condition_image(self, x: torch.Tensor) -> torch.Tensor:
        """The condition of ``sample`` for a domain-A image is the image itself."""
        return x

    def translate(self, x: torch.Tensor, direction: str = "a2b") -> torch.Tensor:
        """G(x) for "a2b", F(x) for "b2a"; (B, C, H, W) in [-1, 1], differentiable."""
        if direction == "a2b":
            return self.G(x)
        if direction == "b2a":
            return self.F(x)
        raise ValueError(f"direction must be 'a2b' or 'b2a', got {direction!r}")

    def optimizer_groups(self):
        return {
            "disc": [*self.D_A.parameters(), *self.D_B.parameters()],
            "gen": [*self.G.parameters(), *self.F.parameters()],
        }

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        if "x_b" not in batch:
            raise KeyError("CycleGAN needs unpaired domain-B images 'x_b' beside domain-A images 'x'")
        cfg = self.config
        a, b = batch["x"], batch["x_b"]
        fake_b, fake_a = self.G(a), self.F(b)  # (B, C, H, W) each

        d_loss = lsgan_d_loss(self.D_B(b), self.D_B(fake_b.detach())) + lsgan_d_loss(self.D_A(a), self.D_A(fake_a.detach()))
        opt_step("disc", d_loss)

        with frozen(self.D_A, self.D_B):
            adv = lsgan_g_loss(self.D_B(fake_b)) + lsgan_g_loss(self.D_A(fake_a))
        cyc = l1_loss(self.F(fake_b), a) + l1_loss(self.G(fake_a), b)
        g_loss = adv + cfg.lambda_cyc * cyc
        logs = {}
        if cfg.lambda_id > 0:
            idt = l1_loss(self.G(b), b) + l1_loss(self.F(a), a)
            g_loss = g_loss + cfg.lambda_id * idt
            logs["identity"] = idt.item()
        opt_step("gen", g_loss)
        return {"d_loss": d_loss.item(), "g_loss": g_loss.item(), "g_adv": adv.item(), "cycle": cyc.item(), **logs}

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """G(cond): a domain-A image translated to domain B, (B, C, H, W) in [-1, 1].
        Deterministic; ``generator`` is accepted for the model contract and unused."""
        return self.G(cond)
