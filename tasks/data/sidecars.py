"""Side-car shard sets: per-sample arrays computed once from a shard set and joined to it by
key — CLIP embeddings (``embeddings/<fp16>/``, members ``clip_img.npy`` + ``clip_txt.npy``)
and autoencoder latents (``latents/<fp16>/``, member ``latent.npy``). Each side-car folder has
a manifest naming the fingerprint of the model that computed it, so a reader never mixes
arrays of two models.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from condgen.tasks.io import shards, storage

IMG_MEMBER = "clip_img.npy"
TXT_MEMBER = "clip_txt.npy"
LATENT_MEMBER = "latent.npy"


def embeddings_uri(shards_uri: str, fingerprint: str) -> str:
    return storage.join(shards_uri, "embeddings", fingerprint[:16])


def latents_uri(shards_uri: str, fingerprint: str) -> str:
    return storage.join(shards_uri, "latents", fingerprint[:16])


def source_shards(shards_uri: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The source manifest and its shard entries as ``{"name", "sha256", "count"}``."""
    manifest = shards.read_manifest(shards_uri)
    return manifest, [{"name": s["name"], "sha256": s.get("sha256"), "count": s.get("n_samples")}
                      for s in manifest["shards"]]


def finished_shards(out_uri: str, fingerprint: str) -> dict[str, dict[str, Any]]:
    """The shard entries a side-car folder already holds for this model, by name (resume).
    A folder written by another model (a custom ``out_uri``) holds nothing reusable."""
    manifest_uri = storage.join(out_uri, shards.MANIFEST)
    if not storage.exists(manifest_uri):
        return {}
    old = storage.read_json(manifest_uri)
    return {e["name"]: e for e in old.get("shards", [])} if old.get("fingerprint") == fingerprint else {}


def is_up_to_date(done: dict[str, dict[str, Any]], source: dict[str, Any], out_uri: str) -> bool:
    """Whether the side-car of one source shard was computed from these very bytes and is still there."""
    entry = done.get(source["name"])
    return bool(entry and source["sha256"] and entry.get("source_sha256") == source["sha256"]
                and storage.exists(storage.join(out_uri, source["name"])))


def write_embeddings(uri: str, keys: Sequence[str], img: np.ndarray, txt: Sequence[np.ndarray]) -> str:
    """One embeddings side-car shard; returns its sha256."""
    return shards.write_tar(uri, [(k, {IMG_MEMBER: shards.npy_bytes(i), TXT_MEMBER: shards.npy_bytes(t)})
                                  for k, i, t in zip(keys, img, txt)])


def write_latents(uri: str, keys: Sequence[str], z: np.ndarray) -> str:
    """One latents side-car shard; returns its sha256."""
    return shards.write_tar(uri, [(k, {LATENT_MEMBER: shards.npy_bytes(row)}) for k, row in zip(keys, z)])


def _rows(uri: str, fingerprint: str, keys: Sequence[str], members: Sequence[str], what: str, fix: str
          ) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    manifest = shards.read_manifest(uri)
    if not manifest["fingerprint"].startswith(fingerprint):
        raise ValueError(f"{uri} holds {what} of {manifest['fingerprint'][:16]}, not {fingerprint[:16]}")
    wanted, found = set(keys), {}
    for entry in manifest["shards"]:
        for s in shards.read_samples(storage.join(uri, entry["name"])):
            if s["__key__"] in wanted:
                found[s["__key__"]] = [shards.load_npy(s[m]) for m in members]
    missing = [k for k in keys if k not in found]
    if missing:
        raise KeyError(f"{len(missing)} of {len(keys)} keys have no {what} in {uri} (e.g. {missing[:3]}); {fix}")
    return manifest, found


def load_embeddings(shards_uri: str, fingerprint: str, keys: Sequence[str], *,
                    uri: str | None = None) -> dict[str, np.ndarray]:
    """Embeddings aligned to ``keys``: ``img`` (N, D) and ``txt`` (N, n_captions, D), float32.

    ``fingerprint`` is the CLIP fingerprint (full or its first 16 hex digits). Samples with
    fewer phrasings than the most have theirs repeated cyclically to fill ``n_captions``.
    """
    uri = uri or embeddings_uri(shards_uri, fingerprint)
    manifest, found = _rows(uri, fingerprint, keys, (IMG_MEMBER, TXT_MEMBER), "embeddings",
                            "run embed() for this shard set first")
    d = int(manifest["embed_dim"])
    n_cap = max((len(found[k][1]) for k in keys), default=0)
    img = np.zeros((len(keys), d), np.float32)
    txt = np.zeros((len(keys), n_cap, d), np.float32)
    for i, k in enumerate(keys):
        img[i] = found[k][0]
        t = found[k][1]
        if len(t):
            txt[i] = t[np.arange(n_cap) % len(t)]
    return {"img": img, "txt": txt}


