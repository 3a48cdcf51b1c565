"""The v1 logic of one serving replica: validated requests (``serving/schema.py``) -> batch jobs -> answers.

No Ray and no FastAPI here (``serving/app.py`` wraps it), so it is tested in-process. Generation
runs through ``tasks.generation.batching.sample_batch`` and editing through
``tasks.generation.sampling.edit_images`` — the functions ``condgen sample`` / ``condgen edit``
run — so a request gives the CLI's image. Errors are ``ApiError(status, detail)``; model-side
``ValueError``s become 422 in the app.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import torch

from condgen.serving import schema
from condgen.serving.batcher import Batcher, Cancellable, Job, Overloaded
from condgen.serving.conditions import b64_png, condition_rows, decode_image, prompt_for_label
from condgen.serving.config import ServeConfig
from condgen.serving.errors import ApiError
from condgen.serving.pool import Loaded, ModelPool
from condgen.tasks.generation.batching import Cancelled, SampleRequest, compat_key, sample_batch
from condgen.tasks.generation.interpolation import interpolate, latent_shape, seed_latent
from condgen.tasks.generation.safety import DenyList, LabelMatch, SafetyFilter
from condgen.tasks.generation.sampling import default_steps, edit_images
from condgen.tasks.io.checkpoint import state_fingerprint
from condgen.tasks.io.model_store import load_model_uri
from condgen.tasks.judging import latent_maps as ml
from condgen.tasks.judging.latent_maps import load_map

log = logging.getLogger(__name__)


class Service:
    """One replica: the model pool, the batcher, CLIP and the safety filter, and one method per endpoint."""

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
            # open_clip is a heavy import, needed only when a CLIP model is configured
            from condgen.tasks.clip.load import load_clip

            self.clip = load_clip(config.clip)
            self.clip.model.eval()
        deny = DenyList(config.deny_list) if config.deny_list is not None else DenyList.from_env()

        judge = load_model_uri(config.judge)[0].eval() if config.judge else None
        self.safety = SafetyFilter([deny], [LabelMatch(judge, config.judge_min_prob)] if judge is not None else [])
        self.batcher = Batcher(self._run_group, enabled=config.batching, max_batch=config.max_batch,
                               wait_s=config.batch_wait_ms / 1000, max_queue=config.max_queue,
                               threads=config.torch_threads)
        self._solo = itertools.count()
        # uploads are decoded here, never on the request loop (a slow decode must not stall /health)
        self._decoder = ThreadPoolExecutor(2, thread_name_prefix="condgen-decode")
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
        self._decoder.shutdown(wait=False, cancel_futures=True)

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
        return sample_batch(loaded.model, reqs, classifier=loaded.classifier, clip_tower=tower)

    async def _submit_solo(self, fn: Callable[[], Any], timeout_s: float | None) -> Any:
        result, _ = await self._submit(("solo", next(self._solo)), 1, fn, timeout_s)
        return result

    async def _submit(self, key: tuple, samples: int, payload: Any, timeout_s: float | None) -> tuple[Any, dict]:
        timeout = min(timeout_s or self.config.request_timeout_s, self.config.request_timeout_s)
        try:
            return await self.batcher.submit(key, samples, payload, timeout)
        except TimeoutError:
            raise ApiError(504, f"timed out after {timeout:g}s (queue: {self.batcher.queued_samples()} samples)") \
                from None
        except Overloaded as exc:
            raise ApiError(503, str(exc), headers={"Retry-After": "1"}) from None
        except Cancelled:
            raise ApiError(504, f"timed out after {timeout:g}s") from None

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
        cond, resolved = condition_rows(loaded, self.clip, req.label, req.prompt, n)
        if loaded.kind != "diffusion":
            if req.guidance != "none":
                raise ApiError(422, f"guidance {req.guidance!r} needs a diffusion model; {loaded.key} is a "
                                    f"{loaded.kind} (use guidance='none')")
            if req.sampler != "ddim" or req.steps is not None or req.eta != 0:
                raise ApiError(422, f"sampler/steps/eta apply to diffusion models; {loaded.key} is a {loaded.kind}")
        steps = int(req.steps or default_steps(loaded.model, req.sampler)) if loaded.kind == "diffusion" else 0
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
            text = req.prompt or prompt_for_label(loaded, int(resolved.get("label", 0)))
            clip_text = self.clip.encode_texts([text])
        negative = None
        if req.negative_label is not None or req.negative_prompt is not None:
            negative, neg_resolved = condition_rows(loaded, self.clip, req.negative_label, req.negative_prompt, n,
                                                    "negative")
            resolved["negative"] = neg_resolved
        sreq = SampleRequest(cond=cond, segments=segments, guidance=req.guidance, scale=float(req.scale),
                                negative=negative, sampler=req.sampler, steps=steps, eta=float(req.eta),
                                clip_text=clip_text)
        payload = _GenPayload(loaded, sreq)
        key = (*loaded.batch_id, compat_key(loaded.kind, sreq))
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
            sreq = SampleRequest(cond=cond, segments=[(req.seed, req.n)], guidance="cfg" if w else "none",
                                    scale=w, steps=int(info["default_steps"]))
        else:
            sreq = SampleRequest(cond=cond, segments=[(req.seed, req.n)])
        key = (*loaded.batch_id, compat_key(loaded.kind, sreq))
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
        x0 = await asyncio.get_running_loop().run_in_executor(
            self._decoder, decode_image, req.image, loaded.info["channels"], loaded.info["image_size"])
        src, src_info = condition_rows(loaded, self.clip, req.source_label, req.source_prompt, 1, "source")
        tgt, tgt_info = condition_rows(loaded, self.clip, req.target_label, req.target_prompt, 1, "target")
        model = loaded.model

        def work() -> torch.Tensor:  # the function `condgen edit` runs, with its defaults (inner steps)
            return edit_images(model, x0, method=req.method, source_cond=src, target_cond=tgt, strength=req.strength,
                               steps=req.steps, scale=req.scale, seed=req.seed, progress=False)

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
        shape = latent_shape(model)
        if (req.latent_a is not None or req.latent_b is not None) and loaded.kind == "diffusion":
            raise ApiError(422, "explicit latents are for CVAE/GAN models; use seed_a/seed_b for diffusion")
        lat = []
        for given, seed, which in ((req.latent_a, req.seed_a, "a"), (req.latent_b, req.seed_b, "b")):
            if given is not None:
                if len(given) != int(np.prod(shape)):
                    raise ApiError(422, f"latent_{which} needs {int(np.prod(shape))} numbers, got {len(given)}")
                lat.append(torch.tensor(given, dtype=torch.float32).view(shape))
            else:
                lat.append(seed_latent(model, seed))
        cond, resolved = condition_rows(loaded, self.clip, req.label, req.prompt, 1)
        steps = int(req.steps or loaded.info.get("default_steps", 1))
        if loaded.kind == "diffusion" and steps > int(loaded.info["timesteps"]):
            raise ApiError(422, f"steps must be <= the model's {loaded.info['timesteps']} timesteps")

        def work() -> torch.Tensor:
            return interpolate(model, cond, lat[0], lat[1], frames=req.frames, method=req.method, steps=steps,
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
            out.append({"name": loaded.key, "registered_name": loaded.registered_name,
                        "uri": _public_uri(loaded.spec.uri),
                        "version": loaded.version, "run_id": loaded.run_id,
                        "adapters": sorted(a for a in variants if a is not None),
                        "classifier_guidance": loaded.classifier is not None, "loaded_at": loaded.loaded_at,
                        "channels": loaded.info["channels"], "image_size": loaded.info["image_size"],
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


def _public_uri(uri: str) -> str | None:
    """The registry URI a model was asked for; never a checkpoint's local or storage path."""
    return uri if uri.startswith("models:/") else None


@dataclass(eq=False)
class _GenPayload(Cancellable):
    """A /generate job: the loaded model and its sampling request (whose ``cancelled`` the batcher sets)."""

    loaded: Loaded
    req: SampleRequest

    @property
    def cancelled(self) -> Callable[[], bool]:
        return self.req.cancelled

    @cancelled.setter
    def cancelled(self, fn: Callable[[], bool]) -> None:
        self.req.cancelled = fn
