"""The judge classifier: a small CNN trained on a labelled shard set's own labels, the judge
for conditional accuracy and the feature extractor for the domain FID and KID (Fréchet
distance, Heusel et al. 2017, and kernel distance, Bińkowski et al. 2018, on its
penultimate layer, with domain features in place of Inception's).

Any number of channels (``in_channels``: 1 greyscale, 3 RGB) and classes, any image size
(the convolutions end in an adaptive pool to a 3x3 grid). ``tasks.judging.evaluate.get_judge``
fills both from the shard set's manifest. The class was called ``DigitClassifier`` when the
data were digits; that name stays as an alias (checkpoints name the registry key
``"classifier"``, so old ones load either way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condgen.models.base import OptStep
from condgen.models.configs import ClassifierConfig


class JudgeClassifier(nn.Module):
    GENERATOR = False  # a component: trained and checkpointed, not judged as a generator (models.base)

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = cfg = config
        layers, c_in = [], cfg.in_channels
        for c_out in cfg.channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 9, cfg.feature_dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images in [-1, 1]."""
        return self.fc(self.pool(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes) logits

    def optimizer_groups(self):
        return {"main": self.parameters()}

    def train_step(self, batch: dict[str, torch.Tensor], opt_step: OptStep) -> dict[str, float]:
        x = batch["x"]
        # Small random shifts: the judge must not be fooled by a pixel offset in samples.
        dx, dy = torch.randint(-2, 3, (2,)).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        logits = self(x)
        loss = F.cross_entropy(logits, batch["y"])
        opt_step("main", loss)
        return {"loss": loss.item(), "acc": (logits.argmax(-1) == batch["y"]).float().mean().item()}


DigitClassifier = JudgeClassifier  # the name of the digits era (same class)
