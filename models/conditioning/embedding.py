"""Turn a condition tensor (labels or CLIP text embeddings) into a vector.

Labels use a learned table (one extra row is the "null" condition used by
classifier-free guidance); text embeddings go through a linear projection.
"""
from __future__ import annotations

import torch
from torch import nn


class ConditionEmbedding(nn.Module):
    """c -> e(c), (B,) int64 or (B, D) float -> (B, dim).

    ``null_index`` (== num_classes) is the learned "no condition" token for labels;
    for text a learned null vector replaces rows flagged by ``drop``.
    """

    def __init__(self, condition: str, num_classes: int, text_dim: int, dim: int):
        super().__init__()
        self.condition = condition
        self.num_classes = num_classes
        if condition == "label":
            self.table = nn.Embedding(num_classes + 1, dim)
        elif condition == "text":
            self.proj = nn.Linear(text_dim, dim)
            self.null = nn.Parameter(torch.zeros(dim))
        else:
            raise ValueError(f"unknown condition kind {condition!r}")

    def forward(self, c: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if self.condition == "label":
            if c.dtype != torch.long:
                raise TypeError("label conditioning expects int64 labels")
            if drop is not None:
                c = torch.where(drop, torch.full_like(c, self.num_classes), c)
            return self.table(c)
        if c.dtype == torch.long:
            raise TypeError("text conditioning expects float embeddings, got labels")
        e = self.proj(c.float())
        if drop is not None:
            e = torch.where(drop[:, None], self.null.expand_as(e), e)
        return e

    def null_condition(self, batch: int, device: torch.device) -> torch.Tensor:
        """The condition tensor meaning "unconditional" for this embedding kind."""
        if self.condition == "label":
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        raise NotImplementedError("text null is applied through drop=, not a tensor")
