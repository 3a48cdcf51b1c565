"""The ``batch_generate`` flow: a grid of conditions x seeds -> WebDataset shards + manifest.

Only orchestration: plan (pin the model version, or resume the plan already at
``out_uri``) -> the missing shards as Ray tasks -> manifest. Every step is a plain
function in ``tasks/generation/batch.py``; re-running after an interruption finishes the
job without duplicates (complete shards are kept, shard contents are deterministic). Each sample's
PNG is in the model's colour mode: ``L`` for a 1-channel model, ``RGB`` for a 3-channel one.
"""
from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from condgen.flows.steps import manifest_task, missing_task, payload_task, plan_task, shards_task
from condgen.tasks.generation import batch as bg
from condgen.tasks.io import settings, storage


class BatchGenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a params file is an error, not ignored
    model_uri: str = Field("models:/condgen-cvae@champion", description="models:/NAME@ALIAS or models:/NAME/VERSION")
    out_uri: str | None = Field(None, description="default: <storage>/generated/<model>-<job fingerprint>")
    labels: list[int] = Field(default_factory=lambda: list(range(10)), max_length=10_000)
    prompts: list[str] = Field(default_factory=list, max_length=10_000)
    seeds_per_condition: int = Field(8, ge=1, le=1_000_000)
    seed_base: int = Field(0, ge=0, le=2**31 - 1)
    guidance: Literal["none", "cfg"] = "none"
    scale: float = Field(0.0, ge=0, le=50)
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int | None = Field(None, ge=1, le=1000)
    eta: float = Field(0.0, ge=0, le=1)
    shard_size: int = Field(256, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1, le=4096)
    watermark: bool = True
    judge_uri: str | None = Field(None, description="classifier for the output safety check")
    judge_min_prob: float = Field(0.5, ge=0, le=1)
    deny_list: list[str] | None = None
    use_ray: bool = True

    @model_validator(mode="after")
    def _some_condition(self):
        if not self.labels and not self.prompts:
            raise ValueError("give at least one label or prompt")
        if any(not 0 <= v <= 1_000_000 for v in self.labels):
            raise ValueError("labels must be in [0, 1000000]")
        return self

    def spec(self) -> bg.JobSpec:
        fields = self.model_dump(exclude={"use_ray", "out_uri"})
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        probe = bg.JobSpec(out_uri="", **fields)
        name = self.model_uri.removeprefix("models:/").replace("@", "-").replace("/", "-")
        out = self.out_uri or storage.join(settings.storage_root(), "generated", f"{name}-{probe.fingerprint()}")
        return bg.JobSpec(out_uri=out, **fields)


@flow(name="batch_generate")
def batch_generate(params: BatchGenerateParams) -> dict[str, Any]:
    log = get_run_logger()
    spec = params.spec()
    plan = plan_task(spec)
    todo = missing_task(plan)
    log.info("job %s: %d items in %d shards, %d to make, model %s v%s", plan.fingerprint, plan.n_items,
             len(plan.shards), len(todo), plan.model["name"], plan.model["version"])
    if todo:
        shards_task(plan, todo, payload_task(plan.model["uri"]), use_ray=params.use_ray)
    manifest = manifest_task(plan)
    return {"out_uri": spec.out_uri, "manifest": storage.join(spec.out_uri, bg.MANIFEST),
            "n_samples": manifest["n_samples"], "n_blocked": manifest["n_blocked"], "made": len(todo),
            "kept": len(plan.shards) - len(todo), "model": plan.model}
