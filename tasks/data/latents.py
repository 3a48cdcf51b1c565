"""Autoencoder latents for latent diffusion: precompute once per autoencoder, read from any storage URI.

* ``precompute_latents(shards_uri, autoencoder)``: encode every sample of every shard with a
  frozen ``models.autoencoder.Autoencoder`` and write side-car tars of ``{key}.latent.npy``
  (raw, unscaled ``encode(x)``, float32 (c, h, w)) under
  ``{shards}/latents/{fingerprint[:16]}/``, with a ``manifest.json``. The fingerprint is
  ``tasks.checkpoint.state_fingerprint`` of the autoencoder, so a retrained autoencoder
  gets a new folder and never reads stale latents; shards whose side-car exists for the
  same source sha256 are skipped (the layout and resume logic of ``tasks.embed``).
* ``load_latents`` / ``load_latent_split``: latents aligned to sample keys, for loops that
  feed ``LatentDiffusion.train_step`` batches with ``z`` (it then skips the encoder).
* ``*_config`` helpers: a model config dict built from a frozen component's checkpoint
  (its architecture copied from the checkpoint's config.json, so its channels and image size
  are those of the data it was trained on). The component itself, on
  any URI ``tasks.io.storage`` reads (``s3://``, ``file://``, paths), is loaded and handed
  to the model by ``tasks.io.model_store.attach_frozen_parts`` (``models.base.FrozenPart``).
  The training driver fills the rest from the shard manifest (``num_classes``; a super-resolution
  stage's ``in_channels`` / ``image_size``) and checks the part against the data before Ray starts
  (``tasks.training.data_config.fit_to_data``), so these helpers never repeat channels, size or classes.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from condgen.models.autoencoder import Autoencoder
from condgen.models.base import config_to_dict
from condgen.tasks.data.sidecars import (
    LATENT_MEMBER,
    finished_shards,
    is_up_to_date,
    latents_uri,
    source_shards,
    write_latents,
)
from condgen.tasks.data.splits import load_arrays
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io import storage
from condgen.tasks.io.images import from_uint8
from condgen.tasks.io.model_store import load_trained
from condgen.tasks.io.shards import MANIFEST, decode_png, read_samples

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


# -- configs from frozen components' checkpoints ---------------------------------------------------
def checkpoint_meta(uri: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join(uri, ckpt_io.CONFIG)))


def _expect(meta: dict[str, Any], uri: str, *names: str) -> None:
    if meta.get("model") not in names:
        raise ValueError(f"{uri} holds a {meta.get('model')!r} checkpoint, expected one of {names}")


def latent_diffusion_config(autoencoder_uri: str, **overrides: Any) -> dict[str, Any]:
    """A ``latent_diffusion`` config dict for the autoencoder checkpoint at ``autoencoder_uri``."""
    meta = checkpoint_meta(autoencoder_uri)
    _expect(meta, autoencoder_uri, "autoencoder")
    return {"autoencoder_uri": autoencoder_uri, "autoencoder": meta["config"], **overrides}


def controlnet_config(base_uri: str, **overrides: Any) -> dict[str, Any]:
    """A ``controlnet`` config dict for the ``diffusion`` checkpoint at ``base_uri``."""
    meta = checkpoint_meta(base_uri)
    _expect(meta, base_uri, "diffusion")
    return {"base_uri": base_uri, "base": meta["config"], **overrides}


def superres_config(base_uri: str, **overrides: Any) -> dict[str, Any]:
    """A ``superres`` config dict with the checkpoint at ``base_uri`` (any registered model) embedded as its base."""
    meta = checkpoint_meta(base_uri)
    return {"base_model": meta["model"], "base_uri": base_uri, "base_config": meta["config"], **overrides}


def load_autoencoder(uri: str) -> Autoencoder:

    model, meta = load_trained(uri)
    if not isinstance(model, Autoencoder):
        raise ValueError(f"{uri} holds a {meta['model']!r}, not an autoencoder")
    return model


# -- precomputed latents ------------------------------------------------------------------------
@dataclass
class LatentsResult:
    uri: str  # the side-car folder
    fingerprint: str  # full sha256 of the autoencoder's weights
    latent_shape: tuple[int, ...]
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    n_samples: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def autoencoder_fingerprint(autoencoder: Autoencoder) -> str:
    return ckpt_io.state_fingerprint(autoencoder)


@torch.no_grad()
def encode_images(autoencoder: Autoencoder, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 (N, H, W) greyscale or (N, H, W, 3) RGB -> raw latents float32 (N, c, h, w) (``encode``: KL mean /
    VQ pre-quantisation). ValueError when the images' channels or size are not the autoencoder's."""
    cfg = autoencoder.config
    if len(images):
        shape = (3 if images.ndim == 4 else 1, images.shape[1], images.shape[2])
        if shape != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"images of {shape[0]} channel(s), {shape[1]}x{shape[2]} px, but the autoencoder takes "
                             f"{cfg.in_channels} channel(s), {cfg.image_size}x{cfg.image_size} px")
    autoencoder.eval()
    dev = next(autoencoder.parameters()).device
    out = [autoencoder.encode(from_uint8(images[i:i + batch_size]).to(dev)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, *autoencoder.config.latent_shape), np.float32)


