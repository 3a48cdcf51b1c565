"""Streaming reads of one split of a shard set: what a rank reads of an epoch, in what order, with its
side-car arrays joined by key, holding a bounded number of samples whatever the size of the set.

The pieces, each a small function of its inputs (so an epoch is a pure function of seed, epoch and rank):

* ``build_index``: per shard, how many samples of the split it holds (only the labelled ones for a
  label-conditioned model), from the manifest's per-shard ``split_counts`` / ``labelled_split_counts`` when
  the ingest wrote them, else from one scan of the tars' ``json`` / ``cls`` members (no image decoding).
* ``shard_order``: the shards' order in epoch ``e`` (a permutation seeded by ``(seed, e)``); the split's
  samples in that order are the epoch's stream of positions ``0 .. n-1``.
* ``BufferShuffle``: a shuffle buffer over positions (webdataset's ``shuffle(bufsize)``, the buffer
  MosaicML Streaming and tf.data also use): the output order is computed from integers alone, so a
  resume can skip ``k`` samples without reading or decoding them, and the reader holds only the samples
  the buffer holds.
* ``read_span`` / ``shuffled_span``: the raw (undecoded) samples of positions ``[start, stop)`` in buffer
  order; only the shards that overlap the span are opened, each streamed member by member
  (``shards.iter_samples``: ``file://`` or ``s3://``, never a whole download), with side-car rows joined
  by key (``sidecars.ShardJoin``). With ``keep`` a reader yields only some of the buffer's draws and drops
  the others' raw members undecoded: how a rank takes its slice of each global batch.
* Two ways to share an epoch between ranks (``SHARDINGS``; the loader's ``stream_sharding``):
  ``"global"`` (the default): every rank runs the same buffer over the whole epoch ``[0, steps x G)``
  (seeded by ``(seed, e)``), global step ``k`` is draws ``k*G .. k*G+G-1`` and rank ``r`` keeps the slice
  ``BatchPlan.rank_slice(r)`` of them, the slice ``memory_batches`` gives it; a rank reads the whole
  epoch's tar members (sequential reads are cheap) but decodes only its own samples, so step ``k`` sees
  the same ``G`` samples in the same order for any worker count (issue #17). ``"span"``: rank ``r`` reads
  only its contiguous span (``batching.rank_span``) and shuffles it with a buffer of its own, opening only
  the shards the span overlaps (for IO-bound clusters); a step's samples then change with the worker
  count, and so does the optimisation.
* ``decode_sample``: PNG and ``.npy`` members to arrays (``shards.decode_png`` / ``load_npy``), run by the
  loader's threads (``tasks/training/loader.py``, which also owns batching and prefetch).
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from condgen.tasks.data.sidecars import LATENT_MEMBER, TXT_MEMBER, ShardJoin, sidecar_manifest
from condgen.tasks.io import shards, storage

KEEP_MEMBERS = ("png", "cls")  # what a training sample needs of a source sample (json is read and dropped)
SHARDINGS = ("global", "span")  # how ranks share an epoch's stream (module docstring); the first is the default


@dataclass(frozen=True)
class SplitIndex:
    """How many samples of ``split`` each shard of a set holds (labelled ones only with ``labelled_only``)."""

    shards_uri: str
    split: str
    labelled_only: bool
    names: tuple[str, ...]
    counts: tuple[int, ...]
    source: str  # "manifest" or "scan": where the counts came from

    @property
    def total(self) -> int:
        return int(sum(self.counts))


def keeps(sample: dict[str, Any], split: str, labelled_only: bool) -> bool:
    """Whether a raw source sample belongs to the stream: its split, and a label when one is required."""
    if split != "all" and json.loads(sample["json"])["split"] != split:
        return False
    return not labelled_only or int(sample["cls"]) >= 0


def build_index(shards_uri: str, split: str = "train", *, labelled_only: bool = False,
                manifest: dict[str, Any] | None = None) -> SplitIndex:
    """The per-shard counts of ``split`` (module docstring): the manifest's when it has them, else a scan."""
    manifest = manifest if manifest is not None else shards.read_manifest(shards_uri)
    entries = manifest["shards"]
    names = tuple(e["name"] for e in entries)
    # A set without caption-only samples has its labelled counts equal to its split counts.
    key = "labelled_split_counts" if labelled_only and manifest.get("n_unlabelled", 1) else "split_counts"
    if split == "all" and key == "split_counts" and all("n_samples" in e for e in entries):
        return SplitIndex(shards_uri, split, labelled_only, names, tuple(int(e["n_samples"]) for e in entries),
                          "manifest")
    if all(key in e for e in entries):
        counts = [sum(e[key].values()) if split == "all" else int(e[key].get(split, 0)) for e in entries]
        return SplitIndex(shards_uri, split, labelled_only, names, tuple(counts), "manifest")
    counts = [sum(keeps(s, split, labelled_only) for s in shards.iter_samples(storage.join(shards_uri, n)))
              for n in names]
    return SplitIndex(shards_uri, split, labelled_only, names, tuple(counts), "scan")


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the shards in ``epoch``: the same on every rank, a new one every epoch."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n_shards)


