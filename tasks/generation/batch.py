"""Batch generation: a grid of conditions x seeds -> WebDataset shards + manifest, resumable.

A job is a ``JobSpec``. Its items are enumerated in a fixed order (condition-major, then
seed), item i goes to shard i // shard_size, and every image comes from its own
generator seeded with its own seed (``tasks.batch_sampling``), so a shard's bytes depend
on the job alone — not on which worker made it, how the rows were batched, or whether
the run was interrupted. Hence resume is simple and free of duplicates:

* ``plan.json`` is written first: the spec, its fingerprint and the model version the
  alias resolved to (a resumed run uses that version even if ``champion`` moved since);
  a different job refuses to write into the same prefix;
* shard k is complete when ``shard-00000k.tar`` and its sidecar ``shard-00000k.json``
  (n_samples, sha256, blocked counts) exist and the tar's sha256 matches — the tar is
  written first (atomically), the sidecar second, so a crash in between only costs
  that shard;
* missing shards run as Ray tasks (one per shard, ``num_cpus`` each); the manifest is
  written last, from the sidecars.

Each sample: ``png`` (in the model's colour mode, ``L`` or ``RGB``; marked by
``tasks/generation/watermark.py``), ``cls``, ``json`` with the
condition, seed and a signed provenance record (model name/version/run, parameters,
seed, key, job fingerprint). The safety filter (``tasks/generation/safety.py``) drops denied
prompts before sampling and judge-rejected samples after; both are counted per shard
and in the manifest, so requested = written + blocked.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import mlflow
import numpy as np
import ray
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from condgen.models.base import config_to_dict
from condgen.models.registry import build_model
from condgen.tasks.data.attributes import label_from_prompt
from condgen.tasks.generation import batching as bs
from condgen.tasks.generation import watermark
from condgen.tasks.generation.safety import DenyList, LabelMatch, SafetyFilter
from condgen.tasks.io import settings, storage
from condgen.tasks.io.checkpoint import model_name
from condgen.tasks.io.cluster import ensure_ray
from condgen.tasks.io.images import png_bytes, to_uint8
from condgen.tasks.io.model_store import load_model_uri, load_registered, resolve
from condgen.tasks.io.progress import progress
from condgen.tasks.io.shards import tar_bytes

SCHEMA_VERSION = 1
PLAN = "plan.json"
MANIFEST = "manifest.json"
# Settings a worker needs to reach storage / sign like the driver (forwarded when set).
WORKER_ENV = ("CONDGEN_HOME", "CONDGEN_STORAGE", "CONDGEN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
              "AWS_SHARED_CREDENTIALS_FILE", "NO_PROXY", "no_proxy", watermark.KEY_ENV, watermark.LEGACY_KEY_ENV,
              "CONDGEN_DENYLIST")


@dataclass(frozen=True)
class JobSpec:
    model_uri: str  # models:/NAME@ALIAS | models:/NAME/VERSION
    out_uri: str
    labels: tuple[int, ...] = ()
    prompts: tuple[str, ...] = ()  # label models: prompts that name a digit; checked by the deny-list
    seeds_per_condition: int = 8
    seed_base: int = 0
    guidance: str = "none"
    scale: float = 0.0
    sampler: str = "ddim"
    steps: int | None = None
    eta: float = 0.0
    shard_size: int = 256
    batch_size: int = 64  # rows per forward pass inside a shard
    watermark: bool = True
    judge_uri: str | None = None  # output check: the judge must see the requested label
    judge_min_prob: float = 0.5
    deny_list: tuple[str, ...] | None = None  # None: CONDGEN_DENYLIST or the built-in list

    def conditions(self) -> list[dict[str, Any]]:
        return [{"label": int(v)} for v in self.labels] + [{"prompt": p} for p in self.prompts]

    def fingerprint(self) -> str:
        body = {k: v for k, v in asdict(self).items() if k != "out_uri"}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass
class Plan:
    spec: JobSpec
    model: dict[str, str]  # name, version, run_id, uri (pinned: models:/NAME/VERSION)
    n_items: int
    shards: list[tuple[int, int, int]]  # (index, first item, count)
    fingerprint: str
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "spec": asdict(self.spec), "model": self.model,
                "n_items": self.n_items, "shards": [list(s) for s in self.shards], "fingerprint": self.fingerprint,
                "created": self.created}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in d["spec"].items()}
        return cls(JobSpec(**spec), d["model"], int(d["n_items"]), [tuple(s) for s in d["shards"]],
                   d["fingerprint"], d.get("created", 0.0))


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def sidecar_name(k: int) -> str:
    return f"shard-{k:06d}.json"


def item(spec: JobSpec, i: int) -> dict[str, Any]:
    """Item i of the grid: condition-major, then seed; its key is unique and stable."""
    conds = spec.conditions()
    c, j = divmod(i, spec.seeds_per_condition)
    seed = spec.seed_base + j
    return {"index": i, "cond_index": c, **conds[c], "seed": seed, "key": f"c{c:05d}-s{seed:010d}"}


# -- planning --------------------------------------------------------------------------------------
def resolve_model(model_uri: str) -> dict[str, str]:
    """Pin an alias to the version it points at now."""
    mlflow.set_tracking_uri(settings.tracking_uri())
    ref = resolve(model_uri)
    return {"name": ref.name, "version": ref.version, "run_id": ref.run_id, "uri": ref.uri, "requested": model_uri}


def make_plan(spec: JobSpec) -> Plan:
    """Read the job's plan from ``out_uri`` (resume), or pin the model and write a new one."""
    if spec.seeds_per_condition < 1 or spec.shard_size < 1 or spec.batch_size < 1:
        raise ValueError("seeds_per_condition, shard_size and batch_size must be >= 1")
    if not spec.conditions():
        raise ValueError("give at least one label or prompt")
    uri = storage.join(spec.out_uri, PLAN)
    if storage.exists(uri):
        plan = Plan.from_json(storage.read_json(uri))
        if plan.fingerprint != spec.fingerprint():
            raise ValueError(f"{spec.out_uri} holds another job (fingerprint {plan.fingerprint}, this job "
                             f"{spec.fingerprint()}); use a new out_uri")
        return plan
    n = len(spec.conditions()) * spec.seeds_per_condition
    shards = [(k, first, min(spec.shard_size, n - first)) for k, first in enumerate(range(0, n, spec.shard_size))]
    plan = Plan(spec, resolve_model(spec.model_uri), n, shards, spec.fingerprint())
    storage.write_json(uri, plan.to_json())
    return plan


