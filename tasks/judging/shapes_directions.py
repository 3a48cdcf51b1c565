"""Latent directions for size, position and hue on ``bundled:shapes``, and how much each edit leaks.

Issue #15, item 4. The technique is InterFaceGAN (Shen et al. 2020, "Interpreting the Latent
Space of GANs for Semantic Face Editing", seed 000): regress an attribute on the latent z; the
coefficient vector is the direction along which it grows; project each direction off the
others' normals so that an edit leaves their linear predictions unchanged
(``models/latent_map.py``: ``attribute_directions``, ``orthogonalize``, ``calibrate``).

Attributes are measured from pixels by the shapes checker (``tasks/judging/shapes_checker.py``)
on the images the latents *decode to*, never taken from the data set's labels:

* ``side``: bounding-box side / canvas (the checker's side, from the coverage area);
* ``cx``, ``cy``: bounding-box centre / canvas (y grows downwards);
* ``hue``: the hue of the object's colour (mean RGB of its bright pixels, the pixels the
  checker names the colour from) **relative to the hue of the palette colour of its label**,
  in degrees wrapped to (-180, 180]. Why relative and not cos/sin of the absolute hue: the
  models are label-conditioned and the label fixes the colour class, so across classes the
  absolute hue is a function of c, not of z; a regression of cos/sin hue on z would spend its
  fit on class differences z does not carry (and needs two directions for one attribute). The
  offset from the label's palette hue is the part z controls: one number, continuous across
  the 0/360 seam, zero for a perfect sample. It varies only through the decoder (every data
  image has its palette colour exactly), which is why attributes are measured on decodes.

Latents: a CVAE's posterior means mu(x, c) of real images (``space.embed``); a GAN's prior
draws (sample z, generate, measure, regress: the InterFaceGAN way, no inversion needed). The fit
is within class (z and attributes centred per label): the label sets each class's mean.

The study edits ``n_edit`` latents along each direction (raw and orthogonalised, both
calibrated so that a unit strength predicts +1 std of the asked attribute) at a few
strengths, measures the decodes again and reports the **leakage table**: the change of every
measured attribute per unit strength, in std units of the regression set (diagonal ideal 1,
off-diagonal ideal 0), and the share of edited images whose *discrete* checker attributes
other than the asked one's counterpart (size for side, position for cx/cy, colour for hue)
stay what they were on the unedited decode: shape and colour class must not change.
"""
from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from condgen.models import latent_map as lm
from condgen.tasks.data.shapes import COLOUR_NAMES, COLOURS, SHAPES
from condgen.tasks.io.images import grid, to_uint8
from condgen.tasks.judging import shapes_checker as sc
from condgen.tasks.judging.latent_studies import AttributeStudy, _spearman

CONTINUOUS = ("side", "cx", "cy", "hue")
DISCRETE = sc.JUDGED  # colour, shape, size, position
COUNTERPART = {"side": "size", "cx": "position", "cy": "position", "hue": "colour"}
STRENGTHS = (-2.0, -1.0, 0.0, 1.0, 2.0)
WEAK_R2 = 0.2  # below this a direction explains too little to edit along (its calibrated step is long)
MIN_OWN_SLOPE = 0.05  # std per unit strength: an edit that moves its own attribute less has no leakage ratio
MIN_CHROMA = 0.05  # below this (max - min of the mean RGB in [0, 1]) the hue is undefined


# -- measuring ------------------------------------------------------------------------------------
def hue_degrees(rgb: Sequence[float]) -> float:
    """Hexagonal hue (HSV) of an RGB triple in [0, 1], degrees in [0, 360); NaN for greys."""
    r, g, b = (float(v) for v in rgb)
    if max(r, g, b) - min(r, g, b) < MIN_CHROMA:
        return float("nan")
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


def wrap_degrees(a: float | np.ndarray) -> float | np.ndarray:
    """Angles to (-180, 180]."""
    return 180.0 - np.mod(180.0 - np.asarray(a, dtype=np.float64), 360.0)


PALETTE_HUE = {name: hue_degrees(np.asarray(rgb) / 255.0) for name, rgb in COLOURS.items()}