def load_latents(shards_uri: str, fingerprint: str, keys: Sequence[str], *, uri: str | None = None) -> np.ndarray:
    """Raw latents float32 (N, c, h, w) aligned to ``keys`` (fingerprint: full or its first 16 hex digits)."""
    uri = uri or latents_uri(shards_uri, fingerprint)
    manifest, found = _rows(uri, fingerprint, keys, (LATENT_MEMBER,), "latents",
                            "run precompute_latents for this autoencoder first")
    shape = tuple(manifest["latent_shape"])
    return np.stack([found[k][0] for k in keys]) if keys else np.zeros((0, *shape), np.float32)


# -- streaming joins (tasks/data/stream.py) ---------------------------------------------------------------
SIDECAR_KINDS = {  # kind -> (folder URI, members joined, what, the fix a missing row needs)
    "embeddings": (embeddings_uri, (TXT_MEMBER,), "CLIP embeddings", "run embed() for this shard set first"),
    "latents": (latents_uri, (LATENT_MEMBER,), "latents", "run precompute_latents for this autoencoder first"),
}


def sidecar_manifest(shards_uri: str, kind: str, fingerprint: str) -> tuple[str, dict[str, Any]]:
    """The folder and manifest of a side-car set, checked to be ``fingerprint``'s (one-line errors)."""
    folder_of, _, what, fix = SIDECAR_KINDS[kind]
    uri = folder_of(shards_uri, fingerprint)
    if not storage.exists(storage.join(uri, shards.MANIFEST)):
        raise FileNotFoundError(f"no {what} of {fingerprint[:16]} at {uri}; {fix}")
    manifest = shards.read_manifest(uri)
    if not manifest["fingerprint"].startswith(fingerprint):
        raise ValueError(f"{uri} holds {what} of {manifest['fingerprint'][:16]}, not {fingerprint[:16]}")
    return uri, manifest


class ShardJoin:
    """The side-car rows of one source shard, read alongside it and joined by ``__key__``.

    The side-car shard has the source shard's name and was written from it in the same order, so the rows
    arrive in step: ``take(key)`` reads forward to ``key``, ``drop(key)`` marks a row nobody needs (another
    split, a skipped position). A row that arrives out of order waits in ``stash`` (empty when the orders
    agree), so memory is one row, not the side-car shard. A key the side-car lacks is a one-line error
    naming it and the fix."""

    def __init__(self, folder: str, shard_name: str, kind: str):
        _, self.members, self.what, self.fix = SIDECAR_KINDS[kind]
        self.uri = storage.join(folder, shard_name)
        if not storage.exists(self.uri):
            raise FileNotFoundError(f"{self.uri} is missing (the {self.what} of shard {shard_name}); {self.fix}")
        self._rows = shards.iter_samples(self.uri)
        self.stash: dict[str, dict[str, Any]] = {}
        self._dropped: set[str] = set()

    def take(self, key: str) -> dict[str, bytes]:
        row = self.stash.pop(key, None)
        if row is None:
            for row in self._rows:
                if row["__key__"] == key:
                    break
                if row["__key__"] in self._dropped:
                    self._dropped.discard(row["__key__"])
                    continue
                self.stash[row["__key__"]] = row
            else:
                row = None
            if row is None:
                raise KeyError(f"sample {key!r} has no {self.what} in {self.uri} (side-car missing, stale or "
                               f"incomplete); {self.fix}")
        missing = [m for m in self.members if m not in row]
        if missing:
            raise KeyError(f"sample {key!r} in {self.uri} has no {missing}; {self.fix}")
        return {m: row[m] for m in self.members}

    def drop(self, key: str) -> None:
        if self.stash.pop(key, None) is None:
            self._dropped.add(key)

    def close(self) -> None:
        self._rows.close()
