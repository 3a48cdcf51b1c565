"""The CLIP handle: one open_clip model with its tokenizer, preprocessing and identity,
built, saved and loaded without unpickling anything.

:class:`ClipHandle` gives ``encode_images`` / ``encode_texts`` (L2-normalised float32), a
differentiable ``image_tower`` for CLIP guidance, and a ``fingerprint`` (sha256 over weights
+ config) that keys precomputed embeddings (``tasks/clip/embed.py``). :func:`new_clip` builds
a randomly initialised model for a config name (``tasks/clip/configs.py``); :func:`save_clip`
writes a checkpoint folder (``model.safetensors`` + ``config.json``: model name, open_clip
model and preprocess config, embed dim, fingerprint) and :func:`load_checkpoint` reads one back
from a local path, ``file://`` or ``s3://`` URI, handing open_clip the safetensors file.
Which spec names which model (pretrained, checkpoint, registry, embedded) is
``tasks/clip/load.py``.

Images follow the project convention: uint8 (N, 28, 28), or float in [-1, 1] with
shape (N, 28, 28), (N, 1, H, W) or (N, 3, H, W). The preprocessing is open_clip's
(resize to the tower's size, grey replicated to RGB, mean/std normalisation) written
with tensor ops so that it stays differentiable (CLIP guidance). Where no resize is
needed (the 28 px test tower) it equals open_clip's PIL transform to float precision;
a resize uses torch's bicubic kernel, which differs slightly from PIL's, the same way
for every image, so embeddings stay consistent within condgen.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from condgen.tasks.clip.configs import DEFAULT_CONFIG, jsonable, localised, portable, register_configs
from condgen.tasks.io import storage

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "condgen-clip/1"


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared / non-contiguous storage: clone to plain CPU tensors.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def fingerprint_of(model_cfg: dict, preprocess_cfg: dict, state: dict[str, torch.Tensor]) -> str:
    """sha256 over the architecture + preprocessing config (canonical JSON) and every weight tensor."""
    h = hashlib.sha256()
    h.update(json.dumps({"model_cfg": jsonable(portable(model_cfg)), "preprocess_cfg": jsonable(preprocess_cfg)},
                        sort_keys=True).encode())
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.dtype == torch.bfloat16 else v.numpy().tobytes())
    return h.hexdigest()



# -- the handle ------------------------------------------------------------------------------
@dataclass(eq=False)
class ClipHandle:
    """An open_clip model with its tokenizer, preprocessing and identity."""

    model: torch.nn.Module  # open_clip.CLIP (or CustomTextCLIP)
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    model_name: str
    model_cfg: dict
    preprocess_cfg: dict
    source: str | None = None  # the spec / URI it came from; None = in memory only
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        """sha256 over weights + config; recomputed after :meth:`invalidate` (e.g. after training)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self.model_cfg, self.preprocess_cfg, self.model.state_dict())
        return self._fingerprint

    def invalidate(self) -> None:
        """Call after changing the weights: the fingerprint is recomputed and the handle no
        longer claims to be what its ``source`` holds."""
        self._fingerprint = None
        self.source = None

    # images ---------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, H, W) | (B, 1|3, H, W) -> normalised (B, 3, S, S) the tower expects."""
        if x.ndim == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        x = (x.float() + 1) / 2  # open_clip's ToTensor range [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB, as PIL's convert("RGB")
        size = self.preprocess_cfg.get("size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(x.shape[-2:]) != size:
            mode = self.preprocess_cfg.get("interpolation", "bicubic")
            x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=mode in ("bilinear", "bicubic"))
            x = x.clamp(0, 1)
        mean = torch.tensor(self.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=x.device)
        std = torch.tensor(self.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD), device=x.device)
        return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # (B, 3, S, S)

    def image_tower(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable: x in [-1, 1], (B, 1, 28, 28) -> (B, D) unit-norm image embeddings.

        Gradients flow to ``x`` (CLIP guidance) and to the weights; no ``no_grad`` here.
        """
        return self.model.encode_image(self.preprocess(x.to(self.device)), normalize=True)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """uint8 (N, 28, 28) numpy, or float [-1, 1] tensor -> (N, D) float32 L2-normalised (CPU)."""
        x = as_float_images(images)
        self.model.eval()
        out = [self.image_tower(x[i:i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    # texts ----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)  # (N, context_length) int64

    def text_tower(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
        """list[str] -> (N, D) float32 L2-normalised (CPU)."""
        texts = list(texts)
        self.model.eval()
        out = [self.text_tower(self.tokenize(texts[i:i + batch_size])).float().cpu()
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    # transport --------------------------------------------------------------------------
    def to_payload(self) -> dict[str, Any]:
        """Plain data to rebuild the handle in another process (Ray object store): JSON-able
        configs + safetensors bytes. No module is pickled."""
        return {"model_name": self.model_name, "model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg,
                "fingerprint": self.fingerprint, "source": self.source, "weights": st_save(_state_dict(self.model))}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], device: str | torch.device = "cpu") -> "ClipHandle":
        model, tokenizer = _build(payload["model_name"], payload["model_cfg"], payload["preprocess_cfg"],
                                  st_load(payload["weights"]), device)
        handle = cls(model, tokenizer, payload["model_name"], payload["model_cfg"], payload["preprocess_cfg"],
                     payload.get("source"))
        _check_fingerprint(handle, payload["fingerprint"], "payload")
        return handle


def as_float_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1]: (N, H, W) stays, RGB shard arrays (N, H, W, 3) become (N, 3, H, W); tensors keep
    their layout (they are channels-first already)."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4 and images.shape[-1] == 3:
            images = images.transpose(0, 3, 1, 2)
        if images.dtype == np.uint8:
            return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1)
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        return images.float().div(127.5).sub(1)
    return images.float()


def _check_fingerprint(handle: ClipHandle, expected: str | None, where: str) -> None:
    if expected and handle.fingerprint != expected:
        raise ValueError(f"CLIP weights from {where} do not match their recorded fingerprint "
                         f"({handle.fingerprint[:16]} != {expected[:16]}): corrupt or edited checkpoint")


def _build(model_name: str, model_cfg: dict, preprocess_cfg: dict, state: dict[str, torch.Tensor] | None,
           device: str | torch.device = "cpu"):
    """An open_clip model for ``model_cfg`` (registered under ``model_name`` or not) + its tokenizer."""
    register_configs()
    with tempfile.TemporaryDirectory(prefix="condgen-clip-") as tmp:
        weights = None
        if state is not None:
            weights = os.path.join(tmp, "open_clip_model.safetensors")
            save_file(state, weights)
        return _create(model_name, model_cfg, preprocess_cfg, weights, tmp, device)


def _create(model_name: str, model_cfg: dict, preprocess_cfg: dict, weights: str | None, tmp: str,
            device: str | torch.device):
    """open_clip.create_model_and_transforms with a safetensors file, by name when open_clip
    knows the architecture under that name, else through a ``local-dir:`` folder in ``tmp``."""
    model_cfg = localised(model_cfg)
    if jsonable(open_clip.get_model_config(model_name)) == jsonable(model_cfg):
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device,
                                                            load_weights=weights is not None)
        tokenizer = open_clip.get_tokenizer(model_name)
    else:  # an architecture open_clip does not know by this name: hand it the config file
        Path(tmp, "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                  "preprocess_cfg": preprocess_cfg}))
        if weights is not None and Path(weights).parent != Path(tmp):
            os.symlink(weights, os.path.join(tmp, "open_clip_model.safetensors"))
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp}", device=device,
                                                            load_weights=weights is not None)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    open_clip.set_model_preprocess_cfg(model, dict(preprocess_cfg))
    return model.eval(), tokenizer


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" (root logger):
    expected when we build a model to fit from scratch or to load our own weights into."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def new_clip(config: str = DEFAULT_CONFIG, *, seed: int = 0, device: str | torch.device = "cpu") -> ClipHandle:
    """A randomly initialised open_clip model for a registered config name."""
    register_configs()
    torch.manual_seed(seed)
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        model, _, _ = open_clip.create_model_and_transforms(config, device=device)
    finally:
        logging.getLogger().removeFilter(quiet)
    model_cfg = jsonable(open_clip.get_model_config(config))
    preprocess_cfg = jsonable(open_clip.get_model_preprocess_cfg(model))
    return ClipHandle(model.eval(), open_clip.get_tokenizer(config), config, model_cfg, preprocess_cfg)


# -- checkpoints --------------------------------------------------------------------------------
def fetch_file(uri: str, tmp: str) -> str:
    """A local file path for ``uri``: the file itself when local, else a download into ``tmp``."""
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        if not Path(path).exists():
            raise FileNotFoundError(uri)
        return str(path)
    dest = os.path.join(tmp, os.path.basename(uri.rstrip("/")) or "weights.safetensors")
    with storage.open_read(uri) as src, open(dest, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    return dest


def load_checkpoint(uri: str, *, device: str | torch.device = "cpu") -> ClipHandle:
    """Load a folder written by :func:`save_clip` (local path, file:// or s3://)."""
    meta = storage.read_json(storage.join(uri, CONFIG))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{uri}: not a condgen CLIP checkpoint (format={meta.get('format')!r})")
    with tempfile.TemporaryDirectory(prefix="condgen-clip-") as tmp:
        weights = fetch_file(storage.join(uri, WEIGHTS), tmp)
        model, tokenizer = _create(meta["model_name"], meta["model_cfg"], meta["preprocess_cfg"], weights, tmp, device)
    handle = ClipHandle(model, tokenizer, meta["model_name"], meta["model_cfg"], meta["preprocess_cfg"], source=uri)
    _check_fingerprint(handle, meta.get("fingerprint"), uri)
    return handle


def save_clip(handle: ClipHandle, uri: str, *, extra: dict[str, Any] | None = None) -> str:
    """Write ``{uri}/model.safetensors`` then ``{uri}/config.json`` (each atomic; the config,
    written last, marks a complete checkpoint). Returns ``uri``."""
    state = _state_dict(handle.model)
    meta = {"format": FORMAT, "model_name": handle.model_name, "embed_dim": handle.embed_dim,
            "fingerprint": fingerprint_of(handle.model_cfg, handle.preprocess_cfg, state),
            "model_cfg": portable(handle.model_cfg), "preprocess_cfg": handle.preprocess_cfg, **(extra or {})}
    storage.write_bytes(storage.join(uri, WEIGHTS), st_save(state))
    storage.write_json(storage.join(uri, CONFIG), meta)
    return uri
