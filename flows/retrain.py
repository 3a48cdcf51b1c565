"""The ``retrain`` flow: ingest -> train (Ray Train) -> evaluate -> promote -> report.

The flow only orchestrates; every step is a plain function in ``tasks/`` wrapped as
a Prefect task here. Runs on ephemeral Prefect by default and against a server
when ``PREFECT_API_URL`` is set; ``prefect.yaml`` schedules it nightly.

Specs (``TrainSpec``) run in order and can chain: a config value ``"@<name>"`` is the
checkpoint of an earlier spec (``resolve_refs``), so one run trains an autoencoder and then
the latent diffusion model on top of it. A model that trains on an autoencoder's latents
(``models.base.trains_on_latents``) reads them precomputed once per autoencoder
(``tasks/data/latents.py``). Components (``models.base.is_generator`` false) train and
checkpoint but skip evaluate and promote.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from condgen.flows.params import GateParams, ReportParams, RetrainParams, TrainSpec
from condgen.flows.steps import (
    embed_task,
    evaluate_task,
    ingest_task,
    latents_task,
    promote_task,
    report_task,
    train_task,
)
from condgen.models.base import config_from_dict, config_to_dict, is_generator, trains_on_latents
from condgen.models.registry import config_class, model_class
from condgen.tasks.io import settings, storage
from condgen.tasks.io.redact import redact_uri
from condgen.tasks.judging.report import ReportOptions
from condgen.tasks.training.driver import TrainRequest, TrainResult

__all__ = ["GateParams", "ReportParams", "RetrainParams", "TrainSpec", "default_shards_uri", "resolve_refs",
           "retrain"]


def resolve_refs(config: dict[str, Any], model: str, trained: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Chain specs of one flow run: a config value ``"@<name>"`` becomes the checkpoint URI of
    the earlier spec registered (or named) ``<name>``, e.g. a latent diffusion model's
    ``{"autoencoder_uri": "@autoencoder"}`` or a ControlNet's ``{"base_uri": "@diffusion"}``.
    When the key is ``<field>_uri`` and ``<field>`` is a config field the spec leaves unset,
    ``<field>`` gets the referenced model's config, so the architecture always matches the
    weights. An unknown name is an error before any training starts."""
    fields = {f.name for f in dataclasses.fields(config_class(model))}
    out = dict(config)
    for key, value in config.items():
        if not (isinstance(value, str) and value.startswith("@")):
            continue
        ref = trained.get(value[1:])
        if ref is None:
            raise ValueError(f"{model}: {key}={value!r} names no earlier model of this run "
                             f"(known: {sorted(trained) or 'none'})")
        out[key] = ref["checkpoint"]
        stem = key.removesuffix("_uri")
        if key.endswith("_uri") and stem in fields and stem not in config:
            out[stem] = ref["config"]
    return out


def source_tag(source: str) -> str:
    """A short, path-safe name of a source: ``bundled:mnist`` -> ``mnist``, ``s3://b/x`` -> ``s3_b_x``."""
    return source.replace("bundled:", "").replace("://", "_").replace("/", "_").strip("_") or "data"


def default_shards_uri(source: str) -> str:
    return storage.join(settings.storage_root(), "shards", source_tag(source))


def run_name() -> str:
    """The flow run's name (Prefect ``flow_run_name``): ``retrain-<source>-<model>+<model>``, e.g.
    ``retrain-mnist-cvae+diffusion``, instead of Prefect's random ``cute-woodlouse``."""
    raw = runtime.flow_run.parameters.get("params")
    try:
        p = raw if isinstance(raw, RetrainParams) else RetrainParams.model_validate(raw or {})
    except ValueError:  # an invalid params dict fails in the flow itself, with pydantic's message
        return "retrain"
    return f"retrain-{source_tag(p.source)}-{'+'.join(s.name for s in p.models) or 'none'}"


def named(task: Any, name: str) -> Any:
    """``task`` whose runs are called ``name`` (a model or registry name): Prefect formats
    ``task_run_name`` with the call's parameters, so braces are escaped."""
    return task.with_options(task_run_name=name.replace("{", "{{").replace("}", "}}"))


def report_options(report: ReportParams, judge_epochs: int, seed: int) -> ReportOptions:
    return ReportOptions(exploration=report.exploration, latent_maps=report.latent_maps,
                         map_support=tuple(report.map_support), map_mode=report.map_mode, map_test=report.map_test,
                         inversion_steps=report.inversion_steps, judge_epochs=judge_epochs, seed=seed)


