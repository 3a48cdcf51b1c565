"""The "map latents" step: linear maps between two models' latent spaces, latent
exploration (interpolation, attribute edits) and CLIP-guided latent optimisation.

Latent maps follow Asperti & Tonelli 2023 ("Comparing the latent space of generative
models", seed 000). A *support set* of images is located in both spaces: a CVAE locates
an image by its encoder (the posterior mean mu(x, c)), a GAN by inverting its generator
(``models.latent_map.invert_generator``). A bias-free linear map W (z_b ≈ z_a W) is fitted
on the support set, in closed form (ridge least squares) and by gradient descent, and is
scored on held-out images x with label c, embedded in both spaces as z_a(x), z_b(x):

* ``R`` reconstruction error: pixel MSE between x and G_b(z_b(x), c): how well the target
  space itself holds x; the floor for any map;
* ``L`` latent error: MSE per dimension between z_b(x) and z_a(x) W (``L_rel``: the same
  divided by the variance of z_b, so 1 means "no better than the mean latent");
* ``M`` mapped-image error: pixel MSE between x and G_b(z_a(x) W, c);
* ``class_kept``: share of mapped images G_b(z_a(x) W, c) the judge assigns to c.

Pixel MSEs are on the [0, 1] intensity scale. Two baselines keep the figures honest: a
random latent of the target space under the same label (``M_random``, ``class_random``):
with conditional models the label alone already fixes the class, so ``class_kept`` is
only informative next to ``class_random`` and ``M`` next to ``M_random``.

Support modes: ``"real"`` embeds real images in both spaces (a GAN side costs an
inversion per image); ``"generated"`` draws z from one model (a GAN when there is one,
so its z is exact), generates x, and embeds x in the other model (the paper's cheap way
for VAE <-> GAN: no inversion at all when the other side is a CVAE).

A fitted map is saved as ``map.safetensors`` (W) + ``map.json`` (source and target model
URIs and weight fingerprints, fit settings, scores) and logged as an MLflow artifact;
``load_map(uri)`` + ``translate(z, m)`` use it at serving time, and ``check_models`` refuses
a map whose models' weights changed since it was fitted.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file
from torch import nn

from condgen.models import latent_map as lm
from condgen.models.cvae import CVAE
from condgen.models.gan import _ConditionalGAN
from condgen.tasks.data.attributes import ATTRIBUTE_NAMES, has_ink, measure
from condgen.tasks.data.splits import load_split
from condgen.tasks.io import storage
from condgen.tasks.io.checkpoint import state_fingerprint
from condgen.tasks.io.images import from_uint8, grid, to_uint8
from condgen.tasks.io.model_store import load_trained
from condgen.tasks.judging.evaluate import get_judge, predict

MAP_FORMAT = "condgen-latent-map/1"
MAP_WEIGHTS = "map.safetensors"
MAP_META = "map.json"
SUPPORT_SIZES = (10, 100, 1000)
EDIT_ATTRIBUTES = ("thickness", "slant", "size")
EDIT_STRENGTHS = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


# -- a model's latent space ---------------------------------------------------------------------
@dataclass(eq=False)
class LatentSpace:
    """One model's latent space through the operations a map needs: decode and embed."""

    model: nn.Module
    kind: str  # "cvae" | "gan"
    name: str
    uri: str | None = None
    fingerprint: str = ""

    @property
    def latent_dim(self) -> int:
        return int(self.model.config.latent_dim)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z (B, d), c (B,) -> (B, C, H, W) in [-1, 1], differentiable in z."""
        if self.kind == "cvae":
            return self.model.decode(z, c)
        return self.model.generate(z, c)

    def embed(self, x: torch.Tensor, c: torch.Tensor, *, steps: int = 200, lr: float = 0.05, restarts: int = 1,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Where x lies in this space: (z (B, d), reconstruction MSE in [0, 1] units (B,)).
        CVAE: the posterior mean mu(x, c); GAN: inversion of G by optimisation."""
        if self.kind == "cvae":
            with torch.no_grad():
                z = torch.cat([self.model.encode(x[i:i + 500], c[i:i + 500])[0] for i in range(0, len(x), 500)])
                rec = torch.cat([self.decode(z[i:i + 500], c[i:i + 500]) for i in range(0, len(x), 500)])
            return z, (rec - x).pow(2).flatten(1).mean(-1) / 4
        z, err = lm.invert_generator(self.model.generate, x, c, steps=steps, lr=lr, generator=generator,
                                     latent_dim=self.latent_dim, restarts=restarts)
        return z, err / 4

    def prior_sample(self, c: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z from the model's prior for conditions c, (B, d) (a CVAE's learned prior included)."""
        with torch.no_grad():
            eps = torch.randn(len(c), self.latent_dim, generator=generator)
            if self.kind == "cvae":
                mu, logvar = self.model.prior(c)
                return mu + eps * (0.5 * logvar).exp()
            return eps

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "uri": self.uri, "fingerprint": self.fingerprint,
                "latent_dim": self.latent_dim}


def space_kind(model: nn.Module) -> str | None:
    """"cvae" | "gan" for models with a latent space this module can map, else None."""

    if isinstance(model, CVAE) and getattr(model.config, "condition", "label") == "label":
        return "cvae"
    if isinstance(model, _ConditionalGAN) and getattr(model.config, "condition", "label") == "label":
        return "gan"
    return None


def latent_space(model: nn.Module, *, name: str | None = None, uri: str | None = None) -> LatentSpace:
    kind = space_kind(model)
    if kind is None:
        raise ValueError(f"{type(model).__name__} (condition={getattr(model.config, 'condition', '?')}) has no "
                         "label-conditioned latent space to map (CVAE and cGAN/AC-GAN with condition='label')")
    model.eval()  # inversion and CLIP optimisation take gradients w.r.t. z only (autograd.grad)
    return LatentSpace(model, kind, name or type(model).__name__.lower(), uri, state_fingerprint(model))


def load_space(checkpoint_uri: str, name: str | None = None) -> LatentSpace:

    model, meta = load_trained(checkpoint_uri)
    return latent_space(model, name=name or meta.get("model"), uri=checkpoint_uri)


# -- support sets ---------------------------------------------------------------------------------
@dataclass
class Support:
    """Images located in two spaces: x (N, 1, H, W), y (N,), z_a (N, d_a), z_b (N, d_b) and each
    space's reconstruction MSE of x (N,) ([0, 1] units; 0 where x was generated from that z)."""

    x: torch.Tensor
    y: torch.Tensor
    z_a: torch.Tensor
    z_b: torch.Tensor
    rec_a: torch.Tensor
    rec_b: torch.Tensor
    mode: str

    def __len__(self) -> int:
        return len(self.y)

    def take(self, n: int) -> "Support":
        return Support(self.x[:n], self.y[:n], self.z_a[:n], self.z_b[:n], self.rec_a[:n], self.rec_b[:n], self.mode)

    def swap(self) -> "Support":
        return Support(self.x, self.y, self.z_b, self.z_a, self.rec_b, self.rec_a, self.mode)


