"""Precompute CLIP image/text embeddings for a shard set, as side-car shards.

``embed(shards_uri, clip)`` maps one Ray task per source shard (``num_cpus=1``, at most
``num_workers`` in flight, batched inference inside each task) and writes, for every
source ``shard-XXXXXX.tar``, a side-car tar with the same name under

    {shards_uri}/embeddings/{fingerprint[:16]}/shard-XXXXXX.tar
        <key>.clip_img.npy   (D,)            float16, unit norm before the cast
        <key>.clip_txt.npy   (n_captions, D) float16, one row per caption phrasing
    {shards_uri}/embeddings/{fingerprint[:16]}/manifest.json
    {shards_uri}/embeddings/{fingerprint[:16]}/clip/   (the CLIP, when it was only in memory)

keyed by the source samples' ``__key__``. Side-cars are written atomically
(``tasks.io.storage.open_write``) and the manifest is rewritten after every finished
shard, so an interrupted run resumes where it stopped. A shard is skipped when its
side-car exists and its manifest entry records the same source sha256 (from the source
manifest): re-running computes nothing, a new model (fingerprint) gets a new folder,
a re-ingested shard is recomputed.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import ray
import torch

from condgen.tasks.clip.handle import ClipHandle, save_clip
from condgen.tasks.clip.load import load_clip
from condgen.tasks.data.sidecars import (
    IMG_MEMBER,
    TXT_MEMBER,
    embeddings_uri,
    finished_shards,
    is_up_to_date,
    source_shards,
    write_embeddings,
)
from condgen.tasks.io import storage
from condgen.tasks.io.cluster import ensure_ray
from condgen.tasks.io.progress import progress as progress_bar
from condgen.tasks.io.shards import MANIFEST, decode_png, read_samples

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class EmbedResult:
    uri: str  # the side-car folder
    fingerprint: str  # full sha256 of the CLIP
    clip_uri: str  # a spec load_clip() accepts for the same model
    computed: list[str] = field(default_factory=list)  # shard names embedded by this call
    skipped: list[str] = field(default_factory=list)  # shard names already up to date
    n_samples: int = 0
    embed_dim: int = 0
    n_captions: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _captions(sample: dict[str, Any]) -> list[str]:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    caps = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
    return [str(c) for c in caps]


def embed_samples(handle: ClipHandle, samples: Sequence[dict[str, Any]], batch_size: int = 256
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(N, D) float16 image rows and per-sample (n_i, D) float16 caption rows."""
    images = np.stack([decode_png(s["png"]) for s in samples])  # (N, 28, 28) uint8
    img = handle.encode_images(images, batch_size=batch_size).numpy()
    caps = [_captions(s) for s in samples]
    unique = list(dict.fromkeys(c for cs in caps for c in cs))  # captions repeat a lot: encode each once
    row = {c: i for i, c in enumerate(unique)}
    txt_u = handle.encode_texts(unique, batch_size=max(batch_size, 256)).numpy() if unique else \
        np.zeros((0, handle.embed_dim), np.float32)
    txt = [txt_u[[row[c] for c in cs]].astype(np.float16) if cs else np.zeros((0, handle.embed_dim), np.float16)
           for cs in caps]
    return img.astype(np.float16), txt


# -- the per-shard task ------------------------------------------------------------------------
_HANDLES: dict[str, ClipHandle] = {}  # per worker process: build the model once, not once per shard


def _worker_handle(payload: dict[str, Any]) -> ClipHandle:
    fp = payload["fingerprint"]
    if fp not in _HANDLES:
        _HANDLES.clear()
        _HANDLES[fp] = ClipHandle.from_payload(payload)
    return _HANDLES[fp]


def embed_shard(payload: dict[str, Any] | ClipHandle, src_uri: str, dst_uri: str, batch_size: int = 256,
                threads: int | None = 1) -> dict[str, Any]:
    """Embed one source shard into its side-car; returns the manifest entry (without name/source sha)."""
    if threads:
        torch.set_num_threads(threads)  # the task holds num_cpus=1
    handle = payload if isinstance(payload, ClipHandle) else _worker_handle(payload)
    t0 = time.perf_counter()
    samples = read_samples(src_uri)
    if not samples:
        img, txt = np.zeros((0, handle.embed_dim), np.float16), []
    else:
        img, txt = embed_samples(handle, samples, batch_size)
    sha = write_embeddings(dst_uri, [s["__key__"] for s in samples], img, txt)
    return {"count": len(samples), "sha256": sha, "n_captions": max((len(t) for t in txt), default=0),
            "seconds": time.perf_counter() - t0}


