"""Studies of latent spaces, built on the maps of ``tasks/judging/latent_maps.py``:

* the map study (:func:`compare_spaces`): a <-> b maps fitted on nested support sets of
  each size and scored on held-out images (R, L, M, class kept; the table the report shows),
  and :func:`map_latents`, that study for two trained checkpoints on a shard set, logged to MLflow;
* interpolation strips (lerp and slerp) between latents under one label;
* attribute directions regressed in a CVAE's latent space (thickness, slant, size), edits
  along them, and how much each edit leaks into the other attributes, before and after
  orthogonalisation (:func:`attribute_study`);
* CLIP-guided latent optimisation (:func:`clip_optimize`, seed 000): move z so the decoded
  image matches a text.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from condgen.models import latent_map as lm
from condgen.tasks.data.attributes import ATTRIBUTE_NAMES, has_ink, measure
from condgen.tasks.data.splits import load_split
from condgen.tasks.io.images import from_uint8, grid, to_uint8
from condgen.tasks.judging.evaluate import get_judge
from condgen.tasks.judging.latent_maps import (
    SUPPORT_SIZES,
    LatentMap,
    LatentSpace,
    Support,
    build_support,
    fit_map,
    latent_space,
    load_space,
    log_map,
    map_errors,
)

EDIT_ATTRIBUTES = ("thickness", "slant", "size")
EDIT_STRENGTHS = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


# -- the map study ---------------------------------------------------------------------------------
@dataclass
class MapStudy:
    """Rows of the latent-map table (one per direction x method x support size) and the maps."""

    rows: list[dict[str, Any]]
    maps: dict[str, LatentMap]  # key "<a>-to-<b>/<method>-n<size>"
    seconds: dict[str, float]

    def table(self) -> str:
        return map_table_markdown(self.rows)


def compare_spaces(a: LatentSpace, b: LatentSpace, x_support: torch.Tensor | None, y_support: torch.Tensor,
                   x_test: torch.Tensor | None, y_test: torch.Tensor, judge=None, *,
                   sizes: Sequence[int] = SUPPORT_SIZES, mode: str = "real", methods: Sequence[str] = ("lstsq", "gd"),
                   both_directions: bool = True, inversion_steps: int = 200, inversion_lr: float = 0.05,
                   restarts: int = 1, ridge: float = 1.0, gd_steps: int = 2000, seed: int = 0,
                   support: Support | None = None, test: Support | None = None) -> MapStudy:
    """Fit a <-> b maps on nested support sets of each size and score them on the test set.

    The support pool is embedded once (the largest size) and the smaller sets are its
    prefixes, so rows differ only in the support size. Pass ``support``/``test`` to reuse
    embeddings (e.g. the same GAN inversions for several pairs).
    """
    t0 = time.perf_counter()
    sizes = sorted({int(s) for s in sizes if s > 0})
    n_pool = min(max(sizes), len(y_support))
    if support is None:
        xs = None if x_support is None else x_support[:n_pool]
        support = build_support(a, b, xs, y_support[:n_pool], mode=mode, inversion_steps=inversion_steps,
                                inversion_lr=inversion_lr, restarts=restarts, seed=seed)
    t1 = time.perf_counter()
    if test is None:
        test = build_support(a, b, x_test, y_test, mode=mode, inversion_steps=inversion_steps,
                             inversion_lr=inversion_lr, restarts=restarts, seed=seed + 1)
    t2 = time.perf_counter()
    rows, maps = [], {}
    pairs = [(a, b, support, test)] + ([(b, a, support.swap(), test.swap())] if both_directions else [])
    for src, dst, sup, tst in pairs:
        for n in sizes:
            if n > len(sup):
                continue
            for method in methods:
                m = fit_map(sup.take(n), src, dst, method, ridge=ridge, gd_steps=gd_steps, seed=seed)
                m.metrics = map_errors(m, dst, tst, judge, seed=seed)
                key = f"{src.name}-to-{dst.name}/{method}-n{n}"
                maps[key] = m
                rows.append({"source": src.name, "target": dst.name, "method": method, "support": n,
                             "mode": sup.mode, "n_test": len(tst), **m.metrics})
    t3 = time.perf_counter()
    return MapStudy(rows, maps, {"embed_support": t1 - t0, "embed_test": t2 - t1, "fit_and_score": t3 - t2})


MAP_COLUMNS = ("source", "target", "mode", "method", "support", "R", "L", "L_rel", "M", "M_random", "class_kept",
               "class_random")


def map_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The map-table columns (in their fixed order) that any of ``rows`` has."""
    return [c for c in MAP_COLUMNS if any(c in r for r in rows)]


