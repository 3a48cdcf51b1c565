"""The evaluation report of a ``retrain`` run: gather, render, log.

``write_report`` gathers what the page shows for the flow's results (grids from the runs'
artifacts, models from their checkpoints: interpolation strips, the attribute study of the
first CVAE, latent maps between pairs of models), renders it with
``tasks/judging/report_html.py``, and logs ``report/report.html`` + ``report.json`` (and the
fitted latent maps under ``maps/``) to a dedicated MLflow run tagged
``condgen.role=report``; each model run gets a ``condgen.report_run`` tag pointing to it.
A section that fails is shown in the report instead of failing the flow.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from condgen.tasks.data.splits import load_split
from condgen.tasks.io import settings, tracking
from condgen.tasks.io.images import from_uint8
from condgen.tasks.io.model_store import load_trained
from condgen.tasks.judging import latent_maps as ml
from condgen.tasks.judging import latent_studies as studies
from condgen.tasks.judging.evaluate import get_judge
from condgen.tasks.judging.report_html import REPORT_FILE, ModelSection, normalise_curves, render_report

log = logging.getLogger(__name__)

REPORT_DIR = "report"


@dataclass
class ReportOptions:
    exploration: bool = True  # interpolation strips + attribute study (first CVAE)
    latent_maps: bool = True  # maps between every pair of models with latent spaces
    map_support: tuple[int, ...] = (10, 100, 1000)
    map_mode: str = "generated"  # cheap default: no GAN inversion for CVAE <-> GAN pairs
    map_test: int = 200
    inversion_steps: int = 100
    max_map_pairs: int = 3
    n_edit: int = 50
    strengths: tuple[float, ...] = (-2, -1, -0.5, 0, 0.5, 1, 2)
    judge_epochs: int = 4
    seed: int = 0


def _grid_from_run(run_id: str) -> np.ndarray | None:

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = MlflowClient().download_artifacts(run_id, "eval/class_grid.png", tmp)
        except Exception:  # noqa: BLE001 - no grid logged: the section says so
            return None
        return np.asarray(Image.open(path).convert("L"))


def _section(errors: dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
    """Run one report section; a failure is shown in the report instead of failing the flow."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a report section is best effort by design
        log.warning("report section %s failed: %s", name, exc)
        errors[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return None


def gather(results: Sequence[Mapping[str, Any]], shards_uri: str, options: ReportOptions | None = None,
           *, map_run_id: str | None = None) -> dict[str, Any]:
    """Everything the page shows, for the flow's results list (dicts with model, run_id, checkpoint,
    metrics). Maps are logged to ``map_run_id`` when given."""


    opt = options or ReportOptions()
    errors: dict[str, str] = {}
    sections: list[ModelSection] = []
    spaces: list[ml.LatentSpace] = []
    counts: dict[str, int] = {}
    for r in results:
        base = str(r.get("model", "model"))
        counts[base] = counts.get(base, 0) + 1
        name = base if counts[base] == 1 else f"{base}-{counts[base]}"
        sec = ModelSection(name, r.get("run_id"), {k: float(v) for k, v in (r.get("metrics") or {}).items()
                                                    if isinstance(v, (int, float))})
        if sec.run_id:
            sec.grid = _section(errors, f"{name}: sample grid", lambda: _grid_from_run(sec.run_id))
        if r.get("checkpoint") and (opt.exploration or opt.latent_maps):
            def load(r=r, name=name):
                model, _ = load_trained(r["checkpoint"])
                if ml.space_kind(model) is None:
                    return None
                return ml.latent_space(model, name=name, uri=r["checkpoint"])

            space = _section(errors, f"{name}: load checkpoint", load)
            if space is not None:
                spaces.append(space)
        sections.append(sec)

    test = _section(errors, "test split", lambda: load_split(shards_uri, "test")) if spaces else None
    train = _section(errors, "train split", lambda: load_split(shards_uri, "train")) if spaces else None
    study = None
    if opt.exploration and test is not None:
        xt, yt = from_uint8(test["x"]), torch.from_numpy(test["y"])
        for sec in sections:
            space = next((s for s in spaces if s.name == sec.name), None)
            if space is not None:
                sec.interpolation = _section(errors, f"{sec.name}: interpolation",
                                             lambda space=space: studies.interpolation_strips(space, x=xt, y=yt,
                                                                                              seed=opt.seed)) or {}
        cvae = next((s for s in spaces if s.kind == "cvae"), None)
        if cvae is not None and train is not None:
            study = _section(errors, f"{cvae.name}: attribute study", lambda: studies.attribute_study(
                cvae, from_uint8(train["x"]), torch.from_numpy(train["y"]), train["attributes"],
                n_edit=opt.n_edit, strengths=opt.strengths, seed=opt.seed))

    map_rows: list[dict[str, Any]] = []
    map_uris: dict[str, str] = {}
    if opt.latent_maps and len(spaces) >= 2 and train is not None and test is not None:
        judge = _section(errors, "judge", lambda: get_judge(shards_uri, epochs=opt.judge_epochs))
        rng = np.random.default_rng(opt.seed)
        i_sup = rng.permutation(len(train["y"]))[:max(opt.map_support)]
        i_test = np.random.default_rng(opt.seed + 1).permutation(len(test["y"]))[:opt.map_test]
        pairs = [(a, b) for i, a in enumerate(spaces) for b in spaces[i + 1:]][:opt.max_map_pairs]
        for a, b in pairs:
            def run_pair(a=a, b=b):
                st = studies.compare_spaces(a, b, from_uint8(train["x"][i_sup]),
                                            torch.from_numpy(train["y"][i_sup]), from_uint8(test["x"][i_test]),
                                            torch.from_numpy(test["y"][i_test]), judge, sizes=opt.map_support,
                                            mode=opt.map_mode, inversion_steps=opt.inversion_steps, seed=opt.seed)
                if map_run_id:
                    for key, m in st.maps.items():
                        map_uris[key] = ml.log_map(m, map_run_id, f"maps/{key}")
                return st.rows

            map_rows += _section(errors, f"map {a.name} <-> {b.name}", run_pair) or []
    return {"models": sections, "attribute_study": study, "map_rows": map_rows, "map_uris": map_uris,
            "errors": errors}


def write_report(results: Sequence[Mapping[str, Any]], shards_uri: str, *, experiment: str = "condgen",
                 curves: Mapping[str, Any] | None = None, options: ReportOptions | None = None,
                 run_id: str | None = None, title: str = "condgen retrain report") -> dict[str, Any]:
    """Gather, render and log the report. Logs to ``run_id`` when given, otherwise to a new
    run named ``report`` in ``experiment``. Returns ``{"run_id", "uri", "local_path", ...}``."""


    experiment_id = tracking.configure(experiment)
    client = MlflowClient()
    created = run_id is None
    if created:
        run = client.create_run(experiment_id, run_name="report",
                                tags={"condgen.role": "report",
                                      "condgen.runs": ",".join(str(r.get("run_id")) for r in results)[:5000]})
        run_id = run.info.run_id
    t0 = time.perf_counter()
    data = gather(results, shards_uri, options, map_run_id=run_id)
    study = data["attribute_study"]
    info = {"shards": shards_uri, "report run": run_id, "models": len(results)}
    with tempfile.TemporaryDirectory() as tmp:
        path = render_report(tmp, title=title, models=data["models"], curves=curves, map_rows=data["map_rows"],
                             attribute_study=study, info=info, errors=data["errors"])
        summary = {"models": [{"name": m.name, "run_id": m.run_id, "metrics": m.metrics} for m in data["models"]],
                   "map_rows": data["map_rows"], "map_uris": data["map_uris"],
                   "attribute_study": study.to_json() if study is not None else None,
                   "errors": data["errors"], "curves": normalise_curves(curves)}
        Path(tmp, "report.json").write_text(json.dumps(summary, indent=2, default=float))
        client.log_artifacts(run_id, tmp, REPORT_DIR)
        size = path.stat().st_size
    for r in results:
        if r.get("run_id") and r["run_id"] != run_id:
            client.set_tag(r["run_id"], "condgen.report_run", run_id)
    client.log_metric(run_id, "report/seconds", time.perf_counter() - t0)
    if created:
        client.set_terminated(run_id)
    return {"run_id": run_id, "uri": f"runs:/{run_id}/{REPORT_DIR}/{REPORT_FILE}", "bytes": size,
            "map_uris": data["map_uris"], "errors": data["errors"]}


def report_run_of(run_id: str) -> str:
    """The run that holds the report for ``run_id`` (itself, or the one its tag points to)."""

    run = MlflowClient().get_run(run_id)
    return run.data.tags.get("condgen.report_run", run_id)


def download_report(run_id: str, dst: str | Path | None = None) -> Path:
    """Download ``report/report.html`` of a report run (or of the report a model run points to)."""


    rid = report_run_of(run_id)
    dst = Path(dst) if dst else settings.home() / "reports" / rid
    dst.mkdir(parents=True, exist_ok=True)
    local = MlflowClient().download_artifacts(rid, f"{REPORT_DIR}/{REPORT_FILE}", str(dst))
    return Path(local)
