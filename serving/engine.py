"""What runs inside one serving replica: the model pool, the request batcher and the v1 logic.

No Ray and no FastAPI here (``serving/app.py`` wraps it), so it is tested in-process.

* ``ModelPool`` loads several registry models (``models:/NAME@alias`` or ``models:/NAME/3``),
  each optionally with LoRA adapters (one merged copy per adapter, so requests never toggle
  shared weights) and a noise-aware classifier for classifier guidance. ``refresh()``
  re-resolves aliases and swaps in a new version when ``champion`` moved; a background
  thread calls it every ``poll_s`` seconds. Entries are immutable: a swap replaces the
  dict entry, and requests already holding the old entry finish on it.
* ``Batcher`` is an asyncio queue in front of ONE compute thread. Each round it takes the
  oldest request and every queued request with the same batch key (same loaded model,
  sampler, steps, eta and guidance family) up to ``max_batch`` samples, and runs them as
  one ``tasks.batch_sampling.sample_batch`` call. With batching off, a round is one request.
  Requests past their deadline are dropped from the queue, and a batch whose requests
  have all timed out stops between sampler steps.
* ``Service`` turns validated requests (``serving/schema.py``) into batch jobs and answers.
  Errors are ``ApiError(status, detail)``; model-side ``ValueError``s become 422 in the app.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import itertools
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from condgen.serving import schema
from condgen.tasks.data.attributes import label_from_prompt, label_prompt
from condgen.tasks.generation import batched as bs
from condgen.tasks.generation.safety import DenyList, LabelMatch, SafetyFilter
from condgen.tasks.io.checkpoint import state_fingerprint
from condgen.tasks.io.images import png_bytes, to_uint8
from condgen.tasks.io.model_store import apply_adapter, load_model_uri, parse_model_uri
from condgen.tasks.judging import latent_maps as ml
from condgen.tasks.judging.latent_maps import load_map

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


# -- configuration ----------------------------------------------------------------------------
class ModelSpec(BaseModel):
    uri: str = Field(..., description="models:/NAME@ALIAS or models:/NAME/VERSION")
    name: str | None = Field(None, description="name in the API; default: the registered name")
    classifier: str | None = Field(None, description="noise-aware classifier for classifier guidance (URI)")
    adapters: dict[str, str] = Field(default_factory=dict,
                                   description="LoRA adapter name -> storage folder URI or models:/NAME@alias")


class ServeConfig(BaseModel):
    models: list[ModelSpec]
    tracking_uri: str | None = None
    clip: str | None = Field(None, description="load_clip spec: text prompts and CLIP guidance")
    judge: str | None = Field(None, description="classifier URI for the output safety check (label match)")
    judge_min_prob: float = 0.5
    deny_list: list[str] | None = Field(None, description="prompt deny-list; default: CONDGEN_DENYLIST or built-in")
    batching: bool = True
    max_batch: int = Field(32, ge=1, le=1024, description="samples per forward pass")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000)
    max_queue: int = Field(1024, ge=1, description="queued samples before 503")
    request_timeout_s: float = Field(60.0, gt=0)
    poll_s: float = Field(30.0, ge=0, description="registry alias poll period; 0 = never")
    torch_threads: int = Field(1, ge=1, le=256)
    api_key_sha256: str | None = Field(None, description="sha256 of the API key (never the key itself)")
    maps: list[str] = Field(default_factory=list,
                            description="fitted latent maps (tasks.map_latents.load_map URIs: runs:/…, s3://…, a "
                                        "folder); /v1/map uses the one fitted on the loaded models' weights")


@dataclass(frozen=True)
class Loaded:
    """One servable model (one adapter variant); never mutated after construction."""

    key: str  # API name
    spec: ModelSpec
    registered_name: str
    version: str
    run_id: str
    model: torch.nn.Module
    kind: str
    adapter: str | None
    classifier: torch.nn.Module | None
    loaded_at: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_id(self) -> tuple:
        return (self.key, self.version, self.adapter)


class ModelPool:
    def __init__(self, specs: list[ModelSpec]):
        if not specs:
            raise ValueError("serve at least one model")
        self.specs = specs
        self._entries: dict[str, dict[str | None, Loaded]] = {}
        self._lock = threading.Lock()  # serialises reloads, never held while serving
        self.reloads: list[dict[str, str]] = []
        for spec in specs:
            entry = self._load(spec)
            key = next(iter(entry.values())).key
            if key in self._entries:
                raise ValueError(f"two models are served as {key!r}; give one a 'name'")
            self._entries[key] = entry

    @staticmethod
    def _load(spec: ModelSpec) -> dict[str | None, Loaded]:

        model, meta = load_model_uri(spec.uri)
        kind = bs.model_kind(model)
        if kind == "other":
            raise ValueError(f"{spec.uri} is a {type(model).__name__}; the service serves cvae, gan and diffusion")
        classifier = load_model_uri(spec.classifier)[0].eval() if spec.classifier else None
        key = spec.name or str(meta["name"])
        now = time.time()
        common = dict(key=key, spec=spec, registered_name=str(meta["name"]), version=str(meta["version"]),
                      run_id=str(meta.get("run_id", "")), kind=kind, classifier=classifier, loaded_at=now,
                      info=bs.describe(model))
        out: dict[str | None, Loaded] = {None: Loaded(model=model.eval(), adapter=None, **common)}
        for name, uri in spec.adapters.items():
            out[name] = Loaded(model=apply_adapter(model, uri), adapter=name, **common)
        return out

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str | None, adapter: str | None = None) -> Loaded:
        entries = self._entries  # one read: a concurrent swap is atomic for us
        key = name or next(iter(entries))
        if key not in entries:
            raise ApiError(404, f"model {key!r} is not loaded; loaded: {sorted(entries)}")
        variants = entries[key]
        if adapter not in variants:
            raise ApiError(404, f"model {key!r} has no adapter {adapter!r}; "
                                f"adapters: {sorted(a for a in variants if a is not None)}")
        return variants[adapter]

    def all(self) -> list[Loaded]:
        return [v[None] for v in self._entries.values()]

    def refresh(self) -> list[dict[str, str]]:
        """Reload every alias-based model whose alias now points at another version."""


        changes = []
        with self._lock:
            for key, variants in list(self._entries.items()):
                current = variants[None]
                name, alias, _ = parse_model_uri(current.spec.uri) if current.spec.uri.startswith("models:/") else (
                    None, None, None)
                if not alias:
                    continue
                version = MlflowClient().get_model_version_by_alias(name, alias).version
                if str(version) == current.version:
                    continue
                fresh = self._load(current.spec)  # load fully before the swap
                entries = dict(self._entries)
                entries[key] = fresh
                self._entries = entries
                change = {"model": key, "from": current.version, "to": str(version)}
                changes.append(change)
                self.reloads.append(change)
                log.info("reloaded %s: version %s -> %s", key, current.version, version)
        return changes


# -- batching -----------------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    key: tuple
    samples: int
    payload: Any
    future: asyncio.Future
    deadline: float
    cancelled: bool = False
    batch_info: dict[str, int] = field(default_factory=dict)

    def expired(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline


class Overloaded(Exception):
    pass


class Batcher:
    """Groups queued jobs by key and runs each group on the single compute thread."""

    def __init__(self, runner: Callable[[tuple, list[Job]], list[Any]], *, enabled: bool, max_batch: int,
                 wait_s: float, max_queue: int, threads: int = 1):
        self.runner = runner
        self.enabled, self.max_batch, self.wait_s, self.max_queue = enabled, max_batch, wait_s, max_queue
        self.queue: list[Job] = []
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="condgen-compute",
                                           initializer=lambda: torch.set_num_threads(threads))
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.batches = Counter()  # samples per batch -> count (for /metrics and the benchmark)

    def queued_samples(self) -> int:
        return sum(j.samples for j in self.queue)

    async def submit(self, key: tuple, samples: int, payload: Any, timeout_s: float) -> tuple[Any, dict]:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            # First use, or a new event loop (tests' clients may start one per call).
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop())
        if self.queued_samples() + samples > self.max_queue:
            raise Overloaded(f"queue full ({self.queued_samples()} samples waiting); retry later")
        job = Job(key, samples, payload, loop.create_future(), time.monotonic() + timeout_s)
        if isinstance(payload, _GenPayload):
            payload.cancelled = job.expired  # the sampler checks this between steps
        self.queue.append(job)
        self._wake.set()
        try:
            result = await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise
        except asyncio.CancelledError:  # the client went away
            job.cancelled = True
            raise
        return result, job.batch_info

    def _take(self) -> list[Job]:
        now_live = [j for j in self.queue if not j.expired()]
        dropped = [j for j in self.queue if j.expired()]
        for j in dropped:
            if not j.future.done():
                j.future.set_exception(asyncio.TimeoutError())
        self.queue = now_live
        if not self.queue:
            return []
        first = self.queue[0]
        group, total = [first], first.samples
        if self.enabled and first.key[0] != "solo":
            for j in self.queue[1:]:
                if j.key == first.key and total + j.samples <= self.max_batch:
                    group.append(j)
                    total += j.samples
        taken = set(map(id, group))
        self.queue = [j for j in self.queue if id(j) not in taken]
        return group

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            if self.enabled and self.wait_s > 0 and self.queued_samples() < self.max_batch:
                await asyncio.sleep(self.wait_s)  # let concurrent requests join this batch
            group = self._take()
            if not group:
                continue
            info = {"requests": len(group), "samples": sum(j.samples for j in group)}
            self.batches[info["samples"]] += 1
            try:
                results = await loop.run_in_executor(self.executor, self.runner, group[0].key, group)
            except asyncio.CancelledError:  # the event loop is shutting down
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            for j, r in zip(group, results):
                j.batch_info = info
                if not j.future.done():
                    j.future.set_result(r)


# -- conditions -----------------------------------------------------------------------------------
def decode_image(b64: str, size: int) -> torch.Tensor:
    """base64 PNG/JPEG -> (1, 1, size, size) float in [-1, 1]; 422 on anything else."""

    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width > schema.MAX_IMAGE_SIDE or im.height > schema.MAX_IMAGE_SIDE or im.width < 1 or im.height < 1:
                raise ApiError(422, f"image is {im.width}x{im.height}; at most {schema.MAX_IMAGE_SIDE} per side")
            grey = np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ApiError(422, "image is not a readable PNG/JPEG") from None
    return torch.from_numpy(grey.copy()).float().div(127.5).sub(1)[None, None]


def b64_png(x: torch.Tensor) -> list[str]:
    return [base64.b64encode(png_bytes(img)).decode() for img in to_uint8(x)]


# -- the service ------------------------------------------------------------------------------------
class Service:
    def __init__(self, config: ServeConfig):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


        self.config = config
        if config.tracking_uri:
            mlflow.set_tracking_uri(config.tracking_uri)
        torch.set_num_threads(config.torch_threads)
        self.pool = ModelPool(config.models)
        self._fingerprints: dict[tuple, str] = {}  # Loaded.batch_id -> state_fingerprint of its weights
        self.maps = [self._load_map(uri) for uri in config.maps]
        self.clip = None
        if config.clip:
            from condgen.tasks.clip.handle import load_clip

            self.clip = load_clip(config.clip)
            self.clip.model.eval()
        deny = DenyList(config.deny_list) if config.deny_list is not None else DenyList.from_env()

        judge = load_model_uri(config.judge)[0].eval() if config.judge else None
        self.safety = SafetyFilter([deny], [LabelMatch(judge, config.judge_min_prob)] if judge is not None else [])
        self.batcher = Batcher(self._run_group, enabled=config.batching, max_batch=config.max_batch,
                               wait_s=config.batch_wait_ms / 1000, max_queue=config.max_queue,
                               threads=config.torch_threads)
        self._solo = itertools.count()
        self._stop = threading.Event()
        self.metrics = None  # set by the app (prometheus collectors)
        if config.poll_s > 0:
            threading.Thread(target=self._poll, name="condgen-registry-poll", daemon=True).start()

    @staticmethod
    def _load_map(uri: str):

        try:
            return load_map(uri)
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"latent map {uri}: {exc}") from exc

    def close(self) -> None:
        self._stop.set()
        self.batcher.executor.shutdown(wait=False, cancel_futures=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            try:
                for change in self.pool.refresh():
                    if self.metrics is not None:
                        self.metrics.reloads.labels(change["model"]).inc()
            except Exception as exc:  # noqa: BLE001 - the registry may be briefly unreachable; keep serving
                log.warning("registry poll failed: %s", type(exc).__name__)

    # compute thread -----------------------------------------------------------------------------
    def _run_group(self, key: tuple, jobs: list[Job]) -> list[Any]:
        if key[0] == "solo":
            return [jobs[0].payload()]
        loaded: Loaded = jobs[0].payload.loaded
        reqs = [j.payload.req for j in jobs]
        tower = self.clip.image_tower if self.clip is not None else None
        return bs.sample_batch(loaded.model, reqs, classifier=loaded.classifier, clip_tower=tower)

    async def _submit_solo(self, fn: Callable[[], Any], timeout_s: float | None) -> Any:
        result, _ = await self._submit(("solo", next(self._solo)), 1, fn, timeout_s)
        return result

    async def _submit(self, key: tuple, samples: int, payload: Any, timeout_s: float | None) -> tuple[Any, dict]:
        timeout = min(timeout_s or self.config.request_timeout_s, self.config.request_timeout_s)
        try:
            return await self.batcher.submit(key, samples, payload, timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, f"timed out after {timeout:g}s (queue: {self.batcher.queued_samples()} samples)") \
                from None
        except Overloaded as exc:
            raise ApiError(503, str(exc), headers={"Retry-After": "1"}) from None
        except bs.Cancelled:
            raise ApiError(504, f"timed out after {timeout:g}s") from None

    # conditions ---------------------------------------------------------------------------------
    def _condition(self, loaded: Loaded, label: int | None, prompt: str | None, n: int, what: str = "label"
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Raw condition rows (n,) labels or (n, D) CLIP text for ``loaded``; what was resolved."""
        info = loaded.info
        if info["condition"] == "label":
            if prompt is not None:
                label = label_from_prompt(prompt, info["num_classes"])
                if label is None:
                    raise ApiError(422, f"{loaded.key} is a label model and the {what} prompt names no class in "
                                        f"[0, {info['num_classes'] - 1}]; give a label or a digit in the prompt")
            if label >= info["num_classes"]:
                raise ApiError(422, f"{what} must be in [0, {info['num_classes'] - 1}], got {label}")
            return torch.full((n,), int(label), dtype=torch.long), {"label": int(label)}
        if self.clip is None:
            raise ApiError(409, f"{loaded.key} is text-conditioned and this service has no CLIP model configured")
        text = prompt if prompt is not None else label_prompt(int(label))
        emb = self.clip.encode_texts([text])  # (1, D)
        if emb.shape[1] != loaded.model.config.text_dim:
            raise ApiError(409, f"the configured CLIP gives {emb.shape[1]}-d text, {loaded.key} takes "
                                f"{loaded.model.config.text_dim}-d")
        return emb.expand(n, -1).clone(), {"prompt": text}

    def _check_prompt(self, *texts: str | None) -> None:
        reasons, counts = self.safety.check_prompts([t for t in texts if t])
        for reason in reasons:
            if reason:
                if self.metrics is not None:
                    for k, v in counts.items():
                        self.metrics.blocked.labels(k).inc(v)
                raise ApiError(422, f"refused by the safety filter: {reason}")

    # endpoints ----------------------------------------------------------------------------------
    async def generate(self, req: schema.GenerateV1) -> dict[str, Any]:
        t0 = time.perf_counter()
        loaded = self.pool.get(req.model, req.adapter)
        info = loaded.info
        self._check_prompt(req.prompt, req.negative_prompt)
        if req.seeds is not None:
            segments = [(int(s), 1) for s in req.seeds]
        else:
            segments = [(int(req.seed or 0), int(req.n or 1))]
        n = sum(c for _, c in segments)
        cond, resolved = self._condition(loaded, req.label, req.prompt, n)
        if loaded.kind != "diffusion":
            if req.guidance != "none":
                raise ApiError(422, f"guidance {req.guidance!r} needs a diffusion model; {loaded.key} is a "
                                    f"{loaded.kind} (use guidance='none')")
            if req.sampler != "ddim" or req.steps is not None or req.eta != 0:
                raise ApiError(422, f"sampler/steps/eta apply to diffusion models; {loaded.key} is a {loaded.kind}")
        steps = int(req.steps or info.get("default_steps", 0) or 0)
        T = int(info.get("timesteps", 0) or 0)
        if loaded.kind == "diffusion" and steps > T:
            raise ApiError(422, f"steps must be <= the model's {T} timesteps, got {steps}")
        if req.guidance == "classifier":
            if loaded.classifier is None:
                raise ApiError(409, f"{loaded.key} has no classifier configured for classifier guidance")
            if info["condition"] != "label":
                raise ApiError(422, "classifier guidance needs a label-conditioned model")
        clip_text = None
        if req.guidance == "clip":
            if self.clip is None:
                raise ApiError(409, "CLIP guidance needs a CLIP model; this service has none configured")
            text = req.prompt or label_prompt(int(resolved.get("label", 0)))
            clip_text = self.clip.encode_texts([text])
        negative = None
        if req.negative_label is not None or req.negative_prompt is not None:
            negative, neg_resolved = self._condition(loaded, req.negative_label, req.negative_prompt, n, "negative")
            resolved["negative"] = neg_resolved
        sreq = bs.SampleRequest(cond=cond, segments=segments, guidance=req.guidance, scale=float(req.scale),
                                negative=negative, sampler=req.sampler, steps=steps, eta=float(req.eta),
                                clip_text=clip_text)
        payload = _GenPayload(loaded, sreq)
        key = (*loaded.batch_id, bs.compat_key(loaded.kind, sreq))
        x, batch = await self._submit(key, n, payload, req.timeout_s)
        keep, counts = self.safety.check_outputs(x, cond if cond.dtype == torch.long else None)
        if self.metrics is not None:
            for k, v in counts.items():
                self.metrics.blocked.labels(k).inc(v)
            self.metrics.samples.labels(loaded.key).inc(int(keep.sum()))
        params: dict[str, Any] = {
            **resolved, "n": n, "seeds": [s for s, _ in segments] if req.seeds is not None else None,
            "seed": None if req.seeds is not None else segments[0][0], "guidance": req.guidance,
            "scale": float(req.scale) if req.guidance != "none" else 0.0,
        }
        if loaded.kind == "diffusion":
            params.update(sampler=req.sampler, steps=steps, eta=float(req.eta) if req.sampler == "ddim" else None,
                          timesteps=T)
        return {
            "model": loaded.key, "registered_name": loaded.registered_name, "version": loaded.version,
            "run_id": loaded.run_id, "adapter": loaded.adapter, "n": int(keep.sum()),
            "images": b64_png(x[keep]), "parameters": params,
            "safety": {"blocked": int((~keep).sum()), "reasons": dict(counts)},
            "batch": batch, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2),
        }

    async def generate_legacy(self, req: schema.GenerateRequest) -> dict[str, Any]:
        """``POST /generate``: the first model, its own defaults (== ``model.sample``)."""
        loaded = self.pool.get(None)
        info = loaded.info
        if info["condition"] != "label":
            raise ApiError(409, f"{loaded.key} is text-conditioned; /generate serves label models (use /v1/generate)")
        if req.label >= info["num_classes"]:
            raise ApiError(422, f"label must be in [0, {info['num_classes'] - 1}], got {req.label}")
        cond = torch.full((req.n,), req.label, dtype=torch.long)
        if loaded.kind == "diffusion":
            w = float(info["default_guidance_scale"])
            sreq = bs.SampleRequest(cond=cond, segments=[(req.seed, req.n)], guidance="cfg" if w else "none",
                                    scale=w, steps=int(info["default_steps"]))
        else:
            sreq = bs.SampleRequest(cond=cond, segments=[(req.seed, req.n)])
        key = (*loaded.batch_id, bs.compat_key(loaded.kind, sreq))
        x, _ = await self._submit(key, req.n, _GenPayload(loaded, sreq), None)
        return {"model": loaded.registered_name, "version": loaded.version, "label": req.label, "n": req.n,
                "seed": req.seed, "images": b64_png(x)}

    async def edit(self, req: schema.EditV1) -> dict[str, Any]:
        t0 = time.perf_counter()
        loaded = self.pool.get(req.model)
        if loaded.kind != "diffusion":
            raise ApiError(422, f"editing needs a diffusion model; {loaded.key} is a {loaded.kind}")
        self._check_prompt(req.source_prompt, req.target_prompt)
        T = int(loaded.info["timesteps"])
        if req.steps > T:
            raise ApiError(422, f"steps must be <= the model's {T} timesteps, got {req.steps}")
        if req.method == "null_text" and req.scale <= 0:
            raise ApiError(422, "method 'null_text' needs scale > 0 (it optimises the unconditional branch of CFG)")
        x0 = decode_image(req.image, loaded.info["image_size"])
        src, src_info = self._condition(loaded, req.source_label, req.source_prompt, 1, "source")
        tgt, tgt_info = self._condition(loaded, req.target_label, req.target_prompt, 1, "target")
        model = loaded.model

        def work() -> torch.Tensor:
            return bs.edit(model, x0, src, tgt, method=req.method, strength=req.strength, scale=req.scale,
                           steps=req.steps, seed=req.seed)

        x = await self._submit_solo(work, req.timeout_s)
        params = {"source": src_info, "target": tgt_info, "method": req.method, "scale": req.scale,
                  "steps": req.steps, "strength": req.strength if req.method == "sdedit" else None,
                  "seed": req.seed if req.method == "sdedit" else None}
        return {"model": loaded.key, "version": loaded.version, "image": b64_png(x)[0], "parameters": params,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}

    async def interpolate(self, req: schema.InterpolateV1) -> dict[str, Any]:
        t0 = time.perf_counter()
        loaded = self.pool.get(req.model)
        if not loaded.info["interpolate"]:
            raise ApiError(422, f"{loaded.key} has no latent space to interpolate")
        self._check_prompt(req.prompt)
        model = loaded.model
        shape = bs.latent_shape(model)
        if (req.latent_a is not None or req.latent_b is not None) and loaded.kind == "diffusion":
            raise ApiError(422, "explicit latents are for CVAE/GAN models; use seed_a/seed_b for diffusion")
        lat = []
        for given, seed, which in ((req.latent_a, req.seed_a, "a"), (req.latent_b, req.seed_b, "b")):
            if given is not None:
                if len(given) != int(np.prod(shape)):
                    raise ApiError(422, f"latent_{which} needs {int(np.prod(shape))} numbers, got {len(given)}")
                lat.append(torch.tensor(given, dtype=torch.float32).view(shape))
            else:
                lat.append(bs.seed_latent(model, seed))
        cond, resolved = self._condition(loaded, req.label, req.prompt, 1)
        steps = int(req.steps or loaded.info.get("default_steps", 1))
        if loaded.kind == "diffusion" and steps > int(loaded.info["timesteps"]):
            raise ApiError(422, f"steps must be <= the model's {loaded.info['timesteps']} timesteps")

        def work() -> torch.Tensor:
            return bs.interpolate(model, cond, lat[0], lat[1], frames=req.frames, method=req.method, steps=steps,
                                  scale=req.scale)

        x = await self._submit_solo(work, req.timeout_s)
        params = {**resolved, "frames": req.frames, "method": req.method,
                  "seed_a": None if req.latent_a is not None else req.seed_a,
                  "seed_b": None if req.latent_b is not None else req.seed_b,
                  "steps": steps if loaded.kind == "diffusion" else None,
                  "scale": req.scale if loaded.kind == "diffusion" else None}
        return {"model": loaded.key, "version": loaded.version, "images": b64_png(x), "parameters": params,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def _fingerprint(self, loaded: Loaded) -> str:
        """Hashed once per (model, version, adapter): a Loaded's weights never change, and a
        reload is a new version (an ``id()`` key could be reused by a later object)."""

        key = loaded.batch_id
        if key not in self._fingerprints:
            self._fingerprints[key] = state_fingerprint(loaded.model)
        return self._fingerprints[key]

    def _find_map(self, src: Loaded, tgt: Loaded):
        """The loaded map fitted on exactly these two models' weights."""
        want = (self._fingerprint(src), self._fingerprint(tgt))
        for m in self.maps:
            if (m.source.get("fingerprint"), m.target.get("fingerprint")) == want:
                return m
        have = [f"{m.source.get('name')} -> {m.target.get('name')}" for m in self.maps] or ["none"]
        raise ApiError(409, f"no latent map from {src.key!r} (version {src.version}) to {tgt.key!r} (version "
                            f"{tgt.version}) is loaded: maps are fitted on given weights; loaded maps: "
                            f"{', '.join(have)}. Fit one with the 'map latents' step and add it to `maps`")

    async def map(self, req: schema.MapV1) -> dict[str, Any]:
        """Translate a latent of one model to another through a fitted linear map
        (Asperti & Tonelli 2023): z_b = z_a W, and decode both under the same label."""

        t0 = time.perf_counter()
        src, tgt = self.pool.get(req.source_model), self.pool.get(req.target_model)
        kinds = [ml.space_kind(loaded.model) for loaded in (src, tgt)]
        for loaded, kind in zip((src, tgt), kinds):
            if kind is None:
                raise ApiError(409, f"{loaded.key} is a {loaded.kind} model with no label-conditioned latent space "
                                    "to map (CVAE, cGAN, AC-GAN)")
        if req.label is None:
            raise ApiError(422, "label is required: both latent spaces are conditioned on it")
        for loaded in (src, tgt):
            if req.label >= loaded.info["num_classes"]:
                raise ApiError(422, f"label must be in [0, {loaded.info['num_classes'] - 1}] for {loaded.key}, "
                                    f"got {req.label}")
        m = self._find_map(src, tgt)
        a, b = ml.LatentSpace(src.model, kinds[0], src.key), ml.LatentSpace(tgt.model, kinds[1], tgt.key)
        cond = torch.tensor([req.label])
        if req.latent is not None and len(req.latent) != a.latent_dim:
            raise ApiError(422, f"latent needs {a.latent_dim} numbers for {src.key}, got {len(req.latent)}")

        def work() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                z_a = (torch.tensor([req.latent], dtype=torch.float32) if req.latent is not None
                       else a.prior_sample(cond, generator=torch.Generator().manual_seed(req.seed)))
                z_b = ml.translate(z_a, m)
                return {"z_a": z_a, "z_b": z_b, "x_a": a.decode(z_a, cond), "x_b": b.decode(z_b, cond)}

        out = await self._submit_solo(work, None)
        return {"source_model": src.key, "source_version": src.version, "target_model": tgt.key,
                "target_version": tgt.version, "label": req.label,
                "seed": None if req.latent is not None else req.seed,
                "latent_source": [round(float(v), 6) for v in out["z_a"][0]],
                "latent_target": [round(float(v), 6) for v in out["z_b"][0]],
                "images": {"source": b64_png(out["x_a"])[0], "target": b64_png(out["x_b"])[0]},
                "map": {"method": m.method, "support_size": m.support_size, "support_mode": m.support_mode,
                        "metrics": {k: float(v) for k, v in m.metrics.items()}},
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def models(self) -> dict[str, Any]:
        out = []
        for loaded in self.pool.all():
            variants = self.pool._entries[loaded.key]
            out.append({"name": loaded.key, "registered_name": loaded.registered_name, "uri": loaded.spec.uri,
                        "version": loaded.version, "run_id": loaded.run_id,
                        "adapters": sorted(a for a in variants if a is not None),
                        "classifier_guidance": loaded.classifier is not None, "loaded_at": loaded.loaded_at,
                        "info": loaded.info})
        return {"models": out, "clip": self.clip is not None,
                "safety": {"prompt_checks": [c.name for c in self.safety.prompt_checks],
                           "output_checks": [c.name for c in self.safety.output_checks]},
                "batching": {"enabled": self.config.batching, "max_batch": self.config.max_batch,
                             "wait_ms": self.config.batch_wait_ms}}

    def health(self) -> dict[str, Any]:
        first = self.pool.get(None)
        return {"status": "ok", "model": first.registered_name, "version": first.version,
                "models": {m.key: m.version for m in self.pool.all()}}


@dataclass(eq=False)
class _GenPayload:
    loaded: Loaded
    req: bs.SampleRequest

    @property
    def cancelled(self):
        return self.req.cancelled

    @cancelled.setter
    def cancelled(self, fn):
        self.req.cancelled = fn


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
