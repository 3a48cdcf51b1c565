"""One self-contained HTML evaluation report for a ``retrain`` run.

``render_report`` is pure (data in, one HTML file out, every PNG inlined as base64 so the
file opens anywhere: a browser, an MLflow artifact view, a mail attachment). It shows:

* a metrics table per model (``tasks.evaluate.EvalResult.metrics()`` keys),
* each model's per-class sample grid,
* optional curves (accuracy / FID vs guidance scale or sampler steps), given as dicts,
* latent interpolation strips (lerp and slerp) per model with a latent space,
* attribute-edit strips with the leakage table before / after orthogonalisation and the
  measured attribute vs edit strength,
* the latent-map error table (R, L, M, class kept vs support size).

``write_report`` gathers those for the flow's results (grids from the runs' artifacts,
models from their checkpoints), renders, and logs ``report/report.html`` + ``report.json``
(and the fitted latent maps under ``maps/``) to a dedicated MLflow run tagged
``condgen.role=report``; each model run gets a ``condgen.report_run`` tag pointing to it.
A page script sets ``data-images-loaded`` / ``data-images-total`` on ``<body>`` once every
image has decoded (what the headless-browser test checks).
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import tempfile
import time
import traceback
from dataclasses import dataclass, field
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

log = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_FILE = "report.html"

# Metrics shown first, in this order; any other numeric metric follows.
METRIC_ORDER = ("eval/cond_accuracy", "eval/fid", "eval/precision", "eval/recall", "eval/density", "eval/coverage",
                "eval/diversity", "eval/diversity_real", "eval/clip_score", "eval/mean_confidence",
                "eval/mean_entropy", "eval/judge_test_accuracy")


# -- data for one model --------------------------------------------------------------------------
@dataclass
class ModelSection:
    name: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    grid: np.ndarray | None = None  # uint8 (H, W): per-class sample grid
    interpolation: dict[str, np.ndarray] = field(default_factory=dict)  # "lerp"/"slerp" -> uint8 grid
    notes: list[str] = field(default_factory=list)


# -- small renderers --------------------------------------------------------------------------------
def png_data_uri(img: np.ndarray | bytes) -> str:
    """uint8 (H, W) / (H, W, 3|4) array or PNG bytes -> ``data:image/png;base64,…``."""
    if not isinstance(img, (bytes, bytearray)):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img)).save(buf, format="PNG")
        img = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(bytes(img)).decode("ascii")


def _img(img: np.ndarray | bytes, alt: str, css: str = "") -> str:
    return f'<img class="{css}" alt="{html.escape(alt)}" src="{png_data_uri(img)}">'


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "–"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return html.escape(str(v))


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
               labels: Mapping[str, str] | None = None) -> str:
    if not rows:
        return "<p class=empty>no rows</p>"
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    labels = labels or {}
    head = "".join(f"<th>{html.escape(labels.get(c, c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_png(draw: Callable[[Any], None], size: tuple[float, float] = (5.0, 3.2)) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def normalise_curves(curves: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Accepts ``{title: {series: {x: y}}}``, ``{title: {series: [[x, y], ...]}}`` or
    ``{title: {"xlabel": .., "ylabel": .., "series": {...}}}``; returns the last form with
    series as sorted (xs, ys) lists."""
    out: dict[str, dict[str, Any]] = {}
    for title, spec in (curves or {}).items():
        spec = dict(spec)
        series = spec.pop("series") if "series" in spec else {k: v for k, v in spec.items()
                                                               if k not in ("xlabel", "ylabel", "logx")}
        clean = {}
        for name, pts in series.items():
            pairs = sorted((float(k), float(v)) for k, v in (pts.items() if isinstance(pts, Mapping) else pts))
            clean[str(name)] = ([p[0] for p in pairs], [p[1] for p in pairs])
        xlabel, _, ylabel = title.partition(" vs ")
        out[title] = {"xlabel": spec.get("xlabel", ylabel or "x"), "ylabel": spec.get("ylabel", xlabel or "y"),
                      "logx": bool(spec.get("logx", False)), "series": clean}
    return out


def curve_png(spec: Mapping[str, Any], title: str) -> bytes:
    def draw(ax):
        for name, (xs, ys) in spec["series"].items():
            ax.plot(xs, ys, marker="o", label=name)
        if spec.get("logx"):
            ax.set_xscale("log")
        ax.set_xlabel(spec["xlabel"])
        ax.set_ylabel(spec["ylabel"])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(spec["series"]) > 1:
            ax.legend(fontsize=8)

    return _figure_png(draw)