def build_support(a: LatentSpace, b: LatentSpace, x: torch.Tensor | None, y: torch.Tensor, *, mode: str = "real",
                  inversion_steps: int = 200, inversion_lr: float = 0.05, restarts: int = 1,
                  seed: int = 0) -> Support:
    """Locate a support set in spaces a and b (see the module doc for ``mode``).

    ``x`` real images in [-1, 1] (``mode="real"``; ignored for ``"generated"``), ``y`` labels.
    """
    g = torch.Generator().manual_seed(seed)
    y = y.long()
    kw = {"steps": inversion_steps, "lr": inversion_lr, "restarts": restarts, "generator": g}
    if mode == "real":
        if x is None:
            raise ValueError("mode='real' needs images x")
        z_a, rec_a = a.embed(x, y, **kw)
        z_b, rec_b = b.embed(x, y, **kw)
        return Support(x, y, z_a, z_b, rec_a, rec_b, mode)
    if mode != "generated":
        raise ValueError(f"mode must be 'real' or 'generated', got {mode!r}")
    # Generate from the side whose embedding would cost an inversion (its z is then exact).
    flip = a.kind == "cvae" and b.kind == "gan"
    src, dst = (b, a) if flip else (a, b)
    z_src = src.prior_sample(y, generator=g)
    with torch.no_grad():
        x_gen = torch.cat([src.decode(z_src[i:i + 500], y[i:i + 500]) for i in range(0, len(y), 500)])
    z_dst, rec_dst = dst.embed(x_gen, y, **kw)
    zero = torch.zeros(len(y))
    if flip:
        return Support(x_gen, y, z_dst, z_src, rec_dst, zero, mode)
    return Support(x_gen, y, z_src, z_dst, zero, rec_dst, mode)