def precompute_latents(shards_uri: str, autoencoder: Autoencoder | str, out_uri: str | None = None, *,
                       batch_size: int = 256) -> LatentsResult:
    """Encode every shard of ``shards_uri`` once per autoencoder; skip shards already done.

    ``autoencoder``: a model or a checkpoint URI. Serial on purpose: encoding 5,000 digits
    takes seconds on a CPU, so the Ray fan-out of ``tasks.embed`` would cost more than it saves.
    """

    t0 = time.perf_counter()
    ae = load_autoencoder(autoencoder) if isinstance(autoencoder, str) else autoencoder
    fp = autoencoder_fingerprint(ae)
    out_uri = out_uri or latents_uri(shards_uri, fp)
    source_manifest, shards = source_shards(shards_uri)
    manifest_uri = storage.join(out_uri, MANIFEST)
    done = finished_shards(out_uri, fp)

    def up_to_date(s: dict[str, Any]) -> bool:
        return is_up_to_date(done, s, out_uri)

    result = LatentsResult(uri=out_uri, fingerprint=fp, latent_shape=tuple(ae.config.latent_shape))

    def manifest() -> dict[str, Any]:
        sha = {s["name"]: s["sha256"] for s in shards}
        entries = [done[n] for n in sorted(done) if n in sha and done[n].get("source_sha256") == sha[n]]
        return {"schema_version": SCHEMA_VERSION, "kind": "autoencoder-latents", "fingerprint": fp,
                "latent_shape": list(result.latent_shape), "dtype": "float32", "member": LATENT_MEMBER,
                "autoencoder_config": config_to_dict(ae.config), "source": shards_uri,
                "source_fingerprint": source_manifest.get("source_fingerprint"),
                "complete": len(entries) == len(shards), "shards": entries}

    for s in shards:
        if up_to_date(s):
            result.skipped.append(s["name"])
            continue
        samples = read_samples(storage.join(shards_uri, s["name"]))
        images = np.stack([decode_png(x["png"]) for x in samples]) if samples else np.zeros((0, 0, 0), np.uint8)
        z = encode_images(ae, images, batch_size) if samples else np.zeros((0, *result.latent_shape), np.float32)
        sha = write_latents(storage.join(out_uri, s["name"]), [x["__key__"] for x in samples], z)
        done[s["name"]] = {"name": s["name"], "source_sha256": s["sha256"], "count": len(samples), "sha256": sha}
        result.computed.append(s["name"])
        storage.write_json(manifest_uri, manifest())  # after every shard: an interrupted run resumes here
    final = storage.dumps_json(manifest())
    if not storage.exists(manifest_uri) or storage.read_bytes(manifest_uri) != final:
        storage.write_bytes(manifest_uri, final)
    result.n_samples = sum(int(done[s["name"]]["count"]) for s in shards if s["name"] in done)
    result.seconds = time.perf_counter() - t0
    log.info("latents %s: %d computed, %d skipped, %d samples in %.1fs", out_uri, len(result.computed),
             len(result.skipped), result.n_samples, result.seconds)
    return result


def load_latent_split(shards_uri: str, split: str, fingerprint: str) -> dict[str, np.ndarray]:
    """``x`` uint8 (N, H, W), ``y`` int64 (N,), ``z`` float32 (N, c, h, w) for one split: the
    arrays the training loop reads (``tasks.train.load_arrays`` with ``latents``)."""

    return load_arrays(shards_uri, split, latents=fingerprint)
