"""The replica's model pool: registry models (``models:/NAME@alias`` or ``models:/NAME/3``), each with
optional LoRA adapters (one merged copy per adapter, so requests never toggle shared weights) and
a noise-aware classifier for classifier guidance.

A model's ``info`` also carries what its run's shard set says (``training_set()``): the ``class_names``
(a label request to a text model becomes "a red circle", and a prompt to a label model names its class),
whether it is a ``digits`` set, and, for a text model, ``example_prompts``: train captions, which the web
page shows in its prompt box.

``refresh()`` re-resolves aliases and swaps in a new version when ``champion`` moved (the
service's background thread calls it every ``poll_s`` seconds). Entries are immutable: a swap
replaces the dict entry, and requests already holding the old entry finish on it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from mlflow.tracking import MlflowClient

from condgen.serving.config import ModelSpec
from condgen.serving.errors import ApiError
from condgen.tasks.generation.batching import describe, model_kind
from condgen.tasks.io.model_store import apply_adapter, load_model_uri, parse_model_uri
from condgen.tasks.io.shards import iter_samples, shard_uris
from condgen.tasks.io.tracking import run_shard_set

log = logging.getLogger(__name__)

EXAMPLE_PROMPTS = 4  # captions a text model's info carries (the web page's placeholder and suggestions)
EXAMPLE_SCAN = 256  # samples of the first shard read at most to find them


def training_set(run_id: str, text: bool, k: int = EXAMPLE_PROMPTS) -> dict[str, Any]:
    """What a served model knows of the shard set its run trained on (the run's ``condgen.shards`` tag):

    - ``class_names``: the manifest's names of the label classes, or None (integer labels, or unknown);
    - ``digits``: whether the set is a digit set (its labels are digits; schema v1 sets all are), so a
      bare label may be phrased as a digit sentence; None when the run or manifest cannot be read;
    - ``example_prompts`` (text models): up to ``k`` distinct train captions, from the first shard streamed
      until ``k`` are found (a few samples). So a ``bundled:shapes`` model suggests "a small red circle in
      the top left", not a digit sentence, and never a held-out combination.

    Nothing is raised: a missing run, tag, manifest or shard only loses these hints, never the model."""
    out: dict[str, Any] = {"class_names": None, "digits": None}
    if text:
        out["example_prompts"] = []
    if not run_id:
        return out
    try:
        found = run_shard_set(run_id)
        if found is None:
            return out
        shards, manifest = found
        names = manifest.get("class_names")
        out["class_names"] = [str(n) for n in names] if names else None
        out["digits"] = bool(manifest.get("digits", int(manifest.get("schema_version", 1)) == 1))
        if text:
            with contextlib.closing(iter_samples(shard_uris(shards, manifest)[0])) as samples:
                for _, sample in zip(range(EXAMPLE_SCAN), samples):
                    meta = json.loads(sample.get("json") or b"{}")
                    caption = str(meta.get("caption") or "").strip()
                    if meta.get("split", "train") == "train" and caption and caption not in out["example_prompts"]:
                        out["example_prompts"].append(caption)
                    if len(out["example_prompts"]) >= k:
                        break
    except Exception as exc:  # noqa: BLE001 - a missing run, tag or shard only loses the hints
        log.warning("no training-set facts for run %s: %s", run_id, type(exc).__name__)
    return out


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
        kind = model_kind(model)
        if kind == "other":
            raise ValueError(f"{spec.uri} is a {type(model).__name__}; the service serves cvae, gan and diffusion")
        classifier = load_model_uri(spec.classifier)[0].eval() if spec.classifier else None
        key = spec.name or str(meta["name"])
        info = describe(model)
        info.update(training_set(str(meta.get("run_id") or ""), info["condition"] == "text"))
        now = time.time()
        common = {"key": key, "spec": spec, "registered_name": str(meta["name"]), "version": str(meta["version"]),
                  "run_id": str(meta.get("run_id", "")), "kind": kind, "classifier": classifier, "loaded_at": now,
                  "info": info}
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
