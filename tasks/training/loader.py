"""A worker's training data: ``open_train_data(config, rank, world, labelled_only=...)`` -> ``TrainData``.

Two ways to feed the same epochs (``tasks/training/batching.py`` defines the global batch and the epoch):

* **memory** (``data_mode="memory"``): the split is decoded once into numpy arrays (``splits.load_arrays``)
  and each step slices one permutation per epoch (``memory_batches``, exactly the batches the worker always
  took, the same for any worker count). Fastest for a set that fits: no decoding after the first read.
* **stream** (``data_mode="stream"``): nothing is held whole. The epoch's shard stream
  (``tasks/data/stream.py``, from ``file://`` or ``s3://``) goes through a shuffle buffer of
  ``stream_buffer`` raw samples; one reader thread and ``loader_threads`` decode threads (Pillow and numpy
  release the GIL) build batches ahead of the trainer, at most ``PREFETCH_BATCHES`` of them, in a fixed
  order. Memory is bounded by ``max_live``, not by the set. ``stream_sharding`` says how ranks share the
  stream: ``"global"`` (the default) runs the same buffer over the whole epoch on every rank and each rank
  keeps the slice of each global batch that ``memory_batches`` gives it, decoding only those samples, so
  1, 2 or 3 workers take the same optimisation steps (issue #17; MosaicML Streaming's global sample order
  is the same idea); ``"span"`` gives each rank a contiguous span of the stream and a buffer of its own and
  opens only the shards the span overlaps (webdataset's ``split_by_node`` + ``shuffle``): less IO per
  rank, but a step's samples, and so the model, change with the worker count.
* **auto** (the default): memory when the decoded split (images + embeddings + latents, estimated from the
  manifests) is below ``memory_limit_mb``, else stream; ``summary()`` says which and why.

Both are deterministic functions of ``(seed, epoch, rank, world)`` (and with ``"global"`` streaming the
concatenation of the ranks' batches is one worker's batch, bitwise), and ``epoch(e, skip_steps=k)`` yields
exactly the batches from step ``k`` on of ``epoch(e)`` (a mid-epoch resume), without decoding the skipped
steps' images. Per-sample random choices of a streamed step (a caption phrasing, CycleGAN's unpaired
``x_b``) are drawn by a generator seeded with ``(seed, epoch, step)`` for the whole global batch and
sliced (``"global"``), or with ``(seed, epoch, step, rank)`` for the rank's share (``"span"``), so a resume
repeats them.
"""
from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from condgen.tasks.data import stream
from condgen.tasks.data.sidecars import sidecar_manifest
from condgen.tasks.data.splits import dataset_info, load_arrays
from condgen.tasks.io import shards
from condgen.tasks.io.images import from_uint8
from condgen.tasks.training import batching

MODES = ("auto", "memory", "stream")
SHARDINGS = stream.SHARDINGS  # "global" (world-invariant, the default) or "span" (rank spans)
DEFAULTS: dict[str, Any] = {"data_mode": "auto", "stream_buffer": 2000, "loader_threads": 2, "memory_limit_mb": 512,
                            "stream_sharding": SHARDINGS[0]}
PREFETCH_BATCHES = 4  # decoded batches ready ahead of the trainer