# -- maps ----------------------------------------------------------------------------------------
@dataclass
class LatentMap:
    """W (d_a, d_b): z_b ≈ z_a W, with where it came from."""

    W: torch.Tensor
    source: dict[str, Any]
    target: dict[str, Any]
    method: str  # "lstsq" | "gd"
    support_size: int
    support_mode: str
    fit: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        return {"format": MAP_FORMAT, "source": self.source, "target": self.target, "method": self.method,
                "support_size": self.support_size, "support_mode": self.support_mode, "fit": self.fit,
                "metrics": self.metrics, "shape": list(self.W.shape)}


def fit_map(support: Support, a: LatentSpace, b: LatentSpace, method: str = "lstsq", *, ridge: float = 1.0,
            gd_steps: int = 2000, gd_lr: float = 1e-2, gd_weight_decay: float = 1e-3, seed: int = 0) -> LatentMap:
    """Fit a -> b on the support set with the closed form (``"lstsq"``) or gradient descent (``"gd"``)."""
    if method == "lstsq":
        w = lm.fit_linear_map(support.z_a, support.z_b, ridge=ridge)
        fit = {"ridge": ridge}
    elif method == "gd":
        w = lm.fit_linear_map_gd(support.z_a, support.z_b, steps=gd_steps, lr=gd_lr, weight_decay=gd_weight_decay,
                                 generator=torch.Generator().manual_seed(seed))
        fit = {"steps": gd_steps, "lr": gd_lr, "weight_decay": gd_weight_decay, "seed": seed}
    else:
        raise ValueError(f"method must be 'lstsq' or 'gd', got {method!r}")
    return LatentMap(w, a.describe(), b.describe(), method, len(support), support.mode, fit)


def translate(z: torch.Tensor | np.ndarray, m: LatentMap) -> torch.Tensor:
    """Latents of the source space (N, d_a) -> the target space (N, d_b)."""
    z = torch.as_tensor(np.asarray(z) if not torch.is_tensor(z) else z, dtype=torch.float32)
    if z.ndim == 1:
        z = z[None]
    if z.shape[-1] != m.W.shape[0]:
        raise ValueError(f"map expects {m.W.shape[0]}-d source latents, got {z.shape[-1]}")
    return lm.apply_map(z, m.W)


def check_models(m: LatentMap, source: nn.Module, target: nn.Module) -> None:
    """Refuse a map fitted for other weights than the models it is about to connect."""
    for role, model, want in (("source", source, m.source), ("target", target, m.target)):
        have = state_fingerprint(model)
        if want.get("fingerprint") and have != want["fingerprint"]:
            raise ValueError(f"latent map {role} was fitted on weights {want['fingerprint'][:12]} "
                             f"({want.get('uri')}), not {have[:12]}")


def save_map(m: LatentMap, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"W": m.W.detach().float().contiguous()}, str(directory / MAP_WEIGHTS))
    (directory / MAP_META).write_text(json.dumps(m.meta(), indent=2, sort_keys=True, default=float))
    return directory


