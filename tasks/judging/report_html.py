"""One self-contained HTML evaluation report: ``render_report`` is pure (data in, one HTML
file out, every PNG inlined as base64 so the file opens anywhere: a browser, an MLflow
artifact view, a mail attachment). It shows:

* a metrics table per model (``tasks.judging.evaluate.EvalResult.metrics()`` keys),
* each model's per-class sample grid,
* optional curves (accuracy / FID vs guidance scale or sampler steps), given as dicts,
* latent interpolation strips (lerp and slerp) per model with a latent space,
* attribute-edit strips with the leakage table before / after orthogonalisation and the
  measured attribute vs edit strength,
* the latent-map error table (R, L, M, class kept vs support size).

A page script sets ``data-images-loaded`` / ``data-images-total`` on ``<body>`` once every
image has decoded (what the headless-browser test checks). Gathering the data for a
retrain run and logging the page to MLflow is ``tasks/judging/report.py``.
"""
from __future__ import annotations

import base64
import html
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from condgen.tasks.judging.latent_studies import map_columns

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
    # matplotlib (~0.5 s to import, not a declared dependency: it comes with mlflow) only for plots
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


def _plots(specs: Mapping[str, Any], head: str = "") -> list[str]:
    """Page parts for a row of curve plots (``head`` goes before the row's opening tag)."""
    return [f"{head}<div class='row plots'>", *(_img(curve_png(spec, t), t, "plot") for t, spec in specs.items()),
            "</div>"]


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

    ``attribute_study``: a ``tasks.judging.latent_studies.AttributeStudy`` or its ``to_json()`` dict;
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
        parts += _plots(norm, "<h2 id=curves>Curves</h2>")

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
                     "decoded images with tasks.data.attributes.measure. 'orthogonal' = each direction projected "
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
        parts += _plots(attribute_curves(study))
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
        parts.append(html_table(map_rows, map_columns(map_rows)))
        parts += _plots(map_curves(map_rows))

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
