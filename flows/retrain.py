"""The ``retrain`` flow: ingest -> train (Ray Train) -> evaluate -> promote.

The flow only orchestrates; every step is a plain function in ``tasks/`` wrapped as
a Prefect task here. Runs on ephemeral Prefect by default and against a server
when ``PREFECT_API_URL`` is set; ``prefect.yaml`` schedules it nightly.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from condgen import settings
from tasks import evaluate as evaluate_mod
from tasks import ingest as ingest_mod
from tasks import promote as promote_mod
from tasks import storage
from tasks import train as train_mod


class ModelSpec(BaseModel):
    name: str = Field("cvae", description="a key of models.registry.MODELS")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the model's config dataclass")
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    registered_name: str | None = Field(None, description="MLflow registry name; default condgen-<name>")


class GateParams(BaseModel):
    min_accuracy: float = Field(0.8, ge=0, le=1)
    tolerance: float = Field(0.0, ge=0, le=1)


class RetrainParams(BaseModel):
    source: str = "bundled:mnist"
    shards_uri: str | None = Field(None, description="default: <storage>/shards/<source>")
    limit: int | None = Field(None, ge=1, description="ingest at most this many samples (tests, smoke runs)")
    shard_size: int = Field(1000, ge=1)
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec()])
    num_workers: int = Field(2, ge=1, le=1024)
    seed: int = 0
    eval_per_class: int = Field(100, ge=1, le=10_000)
    judge_epochs: int = Field(4, ge=1, le=100)
    gate: GateParams = Field(default_factory=GateParams)
    experiment: str = "condgen"


def default_shards_uri(source: str) -> str:
    tag = source.replace("bundled:", "").replace("://", "_").replace("/", "_").strip("_") or "data"
    return storage.join(settings.storage_root(), "shards", tag)


ingest_task = task(ingest_mod.ingest, name="ingest", retries=2, retry_delay_seconds=5, cache_policy=NONE)
train_task = task(train_mod.train, name="train", cache_policy=NONE)
evaluate_task = task(evaluate_mod.evaluate_run, name="evaluate", cache_policy=NONE)


@task(name="promote", cache_policy=NONE)
def promote_task(run_id: str, registered_name: str, metrics: dict[str, float], gate: GateParams,
                 shards_uri: str, eval_per_class: int, judge_epochs: int) -> dict[str, Any]:
    score = evaluate_mod.scorer(shards_uri, n_per_class=eval_per_class, judge_epochs=judge_epochs)
    p = promote_mod.promote(run_id, registered_name, metrics["eval/cond_accuracy"],
                            promote_mod.Gate(gate.min_accuracy, gate.tolerance), champion_accuracy_fn=score)
    return p.__dict__


@flow(name="retrain", log_prints=True)
def retrain(params: RetrainParams = RetrainParams()) -> dict[str, Any]:
    log = get_run_logger()
    shards_uri = params.shards_uri or default_shards_uri(params.source)
    ing = ingest_task(params.source, shards_uri, shard_size=params.shard_size, seed=params.seed, limit=params.limit)
    log.info("shards at %s (%s, %d rejected)", shards_uri, ing.counts, ing.n_rejected)
    results = []
    for spec in params.models:
        req = train_mod.TrainRequest(model=spec.name, shards_uri=shards_uri, model_config=spec.config,
                                     epochs=spec.epochs, batch_size=spec.batch_size, num_workers=params.num_workers,
                                     seed=params.seed, experiment=params.experiment)
        trained = train_task(req)
        metrics = evaluate_task(trained.run_id, trained.checkpoint_uri, shards_uri,
                                n_per_class=params.eval_per_class, judge_epochs=params.judge_epochs)
        name = spec.registered_name or f"condgen-{spec.name}"
        decision = promote_task(trained.run_id, name, metrics, params.gate, shards_uri,
                                params.eval_per_class, params.judge_epochs)
        log.info("%s: cond_accuracy=%.4f fid=%.3f -> %s (%s)", name, metrics["eval/cond_accuracy"],
                 metrics["eval/fid"], "promoted" if decision["promoted"] else "kept champion", decision["reason"])
        results.append({"model": spec.name, "run_id": trained.run_id, "checkpoint": trained.checkpoint_uri,
                        "metrics": metrics, "promotion": decision})
    return {"shards_uri": shards_uri, "manifest": ing.manifest_uri, "results": results}
