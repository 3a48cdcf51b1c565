"""Register a trained model in the MLflow registry and move the ``champion`` alias
to it only if it passes the gate.

Gate (configurable): the candidate's conditional accuracy is at least
``min_accuracy`` and not worse than the current champion's by more than
``tolerance`` on *the same evaluation* (same judge, same seeds) — the champion is
re-scored now rather than trusting a number logged under another judge.
Every decision is recorded as tags on the model version.

Each registered version is also what MLflow users expect (issue #19): an MLflow pyfunc model
(``tasks.io.pyfunc_model``: ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(...)``), with
a model card as its description (:func:`model_card`: data, config, metrics, gate decision); the
training run gets its shard set as a dataset input and its per-class accuracies as one table.

A number that is not a number decides nothing: a NaN accuracy never passes, and a NaN FID
(a split too small to measure it, ``tasks.judging.evaluate``) fails a gate that bounds FID.
When the evaluation's judge was too weak to judge (the run's ``condgen.judge_warning`` tag),
the warning goes into the reason and onto the version; with ``require_competent_judge`` it
also blocks the promotion.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from condgen.tasks.io import shards, tracking
from condgen.tasks.io.model_store import ALIAS, alias_version, load_registered, register
from condgen.tasks.io.pyfunc_model import log_pyfunc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gate:
    min_accuracy: float = 0.8
    tolerance: float = 0.0  # the candidate may be this much worse than the champion
    max_fid: float | None = None
    require_competent_judge: bool = False  # True: a weak judge's warning blocks promotion


@dataclass
class Promotion:
    name: str
    version: str
    promoted: bool
    reason: str
    candidate_accuracy: float
    champion_accuracy: float | None
    champion_version: str | None


def decide(candidate: float, champion: float | None, gate: Gate, fid: float | None = None,
           judge_warning: str | None = None, metric: str = "conditional accuracy") -> tuple[bool, str]:
    """The gate as a pure function (so it is tested without a registry); ``metric`` names the score in the
    reason (a pretrained adapter is gated on its held-out denoising gain, not on a judge's accuracy)."""
    if not math.isfinite(candidate):
        return False, f"{metric} {candidate} is not a number"
    if candidate < gate.min_accuracy:
        return False, f"{metric} {candidate:.4f} < threshold {gate.min_accuracy:.4f}"
    if gate.max_fid is not None and fid is not None and not fid <= gate.max_fid:
        return False, f"FID {fid:.3f} > max {gate.max_fid:.3f}" if math.isfinite(fid) else "FID not measured (NaN)"
    if gate.require_competent_judge and judge_warning:
        return False, f"the judge is too weak to judge: {judge_warning}"
    if champion is not None and candidate < champion - gate.tolerance:
        return False, f"{metric} {candidate:.4f} worse than champion's {champion:.4f} on the same eval"
    if champion is None:
        reason = f"first champion: {metric} {candidate:.4f} >= {gate.min_accuracy:.4f}"
    else:
        reason = f"{metric} {candidate:.4f} >= champion's {champion:.4f} - {gate.tolerance}"
    return True, reason + (f" (judge warning: {judge_warning})" if judge_warning else "")


def promote(run_id: str, name: str, candidate_accuracy: float, gate: Gate, *,
            champion_accuracy_fn=None, fid: float | None = None) -> Promotion:
    """Register the run's model; move the alias if the gate passes; tag the decision.

    ``champion_accuracy_fn(model) -> float`` re-scores the current champion with the
    candidate's evaluation; without it the champion's logged metric is used.
    """
    client = MlflowClient()
    prev = alias_version(name, ALIAS)
    lineage = _attach_lineage(client, run_id)
    version = register(run_id, name, tags={"condgen.cond_accuracy": f"{candidate_accuracy:.6f}"})
    champ_acc = None
    if prev is not None:
        if champion_accuracy_fn is not None:
            model, _ = load_registered(f"models:/{name}@{ALIAS}")
            champ_acc = float(champion_accuracy_fn(model))
        else:
            champ_run = client.get_model_version(name, prev).run_id
            champ_acc = client.get_run(champ_run).data.metrics.get("eval/cond_accuracy")
    judge_warning = client.get_run(run_id).data.tags.get("condgen.judge_warning")  # set by evaluate.log_eval
    ok, reason = decide(candidate_accuracy, champ_acc, gate, fid, judge_warning)
    if ok:
        client.set_registered_model_alias(name, ALIAS, version)
    client.set_model_version_tag(name, version, "condgen.promoted", str(ok).lower())
    client.set_model_version_tag(name, version, "condgen.reason", reason)
    if judge_warning:
        client.set_model_version_tag(name, version, "condgen.judge_warning", judge_warning)
    for key, value in lineage.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_tag(run_id, "condgen.promoted", str(ok).lower())
    client.set_tag(run_id, "condgen.promotion_reason", reason)
    decision = Promotion(name, version, ok, reason, candidate_accuracy, champ_acc, prev)
    client.update_model_version(name, version, description=model_card(client.get_run(run_id), decision, gate,
                                                                      lineage.get("condgen.data_digest")))
    return decision


def _attach_lineage(client: MlflowClient, run_id: str) -> dict[str, str]:
    """Before registering: the run's ``model/`` folder as a pyfunc model, its shard set as a dataset input
    and its per-class table (when the run lacks them). Bookkeeping: a failure is logged and tagged on the
    run, never a failed promotion. Returns tags for the version (``condgen.pyfunc``, the data digest)."""
    run, tags = client.get_run(run_id), {}
    try:
        tags["condgen.pyfunc"] = str(log_pyfunc(run_id)).lower()
    except Exception as exc:  # noqa: BLE001 - a version without a pyfunc flavour is still a version
        log.warning("condgen: %s: no pyfunc model: %s", run_id, exc)
        tags["condgen.pyfunc"] = "false"
        client.set_tag(run_id, "condgen.pyfunc_error", str(exc)[:500])
    shards_uri = run.data.params.get("shards_uri")
    try:
        manifest = shards.read_manifest(shards_uri) if shards_uri else None
    except Exception as exc:  # noqa: BLE001 - the shard set may be gone; the run still names it
        log.warning("condgen: %s: manifest unreadable: %s", shards_uri, exc)
        manifest = None
    if manifest is not None:
        dataset = tracking.shard_dataset(shards_uri, manifest)
        tags["condgen.data_digest"] = dataset.digest
        if not run.inputs or not run.inputs.dataset_inputs:
            tracking.log_shard_input(run_id, shards_uri, manifest)
    per_class = per_class_accuracy(run.data.metrics)
    if per_class and not any(f.path == tracking.PER_CLASS_TABLE for f in client.list_artifacts(run_id, "eval")):
        tracking.log_per_class_table(run_id, per_class, (manifest or {}).get("class_names"))
    return tags


def per_class_accuracy(metrics: dict[str, float]) -> list[float]:
    """``eval/acc_class_<c>`` metrics as a list indexed by class (NaN where a class has none)."""
    found = {int(k.rsplit("_", 1)[1]): v for k, v in metrics.items() if k.startswith("eval/acc_class_")}
    return [found.get(c, float("nan")) for c in range(max(found) + 1)] if found else []


def model_card(run: Any, decision: Promotion, gate: Gate, data_digest: str | None = None) -> str:
    """The model version's description (markdown): what it is, the data it saw, its config, its metrics,
    the gate's decision and how to load it."""
    params, metrics = run.data.params, run.data.metrics
    config = {k.removeprefix("cfg."): v for k, v in sorted(params.items()) if k.startswith("cfg.")}
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith("eval/") and "acc_class_" not in k}
    lines = [
        f"# {decision.name} v{decision.version} — {params.get('model', 'model')}",
        "",
        f"**Gate**: {'promoted to @' + ALIAS if decision.promoted else 'not promoted'} — {decision.reason} "
        f"(min accuracy {gate.min_accuracy}, tolerance {gate.tolerance}"
        + (f", max FID {gate.max_fid}" if gate.max_fid is not None else "") + ").",
        "",
        "## Data",
        f"- shard set: `{params.get('shards_uri', 'unknown')}`" + (f" (digest `{data_digest}`)" if data_digest else ""),
        f"- training run: `{run.info.run_id}`, {params.get('epochs', '?')} epochs, "
        + f"batch {params.get('batch_size', '?')}, seed {params.get('seed', '?')}",
        "",
        "## Config",
        "```json", json.dumps(config, indent=1, sort_keys=True) if config else "{}", "```",
        "",
        "## Metrics",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in shown.items()],
        "",
        "## Use",
        "```python",
        "import mlflow, pandas as pd",
        f'model = mlflow.pyfunc.load_model("models:/{decision.name}/{decision.version}")',
        'images = model.predict(pd.DataFrame([{"condition": 7, "n": 4, "seed": 0}]))  # (4, H, W, C) uint8',
        "```",
    ]
    return "\n".join(lines)