def label_colour(c: int) -> str:
    """The colour name of class ``c`` (cls = colour index * 3 + shape index)."""
    return COLOUR_NAMES[int(c) // len(SHAPES)]


def object_rgb(img: np.ndarray) -> np.ndarray | None:
    """Mean RGB in [0, 1] of the object's bright pixels (the checker's rule), None if no object."""
    x = img.astype(np.float64) / 255.0
    brightness = x.max(axis=2)
    comp = sc.object_mask(brightness)
    if comp is None:
        return None
    bright = comp & (brightness >= sc.BRIGHT_FRACTION * brightness[comp].max())
    return x[bright].mean(axis=0)


def measure_shape(img: np.ndarray, colour: str | None = None) -> dict[str, Any]:
    """The checker's reading of one RGB uint8 image plus ``hue``: the object's hue minus the
    palette hue of ``colour`` (default: the colour the checker reads), degrees in (-180, 180]."""
    out = dict(sc.measure(img))
    rgb = object_rgb(img)
    ref = colour or out["colour"]
    hue = float("nan") if rgb is None or ref == sc.NONE else hue_degrees(rgb)
    out["hue"] = float(wrap_degrees(hue - PALETTE_HUE[ref])) if np.isfinite(hue) else float("nan")
    return out


def measure_images(images: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """uint8 (N, H, W, 3) and their labels -> (continuous (N, 4) in ``CONTINUOUS`` order, NaN
    where unmeasurable; the checker's readings per image)."""
    readings = [measure_shape(im, label_colour(c)) for im, c in zip(images, labels)]
    values = np.asarray([[r[k] for k in CONTINUOUS] for r in readings], dtype=np.float64).reshape(-1, len(CONTINUOUS))
    return values, readings


# -- latents ---------------------------------------------------------------------------------------
def study_latents(space, *, x: torch.Tensor | None = None, y: torch.Tensor | None = None, n: int = 1000,
                  classes: Sequence[int] = tuple(range(18)), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, d), c (N,)): a CVAE's posterior means of real images ``x`` with labels ``y``; for a
    GAN, ``n`` prior draws under labels drawn uniformly from ``classes``."""
    if space.kind == "cvae":
        if x is None or y is None:
            raise ValueError("a CVAE's directions are regressed on posterior means: pass real images x and labels y")
        return space.embed(x, y)[0], y
    g = torch.Generator().manual_seed(seed)
    cls = torch.as_tensor(list(classes), dtype=torch.long)
    c = cls[torch.randint(len(cls), (n,), generator=g)]
    return space.prior_sample(c, generator=g), c


# -- the study -------------------------------------------------------------------------------------
@dataclass
class ShapesDirectionStudy(AttributeStudy):
    """:class:`AttributeStudy` (its leakage table and summary) plus the discrete checks."""

    space: str = ""
    n_regression: int = 0
    n_edited: int = 0
    std: dict[str, float] = field(default_factory=dict)  # native units per std (side, cx, cy: canvas; hue: deg)
    # kept[variant][edited][discrete]: share of edits (non-zero strengths) whose checker class equals the
    # unedited decode's
    kept: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    others_kept: dict[str, dict[str, float]] = field(default_factory=dict)  # all discrete but the counterpart kept

    def summary(self) -> dict[str, float]:
        """Per variant: the mean asked-attribute slope (ideal 1), the mean |off-diagonal slope| (std of
        another attribute per unit strength, ideal 0), the mean |leakage ratio| and the mean share of
        edits keeping the other discrete classes."""
        out = super().summary()
        k = len(self.names)
        for v, mat in self.slopes.items():
            out[f"{v}/mean_asked_slope"] = float(np.nanmean([mat[i][i] for i in range(k)]))
            off = [abs(mat[i][j]) for i in range(k) for j in range(k) if i != j]
            out[f"{v}/mean_abs_offdiag_slope"] = float(np.nanmean(off)) if off else 0.0
            out[f"{v}/mean_others_kept"] = float(np.nanmean(list(self.others_kept.get(v, {}).values()) or [np.nan]))
        return out

    def slopes_markdown(self) -> str:
        """The leakage table: change of each measured attribute per unit edit strength, std units."""
        lines = []
        for v, mat in self.slopes.items():
            lines += [(f"**{v}** directions: change of each measured attribute (std units) per unit strength "
                       "(rows: edited; a unit strength predicts +1 std of the asked one: diagonal ideal 1, "
                       "the rest 0)"),
                      "| edited \\ measured | " + " | ".join(self.measured) + " | monotonicity (rho) |",
                      "|" + "---|" * (len(self.measured) + 2)]
            for i, n in enumerate(self.names):
                lines.append(f"| {n} | " + " | ".join(f"{x:+.3f}" for x in mat[i]) +
                             f" | {self.monotonicity[v][n]:.3f} |")
            lines.append("")
        return "\n".join(lines)

    def kept_markdown(self) -> str:
        lines = ["| variant | edited | " + " | ".join(f"{a} kept" for a in DISCRETE) + " | others kept |",
                 "|" + "---|" * (len(DISCRETE) + 3)]
        for v, rows in self.kept.items():
            for n, row in rows.items():
                cells = [f"{row[a]:.3f}" + ("*" if COUNTERPART[n] == a else "") for a in DISCRETE]
                lines.append(f"| {v} | {n} | " + " | ".join(cells) + f" | {self.others_kept[v][n]:.3f} |")
        return "\n".join(lines) + "\n(* the asked attribute's own class: it may change)"

    def markdown(self) -> str:
        units = ", ".join(f"{k} {v:.4g}" for k, v in self.std.items())
        return (f"### {self.space}: {self.n_regression} latents regressed, {self.n_edited} edited; "
                f"1 std = {units} (hue in degrees, the others in canvas fractions)\n\n"
                f"R² of each attribute from z (within class): "
                + ", ".join(f"{k} {v:.3f}" + (" (weak: no reliable direction)" if v < WEAK_R2 else "")
                            for k, v in self.r2.items()) + "\n\n"
                + self.slopes_markdown() + "\n" + self.kept_markdown() + "\n")


def class_centred(a: torch.Tensor | np.ndarray, c: torch.Tensor) -> torch.Tensor | np.ndarray:
    """``a`` (N, K) minus the mean of its label's rows: the within-class part (fixed effects)."""
    arr = a.double().numpy() if torch.is_tensor(a) else np.asarray(a, dtype=np.float64)
    labels = np.asarray(c)
    out = arr.copy()
    for k in np.unique(labels):
        out[labels == k] -= arr[labels == k].mean(0)
    return torch.from_numpy(out) if torch.is_tensor(a) else out


def _valid(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values).all(axis=1)


def direction_study(space, z: torch.Tensor, c: torch.Tensor, *, names: Sequence[str] = CONTINUOUS,
                    strengths: Sequence[float] = STRENGTHS, n_edit: int = 100, strip_rows: int = 3, seed: int = 0,
                    method: str = "projection", within_class: bool = True) -> ShapesDirectionStudy:
    """Regress ``names`` (of ``CONTINUOUS``) on z, measured on decode(z, c); edit, measure, tabulate.

    ``within_class`` (default): z and the attributes are centred per label before the regression
    (a fixed-effects fit): the label, not z, sets each class's mean (a decoder may, say, draw every
    yellow a little orange), so only the within-class variation is z's to explain; std units are
    within-class stds too. ``space``: a ``LatentSpace`` (or anything with ``kind``, ``name`` and
    ``decode_all(z, c)`` returning (B, 3, H, W) in [-1, 1]). Rows where an edited attribute is
    unmeasurable are left out.
    """
    if 0.0 not in [float(s) for s in strengths]:
        raise ValueError("strengths must include 0 (the unedited decode every edit is compared with)")
    col = [CONTINUOUS.index(n) for n in names]  # the measured attributes: the edited ones
    values = measure_images(to_uint8(space.decode_all(z.float(), c)), c.tolist())[0][:, col]
    ok = _valid(values)
    if ok.sum() < 2 * z.shape[1] + 2:
        raise ValueError(f"only {int(ok.sum())} of {len(ok)} decodes are measurable shapes; train the model longer")
    z_ok, c_ok, v_ok = z[torch.from_numpy(ok)], c[torch.from_numpy(ok)], values[ok]
    z_fit, v_fit = (class_centred(z_ok, c_ok), class_centred(v_ok, c_ok)) if within_class else (z_ok, v_ok)
    std = v_fit.std(0)
    normals = lm.attribute_directions(z_fit, v_fit)  # (K, d)
    a_std = (v_fit - v_fit.mean(0)) / np.maximum(std, 1e-12)
    pred = ((z_fit - z_fit.mean(0)).double() @ normals.double().T).numpy()
    r2 = {n: float(1 - ((a_std[:, i] - pred[:, i]) ** 2).mean() / max(a_std[:, i].var(), 1e-12))
          for i, n in enumerate(names)}
    unit = F.normalize(normals.double(), dim=-1)
    variants = {"raw": lm.calibrate(normals, normals),
                "orthogonal": lm.calibrate(lm.orthogonalize(normals, method=method), normals)}
    s = torch.tensor([float(v) for v in strengths], dtype=torch.float32)
    sv, i0 = s.numpy().astype(np.float64), [float(v) for v in strengths].index(0.0)
    pick = torch.from_numpy(np.random.default_rng(seed).permutation(len(z_ok))[:n_edit])
    z_e, c_e = z_ok[pick], c_ok[pick]
    out: dict[str, dict] = {k: {} for k in ("slopes", "leakage", "mono", "curves", "kept", "others")}
    strips: dict[str, np.ndarray] = {}
    for v, d in variants.items():
        for key, per_variant in out.items():
            per_variant[v] = [] if key in ("slopes", "leakage") else {}
        for k, n in enumerate(names):
            zz = (z_e[None] + s[:, None, None] * d[k]).reshape(-1, z.shape[1])  # (S*B, d), strength-major
            cc = c_e.repeat(len(s))
            imgs = to_uint8(space.decode_all(zz.float(), cc))
            vals, readings = measure_images(imgs, cc.tolist())
            m = vals[:, col].reshape(len(s), len(z_e), -1) / np.maximum(std, 1e-12)  # (S, B, K) std units
            slope = [_slope(sv, m[:, :, j], i0) for j in range(len(names))]
            good = np.isfinite(m[:, :, k]).all(axis=0)  # the asked attribute measurable at every strength
            diag = slope[k]
            out["slopes"][v].append(slope)
            # a ratio to an edit that barely moves its own attribute is noise over ~0: no ratio (NaN)
            out["leakage"][v].append([x / diag if abs(diag) >= MIN_OWN_SLOPE else float("nan") for x in slope])
            out["mono"][v][n] = float(np.mean([_spearman(sv, m[:, i, k]) for i in np.flatnonzero(good)])) \
                if good.any() else 0.0
            out["curves"][v][n] = np.nanmean(m * std, axis=1).tolist()
            out["kept"][v][n], out["others"][v][n] = _kept(readings, len(s), len(z_e), i0, COUNTERPART[n])
            rows = imgs.reshape(len(s), len(z_e), *imgs.shape[1:])[:, :strip_rows]  # (S, R, H, W, 3)
            strips[f"{v}/{n}"] = grid(rows.transpose(1, 0, 2, 3, 4).reshape(-1, *imgs.shape[1:]), nrow=len(s))
    return ShapesDirectionStudy(
        list(names), list(names), r2, (unit @ unit.T).tolist(), [float(x) for x in strengths], out["slopes"],
        out["leakage"], out["mono"], out["curves"], strips, variants, space=space.name, n_regression=int(ok.sum()),
        n_edited=len(z_e), std={k: float(x) for k, x in zip(names, std)}, kept=out["kept"],
        others_kept=out["others"])


def _slope(sv: np.ndarray, m: np.ndarray, i0: int) -> float:
    """Least-squares slope through the origin of (value - value at strength 0) on the strength,
    over the images measurable at every strength; m (S, B). NaN when none is."""
    good = np.isfinite(m).all(axis=0)
    if not good.any():
        return float("nan")
    delta = m[:, good] - m[i0, good]
    return float((sv[:, None] * delta).sum() / ((sv ** 2).sum() * int(good.sum())))


def _kept(readings: list[dict[str, Any]], n_s: int, n_b: int, i0: int, counterpart: str) -> tuple[dict, float]:
    """Share of edited readings (strengths other than index ``i0``) whose discrete attributes equal
    the unedited one's, per attribute, and with every attribute but ``counterpart`` kept at once."""
    grid_r = [readings[i * n_b:(i + 1) * n_b] for i in range(n_s)]
    base = grid_r[i0]
    hits = np.asarray([[[r[a] != sc.NONE and r[a] == b[a] for a in DISCRETE] for r, b in zip(grid_r[i], base)]
                       for i in range(n_s) if i != i0], dtype=bool).reshape(-1, len(DISCRETE))
    if not len(hits):
        return {a: float("nan") for a in DISCRETE}, float("nan")
    others = [i for i, a in enumerate(DISCRETE) if a != counterpart]
    return {a: float(hits[:, i].mean()) for i, a in enumerate(DISCRETE)}, float(hits[:, others].all(axis=1).mean())
