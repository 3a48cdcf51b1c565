"""The ``batch_generate`` flow: a grid of conditions x seeds -> WebDataset shards + manifest.

Only orchestration: plan (pin the model version, or resume the plan already at
``out_uri``) -> the missing shards -> manifest. Every step is a plain function in
``tasks/generation/batch.py``; re-running after an interruption finishes the job without
duplicates (complete shards are kept, shard contents are deterministic). Each sample's PNG is
in the model's colour mode: ``L`` for a 1-channel model, ``RGB`` for a 3-channel one.

The shards fan out as one Prefect task run per shard (``shard-<k>``) on prefect-ray's
``RayTaskRunner``, in a sub-flow that joins the Ray connection ``ensure_ray`` made (``RAY_ADDRESS``
or a local instance), so each shard's state, retries and logs are visible in the Prefect UI.
With ``use_ray`` false the shards run in this process. The run leaves two artifacts: a table of
the shards (``batch-shards``) and a link to the manifest (``batch-manifest``).
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from condgen.flows.params import BatchGenerateParams
from condgen.flows.steps import manifest_task, missing_task, payload_task, plan_task, shard_task, shards_task
from condgen.tasks.generation import batch as bg
from condgen.tasks.io import settings, storage
from condgen.tasks.io.cluster import ensure_ray
from condgen.tasks.io.progress import progress

__all__ = ["BatchGenerateParams", "batch_generate", "job_spec"]


def job_spec(params: BatchGenerateParams) -> bg.JobSpec:
    """The job the parameters describe; ``out_uri`` defaults to ``<storage>/generated/<model>-<fingerprint>``."""
    fields = params.model_dump(exclude={"use_ray", "out_uri"})
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    probe = bg.JobSpec(out_uri="", **fields)
    name = params.model_uri.removeprefix("models:/").replace("@", "-").replace("/", "-")
    out = params.out_uri or storage.join(settings.storage_root(), "generated", f"{name}-{probe.fingerprint()}")
    return bg.JobSpec(out_uri=out, **fields)


def run_name() -> str:
    """The flow run's name: ``generate-<model>-<alias or version>-<sampler>``, e.g. ``generate-condgen-cvae-champion``."""
    raw = runtime.flow_run.parameters.get("params")
    try:
        p = raw if isinstance(raw, BatchGenerateParams) else BatchGenerateParams.model_validate(raw or {})
    except ValueError:
        return "generate"
    name = p.model_uri.removeprefix("models:/").replace("@", "-").replace("/", "-v")
    return f"generate-{name}-{p.sampler}" if "diffusion" in name else f"generate-{name}"


@flow(name="generate-shards", flow_run_name="generate-shards-{plan.fingerprint}", task_runner=RayTaskRunner())
def shards_on_ray(plan: bg.Plan, todo: list[int], payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One Prefect task run per missing shard, on Ray (the connection ``ensure_ray`` made); every shard is
    waited for, then the first failure (if any) is raised: complete shards stay on disk for a re-run."""
    import ray

    payload_ref, plan_json = ray.put(payload), plan.to_json()
    with remote_options(num_cpus=1, runtime_env={"env_vars": bg.worker_env()}):
        futures = {shard_task.submit(payload_ref, plan_json, k): k for k in todo}
    results, errors = [], []
    with progress(total=len(todo), desc=f"generate {plan.fingerprint[:8]}", unit="shard") as bar:
        for fut in as_completed(list(futures)):
            try:
                results.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - finish the others, then report
                errors.append((futures[fut], exc))
            bar.update(1)
    if errors:
        k, exc = min(errors, key=lambda e: e[0])
        raise RuntimeError(f"{len(errors)} shard(s) failed, first: shard {k}: {exc}") from exc
    return sorted(results, key=lambda e: e["index"])


@flow(name="batch_generate", flow_run_name=run_name)
def batch_generate(params: BatchGenerateParams) -> dict[str, Any]:
    log = get_run_logger()
    spec = job_spec(params)
    plan = plan_task(spec)
    todo = missing_task(plan)
    log.info("job %s: %d items in %d shards, %d to make, model %s v%s -> %s", plan.fingerprint, plan.n_items,
             len(plan.shards), len(todo), plan.model["name"], plan.model["version"], spec.out_uri)
    if todo:
        payload = payload_task(plan.model["uri"])
        if params.use_ray:
            ensure_ray()
            shards_on_ray(plan, todo, payload)
        else:
            shards_task(plan, todo, payload, use_ray=False)
    manifest = manifest_task(plan)
    uri = storage.join(spec.out_uri, bg.MANIFEST)
    log.info("wrote %d samples (%d blocked) in %d shards; manifest %s", manifest["n_samples"], manifest["n_blocked"],
             len(manifest["shards"]), uri)
    create_table_artifact([{"shard": s["name"], "samples": s["n_samples"], "blocked": sum(s["blocked"].values())}
                           for s in manifest["shards"]], key="batch-shards",
                          description=f"{plan.model['name']} v{plan.model['version']}: job {plan.fingerprint}")
    create_link_artifact(uri, link_text="manifest.json", key="batch-manifest",
                         description=f"{manifest['n_samples']} samples from {plan.model['name']} v"
                                     f"{plan.model['version']}")
    return {"out_uri": spec.out_uri, "manifest": uri, "n_samples": manifest["n_samples"],
            "n_blocked": manifest["n_blocked"], "made": len(todo), "kept": len(plan.shards) - len(todo),
            "model": plan.model}
