"""Low-Rank Adaptation.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (seed 000):
a frozen weight W gets a trainable low-rank update, h = W x + (alpha / r) B A x with
A (r, in), B (out, r), r << min(in, out). B starts at zero, so a fresh adapter leaves
the model's outputs unchanged; only A and B train (< 1% of a layer's parameters), and
one base model can swap adapters (merge/unmerge, or the ``enabled`` switch).

For a convolution, A is a convolution with the base kernel's size, stride and padding
into r channels and B a 1x1 convolution back out, so Delta W = B A is again a kernel
of the base's shape and can be merged.

Typical use (the base checkpoint is loaded *before* injection, since the wrapped
layer's weights then live under ``<name>.base.``)::

    names = inject_lora(model, ["to_q", "to_v"], rank=4, alpha=4)
    freeze_base(model)            # only lora_A / lora_B require grad
    ...train...
    sd = lora_state_dict(model)   # adapter weights only
    load_lora_state_dict(other_model_with_same_injection, sd)
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class _LoRABase(nn.Module):
    """Shared state of a LoRA-wrapped layer: rank, scale, enabled/merged flags."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.enabled = True
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.enabled and not self.merged:
            out = out + self.scale * self._lora(x)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold (alpha/r) B A into the base weight: inference then costs nothing extra."""
        if self.merged or not self.enabled:
            return
        if not isinstance(self.base.weight, nn.Parameter):
            raise RuntimeError("cannot merge into a parametrised weight (e.g. spectral norm); use enabled instead")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter again, restoring the base weight (up to float rounding)."""
        if not self.merged:
            return
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, enabled={self.enabled}, merged={self.merged}"


class LoRALinear(_LoRABase):
    """nn.Linear(in, out) + (alpha/r) B A; x (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 4.0):
        super().__init__(base, rank, alpha)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / the LoRA reference code

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.lora_A  # (out, in)

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoRAConv2d(_LoRABase):
    """nn.Conv2d(in, out, k) + (alpha/r) B A; A: (r, in, k, k) conv, B: (out, r, 1, 1) conv."""

    def __init__(self, base: nn.Conv2d, rank: int = 4, alpha: float = 4.0):
        super().__init__(base, rank, alpha)
        if base.groups != 1:
            raise ValueError("LoRAConv2d supports groups=1 convolutions only")
        if base.padding_mode != "zeros":
            raise ValueError("LoRAConv2d supports padding_mode='zeros' only")
        w = base.weight
        kh, kw = base.kernel_size
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_channels, kh, kw, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        # B is 1x1, so composing the two convolutions is a channel mix of A's kernels.
        return self.scale * torch.einsum("or,rikl->oikl", self.lora_B[:, :, 0, 0], self.lora_A)  # (out, in, k, k)

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        h = F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)  # (B, r, H', W')
        return F.conv2d(h, self.lora_B)  # (B, out, H', W')


class LoRAConvTranspose2d(_LoRABase):
    """nn.ConvTranspose2d(in, out, k) + (alpha/r) B A (the up-sampling layers of GAN and VAE decoders).

    A is a transposed convolution in -> r with the base's kernel, stride, padding and
    output padding (weight (in, r, k, k)); B a 1x1 convolution r -> out. Their composition
    is again a transposed convolution, Delta W[i, o] = sum_r A[i, r] B[o, r], so it merges.
    """

    def __init__(self, base: nn.ConvTranspose2d, rank: int = 4, alpha: float = 4.0):
        super().__init__(base, rank, alpha)
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError("LoRAConvTranspose2d supports groups=1, padding_mode='zeros' only")
        w = base.weight  # (in, out, k, k)
        kh, kw = base.kernel_size
        self.lora_A = nn.Parameter(torch.empty(base.in_channels, rank, kh, kw, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * torch.einsum("irkl,or->iokl", self.lora_A, self.lora_B[:, :, 0, 0])  # (in, out, k, k)

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        h = F.conv_transpose2d(x, self.lora_A, None, b.stride, b.padding, b.output_padding, 1, b.dilation)
        return F.conv2d(h, self.lora_B)  # (B, out, H', W')


# Explicit map from base layer type to its adapter (no string imports). ConvTranspose2d is not a
# subclass of Conv2d, so the isinstance lookup below cannot pick the wrong adapter.
LORA_LAYERS: dict[type[nn.Module], type[_LoRABase]] = {
    nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d, nn.ConvTranspose2d: LoRAConvTranspose2d}


def _adapter_for(module: nn.Module) -> type[_LoRABase] | None:
    for base_type, lora_type in LORA_LAYERS.items():
        if isinstance(module, base_type):
            return lora_type
    return None


def _matches(name: str, module: nn.Module, targets: Iterable[str | type]) -> bool:
    for t in targets:
        if isinstance(t, str):
            # exact dotted name, or its last component(s): "to_q" matches "blocks.0.attn.to_q"
            if name == t or name.endswith("." + t):
                return True
        elif isinstance(module, t):
            return True
    return False


def lora_modules(model: nn.Module) -> dict[str, _LoRABase]:
    """Dotted name -> LoRA-wrapped layer, in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _LoRABase)}