# -- the map over shards ---------------------------------------------------------------------
def embed(shards_uri: str, clip_spec_or_handle: str | ClipHandle = "embedded", out_uri: str | None = None, *,
          batch_size: int = 256, num_workers: int = 2, progress: bool = True,
          fit_kwargs: dict[str, Any] | None = None) -> EmbedResult:
    """Embed every shard of ``shards_uri`` with a CLIP (spec or handle); skip what is up to date.

    ``clip_spec_or_handle``: anything :func:`tasks.clip.load.load_clip` takes; ``"embedded"``
    fits (or reuses) the default CLIP on this shard set's train split (``fit_kwargs``).
    Returns an :class:`EmbedResult`; ``computed`` / ``skipped`` list shard names.
    """
    t0 = time.perf_counter()
    handle = load_clip(clip_spec_or_handle, data_uri=shards_uri, **(fit_kwargs or {}))
    fp = handle.fingerprint
    out_uri = out_uri or embeddings_uri(shards_uri, fp)
    source_manifest, shards = source_shards(shards_uri)
    manifest_uri = storage.join(out_uri, MANIFEST)

    done = finished_shards(out_uri, fp)

    clip_uri = handle.source
    if clip_uri is None:  # in-memory model: store it beside its embeddings so they stay reproducible
        clip_uri = storage.join(out_uri, "clip")
        if not storage.exists(storage.join(clip_uri, "config.json")):
            save_clip(handle, clip_uri)

    def up_to_date(s: dict[str, Any]) -> bool:
        return is_up_to_date(done, s, out_uri)

    todo = [s for s in shards if not up_to_date(s)]
    result = EmbedResult(uri=out_uri, fingerprint=fp, clip_uri=clip_uri, embed_dim=handle.embed_dim,
                         skipped=[s["name"] for s in shards if up_to_date(s)])

    def manifest() -> dict[str, Any]:
        sha = {s["name"]: s["sha256"] for s in shards}  # stale entries (re-ingested shards) are dropped
        entries = [done[n] for n in sorted(done) if n in sha and done[n].get("source_sha256") == sha[n]]
        return {
            "schema_version": SCHEMA_VERSION, "kind": "clip-embeddings", "fingerprint": fp,
            "model_name": handle.model_name, "embed_dim": handle.embed_dim, "clip_uri": clip_uri,
            "dtype": "float16", "members": {"image": IMG_MEMBER, "text": TXT_MEMBER},
            "source": shards_uri, "source_fingerprint": source_manifest.get("source_fingerprint"),
            "complete": len(entries) == len(shards), "shards": entries,
        }

    if todo:
        ensure_ray()
        payload_ref = ray.put(handle.to_payload())
        remote = ray.remote(num_cpus=1, max_retries=2)(embed_shard)
        queue = list(todo)
        running: dict[Any, dict[str, Any]] = {}
        bar = progress_bar(total=len(todo), desc=f"embed {fp[:8]}", unit="shard", enabled=progress)
        try:
            while queue or running:
                while queue and len(running) < max(1, num_workers):  # backpressure: num_workers in flight
                    s = queue.pop(0)
                    ref = remote.remote(payload_ref, storage.join(shards_uri, s["name"]),
                                        storage.join(out_uri, s["name"]), batch_size)
                    running[ref] = s
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    s = running.pop(ref)
                    entry = ray.get(ref)
                    done[s["name"]] = {"name": s["name"], "source_sha256": s["sha256"], **entry}
                    result.computed.append(s["name"])
                    # after every shard, so an interrupted run resumes from here
                    storage.write_json(manifest_uri, manifest())
                    bar.update(1)
        finally:
            bar.close()
            for ref in running:
                ray.cancel(ref)
    final = storage.dumps_json(manifest())
    if not storage.exists(manifest_uri) or storage.read_bytes(manifest_uri) != final:
        storage.write_bytes(manifest_uri, final)  # e.g. dropped shards, first run with nothing to do

    entries = [done[s["name"]] for s in shards if s["name"] in done]
    result.n_samples = sum(int(e.get("count", 0)) for e in entries)
    result.n_captions = max((int(e.get("n_captions", 0)) for e in entries), default=0)
    result.seconds = time.perf_counter() - t0
    log.info("embed %s: %d computed, %d skipped, %d samples in %.1fs", out_uri, len(result.computed),
             len(result.skipped), result.n_samples, result.seconds)
    return result
