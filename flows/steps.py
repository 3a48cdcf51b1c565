"""Every Prefect task of condgen's flows, in one place, each with one retry policy.

The steps themselves are plain functions in ``condgen.tasks``; this module only names them
for Prefect. A step that only reads and writes storage or the tracking server is retried
on transient I/O errors (connection resets, 5xx, throttling) and on nothing else: a bad
config, a missing file or a model that fails to converge fails at once, because running it
again cannot help. Steps that spend minutes of compute (training, evaluation, generation)
are not retried by Prefect at all; Ray Train's ``FailureConfig`` already restarts a lost
worker from its last checkpoint.
"""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from condgen.tasks.clip.embed import embed
from condgen.tasks.data.ingest import ingest
from condgen.tasks.data.latents import precompute_latents
from condgen.tasks.generation import batch as bg
from condgen.tasks.io import health, storage
from condgen.tasks.judging import evaluate as evaluate_mod
from condgen.tasks.judging import promote as promote_mod
from condgen.tasks.judging import report as report_mod
from condgen.tasks.training.driver import train


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task only when it failed on I/O."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return False
    return isinstance(exc, BaseException) and storage.is_transient_io_error(exc)


IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_on_io}


def io_step(fn, name: str, run_name: str | None = None):
    """A storage/tracking-bound step: retried on transient I/O errors only. ``run_name``: Prefect's
    ``task_run_name`` template over the step's parameters (default: the name and a counter)."""
    return task(fn, name=name, task_run_name=run_name, cache_policy=NONE, **IO_RETRIES)


def compute_step(fn, name: str, run_name: str | None = None):
    """A compute-bound step: never retried by Prefect (Ray restarts lost workers itself)."""
    return task(fn, name=name, task_run_name=run_name, cache_policy=NONE)


# retrain
# Task runs are named from their parameters (``train-cvae``, ``promote-condgen-cvae``), not ``train-329``;
# the flows rename a call where the parameters do not say which model it is (``flows.retrain.named``).
ingest_task = io_step(ingest, "ingest", "ingest-{source}")
latents_task = io_step(precompute_latents, "precompute-latents")
train_task = compute_step(train, "train", "train-{req.model}")
evaluate_task = compute_step(evaluate_mod.evaluate_run, "evaluate", "evaluate-{run_id}")


@task(name="embed", task_run_name="embed-{clip}", cache_policy=NONE, **IO_RETRIES)
def embed_task(shards_uri: str, clip: str, fit_steps: int, num_workers: int) -> dict[str, Any]:
    return embed(shards_uri, clip, num_workers=num_workers,
                 fit_kwargs={"steps": fit_steps}).to_dict()


@task(name="promote", task_run_name="promote-{registered_name}", cache_policy=NONE)
def promote_task(run_id: str, registered_name: str, metrics: dict[str, float], min_accuracy: float,
                 tolerance: float, shards_uri: str, eval_per_class: int, judge_epochs: int,
                 embeddings: str | None = None) -> dict[str, Any]:
    """Register the run's model and move ``champion`` if the gate passes; the current
    champion is re-scored on the candidate's evaluation."""
    score = evaluate_mod.scorer(shards_uri, embeddings=embeddings, n_per_class=eval_per_class,
                                judge_epochs=judge_epochs)
    p = promote_mod.promote(run_id, registered_name, metrics["eval/cond_accuracy"],
                            promote_mod.Gate(min_accuracy, tolerance), champion_accuracy_fn=score)
    return p.__dict__


@task(name="report", task_run_name="report-{experiment}", cache_policy=NONE)
def report_task(results: list[dict[str, Any]], shards_uri: str, options: report_mod.ReportOptions, experiment: str,
                curves: dict[str, Any] | None) -> dict[str, Any]:
    """One HTML report for every model of this flow run, logged to a dedicated MLflow run."""
    return report_mod.write_report(results, shards_uri, experiment=experiment, curves=curves, options=options)


# batch_generate
plan_task = io_step(bg.make_plan, "plan", "plan-{spec.model_uri}")
missing_task = compute_step(bg.missing_shards, "missing-shards", "missing-shards-{plan.fingerprint}")
payload_task = io_step(bg.model_payload, "load-model", "load-model-{uri}")
shards_task = compute_step(bg.run_shards, "generate-shards", "generate-shards-{plan.fingerprint}")
# One shard, as a task run of its own on Ray (flows/batch_generate.py): its bytes depend on the job alone, so a
# retry after a storage hiccup writes the same shard.
shard_task = task(bg.generate_shard, name="generate-shard", task_run_name="shard-{k}", cache_policy=NONE,
                  **IO_RETRIES)
manifest_task = io_step(bg.write_manifest, "manifest", "manifest-{plan.fingerprint}")

# healthcheck
storage_check_task = io_step(health.storage_roundtrip, "storage")
tracking_check_task = io_step(health.tracking_ping, "tracking")
ray_check_task = compute_step(health.ray_ping, "ray")
