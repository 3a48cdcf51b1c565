"""Read colour, shape, size and position back from a ``bundled:shapes`` image, from pixels alone.

No learning: the rules follow the generator's specification (``tasks/data/shapes.py``,
condgen's own), so a generated image can be scored against the attributes it was asked for.

1. The object is the largest 8-connected component of pixels whose brightest channel is
   at least ``INK_LEVEL`` (stray specks elsewhere are ignored). None -> every attribute
   "none", which never matches a request.
2. Colour: the palette entry nearest (RGB distance) to the mean of the component's
   bright pixels (brightest channel >= 75 % of its maximum: the anti-aliased rim is
   left out).
3. Coverage: each pixel's projection onto that colour, clipped to [0, 1], in the
   component grown by one pixel; area = its sum, width / height = the sums of its
   column / row maxima (sub-pixel extents).
4. Shape: a triangle (apex up) puts two thirds of its mass in the lower half, so the
   vertical skewness of the coverage is about -0.57 (circle, square: 0); below
   ``TRIANGLE_SKEW`` -> triangle. Otherwise the fill ratio area / (width * height) is
   pi/4 for a circle and 1 for a square; below ``SQUARE_FILL`` -> circle.
5. Side = sqrt(area / k) with k = pi/4, 1, 1/2 for circle, square, triangle; "small"
   below ``SIZE_SPLIT`` of the canvas (between 0.30 and 0.38), else "large".
6. Centre: the coverage centroid, moved up by side/6 for a triangle (its centroid lies
   a third of the way up from the base); position = the nearest anchor (per-axis
   maximum distance) among ``POSITIONS``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from condgen.tasks.data.shapes import COLOURS, POSITIONS

INK_LEVEL = 0.25  # brightest channel (fraction of 255) that counts as part of the object
BRIGHT_FRACTION = 0.75
TRIANGLE_SKEW = -0.28  # half way between a triangle (-0.57) and a symmetric shape (0)
SQUARE_FILL = 0.89  # between a circle's pi/4 and a square's 1
SIZE_SPLIT = 0.34
AREA_PER_SIDE2 = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
JUDGED = ("colour", "shape", "size", "position")
NONE = "none"

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.asarray([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64) / 255.0
_EIGHT = np.ones((3, 3), dtype=bool)


def _empty() -> dict[str, float | str]:
    nan = float("nan")
    return {"colour": NONE, "shape": NONE, "size": NONE, "position": NONE, "cx": nan, "cy": nan, "side": nan,
            "fill": nan, "skew": nan}


def object_mask(brightness: np.ndarray) -> np.ndarray | None:
    """The object's pixels: the largest 8-connected component of pixels at or above ``INK_LEVEL``
    (None on a blank canvas); stray specks of a generated image are not the object."""
    mask = brightness >= INK_LEVEL
    if not mask.any():
        return None
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        return labels == (int(np.argmax(sizes)) + 1)
    return mask


def _nearest_colour(rgb: np.ndarray) -> int:
    return int(np.argmin(((_PALETTE - rgb[None, :]) ** 2).sum(axis=1)))


def _nearest_position(cx: float, cy: float) -> str:
    return min(POSITIONS, key=lambda p: max(abs(cx - POSITIONS[p][0]), abs(cy - POSITIONS[p][1])))


def measure(img: np.ndarray) -> dict[str, float | str]:
    """Predictions for one RGB uint8 (H, W, 3) image: ``colour``, ``shape``, ``size``,
    ``position`` (strings, "none" when there is no object), ``cx``, ``cy``, ``side``
    (fractions of the canvas) and the features ``fill`` and ``skew``."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
    x = img.astype(np.float64) / 255.0
    brightness = x.max(axis=2)
    comp = object_mask(brightness)
    if comp is None:
        return _empty()
    bright = comp & (brightness >= BRIGHT_FRACTION * brightness[comp].max())
    ci = _nearest_colour(x[bright].mean(axis=0))
    c = _PALETTE[ci]
    region = ndimage.binary_dilation(comp, structure=_EIGHT)
    cov = np.clip(x @ c / (c @ c), 0.0, 1.0) * region
    area = float(cov.sum())
    h, w = img.shape[:2]
    width, height = float(cov.max(axis=0).sum()), float(cov.max(axis=1).sum())
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    row_mass, col_mass = cov.sum(axis=1), cov.sum(axis=0)
    mx, my = float(col_mass @ xs) / area, float(row_mass @ ys) / area
    var_y = float(row_mass @ (ys - my) ** 2) / area
    skew = float(row_mass @ (ys - my) ** 3) / area / var_y ** 1.5 if var_y > 0 else 0.0
    fill = area / (width * height)
    if skew < TRIANGLE_SKEW:
        shape = "triangle"
    else:
        shape = "square" if fill >= SQUARE_FILL else "circle"
    side = math.sqrt(area / AREA_PER_SIDE2[shape])
    cy_px = my - side / 6 if shape == "triangle" else my
    cx, cy, side_f = mx / w, cy_px / h, side / max(h, w)
    return {"colour": _PALETTE_NAMES[ci], "shape": shape, "size": "small" if side_f < SIZE_SPLIT else "large",
            "position": _nearest_position(cx, cy), "cx": cx, "cy": cy, "side": side_f, "fill": fill, "skew": skew}


def measure_batch(images: np.ndarray | Iterable[np.ndarray]) -> list[dict[str, float | str]]:
    """:func:`measure` for each image of an (N, H, W, 3) array or an iterable of images."""
    return [measure(np.asarray(im)) for im in images]


def accuracy(predictions: Sequence[Mapping[str, object]], requested: Sequence[Mapping[str, object]],
             attributes: Sequence[str] = JUDGED) -> dict[str, float]:
    """Fraction of images whose predicted attribute equals the requested one, per
    attribute, and ``joint`` (all of ``attributes`` right); ``n`` is the count. A "none"
    prediction (empty image) is wrong for every attribute."""
    if len(predictions) != len(requested):
        raise ValueError(f"{len(predictions)} predictions for {len(requested)} requests")
    n = len(requested)
    if n == 0:
        return {**{a: float("nan") for a in attributes}, "joint": float("nan"), "n": 0}
    hits = np.asarray([[p[a] != NONE and p[a] == r[a] for a in attributes] for p, r in zip(predictions, requested)],
                      dtype=bool).reshape(n, len(attributes))
    out = {a: float(hits[:, i].mean()) for i, a in enumerate(attributes)}
    out["joint"] = float(hits.all(axis=1).mean())
    out["n"] = n
    return out


def check(images: np.ndarray | Iterable[np.ndarray], requested: Sequence[Mapping[str, object]],
          attributes: Sequence[str] = JUDGED) -> tuple[list[dict[str, float | str]], dict[str, float]]:
    """Measure ``images`` and score them against ``requested``: (predictions, accuracy)."""
    predictions = measure_batch(images)
    return predictions, accuracy(predictions, requested, attributes)