def shard_entry(out_uri: str, k: int) -> dict[str, Any] | None:
    """The sidecar of a complete shard, or None (missing, or the tar does not match it)."""
    side, tar = storage.join(out_uri, sidecar_name(k)), storage.join(out_uri, shard_name(k))
    if not storage.exists(side) or not storage.exists(tar):
        return None
    entry = storage.read_json(side)
    if hashlib.sha256(storage.read_bytes(tar)).hexdigest() != entry.get("sha256"):
        return None
    return entry


def missing_shards(plan: Plan) -> list[int]:
    return [k for k, _, _ in plan.shards if shard_entry(plan.spec.out_uri, k) is None]


# -- the model travels as safetensors bytes + config (never a pickled module) ------------------------
def model_payload(uri: str) -> dict[str, Any]:
    """A registered model (``models:/NAME/VERSION``) as plain data a Ray worker can rebuild."""
    mlflow.set_tracking_uri(settings.tracking_uri())
    return payload_of(*load_registered(uri))


def payload_of(model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """A loaded model and its registry meta (name, version, run_id) as ``model_payload`` data."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return {"model": model_name(model), "config": config_to_dict(model.config), "weights": st_save(state),
            "meta": {"name": meta["name"], "version": str(meta["version"]), "run_id": meta["run_id"]}}


def model_from_payload(payload: dict[str, Any]) -> torch.nn.Module:
    model = build_model(payload["model"], payload["config"])
    model.load_state_dict(st_load(payload["weights"]))
    return model.eval()


def load_any(uri: str) -> torch.nn.Module:
    """A classifier from ``models:/…`` or a checkpoint folder in storage (the judge)."""
    return load_model_uri(uri)[0]


# -- one shard --------------------------------------------------------------------------------------
def _safety(spec: JobSpec):
    deny = DenyList(spec.deny_list) if spec.deny_list is not None else DenyList.from_env()
    outputs = [LabelMatch(load_any(spec.judge_uri), spec.judge_min_prob)] if spec.judge_uri else []
    return SafetyFilter([deny], outputs)


def _label_of(model: torch.nn.Module, it: dict[str, Any]) -> int | None:
    if "label" in it:
        return int(it["label"])
    return label_from_prompt(it["prompt"], int(getattr(model.config, "num_classes", 10)))


def generate_shard(payload: dict[str, Any], plan_json: dict[str, Any], k: int) -> dict[str, Any]:
    """Make shard k of the plan, write tar then sidecar; returns the sidecar entry."""
    torch.set_num_threads(1)
    plan = Plan.from_json(plan_json)
    spec = plan.spec
    _, first, count = plan.shards[k]
    model = model_from_payload(payload)
    kind = bs.model_kind(model)
    if getattr(model.config, "condition", "label") != "label":
        raise ValueError("batch generation serves label-conditioned models (prompts are mapped to labels)")
    safety = _safety(spec)
    blocked: dict[str, int] = {}
    items = [item(spec, i) for i in range(first, first + count)]
    runnable = []
    for it in items:
        reasons, counts = safety.check_prompts([it.get("prompt")])
        label = _label_of(model, it)
        if reasons[0]:
            for key, v in counts.items():
                blocked[key] = blocked.get(key, 0) + v
        elif label is None or not 0 <= label < model.config.num_classes:
            blocked["prompt:no_label"] = blocked.get("prompt:no_label", 0) + 1
        else:
            runnable.append({**it, "label": label})
    steps = spec.steps or int(getattr(model.config, "sample_steps", 0) or 0)
    params = {"guidance": spec.guidance, "scale": spec.scale, "sampler": spec.sampler if kind == "diffusion" else None,
              "steps": steps if kind == "diffusion" else None, "eta": spec.eta if kind == "diffusion" else None}
    samples = []
    for b in range(0, len(runnable), spec.batch_size):
        chunk = runnable[b:b + spec.batch_size]
        reqs = [bs.SampleRequest(cond=torch.tensor([it["label"]]), segments=[(it["seed"], 1)],
                                 guidance=spec.guidance, scale=spec.scale, sampler=spec.sampler,
                                 steps=steps or 1, eta=spec.eta) for it in chunk]
        x = torch.cat(bs.sample_batch(model, reqs))
        keep, counts = safety.check_outputs(x, torch.tensor([it["label"] for it in chunk]))
        for key, v in counts.items():
            blocked[key] = blocked.get(key, 0) + v
        for it, img, ok in zip(chunk, to_uint8(x), keep.tolist()):
            if not ok:
                continue
            record = {"model": plan.model["name"], "version": plan.model["version"], "run_id": plan.model["run_id"],
                      "job": plan.fingerprint, "key": it["key"], "label": it["label"], "prompt": it.get("prompt"),
                      "seed": it["seed"], **params}
            if spec.watermark:
                img, record = watermark.mark(img, record)
            else:
                record = watermark.sign(record)
            meta = {"label": it["label"], "prompt": it.get("prompt"), "seed": it["seed"], "provenance": record}
            samples.append((it["key"], {"png": png_bytes(img), "cls": str(it["label"]).encode(),
                                        "json": json.dumps(meta, sort_keys=True).encode()}))
    data = tar_bytes(samples)
    digest = hashlib.sha256(data).hexdigest()
    storage.write_bytes(storage.join(spec.out_uri, shard_name(k)), data)
    entry = {"name": shard_name(k), "index": k, "n_samples": len(samples), "n_requested": count,
             "sha256": digest, "blocked": blocked, "first_item": first}
    storage.write_json(storage.join(spec.out_uri, sidecar_name(k)), entry)  # written last: marks completion
    return entry


def worker_env() -> dict[str, str]:
    """The settings a shard worker needs (``WORKER_ENV``) that are set here, for a Ray ``runtime_env``."""
    return {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}


# -- many shards ------------------------------------------------------------------------------------
def run_shards(plan: Plan, shard_ids: Sequence[int], payload: dict[str, Any], *, use_ray: bool = True,
               max_in_flight: int = 8, fail_shards: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Run shards as Ray tasks (or in-process); completed shards stay on disk if another one fails."""
    plan_json = plan.to_json()
    bar = progress(total=len(shard_ids), desc=f"generate {plan.fingerprint[:8]}", unit="shard")
    if not use_ray:
        out = []
        with bar:
            for k in shard_ids:
                if k in fail_shards:
                    raise RuntimeError(f"injected failure on shard {k}")
                out.append(generate_shard(payload, plan_json, k))
                bar.update(1)
        return out

    ensure_ray()
    env = worker_env()

    @ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])
    def shard_task(payload, plan_json, k, fail):
        if fail:
            raise RuntimeError(f"injected failure on shard {k}")
        return generate_shard(payload, plan_json, k)

    task = shard_task.options(runtime_env={"env_vars": env}) if env else shard_task
    payload_ref, plan_ref = ray.put(payload), ray.put(plan_json)
    pending, results, errors = {}, [], []
    queue = list(shard_ids)
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            k = queue.pop(0)
            pending[task.remote(payload_ref, plan_ref, k, k in fail_shards)] = k
        done, _ = ray.wait(list(pending), num_returns=1)
        k = pending.pop(done[0])
        try:
            results.append(ray.get(done[0]))
        except Exception as exc:  # noqa: BLE001 - finish the others, then report
            errors.append((k, exc))
        bar.update(1)
    bar.close()
    if errors:
        k, exc = errors[0]
        raise RuntimeError(f"{len(errors)} shard(s) failed, first: shard {k}: {exc}") from exc
    return results


