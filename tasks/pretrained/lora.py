"""peft LoRA adapters on a pretrained pipeline's U-Net (and optionally its text encoder).

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": W x + (alpha / r) B A x
with A (r, d_in), B (d_out, r), B = 0 at the start, so the adapted pipeline starts as the base.
The targets are the attention projections diffusers' own LoRA scripts train
(``train_text_to_image_lora.py``: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``; CLIP's
``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).

An adapter folder is the same two files as condgen's own adapters (``tasks.io.model_store``:
``adapter.safetensors`` + ``adapter.json``), so registering, reading and downloading it go
through the same functions; ``adapter.json`` has ``"kind": "pretrained-lora"``, the rank,
alpha, targets, and the base's URI and fingerprint, and the tensors are named
``unet.<peft key>`` / ``text_encoder.<peft key>``.

Several adapters can live in one loaded base under different names (peft's adapter names):
``apply_adapter`` adds one without touching the base weights, ``activate`` picks the one a
request names (or none), which is what a multi-adapter replica needs.
"""
from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from condgen.tasks.io import storage
from condgen.tasks.io.model_store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
from condgen.tasks.pretrained.base import Pretrained

KIND = "pretrained-lora"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PARTS = ("unet", "text_encoder")


def settings(rank: int, alpha: float | None, train_text_encoder: bool, base: Pretrained,
             unet_targets: list[str] | None = None) -> dict[str, Any]:
    """The JSON half of an adapter: what ``inject`` needs to rebuild the same layers on the same base
    (``unet_targets``: peft target module names, default the attention projections)."""
    return {"kind": KIND, "rank": int(rank), "alpha": float(alpha if alpha is not None else rank),
            "targets": {"unet": list(unet_targets or UNET_TARGETS), "text_encoder": list(TEXT_TARGETS) if train_text_encoder else []},
            "base": base.uri, "base_fingerprint": base.fingerprint}


def inject(p: Pretrained, cfg: dict[str, Any], name: str = "default") -> list[torch.nn.Parameter]:
    """Add LoRA layers named ``name`` to the parts ``cfg["targets"]`` lists; returns their parameters (B = 0:
    the output is unchanged until they train). The base weights stay frozen."""
    params: list[torch.nn.Parameter] = []
    for part in PARTS:
        targets = cfg["targets"].get(part) or []
        if not targets:
            continue
        module = getattr(p, part)
        lora_cfg = LoraConfig(r=int(cfg["rank"]), lora_alpha=float(cfg["alpha"]), target_modules=list(targets),
                              init_lora_weights=True)
        inject_adapter_in_model(lora_cfg, module, adapter_name=name)
        params += [prm for n, prm in module.named_parameters() if "lora_" in n and f".{name}." in n]
    for prm in params:
        prm.requires_grad_(True)
    return params


def state_dict(p: Pretrained, cfg: dict[str, Any], name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors, ``<part>.<peft key>``, detached on the CPU in float32."""
    out = {}
    for part in PARTS:
        if cfg["targets"].get(part):
            sd = get_peft_model_state_dict(getattr(p, part), adapter_name=name)
            out.update({f"{part}.{k}": v.detach().float().cpu().contiguous() for k, v in sd.items()})
    return out


def load_state_dict(p: Pretrained, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy adapter tensors into the LoRA layers named ``name``; every adapter tensor must find its layer."""
    for part in PARTS:
        if not cfg["targets"].get(part):
            continue
        prefix = f"{part}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(getattr(p, part), sd, adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter tensors {unexpected[:3]} match no layer of the base's {part}: wrong base?")


def save(uri: str, p: Pretrained, cfg: dict[str, Any], name: str = "default",
         tensors: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``adapter.safetensors`` + ``adapter.json`` to a storage folder (each write atomic)."""
    tensors = tensors if tensors is not None else state_dict(p, cfg, name)
    storage.write_bytes(storage.join(uri, ADAPTER_WEIGHTS), st_save(tensors))
    storage.write_json(storage.join(uri, ADAPTER_CONFIG), cfg)
    return uri


def read(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, settings) of a pretrained-pipeline adapter from a storage folder or ``models:/NAME@alias``;
    ValueError for any other adapter."""
    tensors, cfg = read_adapter(uri)
    if cfg.get("kind") != KIND:
        raise ValueError(f"{uri} is not a pretrained-pipeline LoRA adapter (adapter.json kind={cfg.get('kind')!r})")
    return tensors, cfg


def require_base(p: Pretrained, cfg: dict[str, Any], uri: str) -> None:
    """ValueError when the adapter's ``base_fingerprint`` names another base than ``p``."""
    if cfg.get("base_fingerprint") not in (None, p.fingerprint):
        raise ValueError(f"{uri} was trained on base {cfg['base_fingerprint']}, this base is {p.fingerprint}: "
                         "load the base it names in adapter.json")


def install(p: Pretrained, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], name: str) -> None:
    """Add already-read adapter tensors to the loaded base under ``name`` (no I/O, the base weights untouched)
    and make it the active adapter; every LoRA weight stays frozen."""
    inject(p, cfg, name)
    load_state_dict(p, cfg, tensors, name)
    activate(p, name)
    for part in PARTS:
        getattr(p, part).requires_grad_(False)  # peft's set_adapter marks the active adapter trainable


def apply_adapter(p: Pretrained, uri: str, name: str = "default", *, check_base: bool = True) -> dict[str, Any]:
    """Add the adapter at ``uri`` to the loaded base under ``name`` and make it the active one; the base
    weights are never changed, so ``activate(p, None)`` gives the base back. Returns its settings."""
    tensors, cfg = read(uri)
    if check_base:
        require_base(p, cfg, uri)
    install(p, tensors, cfg, name)
    return cfg


def remove(p: Pretrained, name: str) -> None:
    """Delete adapter ``name``'s LoRA tensors from every layer of the base (an evicted adapter frees its
    memory); the remaining adapters and the base are untouched. Call ``activate`` before the next use."""
    for part in PARTS:
        for module in getattr(p, part).modules():
            if isinstance(module, BaseTunerLayer) and name in module.lora_A:
                module.delete_adapter(name)


def activate(p: Pretrained, name: str | None) -> None:
    """Route every LoRA layer of the base through adapter ``name``, or through none (the base) for None."""
    for part in PARTS:
        for module in getattr(p, part).modules():
            if isinstance(module, BaseTunerLayer):
                if name is None or name not in module.lora_A:
                    module.enable_adapters(False)
                else:
                    module.enable_adapters(True)
                    module.set_adapter(name)


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Adapter tensors from safetensors bytes (a checkpoint's ``adapter.safetensors``)."""
    return st_load(data)
