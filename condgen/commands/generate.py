"""``condgen generate``: batch generation of a grid of conditions x seeds into WebDataset shards.

The options and a parameter file are validated by ``BatchGenerateParams`` (``condgen.flows.params``,
pydantic only) and the model (and judge) are looked up in the registry before the flow (Prefect, Ray,
torch) is imported inside :func:`generate`.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

import typer

from condgen.commands import checks

TRAIN_FIX = "train and promote one with `condgen demo` or `condgen retrain --params FILE`"


def generate(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="models:/NAME@ALIAS or models:/NAME/N")] = "models:/condgen-cvae@champion",
    out: Annotated[str | None, typer.Option(help="shards URI (file://… or s3://…); default under CONDGEN_STORAGE")
                   ] = None,
    labels: Annotated[str, typer.Option(help="e.g. 0-9 or 1,3,7")] = "0-9",
    prompt: Annotated[list[str] | None, typer.Option(help="a prompt naming a digit (repeatable)")] = None,
    seeds: Annotated[int, typer.Option(help="seeds per condition")] = 8,
    seed_base: int = 0,
    guidance: Literal["none", "cfg"] = "none",
    scale: float = 0.0,
    sampler: Annotated[Literal["ddim", "ddpm", "dpmpp_2m"], typer.Option(
        help="diffusion models: ddim (eta 0 = deterministic), ddpm (ancestral) or dpmpp_2m (DPM-Solver++(2M), "
             "good in ~20 steps); ignored by other families")] = "ddim",
    steps: Annotated[int | None, typer.Option(help="sampler steps (default: the model's sample_steps)")] = None,
    eta: Annotated[float, typer.Option(help="DDIM eta (0 = deterministic, 1 = ancestral)")] = 0.0,
    shard_size: int = 256,
    batch_size: int = 64,
    judge: Annotated[str | None, typer.Option(help="classifier URI for the output safety check")] = None,
    no_watermark: Annotated[bool, typer.Option("--no-watermark", help="no provenance mark")] = False,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="generate in this process")] = False,
    no_prefect: Annotated[bool, typer.Option(
        "--no-prefect", help="run the plain functions without a Prefect flow run")] = False,
    params: Annotated[str | None, typer.Option(help="JSON file with BatchGenerateParams fields (flags override)")
                      ] = None,
) -> int:
    """Batch-generate a grid of conditions x seeds into shards (the batch_generate flow)."""
    from condgen.flows.params import BatchGenerateParams

    raw = checks.json_file(params, "--params") if params else {}
    checks.flow_params(BatchGenerateParams, raw, params or "parameters")  # the file alone: its typos named
    flags = {"model_uri": ("model", model), "labels": ("labels", checks.labels(labels)),
             "prompts": ("prompt", prompt or []), "seeds_per_condition": ("seeds", seeds),
             "seed_base": ("seed_base", seed_base), "guidance": ("guidance", guidance), "scale": ("scale", scale),
             "sampler": ("sampler", sampler), "steps": ("steps", steps), "eta": ("eta", eta),
             "shard_size": ("shard_size", shard_size), "batch_size": ("batch_size", batch_size),
             "judge_uri": ("judge", judge), "watermark": ("no_watermark", not no_watermark),
             "use_ray": ("no_ray", not no_ray), "out_uri": ("out", out)}
    for field, (option, value) in flags.items():
        # with a params file, only the flags typed on the command line override it (not their defaults)
        if not params or _given(ctx, option):
            raw[field] = value
    raw = {k: v for k, v in raw.items() if not (k == "out_uri" and v is None)}
    job = checks.flow_params(BatchGenerateParams, raw, params or "generate options")
    checks.registered(job.model_uri, TRAIN_FIX)
    if job.judge_uri:
        checks.model_ref(job.judge_uri)

    from condgen.flows.batch_generate import batch_generate, job_spec
    from condgen.tasks.generation import batch as bg

    result = bg.run_job(job_spec(job), use_ray=job.use_ray) if no_prefect else batch_generate(job)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _given(ctx: typer.Context, option: str) -> bool:
    """Was ``option`` typed on the command line (or set from the environment), rather than left at its default?"""
    source = ctx.get_parameter_source(option)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
