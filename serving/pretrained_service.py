"""One replica of the pretrained-pipeline service: a user's base loaded once, many LoRA adapters on it.

No Ray and no FastAPI here (``serving/pretrained_app.py`` wraps it), so it is tested in-process.

* The base (``tasks.pretrained.base.load``) is loaded once, in the constructor; nothing else loads it
  (``base.LOADS`` counts the calls, ``GET /v1/models`` reports them).
* An adapter is named by the request (a configured name, or a registered ``models:/NAME@ALIAS``):
  ``adapter(name)`` returns its entry from an LRU of ``max_adapters``. Under Ray Serve that LRU is
  Ray's model multiplexing (``@serve.multiplexed``, set as ``loader`` by the deployment), which also
  tells the proxy which replica holds which adapter; in-process it is an ``OrderedDict``. Loading
  reads the adapter (registry or storage) on an I/O thread, checks its kind and base fingerprint
  (``lora.read``/``lora.require_base``: a 4xx with the reason), then adds it to the base under its
  own peft name on the compute thread. An evicted entry's tensors leave the base (``lora.remove``).
* Requests that share an adapter (and sampler, steps, size) are batched (``serving/batcher.py``):
  one compute thread, so ``lora.activate`` before each batch never races a running one.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException

from condgen.serving.batcher import Batcher, Job, Overloaded
from condgen.serving.conditions import b64_png, decode_image
from condgen.serving.config import PretrainedServeConfig
from condgen.serving.errors import ApiError
from condgen.serving.pretrained_schema import PretrainedEdit, PretrainedGenerate
from condgen.tasks.io.model_store import is_registry_uri, resolve
from condgen.tasks.io.redact import redact_uri
from condgen.tasks.pretrained import base, lora
from condgen.tasks.pretrained.generate import Row, edit, generate, image_size, vae_factor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# peft warns on every second adapter added to a model; several adapters on one base is the point here
warnings.filterwarnings("ignore", message=r".*(multiple adapters|Already found a `peft_config`).*")


@dataclass(eq=False)
class AdapterEntry:
    """An adapter read into memory: what the request named, its peft name on the base, its tensors.

    ``__del__`` is what Ray's multiplexing calls when it evicts the entry: the tensors leave the base."""

    name: str
    key: str
    uri: str
    version: str | None
    cfg: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    on_evict: Callable[[str], None] | None = field(default=None, repr=False)

    def info(self) -> dict[str, Any]:
        public = self.uri if is_registry_uri(self.uri) else None
        return {"name": self.name, "uri": public, "version": self.version, "kind": self.cfg.get("kind")}

    def evict(self) -> None:
        callback, self.on_evict = self.on_evict, None
        if callback is not None:
            callback(self.key)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the compute thread may be gone
            self.evict()


def peft_name(uri: str) -> str:
    """A peft adapter name for ``uri``: module-dict keys cannot hold '.', so a hash of the URI."""
    return "a" + hashlib.sha256(uri.encode()).hexdigest()[:12]