@flow(name="retrain", flow_run_name=run_name, log_prints=True)
def retrain(params: RetrainParams = RetrainParams()) -> dict[str, Any]:  # noqa: B008 - Prefect reads the default
    """ingest -> embed -> for each spec: train (Ray Train) -> evaluate -> promote -> report; then the run's
    artifacts in Prefect: a metrics table, the promotion decisions with their reasons, a link to the report."""
    log = get_run_logger()
    shards_uri = params.shards_uri or default_shards_uri(params.source)
    log.info("retrain %s: %d model(s) (%s) on %d Ray worker(s)", params.source, len(params.models),
             ", ".join(s.name for s in params.models), params.num_workers)
    ing = ingest_task(params.source, shards_uri, **params.ingest_options())
    log.info("shards at %s (%s, %d rejected)", shards_uri, ing.counts, ing.n_rejected)
    emb = _embed(params, shards_uri)
    results, components, trained_refs = [], [], {}
    for spec in params.models:
        trained, config, embeddings = _train(spec, params, shards_uri, emb, trained_refs)
        name = spec.registered_name or f"condgen-{spec.name}"
        trained_refs[spec.name] = trained_refs[name] = {"checkpoint": trained.checkpoint_uri, "config": config}
        log.info("%s: trained (MLflow run %s, checkpoint %s)", name, trained.run_id, trained.checkpoint_uri)
        if is_generator(model_class(spec.name)):
            results.append(_evaluate_and_promote(spec.name, name, trained, params, shards_uri, embeddings))
        else:
            # A component (autoencoder, guidance classifier, super-res stage): it has no
            # samples of its own to judge, so it is neither evaluated nor promoted; later
            # specs reach its weights through "@<name>".
            log.info("%s: component trained (run %s); not evaluated or promoted", name, trained.run_id)
            components.append({"model": spec.name, "run_id": trained.run_id, "checkpoint": trained.checkpoint_uri,
                               "metrics": trained.metrics})
    out = {"shards_uri": shards_uri, "manifest": ing.manifest_uri, "results": results, "components": components}
    out.update(_report(params, results, shards_uri))
    publish_artifacts(results, components, out["report_uri"], params)
    return out


# -- what the run leaves in Prefect ------------------------------------------------------------------------------
METRIC_COLUMNS = {"eval/cond_accuracy": "cond_accuracy", "eval/fid": "fid", "eval/kid": "kid",
                  "eval/judge_test_accuracy": "judge_test_accuracy"}


