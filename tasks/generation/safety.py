"""A pluggable safety filter for generation: prompt checks before sampling, output checks after.

* prompt checks: ``DenyList`` (whole-word, case-insensitive patterns; from a list, a file
  given by ``CONDGEN_DENYLIST`` (one term per line, ``#`` comments), or the small default);
* output checks: ``LabelMatch`` — the judge classifier (tasks/judging/evaluate.py) must give the
  requested label at least ``min_prob`` and rank it first, so samples that do not show
  what was asked for are withheld.

``SafetyFilter`` holds any number of each (anything with ``check_prompt(text) -> str | None``
or ``check_images(x, labels) -> bool mask``) and counts what it blocked, by reason, so the
service can report it in each response and the batch flow in its manifest.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import torch

from condgen.tasks.generation.inputs import match_channels

DENYLIST_ENV = "CONDGEN_DENYLIST"
# Placeholders that keep the mechanism honest in tests and demos; a deployment ships its own list.
DEFAULT_DENY = ("forbidden", "nsfw", "gore")


class PromptCheck(Protocol):
    name: str

    def check_prompt(self, text: str) -> str | None:
        """A reason if ``text`` must be refused, else None."""


class OutputCheck(Protocol):
    name: str

    def check_images(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(B,) bool: True = keep. x (B, C, H, W) in [-1, 1]."""


class DenyList:
    name = "deny_list"

    def __init__(self, terms: Iterable[str]):
        self.terms = sorted({t.strip().lower() for t in terms if t.strip()})
        self._re = re.compile(r"\b(" + "|".join(map(re.escape, self.terms)) + r")\b", re.I) if self.terms else None

    @classmethod
    def from_env(cls) -> "DenyList":
        path = os.environ.get(DENYLIST_ENV)
        if path:
            with open(path, encoding="utf-8") as f:
                return cls(line.split("#", 1)[0] for line in f)
        return cls(DEFAULT_DENY)

    def check_prompt(self, text: str) -> str | None:
        if self._re is None or not text:
            return None
        m = self._re.search(text)
        return f"prompt contains a denied term ({m.group(1).lower()!r})" if m else None


class LabelMatch:
    """Keep a sample only if the judge classifies it as the requested label (with prob >= min_prob).

    Samples reach the judge in its own channels (``config.in_channels``, default 1): RGB samples become
    luma for a greyscale judge, greyscale ones three equal channels for a colour judge."""

    name = "label_mismatch"

    def __init__(self, judge: torch.nn.Module, min_prob: float = 0.5):
        self.judge = judge.eval()
        self.min_prob = float(min_prob)
        self.channels = int(getattr(getattr(judge, "config", None), "in_channels", 1))

    @torch.no_grad()
    def check_images(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None or labels.dtype != torch.long:
            return torch.ones(x.shape[0], dtype=torch.bool)  # nothing to match against (text prompts)
        x = match_channels(x, self.channels)  # e.g. a greyscale judge of RGB samples sees their luma
        probs = torch.softmax(self.judge(x.to(next(self.judge.parameters()).device)).float(), -1).cpu()
        labels = labels.cpu()
        ok = (probs.argmax(-1) == labels) & (probs.gather(1, labels[:, None])[:, 0] >= self.min_prob)
        return ok


@dataclass
class SafetyFilter:
    prompt_checks: list = field(default_factory=list)
    output_checks: list = field(default_factory=list)

    @classmethod
    def default(cls, judge: torch.nn.Module | None = None, min_prob: float = 0.5) -> "SafetyFilter":
        return cls([DenyList.from_env()], [LabelMatch(judge, min_prob)] if judge is not None else [])

    def check_prompts(self, texts: Sequence[str | None]) -> tuple[list[str | None], Counter]:
        """Per text: a refusal reason or None; plus counts by check name."""
        reasons: list[str | None] = []
        counts: Counter = Counter()
        for text in texts:
            reason = None
            for check in self.prompt_checks:
                reason = check.check_prompt(text or "")
                if reason:
                    counts[f"prompt:{check.name}"] += 1
                    break
            reasons.append(reason)
        return reasons, counts

    def check_outputs(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, Counter]:
        """(B,) keep mask and counts by check name (a sample counts once, for the first check failing it)."""
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        counts: Counter = Counter()
        for check in self.output_checks:
            ok = check.check_images(x, labels).cpu().bool()
            newly = keep & ~ok
            if int(newly.sum()):
                counts[f"output:{check.name}"] += int(newly.sum())
            keep &= ok
        return keep, counts