def write_manifest(plan: Plan) -> dict[str, Any]:
    entries = []
    for k, _, _ in plan.shards:
        entry = shard_entry(plan.spec.out_uri, k)
        if entry is None:
            raise RuntimeError(f"shard {k} is not complete; run the job again to finish it")
        entries.append(entry)
    blocked: dict[str, int] = {}
    for e in entries:
        for key, v in e["blocked"].items():
            blocked[key] = blocked.get(key, 0) + v
    n_samples = sum(e["n_samples"] for e in entries)
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "generated", "job": plan.fingerprint, "model": plan.model,
        "spec": asdict(plan.spec), "n_requested": plan.n_items, "n_samples": n_samples,
        "blocked": blocked, "n_blocked": sum(blocked.values()),
        "shards": [{"name": e["name"], "n_samples": e["n_samples"], "sha256": e["sha256"], "blocked": e["blocked"]}
                   for e in entries],
        "provenance": {"signature": "hmac-sha256" if watermark.signing() else watermark.UNSIGNED,
                       "key_id": watermark.key_id(),
                       "watermark": "lsb-keyed" if plan.spec.watermark and watermark.signing() else None},
    }
    if n_samples + manifest["n_blocked"] != plan.n_items:
        raise RuntimeError(f"manifest accounts for {n_samples + manifest['n_blocked']} of {plan.n_items} items")
    storage.write_json(storage.join(plan.spec.out_uri, MANIFEST), manifest)
    return manifest


