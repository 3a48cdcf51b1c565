"""VAE latents and text embeddings of a captioned shard set, computed once per (encoder fingerprint,
dtype) and reused by every fine-tune of any adapter on that base (SimpleTuner's cached latents and
text embeddings; diffusers' ``train_text_to_image_lora.py`` recomputes them every step).

The latents cache holds the VAE posterior's mean and standard deviation (already times
``scaling_factor``), so a training step still draws z = mean + std * n (the same distribution as
encoding on the fly) at no encoder cost. The text cache holds the hidden states of every distinct
caption and of the empty prompt (the null condition of classifier-free guidance). Both are one
safetensors file in ``<shards>/pretrained/``, named by the encoder's fingerprint, the dtype and
(latents) the image size, with the shards' sha256 digest in its metadata: a changed shard set
is recomputed, never silently mixed.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from condgen.tasks.data.splits import load_split
from condgen.tasks.io import storage
from condgen.tasks.io.images import from_uint8
from condgen.tasks.io.shards import read_manifest
from condgen.tasks.pretrained.base import Pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_digest(shards_uri: str) -> str:
    """sha256 of the manifest's shard names and digests: the identity of the data a cache was built from."""
    manifest = read_manifest(shards_uri)
    rows = [[s.get("name"), s.get("sha256")] if isinstance(s, dict) else s for s in manifest.get("shards", [])]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def latents_uri(shards_uri: str, p: Pretrained, dtype: str, size: int) -> str:
    return storage.join(shards_uri, "pretrained", f"latents-{p.fingerprints['vae']}-{dtype}-{size}px.safetensors")


def text_uri(shards_uri: str, p: Pretrained, dtype: str) -> str:
    fp = hashlib.sha256((p.fingerprints["text_encoder"] + p.fingerprints["tokenizer"]).encode()).hexdigest()[:16]
    return storage.join(shards_uri, "pretrained", f"text-{fp}-{dtype}.safetensors")


def images(arrays: dict[str, Any], size: int) -> torch.Tensor:
    """Shard images (N, H, W[, 3]) uint8 -> (N, 3, size, size) in [-1, 1] (greyscale repeated to RGB,
    resized bilinearly with antialiasing when the set's size differs)."""
    x = from_uint8(arrays["x"])
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _read(uri: str, digest: str) -> dict[str, torch.Tensor] | None:
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    return st_load(data) if meta.get("source") == digest else None


def _write(uri: str, tensors: dict[str, torch.Tensor], digest: str, extra: dict[str, str]) -> None:
    storage.write_bytes(uri, st_save({k: v.contiguous() for k, v in tensors.items()},
                                     metadata={"source": digest, **extra}))


def latents(p: Pretrained, shards_uri: str, *, size: int, dtype: str = "float32", split: str = "train",
            batch_size: int = 16) -> tuple[str, bool]:
    """(cache URI, reused) of the posterior mean/std of every ``split`` image at ``size`` pixels."""
    uri, digest = latents_uri(shards_uri, p, dtype, size), source_digest(shards_uri) + split
    if _read(uri, digest) is not None:
        return uri, True
    x = images(load_split(shards_uri, split, keys=("x",)), size)
    means, stds = [], []
    with torch.no_grad():
        device = next(p.vae.parameters()).device
        for i in range(0, len(x), batch_size):
            dist = p.vae.encode(x[i:i + batch_size].to(device, p.vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu() * p.latent_scale)
            stds.append(dist.std.float().cpu() * p.latent_scale)
    _write(uri, {"mean": torch.cat(means).to(DTYPES[dtype]), "std": torch.cat(stds).to(DTYPES[dtype])}, digest,
           {"vae": p.fingerprints["vae"], "size": str(size)})
    return uri, False


def text(p: Pretrained, shards_uri: str, *, dtype: str = "float32", split: str = "train",
         batch_size: int = 64) -> tuple[str, bool]:
    """(cache URI, reused) of the text hidden states: ``emb`` (U, L, D) of the U distinct captions, ``index``
    (N,) each sample's row in ``emb``, ``null`` (1, L, D) of the empty prompt, ``ids`` (U, L) the tokens."""
    uri, digest = text_uri(shards_uri, p, dtype), source_digest(shards_uri) + split
    if _read(uri, digest) is not None:
        return uri, True
    captions = [str(c) for c in load_split(shards_uri, split, keys=("caption",))["caption"]]
    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    index = torch.tensor([row[c] for c in captions], dtype=torch.long)
    tok = p.tokenizer(unique + [""], padding="max_length", max_length=p.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
    device = next(p.text_encoder.parameters()).device
    with torch.no_grad():
        hidden = torch.cat([p.text_encoder(tok[i:i + batch_size].to(device))[0].float().cpu()
                            for i in range(0, len(tok), batch_size)])
    _write(uri, {"emb": hidden[:-1].to(DTYPES[dtype]), "null": hidden[-1:].to(DTYPES[dtype]), "index": index,
                 "ids": tok[:-1], "null_ids": tok[-1:]}, digest,
           {"text_encoder": p.fingerprints["text_encoder"], "captions": json.dumps(unique)})
    return uri, False


def read(uri: str) -> dict[str, torch.Tensor]:
    """A cache file's tensors."""
    return st_load(storage.read_bytes(uri))