def shard_spans(index: SplitIndex, order: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(shard, first position, end position)`` of each shard in the epoch's stream, in stream order."""
    out, pos = [], 0
    for i in order:
        out.append((int(i), pos, pos + index.counts[i]))
        pos += index.counts[i]
    return out


def shards_overlapping(index: SplitIndex, order: Sequence[int], start: int, stop: int) -> list[int]:
    """The shards a rank whose span is ``[start, stop)`` opens."""
    return [i for i, a, b in shard_spans(index, order) if a < stop and b > start and a < b]


class BufferShuffle:
    """Positions ``start .. stop-1`` through a shuffle buffer of ``size``: keep ``size`` positions, emit a
    random one, refill from the stream; the rest in random order at the end. A function of integers and
    ``rng`` only, so the order is known without the data, and ``buf`` + ``ptr`` say which positions are
    still to come (what a resumed reader must read)."""

    def __init__(self, start: int, stop: int, size: int, rng: np.random.Generator):
        self.ptr, self.stop, self.size, self.rng = start, stop, max(1, size), rng
        self.buf: list[int] = []
        self._u: np.ndarray = np.empty(0)
        self._i = 0

    def _uniform(self) -> float:
        if self._i == len(self._u):
            self._u, self._i = self.rng.random(4096), 0  # drawn in blocks: the order depends on rng only
        self._i += 1
        return float(self._u[self._i - 1])

    def __iter__(self) -> BufferShuffle:
        return self

    def __next__(self) -> int:
        while self.ptr < self.stop and len(self.buf) < self.size:
            self.buf.append(self.ptr)
            self.ptr += 1
        if not self.buf:
            raise StopIteration
        i = int(self._uniform() * len(self.buf))
        q, self.buf[i] = self.buf[i], self.buf[-1]
        self.buf.pop()
        return q


class LiveCount:
    """Samples read and not yet handed to the trainer (raw in the buffer, decoded in the prefetch queue):
    the count that bounds a streaming loader's memory. Thread-safe; ``peak`` is its maximum."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.now += n
            self.peak = max(self.peak, self.now)


@dataclass(frozen=True)
class Sidecars:
    """The side-car folders a stream joins: ``{"embeddings": folder, "latents": folder}`` (either optional)."""

    folders: dict[str, str]

    @classmethod
    def open(cls, shards_uri: str, embeddings: str | None, latents: str | None) -> Sidecars:
        fps = {"embeddings": embeddings, "latents": latents}
        return cls({kind: sidecar_manifest(shards_uri, kind, fp)[0] for kind, fp in fps.items() if fp})


def read_span(index: SplitIndex, order: Sequence[int], start: int, stop: int, sidecars: Sidecars,
              needed: Callable[[int], bool] = lambda p: True) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(position, raw sample)`` for the positions in ``[start, stop)`` that ``needed`` accepts, in stream
    order, with side-car members joined; other samples are passed over undecoded."""
    for i, a, b in shard_spans(index, order):
        if b <= start or a >= stop or a == b:
            continue
        name = index.names[i]
        joins = [ShardJoin(folder, name, kind) for kind, folder in sidecars.folders.items()]
        rows = shards.iter_samples(storage.join(index.shards_uri, name))
        pos = a
        try:
            for s in rows:
                key = s["__key__"]
                if not keeps(s, index.split, index.labelled_only):
                    for j in joins:
                        j.drop(key)
                    continue
                p, pos = pos, pos + 1
                if p >= stop:
                    break
                if p < start or not needed(p):
                    for j in joins:
                        j.drop(key)
                    continue
                raw = {"__key__": key, **{m: s[m] for m in KEEP_MEMBERS}}
                for j in joins:
                    raw.update(j.take(key))
                yield p, raw
        finally:
            rows.close()
            for j in joins:
                j.close()
        if pos != b and pos < stop:
            raise ValueError(f"shard {name} holds {pos - a} {index.split} samples, the index says {b - a}; "
                             f"re-ingest {index.shards_uri} (its manifest does not match its shards)")


def shuffled_span(index: SplitIndex, order: Sequence[int], start: int, stop: int, buffer: int,
                  rng: np.random.Generator, sidecars: Sidecars, *, skip: int = 0,
                  live: LiveCount | None = None, keep: Callable[[int], bool] | None = None
                  ) -> Iterator[dict[str, Any]]:
    """The raw samples of positions ``[start, stop)`` in ``BufferShuffle`` order, without the first ``skip``.

    The skipped samples' positions are drawn from the buffer and never read: reading starts at the first
    position still to come (a shard wholly before it is not opened) and keeps only those positions.
    ``keep(t)`` (``t``: the draw's number from 0, the skipped ones counted) says which draws are yielded; a
    draw not kept is dropped, popped if already read, else passed over when the reader reaches it. The
    samples held (``live``) are those the buffer holds: at most ``buffer`` + 1."""
    order_ = BufferShuffle(start, stop, buffer, rng)
    for _ in range(skip):
        next(order_, None)
    pending, ptr = frozenset(order_.buf), order_.ptr
    first = min(pending, default=ptr)
    dropped: set[int] = set()  # drawn, not kept, not yet read: the reader passes over them

    def needed(p: int) -> bool:
        if p in dropped:
            dropped.discard(p)
            return False
        return p >= ptr or p in pending

    reader = read_span(index, order, first, stop, sidecars, needed)
    store: dict[int, dict[str, Any]] = {}
    try:
        for t, q in enumerate(order_, start=skip):
            if keep is not None and not keep(t):
                if store.pop(q, None) is None:
                    dropped.add(q)
                elif live is not None:
                    live.add(-1)
                continue
            while q not in store:
                p, raw = next(reader)
                store[p] = raw
                if live is not None:
                    live.add(1)
            yield store.pop(q)
    finally:
        reader.close()


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw sample's arrays: ``x`` uint8 (H, W) or (H, W, 3), ``y`` int, ``txt`` (n_phrasings, D) float32
    and ``z`` float32 when the side-cars were joined."""
    out: dict[str, Any] = {"key": raw["__key__"], "x": shards.decode_png(raw["png"]), "y": int(raw["cls"])}
    if TXT_MEMBER in raw:
        out["txt"] = shards.load_npy(raw[TXT_MEMBER]).astype(np.float32)
    if LATENT_MEMBER in raw:
        out["z"] = shards.load_npy(raw[LATENT_MEMBER]).astype(np.float32)
    return out


def head_examples(shards_uri: str, split: str, per_class: int, num_classes: int, sidecars: Sidecars,
                  max_read: int | None = None) -> list[dict[str, Any]]:
    """Up to ``per_class`` decoded labelled samples of each class from the head of ``split`` (manifest order),
    looking at most at ``max_read`` samples of the split (default ``max(1000, 20 x per_class x classes)``)."""
    budget = max_read or max(1000, 20 * per_class * max(num_classes, 1))
    have: dict[int, int] = {}
    out: list[dict[str, Any]] = []
    for name in (e["name"] for e in shards.read_manifest(shards_uri)["shards"]):
        joins = [ShardJoin(folder, name, kind) for kind, folder in sidecars.folders.items()]
        rows = shards.iter_samples(storage.join(shards_uri, name))
        try:
            for s in rows:
                full = num_classes and len(have) >= num_classes and min(have.values()) >= per_class
                if budget <= 0 or full:
                    return out
                wanted = keeps(s, split, True)
                budget -= wanted
                if not wanted or have.get(int(s["cls"]), 0) >= per_class:
                    for j in joins:
                        j.drop(s["__key__"])
                    continue
                raw = {"__key__": s["__key__"], **{m: s[m] for m in KEEP_MEMBERS}}
                for j in joins:
                    raw.update(j.take(s["__key__"]))
                out.append(decode_sample(raw))
                have[out[-1]["y"]] = have.get(out[-1]["y"], 0) + 1
        finally:
            rows.close()
            for j in joins:
                j.close()
    return out