def inject_lora(model: nn.Module, targets: Iterable[str | type], rank: int = 4, alpha: float = 4.0) -> list[str]:
    """Wrap every nn.Linear / nn.Conv2d / nn.ConvTranspose2d matching ``targets`` (names or types) in a LoRA adapter.

    Returns the dotted names of the adapted layers. Layers already wrapped, the layers
    inside a wrapper, and nn.MultiheadAttention's projections (it reads their weights
    directly, bypassing forward) are skipped. A name target that matches no supported
    layer is an error, so a typo cannot silently train nothing.
    """
    targets = list(targets)
    chosen: list[tuple[str, nn.Module]] = []
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, (_LoRABase, nn.MultiheadAttention)):
            skip_prefixes.append(name + "." if name else "")
            continue
        if name and _adapter_for(module) is not None and _matches(name, module, targets):
            chosen.append((name, module))
    for t in targets:
        if isinstance(t, str) and not any(n == t or n.endswith("." + t) for n, _ in chosen):
            raise ValueError(f"LoRA target {t!r} matches no nn.Linear / nn.Conv2d / nn.ConvTranspose2d in the model")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _adapter_for(module)(module, rank=rank, alpha=alpha))
    return [name for name, _ in chosen]


def freeze_base(model: nn.Module) -> int:
    """Make only LoRA parameters trainable; returns how many scalars still train."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for m in lora_modules(model).values():
        for p in (m.lora_A, m.lora_B):
            p.requires_grad_(True)
            n += p.numel()
    return n


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters, e.g. the one optimiser group of an adapter fine-tune."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only: ``{"<layer>.lora_A": ..., "<layer>.lora_B": ...}`` (detached clones)."""
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        sd[f"{name}.lora_A"] = m.lora_A.detach().clone()
        sd[f"{name}.lora_B"] = m.lora_B.detach().clone()
    return sd


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load adapter weights into an already-injected model (keys and shapes must match exactly).

    Merged layers are unmerged first and merged again with the new adapter, so swapping
    adapters on one base never accumulates deltas.
    """
    mods = lora_modules(model)
    expected = {f"{n}.{p}" for n in mods for p in ("lora_A", "lora_B")}
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise KeyError(f"LoRA state dict mismatch: missing={sorted(missing)} unexpected={sorted(unexpected)}")
    for name, m in mods.items():
        was_merged = m.merged
        m.unmerge()
        for p in ("lora_A", "lora_B"):
            src, dst = sd[f"{name}.{p}"], getattr(m, p)
            if src.shape != dst.shape:
                raise ValueError(f"{name}.{p}: shape {tuple(src.shape)} != {tuple(dst.shape)} (different rank?)")
            dst.copy_(src)
        if was_merged:
            m.merge()


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off = the base model); merged adapters are unmerged first."""
    for m in lora_modules(model).values():
        if not enabled:
            m.unmerge()
        m.enabled = enabled