def run_job(spec: JobSpec, *, use_ray: bool = True, max_shards: int | None = None,
            fail_shards: Sequence[int] = ()) -> dict[str, Any]:
    """Plan (or resume), make the missing shards, write the manifest. ``max_shards`` stops early
    (no manifest: what an interruption leaves); ``fail_shards`` injects failures (tests)."""
    plan = make_plan(spec)
    todo = missing_shards(plan)
    kept = len(plan.shards) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    payload = model_payload(plan.model["uri"]) if todo else None
    made = run_shards(plan, todo, payload, use_ray=use_ray, fail_shards=fail_shards) if todo else []
    if missing_shards(plan):
        return {"complete": False, "kept": kept, "made": len(made), "out_uri": spec.out_uri}
    manifest = write_manifest(plan)
    return {"complete": True, "kept": kept, "made": len(made), "out_uri": spec.out_uri,
            "manifest": storage.join(spec.out_uri, MANIFEST), "n_samples": manifest["n_samples"],
            "n_blocked": manifest["n_blocked"], "model": plan.model}


def read_samples(out_uri: str) -> list[dict[str, Any]]:
    """Every sample of a finished job (manifest order): key, image (uint8 (H, W), or (H, W, 3) for RGB), meta."""
    manifest = storage.read_json(storage.join(out_uri, MANIFEST))
    out = []
    for s in manifest["shards"]:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(storage.join(out_uri, s["name"])))) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, group in members.items():
            img = np.asarray(Image.open(io.BytesIO(group["png"])))
            out.append({"key": key, "image": img, "meta": json.loads(group["json"])})
    return out