class PretrainedService:
    """One replica: the base, the adapter LRU, the batcher, and one method per endpoint."""

    def __init__(self, config: PretrainedServeConfig):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.config = config
        if config.tracking_uri:
            mlflow.set_tracking_uri(config.tracking_uri)
        torch.set_num_threads(config.torch_threads)
        self._loads_before = base.LOADS[config.base]  # base.load calls in this process before this replica
        self.p = base.load(config.base, device=config.device, dtype=DTYPES[config.dtype])
        self.size = image_size(self.p)
        self.installed: set[str] = set()  # peft names on the base; touched on the compute thread only
        self.adapter_loads: Counter[str] = Counter()
        self._lru: OrderedDict[str, AdapterEntry] = OrderedDict()
        self.loader: Callable[[str], Awaitable[AdapterEntry]] = self._lru_load  # the deployment: multiplexed
        self.loaded: Callable[[], list[str]] = lambda: list(self._lru)  # the deployment: the multiplexer's
        self._read_ahead: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any], str | None]] = {}
        self.batcher = Batcher(self._run_group, enabled=config.batching, max_batch=config.max_batch,
                               wait_s=config.batch_wait_ms / 1000, max_queue=config.max_queue,
                               threads=config.torch_threads)
        self._solo = itertools.count()

    def close(self) -> None:
        self.batcher.executor.shutdown(wait=False, cancel_futures=True)

    # adapters --------------------------------------------------------------------------------------
    def adapter_uri(self, name: str) -> str:
        """The URI a request's adapter name stands for; 404 for a name that is neither configured nor registry."""
        if name in self.config.adapters:
            return self.config.adapters[name]
        if is_registry_uri(name):
            return name
        raise ApiError(404, f"unknown adapter {name!r}: name a configured adapter {sorted(self.config.adapters)} "
                            "or a registered one as models:/NAME@ALIAS")

    async def adapter(self, name: str | None) -> AdapterEntry | None:
        """The entry of adapter ``name`` (None: the bare base), loaded on first use into the LRU.

        An adapter not in the LRU is read and checked first, outside it: Ray's multiplexer evicts its
        least recently used entry before it calls the loader, so a request naming an unknown adapter must
        fail (4xx) before it reaches the multiplexer, never at the cost of a good adapter."""
        if name is None:
            return None
        if name not in self.loaded():
            self._read_ahead[name] = await self._read_async(name)
        try:
            return await self.loader(name)
        finally:
            self._read_ahead.pop(name, None)  # unused when a concurrent request loaded it first

    async def _lru_load(self, name: str) -> AdapterEntry:
        if name in self._lru:
            self._lru.move_to_end(name)
            return self._lru[name]
        entry = await self.load_adapter(name)
        self._lru[name] = entry
        while len(self._lru) > self.config.max_adapters:
            self._lru.popitem(last=False)[1].evict()
        return entry

    async def load_adapter(self, name: str) -> AdapterEntry:
        """Read adapter ``name`` (I/O thread), check it, add it to the base (compute thread)."""
        uri = self.adapter_uri(name)
        tensors, cfg, version = self._read_ahead.pop(name, None) or await self._read_async(name)
        loop = asyncio.get_running_loop()
        entry = AdapterEntry(name, peft_name(uri), uri, version, cfg, tensors, self._schedule_removal)
        await loop.run_in_executor(self.batcher.executor, self._use, entry)
        self.adapter_loads[name] += 1
        return entry

    async def _read_async(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
        uri = self.adapter_uri(name)
        return await asyncio.get_running_loop().run_in_executor(None, self._read, name, uri)

    def _read(self, name: str, uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
        try:
            version = resolve(uri).version if is_registry_uri(uri) else None
            tensors, cfg = lora.read(uri)
        except MlflowException as exc:
            raise ApiError(404, f"adapter {name!r}: {str(exc.message)[:200]}") from None
        except (FileNotFoundError, OSError) as exc:
            raise ApiError(404, f"adapter {name!r}: nothing readable at it ({type(exc).__name__})") from None
        except ValueError as exc:  # lora.read: not a pretrained-pipeline adapter
            raise ApiError(422, f"adapter {name!r}: {exc}") from None
        try:
            lora.require_base(self.p, cfg, name)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        return tensors, cfg, version

    def _use(self, entry: AdapterEntry | None) -> None:
        """Compute thread: route the base through ``entry`` (re-adding it if an eviction removed it)."""
        if entry is None:
            lora.activate(self.p, None)
            return
        if entry.key not in self.installed:
            lora.install(self.p, entry.tensors, entry.cfg, entry.key)
            self.installed.add(entry.key)
        lora.activate(self.p, entry.key)

    def _remove(self, key: str) -> None:
        if key in self.installed:
            lora.remove(self.p, key)
            self.installed.discard(key)

    def _schedule_removal(self, key: str) -> None:
        self.batcher.executor.submit(self._remove, key)  # after the batches already queued on the thread

    # compute thread --------------------------------------------------------------------------------
    def _run_group(self, key: tuple, jobs: list[Job]) -> list[Any]:
        if key[0] == "solo":
            return [jobs[0].payload()]
        self._use(jobs[0].payload[0])
        _, _, sampler, steps, size = key
        return generate(self.p, [j.payload[1] for j in jobs], steps=steps, sampler=sampler, size=size)

    async def _submit(self, key: tuple, samples: int, payload: Any, timeout_s: float | None) -> tuple[Any, dict]:
        timeout = min(timeout_s or self.config.request_timeout_s, self.config.request_timeout_s)
        try:
            return await self.batcher.submit(key, samples, payload, timeout)
        except TimeoutError:
            raise ApiError(504, f"timed out after {timeout:g}s") from None
        except Overloaded as exc:
            raise ApiError(503, str(exc)) from None

    def _size(self, size: int | None) -> int:
        size = int(size or self.size)
        if size % vae_factor(self.p):
            raise ApiError(422, f"size must be a multiple of {vae_factor(self.p)} (the VAE's factor), got {size}")
        return size

    # endpoints -------------------------------------------------------------------------------------
    async def generate(self, req: PretrainedGenerate, name: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        entry = await self.adapter(name)
        size = self._size(req.size)
        row = Row(req.prompt, req.negative_prompt, float(req.guidance), int(req.seed), int(req.n))
        key = ("gen", entry.key if entry else None, req.sampler, int(req.steps), size)
        images, batch = await self._submit(key, req.n, (entry, row), req.timeout_s)
        params = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "guidance": req.guidance,
                  "steps": req.steps, "sampler": req.sampler, "seed": req.seed, "n": req.n, "size": size}
        return {"adapter": entry.info() if entry else {"name": None}, "base_fingerprint": self.p.fingerprint,
                "n": req.n, "images": b64_png(images), "parameters": params, "batch": batch,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}

    async def edit(self, req: PretrainedEdit, name: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        entry = await self.adapter(name)
        size = self._size(req.size)
        image = await asyncio.get_running_loop().run_in_executor(None, decode_image, req.image, 3, size)

        def work() -> torch.Tensor:
            self._use(entry)
            return edit(self.p, image, prompt=req.prompt, source_prompt=req.source_prompt, method=req.method,
                        strength=req.strength, steps=req.steps, guidance=req.guidance, seed=req.seed)

        x, _ = await self._submit(("solo", next(self._solo)), 1, work, req.timeout_s)
        params = {"prompt": req.prompt, "source_prompt": req.source_prompt, "method": req.method,
                  "strength": req.strength if req.method == "sdedit" else None, "steps": req.steps,
                  "guidance": req.guidance, "seed": req.seed if req.method == "sdedit" else None, "size": size}
        return {"adapter": entry.info() if entry else {"name": None}, "base_fingerprint": self.p.fingerprint,
                "image": b64_png(x)[0], "parameters": params,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def models(self) -> dict[str, Any]:
        """The base, the configured adapters and this replica's LRU (least recently used first)."""
        return {"base": {"uri": redact_uri(self.config.base), "fingerprint": self.p.fingerprint,
                         "image_size": self.size, "loads": base.LOADS[self.config.base] - self._loads_before},
                "adapters": sorted(self.config.adapters), "loaded": self.loaded(),
                "adapter_loads": dict(self.adapter_loads), "max_adapters": self.config.max_adapters}
