"""Class- and text-conditional GANs: cGAN with a projection discriminator, and AC-GAN.

* cGAN (Mirza & Osindero 2014, seeds 000-003): the generator G(z, c) and the
  discriminator both see the condition. The discriminator is the projection
  discriminator of Miyato & Koyama 2018, D(x, c) = psi(phi(x)) + <embed(c), phi(x)>,
  which works for labels and for CLIP text embeddings alike.
* AC-GAN (Odena et al. 2017, seed 000): the discriminator does not see c; it has an
  auxiliary classifier head q(c|x). On top of the adversarial loss we minimise

      - E_{p(x,c)} ln q(c|x)          (term 1, real data: trains the classifier)
      - E_{p_theta(x,c)} ln q(c|x)    (term 2, generated data: G makes easy-to-classify images)

  ``acgan_term2=False`` drops term 2, the variant the seed calls InfoGAN-style. Note
  that the generator then receives no class signal at all (the discriminator never
  sees c), so its samples are not expected to follow the label; term 2 is also what
  biases AC-GAN towards images far from class boundaries (Shu et al. 2017, "AC-GAN
  learns a biased distribution"). Here the classifier is trained on real data only
  (term 1), which keeps G and q from agreeing on features no real digit has.

Recipe (stable on 28x28 MNIST on CPU): DCGAN-style convolutions, spectral norm on
every discriminator layer (Miyato et al. 2018), hinge loss, Adam(5e-4, (0.5, 0.999)),
samples from an exponential moving average of G's weights (Yazici et al. 2019), and for
AC-GAN a translation DiffAugment (Zhao et al. 2020) of everything D sees, so that G cannot
satisfy the auxiliary classifier with features no real digit has. A new cGAN run gets the same
augmentation from ``models.registry.RECIPES`` (a few thousand images let D win early without it).
The generator uses GroupNorm, not BatchNorm, so G(z, c) of one row never depends on
the rest of the batch (batched == single; latent inversion and mapping stay pure).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from condgen.models.adversarial import diff_augment, frozen, hinge_d_loss, hinge_g_loss, sn
from condgen.models.base import BatchDraws, OptStep, condition_from_batch, ema_update
from condgen.models.conditioning import make_block
from condgen.models.conditioning.conv_stack import CondConvStack
from condgen.models.conditioning.embedding import ConditionEmbedding
from condgen.models.configs import ACGANConfig, CGANConfig


def _check_geometry(image_size: int, channels: tuple[int, ...]) -> int:
    """Spatial size after len(channels) halvings; it must be exact so the mirror restores H."""
    if image_size % 2 ** len(channels):
        raise ValueError(f"image_size {image_size} is not divisible by 2^{len(channels)} (channels={channels})")
    return image_size // 2 ** len(channels)


class Generator(nn.Module):
    """G(z, c): z (B, latent_dim), c labels (B,) or text (B, text_dim) -> (B, C, H, W) in [-1, 1].

    z is projected to a (C_last, feat, feat) map; the condition embedding enters at
    that map and after every upsampling through the configured block.
    """

    def __init__(self, cfg: CGANConfig):
        super().__init__()
        self.feat = _check_geometry(cfg.image_size, cfg.channels)
        c_last = cfg.channels[-1]
        self.cond = ConditionEmbedding(cfg.condition, cfg.num_classes, cfg.text_dim, cfg.cond_dim)
        self.from_z = nn.Linear(cfg.latent_dim, c_last * self.feat * self.feat)
        self.stem_block = make_block(cfg.block, c_last, cfg.cond_dim)
        self.stem_norm = nn.Identity() if getattr(self.stem_block, "normalizes", False) else nn.GroupNorm(min(4, c_last), c_last)
        up_channels = list(reversed(cfg.channels[:-1])) + [cfg.channels[0]]
        self.up = CondConvStack(self.stem_block.out_channels, up_channels, cfg.cond_dim, cfg.block, transpose=True, act=nn.ReLU)
        self.to_img = nn.Conv2d(self.up.out_channels, cfg.in_channels, 3, 1, 1)
        self.c_last = c_last

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        e = self.cond(c)  # (B, cond_dim)
        h = self.from_z(z).view(-1, self.c_last, self.feat, self.feat)  # (B, C_last, feat, feat)
        h = F.relu(self.stem_block(self.stem_norm(h), e))
        h = self.up(h, e)  # (B, C', H, W)
        return torch.tanh(self.to_img(h))


class DiscriminatorTrunk(nn.Module):
    """phi(x): (B, C, H, W) -> (B, C_last * feat * feat), spectrally normalised convs + LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...]):
        super().__init__()
        layers, c_in = [], in_channels
        for c_out in channels:
            layers += [sn(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


class ProjectionDiscriminator(nn.Module):
    """D(x, c) = psi(phi(x)) + <embed(c), phi(x)>, (B,) logits (Miyato & Koyama 2018)."""

    def __init__(self, cfg: CGANConfig):
        super().__init__()
        feat = _check_geometry(cfg.image_size, cfg.channels)
        flat = cfg.channels[-1] * feat * feat
        self.phi = DiscriminatorTrunk(cfg.in_channels, cfg.channels)
        self.psi = sn(nn.Linear(flat, 1))
        self.embed = ConditionEmbedding(cfg.condition, cfg.num_classes, cfg.text_dim, flat)
        if cfg.condition == "label":
            # Small rows, no spectral norm: the class term starts near 0 and grows as phi
            # becomes informative. On 5k MNIST digits, N(0, 1) rows (default) or a spectrally
            # normalised table made samples follow the label markedly slower.
            nn.init.normal_(self.embed.table.weight, std=0.02)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.phi(x)  # (B, flat)
        return self.psi(h).squeeze(-1) + (self.embed(c) * h).sum(-1)


class AuxClassifierDiscriminator(nn.Module):
    """x -> (adversarial logit (B,), class logits q(c|x) (B, num_classes)) (Odena et al. 2017)."""

    def __init__(self, cfg: CGANConfig):
        super().__init__()
        feat = _check_geometry(cfg.image_size, cfg.channels)
        flat = cfg.channels[-1] * feat * feat
        self.phi = DiscriminatorTrunk(cfg.in_channels, cfg.channels)
        self.adv = sn(nn.Linear(flat, 1))
        self.cls = nn.Linear(flat, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.phi(x)  # (B, flat)
        return self.adv(h).squeeze(-1), self.cls(h)


class _ConditionalGAN(nn.Module):
    """What cGAN and AC-GAN share: the generator (and its EMA), latents, sampling and optimiser groups."""

    config: CGANConfig
    G: Generator
    D: nn.Module

    def _init_ema(self) -> None:
        # set on the instance, not as a class attribute: nn.Module keeps submodules in
        # _modules, and a class-level None would shadow the registered copy
        self.G_ema: Generator | None = None
        self.draws = BatchDraws()  # z and DiffAugment draws of a training step: the global batch's (models.base)
        if self.config.ema_decay > 0:
            self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    @property
    def gen(self) -> Generator:
        """The generator samples come from: the EMA copy in eval mode when there is one."""
        return self.G_ema if self.G_ema is not None and not self.training else self.G

    def after_lora_injection(self) -> None:
        """Adapter training (``tasks.adapters.prepare``): the discriminator, a critic that is never
        served, trains in full; the EMA restarts as a copy of the adapted G, adapters included, so
        eval-mode samples and the saved adapter use the averaged adapter weights."""
        self.D.requires_grad_(True)
        if self.G_ema is not None:
            self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
            self.ema_updates.zero_()

    def _after_g_step(self) -> None:
        if self.G_ema is not None:  # after the all-reduced step: every worker's EMA stays identical
            ema_update(self.G_ema, self.G, self.ema_updates, self.config.ema_decay)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def generate(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x = G(z, c), (B, C, H, W) in [-1, 1]; differentiable in z (for inversion and latent maps)."""
        return self.gen(z, c)

    @torch.no_grad()
    def latent_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I), (n, latent_dim)."""
        device = next(self.parameters()).device
        return torch.randn(n, self.config.latent_dim, generator=generator, device=device)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I), x = G(z, c); (B, C, H, W) in [-1, 1]."""
        z = torch.randn(cond.shape[0], self.config.latent_dim, generator=generator, device=cond.device)
        return self.gen(z, cond)

    def optimizer_groups(self):
        return {"disc": self.D.parameters(), "gen": self.G.parameters()}

    def group_lr(self, name: str) -> float:
        """Two time-scale update rule (Heusel et al. 2017): D may learn at ``d_lr``."""
        cfg = self.config
        return cfg.d_lr if name == "disc" and cfg.d_lr is not None else cfg.lr

    def _aug(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.augment:
            return x
        dev = x.device  # each op's per-sample draws through BatchDraws: the same for any worker count

        def source(shape: tuple[int, ...]) -> torch.Tensor:
            return self.draws.take(None, shape[0], lambda n: torch.rand((n, *shape[1:]), device=dev))
        return diff_augment(x, self.config.augment, source)

    def _fake(self, c: torch.Tensor) -> torch.Tensor:
        z = self.draws.take(None, c.shape[0], lambda n: torch.randn(n, self.config.latent_dim, device=c.device))
        return self.G(z, c)  # fakes share the real batch's conditions, so classes stay balanced


class CGAN(_ConditionalGAN):
    def __init__(self, config: CGANConfig):
        super().__init__()
        self.config = config
        self.G = Generator(config)
        self.D = ProjectionDiscriminator(config)
        self._init_ema()

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        x, c = batch["x"], condition_from_batch(batch, self.config.condition)
        fake = self._fake(c)  # (B, C, H, W)
        d_real, d_fake = self.D(self._aug(x), c), self.D(self._aug(fake.detach()), c)
        d_loss = hinge_d_loss(d_real, d_fake)
        opt_step("disc", d_loss)
        with frozen(self.D):
            g_loss = hinge_g_loss(self.D(self._aug(fake), c))
        opt_step("gen", g_loss)
        self._after_g_step()
        return {
            "d_loss": d_loss.item(),
            "g_loss": g_loss.item(),
            "d_real": d_real.mean().item(),
            "d_fake": d_fake.mean().item(),
        }


class ACGAN(_ConditionalGAN):
    def __init__(self, config: ACGANConfig):
        super().__init__()
        if config.condition != "label":
            raise ValueError("AC-GAN classifies into num_classes labels; use condition='label' (or cGAN for text)")
        self.config = config
        self.G = Generator(config)
        self.D = AuxClassifierDiscriminator(config)
        self._init_ema()

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        cfg = self.config
        x, y = batch["x"], batch["y"]
        fake = self._fake(y)
        (real_adv, real_cls), (fake_adv, _) = self.D(self._aug(x)), self.D(self._aug(fake.detach()))
        term1 = F.cross_entropy(real_cls, y)  # -E_{p(x,c)} ln q(c|x)
        d_loss = hinge_d_loss(real_adv, fake_adv) + cfg.aux_weight * term1
        opt_step("disc", d_loss)
        with frozen(self.D):
            adv, cls = self.D(self._aug(fake))
            term2 = F.cross_entropy(cls, y)  # -E_{p_theta(x,c)} ln q(c|x)
            g_loss = hinge_g_loss(adv)
            if cfg.acgan_term2:
                g_loss = g_loss + cfg.aux_weight * term2
        opt_step("gen", g_loss)
        self._after_g_step()
        return {
            "d_loss": d_loss.item(),
            "g_loss": g_loss.item(),
            "term1": term1.item(),
            "term2": term2.item(),  # logged even when it does not train G
            "acc_real": (real_cls.argmax(-1) == y).float().mean().item(),
        }
