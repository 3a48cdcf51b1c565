"""Register a trained model in the MLflow registry and move the ``champion`` alias
to it only if it passes the gate.

Gate (configurable): the candidate's conditional accuracy is at least
``min_accuracy`` and not worse than the current champion's by more than
``tolerance`` on *the same evaluation* (same judge, same seeds) — the champion is
re-scored now rather than trusting a number logged under another judge.
Every decision is recorded as tags on the model version.

A number that is not a number decides nothing: a NaN accuracy never passes, and a NaN FID
(a split too small to measure it, ``tasks.judging.evaluate``) fails a gate that bounds FID.
When the evaluation's judge was too weak to judge (the run's ``condgen.judge_warning`` tag),
the warning goes into the reason and onto the version; with ``require_competent_judge`` it
also blocks the promotion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from condgen.tasks.io.model_store import ALIAS, alias_version, load_registered, register


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
           judge_warning: str | None = None) -> tuple[bool, str]:
    """The gate as a pure function (so it is tested without a registry)."""
    if not math.isfinite(candidate):
        return False, f"conditional accuracy {candidate} is not a number"
    if candidate < gate.min_accuracy:
        return False, f"conditional accuracy {candidate:.4f} < threshold {gate.min_accuracy:.4f}"
    if gate.max_fid is not None and fid is not None and not fid <= gate.max_fid:
        return False, f"FID {fid:.3f} > max {gate.max_fid:.3f}" if math.isfinite(fid) else "FID not measured (NaN)"
    if gate.require_competent_judge and judge_warning:
        return False, f"the judge is too weak to judge: {judge_warning}"
    if champion is not None and candidate < champion - gate.tolerance:
        return False, f"conditional accuracy {candidate:.4f} worse than champion's {champion:.4f} on the same eval"
    if champion is None:
        reason = f"first champion: conditional accuracy {candidate:.4f} >= {gate.min_accuracy:.4f}"
    else:
        reason = f"conditional accuracy {candidate:.4f} >= champion's {champion:.4f} - {gate.tolerance}"
    return True, reason + (f" (judge warning: {judge_warning})" if judge_warning else "")


def promote(run_id: str, name: str, candidate_accuracy: float, gate: Gate, *,
            champion_accuracy_fn=None, fid: float | None = None) -> Promotion:
    """Register the run's model; move the alias if the gate passes; tag the decision.

    ``champion_accuracy_fn(model) -> float`` re-scores the current champion with the
    candidate's evaluation; without it the champion's logged metric is used.
    """
    client = MlflowClient()
    prev = alias_version(name, ALIAS)
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
    client.set_tag(run_id, "condgen.promoted", str(ok).lower())
    client.set_tag(run_id, "condgen.promotion_reason", reason)
    return Promotion(name, version, ok, reason, candidate_accuracy, champ_acc, prev)
