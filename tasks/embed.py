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
(``tasks.storage.open_write``) and the manifest is rewritten after every finished
shard, so an interrupted run resumes where it stopped. A shard is skipped when its
side-car exists and its manifest entry records the same source sha256 (from the source
manifest): re-running computes nothing, a new model (fingerprint) gets a new folder,
a re-ingested shard is recomputed.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from PIL import Image

from tasks import storage
from tasks.clip import ClipHandle, load_clip, save_clip

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
IMG_MEMBER = "clip_img.npy"
TXT_MEMBER = "clip_txt.npy"


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


def embeddings_uri(shards_uri: str, fingerprint: str) -> str:
    return storage.join(shards_uri, "embeddings", fingerprint[:16])


def _source_shards(shards_uri: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The source manifest and its shard entries as ``{"name", "sha256", "count"}``."""
    manifest = storage.read_json(storage.join(shards_uri, MANIFEST))
    out = []
    for s in manifest["shards"]:  # tasks.ingest writes {"name", "n_samples", "sha256"}
        out.append({"name": s["name"], "sha256": s.get("sha256"), "count": s.get("n_samples")})
    return manifest, out


# -- reading / writing shards ------------------------------------------------------------------
def read_samples(uri: str) -> list[dict[str, Any]]:
    """All samples of one WebDataset tar (``__key__`` + raw member bytes by extension)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with storage.open_read(uri) as f:
        return list(group_by_keys({**m, "__url__": uri} for m in tar_file_iterator(f)))


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.uint8)


def _captions(sample: dict[str, Any]) -> list[str]:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    caps = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
    return [str(c) for c in caps]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def embed_samples(handle: ClipHandle, samples: Sequence[dict[str, Any]], batch_size: int = 256
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(N, D) float16 image rows and per-sample (n_i, D) float16 caption rows."""
    images = np.stack([_decode_png(s["png"]) for s in samples])  # (N, 28, 28) uint8
    img = handle.encode_images(images, batch_size=batch_size).numpy()
    caps = [_captions(s) for s in samples]
    unique = list(dict.fromkeys(c for cs in caps for c in cs))  # captions repeat a lot: encode each once
    row = {c: i for i, c in enumerate(unique)}
    txt_u = handle.encode_texts(unique, batch_size=max(batch_size, 256)).numpy() if unique else \
        np.zeros((0, handle.embed_dim), np.float32)
    txt = [txt_u[[row[c] for c in cs]].astype(np.float16) if cs else np.zeros((0, handle.embed_dim), np.float16)
           for cs in caps]
    return img.astype(np.float16), txt


def write_sidecar(uri: str, keys: Sequence[str], img: np.ndarray, txt: Sequence[np.ndarray]) -> str:
    """Atomically write a side-car tar; returns its sha256 (deterministic: mtime 0, sorted members)."""
    import hashlib
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, i_row, t_rows in zip(keys, img, txt):
            for member, arr in ((IMG_MEMBER, i_row), (TXT_MEMBER, t_rows)):
                data = _npy(np.ascontiguousarray(arr))
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    storage.write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


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
    sha = write_sidecar(dst_uri, [s["__key__"] for s in samples], img, txt)
    return {"count": len(samples), "sha256": sha, "n_captions": max((len(t) for t in txt), default=0),
            "seconds": time.perf_counter() - t0}


# -- the map over shards ---------------------------------------------------------------------
def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)


def embed(shards_uri: str, clip_spec_or_handle: str | ClipHandle = "embedded", out_uri: str | None = None, *,
          batch_size: int = 256, num_workers: int = 2, progress: bool = True,
          fit_kwargs: dict[str, Any] | None = None) -> EmbedResult:
    """Embed every shard of ``shards_uri`` with a CLIP (spec or handle); skip what is up to date.

    ``clip_spec_or_handle``: anything :func:`tasks.clip.load_clip` takes; ``"embedded"``
    fits (or reuses) the default CLIP on this shard set's train split (``fit_kwargs``).
    Returns an :class:`EmbedResult`; ``computed`` / ``skipped`` list shard names.
    """
    t0 = time.perf_counter()
    handle = load_clip(clip_spec_or_handle, data_uri=shards_uri, **(fit_kwargs or {}))
    fp = handle.fingerprint
    out_uri = out_uri or embeddings_uri(shards_uri, fp)
    source_manifest, shards = _source_shards(shards_uri)
    manifest_uri = storage.join(out_uri, MANIFEST)

    done: dict[str, dict[str, Any]] = {}
    if storage.exists(manifest_uri):
        old = storage.read_json(manifest_uri)
        if old.get("fingerprint") == fp:  # another model's side-cars (custom out_uri) are all stale
            done = {e["name"]: e for e in old.get("shards", [])}

    clip_uri = handle.source
    if clip_uri is None:  # in-memory model: store it beside its embeddings so they stay reproducible
        clip_uri = storage.join(out_uri, "clip")
        if not storage.exists(storage.join(clip_uri, "config.json")):
            save_clip(handle, clip_uri)

    def up_to_date(s: dict[str, Any]) -> bool:
        e = done.get(s["name"])
        return bool(e and e.get("source_sha256") == s["sha256"] and s["sha256"]
                    and storage.exists(storage.join(out_uri, s["name"])))

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
        import ray
        from tqdm.auto import tqdm

        _ensure_ray()
        payload_ref = ray.put(handle.to_payload())
        remote = ray.remote(num_cpus=1, max_retries=2)(embed_shard)
        queue = list(todo)
        running: dict[Any, dict[str, Any]] = {}
        bar = tqdm(total=len(todo), desc=f"embed {fp[:8]}", unit="shard", disable=not progress)
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


def load_embeddings(shards_uri: str, fingerprint: str, keys: Sequence[str], *,
                    uri: str | None = None) -> dict[str, np.ndarray]:
    """Embeddings aligned to ``keys``: ``img`` (N, D) and ``txt`` (N, n_captions, D), float32.

    ``fingerprint`` is the CLIP fingerprint (full or its first 16 hex digits). Samples with
    fewer phrasings than the most have theirs repeated cyclically to fill ``n_captions``.
    """
    uri = uri or embeddings_uri(shards_uri, fingerprint)
    manifest = storage.read_json(storage.join(uri, MANIFEST))
    if not manifest["fingerprint"].startswith(fingerprint):
        raise ValueError(f"{uri} holds embeddings of CLIP {manifest['fingerprint'][:16]}, not {fingerprint[:16]}")
    wanted = set(keys)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for entry in manifest["shards"]:
        for s in read_samples(storage.join(uri, entry["name"])):
            if s["__key__"] in wanted:
                found[s["__key__"]] = (np.load(io.BytesIO(s[IMG_MEMBER])), np.load(io.BytesIO(s[TXT_MEMBER])))
    missing = [k for k in keys if k not in found]
    if missing:
        raise KeyError(f"{len(missing)} of {len(keys)} keys have no embeddings in {uri} (e.g. {missing[:3]}); "
                       f"run embed() for this shard set first")
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


# -- Prefect wrapper: embedding is I/O-heavy and resumable, so retrying on I/O errors is safe --------
@task(name="embed", retries=2, retry_delay_seconds=10, retry_condition_fn=storage.retry_on_io,
      cache_policy=NO_CACHE)
def embed_task(shards_uri: str, clip_spec: str = "embedded", out_uri: str | None = None, *,
               batch_size: int = 256, num_workers: int = 2, fit_kwargs: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    return embed(shards_uri, clip_spec, out_uri, batch_size=batch_size, num_workers=num_workers,
                 progress=False, fit_kwargs=fit_kwargs).to_dict()