def _map_from_dir(directory: str | Path) -> LatentMap:
    meta = json.loads(Path(directory, MAP_META).read_text())
    if meta.get("format") != MAP_FORMAT:
        raise ValueError(f"{directory} is not a {MAP_FORMAT} map (format={meta.get('format')!r})")
    w = load_file(str(Path(directory, MAP_WEIGHTS)))["W"]
    return LatentMap(w, meta["source"], meta["target"], meta["method"], meta["support_size"],
                     meta["support_mode"], meta.get("fit", {}), meta.get("metrics", {}))


def load_map(uri: str) -> LatentMap:
    """A map from a folder: local path, ``file://``, ``s3://`` or an MLflow artifact URI
    (``runs:/<run_id>/<path>``, ``mlflow-artifacts:/…``). Reads JSON + safetensors only."""
    if uri.startswith(("runs:/", "mlflow-artifacts:", "models:/")):
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            return _map_from_dir(local)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (MAP_WEIGHTS, MAP_META):
            Path(tmp, name).write_bytes(storage.read_bytes(storage.join(uri, name)))
        return _map_from_dir(tmp)


def log_map(m: LatentMap, run_id: str, artifact_path: str) -> str:
    """Log a map to an MLflow run; returns its ``runs:/`` URI (what ``load_map`` takes)."""

    with tempfile.TemporaryDirectory() as tmp:
        save_map(m, tmp)
        MlflowClient().log_artifacts(run_id, tmp, artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


# -- scores ----------------------------------------------------------------------------------------
@torch.no_grad()
def _decode_all(space: LatentSpace, z: torch.Tensor, c: torch.Tensor, bs: int = 500) -> torch.Tensor:
    return torch.cat([space.decode(z[i:i + bs], c[i:i + bs]) for i in range(0, len(c), bs)])


@torch.no_grad()
def map_errors(m: LatentMap, b: LatentSpace, test: Support, judge=None, *, seed: int = 0) -> dict[str, float]:
    """R, L, L_rel, M (+ class_kept and the random-latent baselines when a judge is given) on a
    held-out support set located in a (``z_a``) and b (``z_b``)."""

    z_hat = translate(test.z_a, m)  # (N, d_b)
    x_map = _decode_all(b, z_hat, test.y)
    z_rand = b.prior_sample(test.y, generator=torch.Generator().manual_seed(seed))
    x_rand = _decode_all(b, z_rand, test.y)
    var_b = test.z_b.var(0).mean().clamp_min(1e-12)
    out = {
        "R": float(test.rec_b.mean()),
        "L": float((test.z_b - z_hat).pow(2).mean()),
        "L_rel": float((test.z_b - z_hat).pow(2).mean() / var_b),
        "M": float((x_map - test.x).pow(2).mean() / 4),
        "M_random": float((x_rand - test.x).pow(2).mean() / 4),
    }
    if judge is not None:
        model = getattr(judge, "model", judge)
        p_map, _ = predict(model, x_map)
        p_rand, _ = predict(model, x_rand)
        out["class_kept"] = float((p_map.argmax(-1) == test.y).float().mean())
        out["class_random"] = float((p_rand.argmax(-1) == test.y).float().mean())
    return out


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


def map_table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    cols = ["source", "target", "mode", "method", "support", "R", "L", "L_rel", "M", "M_random", "class_kept",
            "class_random"]
    cols = [c for c in cols if any(c in r for r in rows)]
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

    ``clip_handle``: a ``tasks.clip.ClipHandle`` (its differentiable ``image_tower`` is used)
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
            out[f"{v}/mean_abs_leakage"] = float(np.mean(off)) if off else 0.0
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
    raw and orthogonalised alike; the decoded images are measured with ``tasks.attributes``.
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
            imgs = to_uint8(_decode_all(space, zz.float(), cc))
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
        from mlflow.tracking import MlflowClient

        for key, m in study.maps.items():
            uris[key] = log_map(m, run_id, f"maps/{key}")
        MlflowClient().log_dict(run_id, {"rows": study.rows, "seconds": study.seconds}, "maps/table.json")
    return {"rows": study.rows, "map_uris": uris, "seconds": study.seconds, "table": study.table()}


# Retries are for I/O only; fitting is deterministic.