def map_table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    cols = map_columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- CLIP-guided latent optimisation ------------------------------------------------------------
def clip_optimize(model: nn.Module | LatentSpace, z: torch.Tensor, c: torch.Tensor, text_embedding: torch.Tensor,
                  clip_handle: Any, steps: int = 50, lr: float = 0.1, *,
                  prior_weight: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """Move z so that the decoded image matches a text (seed 000):

        w_{t+1} = w_t + lr * dScore(I(w), c)/dw,   Score = cos(image_encoder(I), text_embedding)

    ``clip_handle``: a ``tasks.clip.handle.ClipHandle`` (its differentiable ``image_tower`` is used)
    or any callable images (B, C, H, W) in [-1, 1] -> (B, D). ``text_embedding`` (D,) or
    (B, D). Returns (z (B, d), mean score per step: history[0] before, history[-1] after).
    """
    space = model if isinstance(model, LatentSpace) else latent_space(model)
    encoder = clip_handle.image_tower if hasattr(clip_handle, "image_tower") else clip_handle
    if isinstance(encoder, nn.Module):
        encoder.eval()
    inner = getattr(clip_handle, "model", None)
    if isinstance(inner, nn.Module):
        inner.eval()
    t = F.normalize(text_embedding.float().detach(), dim=-1)

    def score(images: torch.Tensor) -> torch.Tensor:
        e = F.normalize(encoder(images).float(), dim=-1)  # (B, D)
        return (e * t.to(e.device)).sum(-1)

    return lm.optimize_latent(lambda w: space.decode(w, c), z, score, steps=steps, lr=lr, prior_weight=prior_weight)


# -- latent exploration: interpolation ----------------------------------------------------------
@torch.no_grad()
def interpolation_strip(space: LatentSpace, z0: torch.Tensor, z1: torch.Tensor, c: int, *, frames: int = 8,
                        method: str = "slerp") -> np.ndarray:
    """uint8 (frames, H, W): decodes of ``frames`` latents from z0 to z1 (inclusive) under label c."""
    ts = torch.linspace(0, 1, frames)
    z = lm.slerp(z0, z1, ts) if method == "slerp" else lm.lerp(z0, z1, ts)  # (frames, d)
    return to_uint8(space.decode(z.float(), torch.full((frames,), int(c), dtype=torch.long)))


def interpolation_strips(space: LatentSpace, *, pairs: int = 3, frames: int = 8, seed: int = 0,
                         x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Grids (uint8) of ``pairs`` rows for lerp and slerp. Endpoints: embeddings of pairs of real
    images of one class when a CVAE and images are given, otherwise prior draws."""
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list[np.ndarray]] = {"lerp": [], "slerp": []}
    for i in range(pairs):
        c = i % 10
        if space.kind == "cvae" and x is not None and y is not None and int((y == c).sum()) >= 2:
            idx = torch.nonzero(y == c).flatten()[:2]
            z_ends = space.embed(x[idx], y[idx])[0]
        else:
            z_ends = space.prior_sample(torch.full((2,), c, dtype=torch.long), generator=g)
        for method in rows:
            rows[method].append(interpolation_strip(space, z_ends[0], z_ends[1], c, frames=frames, method=method))
    return {m: grid(np.concatenate(r), nrow=frames) for m, r in rows.items()}


# -- latent exploration: attribute directions, edits and leakage ------------------------------------
def measure_batch(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> (N, 4) attributes in ``ATTRIBUTE_NAMES`` order (NaN rows for blank images)."""
    out = np.full((len(images), len(ATTRIBUTE_NAMES)), np.nan)
    for i, img in enumerate(images):
        if has_ink(img):
            a = measure(img)
            out[i] = [a[k] for k in ATTRIBUTE_NAMES]
    return out


@dataclass
class AttributeStudy:
    names: list[str]  # edited attributes
    measured: list[str]  # attributes measured on decoded images (ATTRIBUTE_NAMES)
    r2: dict[str, float]  # linear predictability of each edited attribute from z
    cosine: list[list[float]]  # cosines between the raw directions (entanglement in z)
    strengths: list[float]
    # slopes[variant][k][j]: d(measured attribute j, in data std units) / d(strength) when editing k
    slopes: dict[str, list[list[float]]]
    # leakage[variant][k][j] = slopes[k][j] / slopes[k][k]
    leakage: dict[str, list[list[float]]]
    monotonicity: dict[str, dict[str, float]]  # variant -> attribute -> mean per-image Spearman rho
    curves: dict[str, dict[str, list[list[float]]]]  # variant -> edited -> (S strengths, 4 measured) means
    strips: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # "<variant>/<attr>" -> grid
    directions: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Mean |off-diagonal leakage| per variant (lower = more disentangled)."""
        out = {}
        for v, mat in self.leakage.items():
            k = len(self.names)
            idx = [self.measured.index(n) for n in self.names]
            off = [abs(mat[i][idx[j]]) for i in range(k) for j in range(k) if i != j]
            finite = [x for x in off if np.isfinite(x)]  # a row whose edit does not move its own attribute has no ratio
            out[f"{v}/mean_abs_leakage"] = float(np.mean(finite)) if finite else (float("nan") if off else 0.0)
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("strips")
        d.pop("directions")
        d["summary"] = self.summary()
        return d

    def leakage_markdown(self) -> str:
        lines = []
        for v in self.leakage:
            lines.append(f"**{v}** directions — change of each measured attribute per unit change of the edited "
                         "one (rows: edited; both in data-std units; diagonal = 1)")
            lines.append("| edited \\ measured | " + " | ".join(self.measured) + " | monotonicity (rho) |")
            lines.append("|" + "---|" * (len(self.measured) + 2))
            for i, n in enumerate(self.names):
                cells = [f"{x:+.3f}" for x in self.leakage[v][i]]
                lines.append(f"| {n} | " + " | ".join(cells) + f" | {self.monotonicity[v][n]:.3f} |")
            lines.append("")
        return "\n".join(lines)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def attribute_study(space: LatentSpace, x: torch.Tensor, y: torch.Tensor, attributes: np.ndarray, *,
                    names: Sequence[str] = EDIT_ATTRIBUTES, strengths: Sequence[float] = EDIT_STRENGTHS,
                    n_edit: int = 100, strip_rows: int = 3, seed: int = 0,
                    method: str = "projection") -> AttributeStudy:
    """Attribute directions by regression in a CVAE's latent space, edits, leakage and monotonicity.

    ``x`` (N, 1, H, W) real images, ``y`` labels, ``attributes`` (N, 4) in ``ATTRIBUTE_NAMES``
    order (``load_split``'s column). Directions are regressed on the posterior means of all N
    images; edits move ``n_edit`` of them (a permutation drawn with ``seed``) by ``strength`` along each direction,
    scaled so that a unit strength predicts +1 std of its attribute (``calibrate``),
    raw and orthogonalised alike; the decoded images are measured with ``tasks.data.attributes``.
    """
    if space.kind != "cvae":
        raise ValueError("attribute directions are regressed on encoder latents: pass a CVAE space")
    z, _ = space.embed(x, y)
    col = [ATTRIBUTE_NAMES.index(n) for n in names]
    attrs = np.asarray(attributes, dtype=np.float64)
    normals = lm.attribute_directions(z, attrs[:, col])  # (K, d)
    # R^2 of each regression on the same data (in-sample; d << N).
    zc = (z - z.mean(0)).double()
    std = attrs.std(0)
    a_std = (attrs[:, col] - attrs[:, col].mean(0)) / std[col]
    pred = (zc @ normals.double().T).numpy()
    r2 = {n: float(1 - ((a_std[:, i] - pred[:, i]) ** 2).mean() / a_std[:, i].var()) for i, n in enumerate(names)}
    unit = F.normalize(normals.double(), dim=-1)
    cosine = (unit @ unit.T).tolist()
    variants = {"raw": lm.calibrate(normals, normals),
                "orthogonal": lm.calibrate(lm.orthogonalize(normals, method=method), normals)}
    s = torch.tensor(list(strengths), dtype=torch.float32)
    pick = torch.from_numpy(np.random.default_rng(seed).permutation(len(z))[:n_edit])
    z_e, y_e = z[pick], y[pick]
    slopes, leakage, mono, curves, strips, dirs = {}, {}, {}, {}, {}, {}
    for v, d in variants.items():
        dirs[v] = d
        slopes[v], leakage[v], mono[v], curves[v] = [], [], {}, {}
        for k, n in enumerate(names):
            zz = (z_e[None] + s[:, None, None] * d[k]).reshape(-1, z.shape[1])  # (S*B, d), strength-major
            cc = y_e.repeat(len(s))
            imgs = to_uint8(space.decode_all(zz.float(), cc))
            meas = measure_batch(imgs).reshape(len(s), len(z_e), -1) / std  # (S, B, 4) data-std units
            ok = ~np.isnan(meas).any(axis=(0, 2))  # images measurable at every strength
            m = meas[:, ok]  # (S, B', 4)
            delta = m - m[list(strengths).index(0)] if 0 in strengths else m - m.mean(0)
            sv = s.numpy().astype(np.float64)
            slope = [float((sv[:, None] * delta[:, :, j]).sum() / ((sv**2).sum() * max(m.shape[1], 1)))
                     for j in range(m.shape[2])]
            slopes[v].append(slope)
            diag = slope[ATTRIBUTE_NAMES.index(n)]
            leakage[v].append([x_ / diag if abs(diag) > 1e-12 else float("nan") for x_ in slope])
            j = ATTRIBUTE_NAMES.index(n)
            mono[v][n] = float(np.mean([_spearman(sv, m[:, i, j]) for i in range(m.shape[1])])) if m.shape[1] else 0.0
            curves[v][n] = (m.mean(1) * std).tolist()  # back to native units for plots
            rows = imgs.reshape(len(s), len(z_e), *imgs.shape[1:])[:, :strip_rows]  # (S, R, H, W)
            strips[f"{v}/{n}"] = grid(rows.transpose(1, 0, 2, 3).reshape(-1, *imgs.shape[1:]), nrow=len(s))
    return AttributeStudy(list(names), list(ATTRIBUTE_NAMES), r2, cosine, [float(v) for v in strengths], slopes,
                          leakage, mono, curves, strips, dirs)


# -- the pipeline step ------------------------------------------------------------------------------
def map_latents(checkpoint_a: str, checkpoint_b: str, shards_uri: str, *, name_a: str | None = None,
                name_b: str | None = None, sizes: Sequence[int] = SUPPORT_SIZES, mode: str = "real",
                n_test: int = 500, inversion_steps: int = 200, ridge: float = 1.0, run_id: str | None = None,
                judge_epochs: int = 4, seed: int = 0) -> dict[str, Any]:
    """Fit and score a <-> b maps for two trained checkpoints on a shard set; log every map and
    the table to the MLflow run ``run_id`` (when given). Returns rows, map URIs and timings."""

    a, b = load_space(checkpoint_a, name_a), load_space(checkpoint_b, name_b)
    if a.name == b.name:
        a.name, b.name = f"{a.name}-a", f"{b.name}-b"
    judge = get_judge(shards_uri, epochs=judge_epochs)
    train, test = load_split(shards_uri, "train"), load_split(shards_uri, "test")
    rng = np.random.default_rng(seed)
    i_sup = rng.permutation(len(train["y"]))[:max(sizes)]
    i_test = np.random.default_rng(seed + 1).permutation(len(test["y"]))[:n_test]
    study = compare_spaces(a, b, from_uint8(train["x"][i_sup]), torch.from_numpy(train["y"][i_sup]),
                           from_uint8(test["x"][i_test]), torch.from_numpy(test["y"][i_test]), judge,
                           sizes=sizes, mode=mode, inversion_steps=inversion_steps, ridge=ridge, seed=seed)
    uris = {}
    if run_id:
        for key, m in study.maps.items():
            uris[key] = log_map(m, run_id, f"maps/{key}")
        MlflowClient().log_dict(run_id, {"rows": study.rows, "seconds": study.seconds}, "maps/table.json")
    return {"rows": study.rows, "map_uris": uris, "seconds": study.seconds, "table": study.table()}