def map_curves(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Plots of M and class_kept vs support size, one series per (direction, method)."""
    specs: dict[str, dict[str, Any]] = {}
    for metric, label in (("M", "mapped-image MSE M"), ("class_kept", "class kept (judge)")):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if metric in r:
                series.setdefault(f"{r['source']}→{r['target']} {r['method']}", []).append((r["support"], r[metric]))
        if series:
            specs[f"{label} vs support size"] = {"xlabel": "support-set size", "ylabel": label, "logx": True,
                                                  "series": series}
    return normalise_curves(specs)


def attribute_curves(study: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Measured attribute vs edit strength (raw and orthogonalised directions)."""
    specs = {}
    strengths = study["strengths"]
    measured = study["measured"]
    for name in study["names"]:
        j = measured.index(name)
        series = {v: list(zip(strengths, [row[j] for row in curves[name]])) for v, curves in study["curves"].items()}
        specs[f"measured {name} vs edit strength"] = {"xlabel": "edit strength (predicted data std)",
                                                      "ylabel": f"measured {name}", "series": series}
    return normalise_curves(specs)


# -- the page -------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:8px 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{image-rendering:pixelated;border:1px solid #ddd;margin:4px;max-width:100%}
.plots img{image-rendering:auto}.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.card{border:1px solid #e5e5e5;border-radius:6px;padding:8px 12px}.muted{color:#777;font-size:.85em}
.err{color:#a00;white-space:pre-wrap;font-size:.8em}
"""

SCRIPT = """
(function(){
  function check(){
    var imgs=document.images, ok=0;
    for(var i=0;i<imgs.length;i++){ if(imgs[i].complete && imgs[i].naturalWidth>0) ok++; }
    document.body.setAttribute('data-images-total', String(imgs.length));
    document.body.setAttribute('data-images-loaded', String(ok));
    if(ok===imgs.length){ document.body.setAttribute('data-report-ready','true'); } else { setTimeout(check, 50); }
  }
  if(document.readyState==='complete'){ check(); } else { window.addEventListener('load', check); }
})();
"""


def render_report(out_dir: str | Path, *, title: str = "condgen evaluation report",
                  models: Sequence[ModelSection] = (), curves: Mapping[str, Any] | None = None,
                  map_rows: Sequence[Mapping[str, Any]] | None = None, attribute_study: Any = None,
                  edit_strips: Mapping[str, np.ndarray] | None = None, info: Mapping[str, Any] | None = None,
                  errors: Mapping[str, str] | None = None) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and return its path.

    ``attribute_study``: a ``tasks.map_latents.AttributeStudy`` or its ``to_json()`` dict;
    ``edit_strips``: "<variant>/<attribute>" -> uint8 grid (taken from the study when omitted).
    ``errors``: section -> message, rendered where a section could not be computed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    errors = dict(errors or {})
    parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]
    meta = {"generated": time.strftime("%Y-%m-%d %H:%M:%S"), **(info or {})}
    parts.append("<p class=muted>" + " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}"
                                                 for k, v in meta.items()) + "</p>")

    # metrics table
    parts.append("<h2 id=metrics>Metrics per model</h2>")
    if models:
        keys = [k for k in METRIC_ORDER if any(k in m.metrics for m in models)]
        keys += sorted({k for m in models for k, v in m.metrics.items()
                        if k not in keys and isinstance(v, (int, float)) and "acc_class_" not in k})
        rows = [{"model": m.name, "run": (m.run_id or "")[:8], **m.metrics} for m in models]
        parts.append(html_table(rows, ["model", "run", *keys], labels={k: k.removeprefix("eval/") for k in keys}))
        parts.append("<p class=muted>FID, precision/recall/density/coverage and diversity use the judge's "
                     "penultimate features on the fixed evaluation seed set; diversity_real is the same figure "
                     "for real test images.</p>")
        per_class = [{"model": m.name, **{str(c): m.metrics.get(f"eval/acc_class_{c}") for c in range(10)}}
                     for m in models if any(f"eval/acc_class_{c}" in m.metrics for c in range(10))]
        if per_class:
            parts.append("<h3>Conditional accuracy per class</h3>" + html_table(per_class))
    else:
        parts.append("<p class=empty>no models</p>")

    # sample grids
    parts.append("<h2 id=samples>Samples per class</h2><div class=row>")
    for m in models:
        if m.grid is not None:
            parts.append(f"<div class=card><h3>{html.escape(m.name)}</h3>"
                         f"{_img(m.grid, f'{m.name} samples')}<p class=muted>one row per class (0–9)</p></div>")
        for note in m.notes:
            parts.append(f"<p class=muted>{html.escape(m.name)}: {html.escape(note)}</p>")
    parts.append("</div>")

    # curves
    norm = normalise_curves(curves)
    if norm:
        parts.append("<h2 id=curves>Curves</h2><div class='row plots'>")
        for t, spec in norm.items():
            parts.append(_img(curve_png(spec, t), t, "plot"))
        parts.append("</div>")

    # interpolation
    interp = [m for m in models if m.interpolation]
    if interp:
        parts.append("<h2 id=interpolation>Latent interpolation</h2>"
                     "<p class=muted>each row: decodes from one latent to another under one label; lerp = straight "
                     "line, slerp = great circle (stays on the shell where Gaussian latents live)</p><div class=row>")
        for m in interp:
            for method, img in m.interpolation.items():
                parts.append(f"<div class=card><h3>{html.escape(m.name)} — {method}</h3>"
                             f"{_img(img, f'{m.name} {method} interpolation')}</div>")
        parts.append("</div>")

    # attribute edits
    study = attribute_study.to_json() if hasattr(attribute_study, "to_json") else attribute_study
    if edit_strips is None and hasattr(attribute_study, "strips"):
        edit_strips = attribute_study.strips
    if study:
        parts.append("<h2 id=edits>Attribute directions and edits</h2>")
        parts.append("<p class=muted>directions regressed on the CVAE's posterior means (attributes in data-std "
                     "units); edit strength 1 = +1 std predicted by the regression; attributes re-measured on the "
                     "decoded images with tasks.attributes.measure. 'orthogonal' = each direction projected "
                     "orthogonally to the other attributes' normals.</p>")
        parts.append(html_table([{"attribute": n, "R² of regression": study["r2"][n],
                                  **{f"cos with {o}": study["cosine"][i][j] for j, o in enumerate(study["names"])}}
                                 for i, n in enumerate(study["names"])]))
        for variant, mat in study["leakage"].items():
            rows = [{"edited": n, **{f"Δ{mname}": mat[i][j] for j, mname in enumerate(study["measured"])},
                     "monotonicity ρ": study["monotonicity"][variant][n]} for i, n in enumerate(study["names"])]
            parts.append(f"<h3>Leakage — {html.escape(variant)} directions</h3>"
                         "<p class=muted>change of each measured attribute per unit change of the edited one "
                         "(diagonal = 1; off-diagonal = leakage)</p>" + html_table(rows))
        if "summary" in study:
            parts.append(html_table([{"summary": k, "value": v} for k, v in study["summary"].items()]))
        parts.append("<div class='row plots'>")
        for t, spec in attribute_curves(study).items():
            parts.append(_img(curve_png(spec, t), t, "plot"))
        parts.append("</div>")
    if edit_strips:
        parts.append("<h3>Edit strips</h3><p class=muted>columns: edit strengths "
                     f"{html.escape(str(study['strengths'] if study else ''))}; rows: images</p><div class=row>")
        for key, img in edit_strips.items():
            parts.append(f"<div class=card><h3>{html.escape(key)}</h3>{_img(img, key)}</div>")
        parts.append("</div>")

    # latent maps
    if map_rows:
        parts.append("<h2 id=maps>Latent-space maps</h2><p class=muted>bias-free linear maps z_b ≈ z_a W "
                     "(Asperti & Tonelli). R: target-space reconstruction error of the test images, L: latent MSE "
                     "per dim (L_rel: / var of z_b), M: pixel MSE of the mapped image, M_random / class_random: a "
                     "random target latent under the same label (baseline). Pixel MSE on [0, 1].</p>")
        cols = ["source", "target", "mode", "method", "support", "R", "L", "L_rel", "M", "M_random", "class_kept",
                "class_random"]
        parts.append(html_table(map_rows, [c for c in cols if any(c in r for r in map_rows)]))
        parts.append("<div class='row plots'>")
        for t, spec in map_curves(map_rows).items():
            parts.append(_img(curve_png(spec, t), t, "plot"))
        parts.append("</div>")

    if errors:
        parts.append("<h2 id=errors>Sections not computed</h2>")
        for section, msg in errors.items():
            parts.append(f"<h3>{html.escape(section)}</h3><div class=err>{html.escape(msg)}</div>")

    page = ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + f"<script>{SCRIPT}</script></body></html>")
    path = out / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


# -- gathering the data for a retrain run ------------------------------------------------------------
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
                                             lambda space=space: ml.interpolation_strips(space, x=xt, y=yt,
                                                                                         seed=opt.seed)) or {}
        cvae = next((s for s in spaces if s.kind == "cvae"), None)
        if cvae is not None and train is not None:
            study = _section(errors, f"{cvae.name}: attribute study", lambda: ml.attribute_study(
                cvae, from_uint8(train["x"]), torch.from_numpy(train["y"]), train["attributes"],
                n_edit=opt.n_edit, strengths=opt.strengths, seed=opt.seed))

    map_rows: list[dict[str, Any]] = []
    map_uris: dict[str, str] = {}
    if opt.latent_maps and len(spaces) >= 2 and train is not None and test is not None:
        from condgen.tasks.judging.evaluate import get_judge

        judge = _section(errors, "judge", lambda: get_judge(shards_uri, epochs=opt.judge_epochs))
        rng = np.random.default_rng(opt.seed)
        i_sup = rng.permutation(len(train["y"]))[:max(opt.map_support)]
        i_test = np.random.default_rng(opt.seed + 1).permutation(len(test["y"]))[:opt.map_test]
        pairs = [(a, b) for i, a in enumerate(spaces) for b in spaces[i + 1:]][:opt.max_map_pairs]
        for a, b in pairs:
            def run_pair(a=a, b=b):
                st = ml.compare_spaces(a, b, from_uint8(train["x"][i_sup]), torch.from_numpy(train["y"][i_sup]),
                                       from_uint8(test["x"][i_test]), torch.from_numpy(test["y"][i_test]), judge,
                                       sizes=opt.map_support, mode=opt.map_mode,
                                       inversion_steps=opt.inversion_steps, seed=opt.seed)
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