# -- memory --------------------------------------------------------------------------------------------
def memory_batches(arrays: dict[str, np.ndarray], batch_size: int, rank: int, world: int, epoch: int, seed: int,
                   skip_steps: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Rank ``rank``'s share of each global batch of ``batch_size`` samples in ``epoch``, from step
    ``skip_steps`` on (``tasks.training.batching``: one permutation per epoch, the same on every rank; step
    k's global batch is the same set of samples for any ``world``, and rank r takes its contiguous slice).

    Every rank takes the same number of steps, so the per-step all-reduce never waits on a rank that has run
    out of data. Per-sample random choices (a caption phrasing, CycleGAN's unpaired draw) are drawn for the
    whole global batch and sliced, so they do not depend on ``world`` either; skipped steps still draw
    theirs, so a resumed epoch continues the same stream.
    """
    bp = batching.plan(len(arrays["y"]), batch_size, world)
    part = bp.rank_slice(rank)
    rng = np.random.default_rng(seed * 1000 + epoch * 10)
    for k, step_idx in enumerate(batching.epoch_steps(bp, epoch, seed)):
        pick = rng.integers(0, arrays["txt"].shape[1], len(step_idx))[part] if "txt" in arrays else None
        other = rng.integers(0, len(arrays["x_b"]), len(step_idx))[part] if "x_b" in arrays else None
        if k < skip_steps:
            continue
        idx = step_idx[part]
        batch = {"x": from_uint8(arrays["x"][idx]), "y": torch.from_numpy(arrays["y"][idx])}
        if "z" in arrays:  # precomputed autoencoder latents: latent diffusion skips its encoder
            batch["z"] = torch.from_numpy(arrays["z"][idx])
        if pick is not None:  # one random caption phrasing per sample per step: text is not a lookup table
            batch["txt"] = torch.from_numpy(arrays["txt"][idx, pick])
        if other is not None:  # unpaired second domain (CycleGAN): an independent random draw per batch
            batch["x_b"] = from_uint8(arrays["x_b"][other])
        yield batch


def labelled(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The labelled rows (``y >= 0``): what label-conditioned models and classifiers train on."""
    if (arrays["y"] >= 0).all():
        return arrays
    keep = arrays["y"] >= 0
    return {k: v[keep] for k, v in arrays.items()}


# -- the choice ----------------------------------------------------------------------------------------
def estimate_bytes(config: dict[str, Any], split: str = "train") -> tuple[int, int]:
    """``(samples, bytes)`` of the decoded split, from the manifests alone: images (H x W x C uint8), CLIP
    text embeddings (phrasings x D float32), latents (float32) and a second domain's images."""
    manifest = shards.read_manifest(config["shards_uri"])
    n = int(manifest.get("split_counts", {}).get(split, manifest.get("n_samples", 0)))
    info = dataset_info(config["shards_uri"])
    per = info["image_size"] ** 2 * info["channels"]
    if config.get("embeddings"):
        emb = sidecar_manifest(config["shards_uri"], "embeddings", config["embeddings"])[1]
        n_cap = max([int(e.get("n_captions", 1)) for e in emb.get("shards", [])] or [1])
        per += 4 * n_cap * int(emb.get("embed_dim", 0))
    if config.get("latents"):
        per += 4 * math.prod(sidecar_manifest(config["shards_uri"], "latents", config["latents"])[1]["latent_shape"])
    total = n * per
    if config.get("shards_b_uri"):
        b = shards.read_manifest(config["shards_b_uri"])
        info_b = dataset_info(config["shards_b_uri"])
        total += int(b.get("split_counts", {}).get(split, 0)) * info_b["image_size"] ** 2 * info_b["channels"]
    return n, total


def choose_mode(mode: str, estimated_bytes: int, memory_limit_mb: float) -> str:
    """``memory`` or ``stream`` for ``data_mode`` ``mode`` (``auto``: by the estimated decoded size)."""
    if mode not in MODES:
        raise ValueError(f"data_mode must be one of {MODES}, not {mode!r}")
    if mode != "auto":
        return mode
    return "memory" if estimated_bytes < memory_limit_mb * 2**20 else "stream"


def open_train_data(config: dict[str, Any], rank: int, world: int, *, labelled_only: bool) -> TrainData:
    """Rank ``rank``'s training data of ``config`` (keys in the module docstring; ``batch_size`` is the global
    batch). ``labelled_only``: skip caption-only samples (``y == -1``), as label-conditioned models do."""
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if cfg["stream_sharding"] not in SHARDINGS:
        raise ValueError(f"stream_sharding must be one of {SHARDINGS}, not {cfg['stream_sharding']!r}")
    _, estimate = estimate_bytes(cfg)
    mode = choose_mode(cfg["data_mode"], estimate, float(cfg["memory_limit_mb"]))
    kind = MemoryData if mode == "memory" else StreamData
    return kind(cfg, rank, world, labelled_only, estimate)


# -- the data ------------------------------------------------------------------------------------------
class TrainData:
    """One rank's epochs (``epoch``), the plan they follow (``plan``), examples for sample grids."""

    mode: str
    plan: batching.BatchPlan

    def __init__(self, config: dict[str, Any], rank: int, world: int, labelled_only: bool, estimate: int):
        self.config, self.rank, self.world, self.labelled_only = config, rank, world, labelled_only
        self.seed, self.batch_size, self.bytes_estimate = int(config["seed"]), int(config["batch_size"]), estimate

    def epoch(self, epoch: int, skip_steps: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def grid_examples(self, per_class: int = 8) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """What this rank reads and how (for the run's log and ``batch_plan.json``)."""
        return {"data_mode": self.mode, "requested_mode": self.config["data_mode"], "samples": self.plan.samples,
                "bytes_estimate": self.bytes_estimate, "memory_limit_mb": self.config["memory_limit_mb"],
                **self.plan.summary()}

    def _check_skip(self, skip_steps: int) -> None:
        if not 0 <= skip_steps <= self.plan.steps_per_epoch:
            raise ValueError(f"skip_steps must be in [0, {self.plan.steps_per_epoch}], not {skip_steps}")


class MemoryData(TrainData):
    """The split decoded into arrays once; batches sliced from them (``memory_batches``)."""

    mode = "memory"

    def __init__(self, config: dict[str, Any], rank: int, world: int, labelled_only: bool, estimate: int):
        super().__init__(config, rank, world, labelled_only, estimate)
        arrays = load_arrays(config["shards_uri"], "train", config.get("embeddings"), config.get("latents"))
        self.arrays = labelled(arrays) if labelled_only else arrays
        if config.get("shards_b_uri"):
            self.arrays["x_b"] = load_arrays(config["shards_b_uri"], "train")["x"]
        self.plan = batching.plan(len(self.arrays["y"]), self.batch_size, world)

    def epoch(self, epoch: int, skip_steps: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        self._check_skip(skip_steps)
        return memory_batches(self.arrays, self.batch_size, self.rank, self.world, epoch, self.seed, skip_steps)

    def grid_examples(self, per_class: int = 8) -> dict[str, np.ndarray]:
        y = self.arrays["y"]
        idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y[y >= 0])] or [np.zeros(0, int)])
        return {k: self.arrays[k][idx] for k in ("x", "y", "txt") if k in self.arrays}

    def summary(self) -> dict[str, Any]:
        n = len(shards.read_manifest(self.config["shards_uri"])["shards"])
        return {**super().summary(), "shards": n, "shards_per_rank": n, "stream_buffer": None, "loader_threads": None,
                "stream_sharding": None}


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


class StreamData(TrainData):
    """The split streamed from its shards: this rank's span of each epoch (module docstring)."""

    mode = "stream"

    def __init__(self, config: dict[str, Any], rank: int, world: int, labelled_only: bool, estimate: int):
        super().__init__(config, rank, world, labelled_only, estimate)
        self.index = stream.build_index(config["shards_uri"], "train", labelled_only=labelled_only)
        self.sidecars = stream.Sidecars.open(config["shards_uri"], config.get("embeddings"), config.get("latents"))
        # CycleGAN's second domain is drawn at random per step, not streamed: it stays in memory.
        self.x_b = load_arrays(config["shards_b_uri"], "train")["x"] if config.get("shards_b_uri") else None
        self.plan = batching.plan(self.index.total, self.batch_size, world)
        self.buffer, self.threads = int(config["stream_buffer"]), max(1, int(config["loader_threads"]))
        self.share, self.sharding = self.plan.shares[rank], config["stream_sharding"]
        self.live = stream.LiveCount()  # samples held by the last epoch's pipeline (peak: its maximum)

    @property
    def max_live(self) -> int:
        """The most samples an epoch's pipeline holds: the buffer, the batch being filled, the prefetched
        batches, one waiting to enter the queue and the one being handed over."""
        return self.buffer + 1 + (PREFETCH_BATCHES + 3) * self.share

    def _span(self, epoch: int) -> tuple[int, int, np.random.Generator]:
        """The positions ``[start, stop)`` this rank's buffer runs over in ``epoch``, and its generator: the
        whole epoch and rank 0's generator with ``"global"`` (every rank the same), the rank's own with ``"span"``."""
        if self.sharding == "global":
            return 0, self.plan.steps_per_epoch * self.plan.step_size, np.random.default_rng([self.seed, epoch, 0])
        return (*batching.rank_span(self.plan, self.rank), np.random.default_rng([self.seed, epoch, self.rank]))

    def _keep(self, draw: int) -> bool:
        """Whether the buffer's draw number ``draw`` is this rank's (``"global"``): its slice of the global batch."""
        part = self.plan.rank_slice(self.rank)
        return part.start <= draw % self.plan.step_size < part.stop

    def _collate(self, raws: list[dict[str, Any]], epoch: int, step: int) -> dict[str, torch.Tensor]:
        recs = [stream.decode_sample(r) for r in raws]
        if self.sharding == "global":  # the global batch's draws, sliced: the same for any worker count
            rng = np.random.default_rng([self.seed, epoch, step, 0, 0xCA9])
            n, part = self.plan.step_size, self.plan.rank_slice(self.rank)
        else:
            rng = np.random.default_rng([self.seed, epoch, step, self.rank, 0xCA9])
            n, part = len(recs), slice(None)
        batch = {"x": from_uint8(np.stack([r["x"] for r in recs])),
                 "y": torch.tensor([r["y"] for r in recs], dtype=torch.int64)}
        if "z" in recs[0]:
            batch["z"] = torch.from_numpy(np.stack([r["z"] for r in recs]))
        if "txt" in recs[0]:  # one phrasing per sample, uniform over that sample's own phrasings
            u = rng.random(n)[part]
            rows = [r["txt"][int(ui * len(r["txt"]))] if len(r["txt"]) else np.zeros(r["txt"].shape[1], np.float32)
                    for r, ui in zip(recs, u)]
            batch["txt"] = torch.from_numpy(np.stack(rows).astype(np.float32))
        if self.x_b is not None:
            batch["x_b"] = from_uint8(self.x_b[rng.integers(0, len(self.x_b), n)[part]])
        return batch

    def _produce(self, epoch: int, skip: int, pool: ThreadPoolExecutor, out: queue.Queue, stop: threading.Event
                 ) -> None:
        """The reader thread: raw samples in buffer order, cut into steps, each decoded by the pool."""
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        start, stop_pos, rng = self._span(epoch)
        order = stream.shard_order(len(self.index.names), self.seed, epoch)
        whole = self.sharding == "global"  # the buffer draws every rank's samples; this rank keeps its own
        raws = stream.shuffled_span(self.index, order, start, stop_pos, self.buffer, rng, self.sidecars,
                                    skip=skip * (self.plan.step_size if whole else self.share), live=self.live,
                                    keep=self._keep if whole and self.world > 1 else None)
        try:
            chunk, step = [], skip
            for raw in raws:
                chunk.append(raw)
                if len(chunk) == self.share:
                    if not put(pool.submit(self._collate, chunk, epoch, step)):
                        return
                    chunk, step = [], step + 1
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer's thread and raised there
            put(_Failure(exc))
        finally:
            raws.close()

    def epoch(self, epoch: int, skip_steps: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        self._check_skip(skip_steps)
        return self._batches(epoch, skip_steps)

    def _batches(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        self.live = stream.LiveCount()
        out: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="condgen-decode")
        reader = threading.Thread(target=self._produce, args=(epoch, skip, pool, out, stop), daemon=True,
                                  name="condgen-reader")
        reader.start()
        try:
            for _ in range(self.plan.steps_per_epoch - skip):
                item = out.get()
                if isinstance(item, _Failure):
                    raise item.exc
                if item is _END:
                    raise RuntimeError("the shard stream ended before the epoch's last step; re-ingest the set")
                batch = item.result()
                self.live.add(-self.share)
                yield batch
        finally:
            stop.set()
            while reader.is_alive():
                try:
                    out.get(timeout=0.05)
                except queue.Empty:
                    pass
            pool.shutdown(wait=True, cancel_futures=True)

    def grid_examples(self, per_class: int = 8) -> dict[str, np.ndarray]:
        recs = stream.head_examples(self.config["shards_uri"], "train", per_class,
                                    dataset_info(self.config["shards_uri"])["num_classes"], self.sidecars)
        if not recs:
            return {"x": np.zeros((0, 0, 0), np.uint8), "y": np.zeros(0, np.int64)}
        out = {"x": np.stack([r["x"] for r in recs]), "y": np.asarray([r["y"] for r in recs], np.int64)}
        if recs and "txt" in recs[0]:
            n_cap = max(len(r["txt"]) for r in recs)
            out["txt"] = np.stack([r["txt"][np.arange(n_cap) % max(len(r["txt"]), 1)] for r in recs])
        return out

    def summary(self) -> dict[str, Any]:
        start, stop, _ = self._span(0)
        order = stream.shard_order(len(self.index.names), self.seed, 0)
        return {**super().summary(), "shards": len(self.index.names), "index": self.index.source,
                "stream_sharding": self.sharding,
                "shards_per_rank": len(stream.shards_overlapping(self.index, order, start, stop)),
                "stream_buffer": self.buffer, "loader_threads": self.threads, "prefetch_batches": PREFETCH_BATCHES,
                "max_live_samples": self.max_live}