def metrics_rows(results: list[dict[str, Any]], components: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trained model: registry name and version, MLflow run, the evaluation metrics, the decision."""
    rows = []
    for r in results:
        p = r["promotion"]
        row = {"model": r["model"], "registered": f"{p['name']}/{p['version']}", "run_id": r["run_id"]}
        row.update({col: round(float(r["metrics"][k]), 4) for k, col in METRIC_COLUMNS.items() if k in r["metrics"]})
        rows.append({**row, "promoted": bool(p["promoted"])})
    rows += [{"model": c["model"], "registered": "(component)", "run_id": c["run_id"], "promoted": False}
             for c in components]
    return rows


def promotion_markdown(results: list[dict[str, Any]], gate: GateParams) -> str:
    """The promotion decisions of the run, each with the gate's reason, as markdown."""
    lines = [f"# Promotion decisions (gate: accuracy >= {gate.min_accuracy}, tolerance {gate.tolerance})", ""]
    for r in results:
        p = r["promotion"]
        verdict = "**promoted** to `@champion`" if p["promoted"] else "**not promoted**"
        champion = "none" if p.get("champion_version") is None else \
            f"v{p['champion_version']} ({p.get('champion_accuracy')})"
        lines += [f"## `models:/{p['name']}/{p['version']}` ({r['model']}): {verdict}", "",
                  f"- reason: {p['reason']}", f"- conditional accuracy: {p.get('candidate_accuracy')}",
                  f"- champion before: {champion}", f"- MLflow run: `{r['run_id']}`", ""]
    return "\n".join(lines) if results else "No generator was trained in this run: nothing to promote."


def publish_artifacts(results: list[dict[str, Any]], components: list[dict[str, Any]], report_uri: str | None,
                      params: RetrainParams) -> None:
    """Prefect artifacts of this flow run (the UI's Artifacts tab): ``retrain-metrics`` (table),
    ``retrain-promotion`` (markdown with the reasons) and ``retrain-report`` (link to the HTML report)."""
    create_table_artifact(metrics_rows(results, components), key="retrain-metrics",
                          description=f"evaluation of every model trained on {params.source}")
    create_markdown_artifact(promotion_markdown(results, params.gate), key="retrain-promotion",
                             description="promotion decisions and their reasons")
    if report_uri:
        create_link_artifact(report_link(report_uri), link_text="evaluation report (HTML)", key="retrain-report",
                             description=f"the run's HTML report ({report_uri}); `condgen report "
                                         f"{report_uri.split('/')[1]}` downloads it")


def report_link(report_uri: str) -> str:
    """Where a browser finds the report of ``runs:/RUN_ID/PATH``: its page in the MLflow UI when tracking is an
    MLflow server, else the file in the run's artifact store (``file://…``, ``s3://…``); credentials redacted."""
    run_id, path = report_uri.removeprefix("runs:/").split("/", 1)
    tracking = settings.tracking_uri()
    client = MlflowClient(tracking_uri=tracking)
    run = client.get_run(run_id)
    if tracking.startswith(("http://", "https://")):
        return redact_uri(f"{tracking.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}/artifacts/{path}")
    return redact_uri(f"{run.info.artifact_uri.rstrip('/')}/{path}")


# -- the steps of one run ---------------------------------------------------------------------------
def _embed(params: RetrainParams, shards_uri: str) -> dict[str, Any] | None:
    """CLIP embeddings of the shards (computed once per CLIP), or None without ``params.clip``."""
    if not params.clip:
        return None
    emb = embed_task(shards_uri, params.clip, params.clip_fit_steps, params.num_workers)
    get_run_logger().info("CLIP embeddings %s (%d computed, %d up to date)", emb["uri"], len(emb["computed"]),
                          len(emb["skipped"]))
    return emb


def _train(spec: TrainSpec, params: RetrainParams, shards_uri: str, emb: dict[str, Any] | None,
           trained_refs: dict[str, dict[str, Any]]) -> tuple[TrainResult, dict[str, Any], str | None]:
    """Train one spec: its config with earlier specs' checkpoints filled in, its inputs prepared (second
    domain, CLIP text embeddings, autoencoder latents). Returns (result, full config as JSON, embeddings)."""
    log = get_run_logger()
    shards_b = None
    if spec.source_b:
        shards_b = default_shards_uri(spec.source_b)
        ingest_task(spec.source_b, shards_b, **params.ingest_options())
    config, embeddings = resolve_refs(spec.config, spec.name, trained_refs), None
    if config.get("condition") == "text":
        # Text models train on the precomputed CLIP text embeddings, never re-encoding captions.
        if emb is None:
            raise ValueError(f"{spec.name} is text-conditioned: set `clip` so the embed step runs")
        embeddings = emb["fingerprint"]
        config.setdefault("text_dim", emb["embed_dim"])
    model_config = config_from_dict(config_class(spec.name), config)
    latents = None
    autoencoder_uri = trains_on_latents(model_class(spec.name), model_config)
    if autoencoder_uri:
        # Encode the shards once per autoencoder (side-car tars keyed by its weights'
        # fingerprint, like the CLIP embeddings); training then never runs the encoder.
        lat = named(latents_task, f"latents-{spec.name}")(shards_uri, autoencoder_uri)
        latents = lat.fingerprint
        log.info("autoencoder latents %s (%d computed, %d up to date)", lat.uri, len(lat.computed),
                 len(lat.skipped))
    req = TrainRequest(model=spec.name, shards_uri=shards_uri, model_config=config, shards_b_uri=shards_b,
                       embeddings=embeddings, latents=latents, epochs=spec.epochs, batch_size=spec.batch_size,
                       num_workers=params.num_workers, seed=params.seed, experiment=params.experiment,
                       grid_every=spec.grid_every, lr_scaling=spec.lr_scaling,
                       lr_reference_batch=spec.lr_reference_batch, lr_warmup_steps=spec.lr_warmup_steps,
                       data_mode=spec.data_mode, stream_buffer=spec.stream_buffer, loader_threads=spec.loader_threads,
                       stream_sharding=spec.stream_sharding,
                       precision=spec.precision, grad_accumulation=spec.grad_accumulation,
                       checkpoint_every_steps=spec.checkpoint_every_steps)
    trained = train_task(req)
    # The config as trained (channels, size and classes fitted to the data), so a later "@name"
    # reference gets the architecture that was really built.
    return trained, trained.config or config_to_dict(model_config), embeddings


def _evaluate_and_promote(model: str, name: str, trained: TrainResult, params: RetrainParams, shards_uri: str,
                          embeddings: str | None) -> dict[str, Any]:
    """Judge a trained generator, and move ``name``'s champion alias to it if it passes the gate."""
    metrics = named(evaluate_task, f"evaluate-{name}")(trained.run_id, trained.checkpoint_uri, shards_uri, embeddings=embeddings,
                            n_per_class=params.eval_per_class, judge_epochs=params.judge_epochs)
    decision = promote_task(trained.run_id, name, metrics, params.gate.min_accuracy, params.gate.tolerance,
                            shards_uri, params.eval_per_class, params.judge_epochs, embeddings)
    get_run_logger().info("%s: cond_accuracy=%.4f fid=%.3f -> %s (%s)", name, metrics["eval/cond_accuracy"],
                          metrics["eval/fid"], "promoted" if decision["promoted"] else "not promoted",
                          decision["reason"])
    return {"model": model, "run_id": trained.run_id, "checkpoint": trained.checkpoint_uri, "metrics": metrics,
            "promotion": decision}


def _report(params: RetrainParams, results: list[dict[str, Any]], shards_uri: str) -> dict[str, Any]:
    """The HTML report over every judged model: ``report_uri`` and ``report_run_id`` (None when off)."""
    if not (params.report.enabled and results):
        return {"report_uri": None, "report_run_id": None}
    rep = report_task(results, shards_uri, report_options(params.report, params.judge_epochs, params.seed),
                      params.experiment, params.report.curves or None)
    get_run_logger().info("report: %s (MLflow run %s)", rep["uri"], rep["run_id"])
    return {"report_uri": rep["uri"], "report_run_id": rep["run_id"]}
