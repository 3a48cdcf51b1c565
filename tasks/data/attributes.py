"""Style attributes measured from a digit image, and captions phrased from them.

Images follow MNIST's convention: bright ink on a dark background, uint8 (H, W).
Ingest measures them for digit sets only (greyscale with integer labels); other sets
store just the numeric attributes their source gives (``tasks/data/ingest.py``).
Attributes (order = ``ATTRIBUTE_NAMES``, the column order of ``load_split``):

- ``thickness``: mean stroke width in pixels of the stored image, from the distance
  transform along the stroke's ridge (a 1-px line gives 1, a 3-px line 3; diagonal
  strokes within ~0.2 px of their perpendicular width).
- ``slant``: horizontal shear -mu11/mu02 from intensity-weighted central moments
  (the quantity MNIST deskewing removes); > 0 means the top leans right.
- ``size``: bounding-box height of the ink as a fraction of the image height.
- ``ink``: mean intensity in [0, 1].
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from condgen.tasks.io.labels import DIGIT_WORDS, label_from_text

ATTRIBUTE_NAMES = ("thickness", "slant", "size", "ink")
INK_THRESHOLD = 128  # uint8 level that counts as a stroke pixel (half of full ink)

# Caption bins, at 28 px (thickness is rescaled for other sizes). Picked near the
# tertiles of the 5k MNIST digits so each phrase covers a fair share of the data.
THIN_BELOW, THICK_ABOVE = 2.4, 3.0
SLANT_MIN = 0.15
SMALL_BELOW, LARGE_ABOVE = 0.62, 0.78


def measure(img: np.ndarray) -> dict[str, float]:
    """(H, W) uint8 -> attributes; the image must contain some ink (see ``has_ink``)."""
    x = img.astype(np.float64) / 255.0
    mask = img >= INK_THRESHOLD
    h = img.shape[0]
    return {
        "thickness": _stroke_width(img),
        "slant": _slant(x),
        "size": _height_fraction(mask, h),
        "ink": float(x.mean()),
    }


def has_ink(img: np.ndarray) -> bool:
    return bool((img >= INK_THRESHOLD).any())


def _stroke_width(img: np.ndarray) -> float:
    # Work at 2x (bilinear, so anti-aliased edges count): a stroke w px wide spans 2w
    # pixels there, and its centre pixels lie w pixels from the background. The ridge
    # of the distance transform (its local maxima) runs along the stroke centres, so
    # its mean distance is the mean width in original pixels. At 1x, even widths would
    # be off by a whole pixel.
    rows, cols = np.flatnonzero(img.any(axis=1)), np.flatnonzero(img.any(axis=0))
    crop = img[max(rows[0] - 1, 0): rows[-1] + 2, max(cols[0] - 1, 0): cols[-1] + 2]  # speed only
    up = ndimage.zoom(crop.astype(np.float64), 2, order=1) >= INK_THRESHOLD
    dist = ndimage.distance_transform_edt(np.pad(up, 1))[1:-1, 1:-1]
    ridge = up & (dist >= ndimage.maximum_filter(dist, size=3))
    return float(dist[ridge].mean()) if ridge.any() else 0.0


def _slant(x: np.ndarray) -> float:
    ys, xs = np.mgrid[: x.shape[0], : x.shape[1]]
    m = x.sum()
    cy, cx = (ys * x).sum() / m, (xs * x).sum() / m
    mu11 = ((xs - cx) * (ys - cy) * x).sum()
    mu02 = ((ys - cy) ** 2 * x).sum()
    # Image rows grow downwards, so a right-leaning stroke has mu11 < 0: flip the sign.
    return float(-mu11 / mu02) if mu02 > 0 else 0.0


def _height_fraction(mask: np.ndarray, h: int) -> float:
    rows = np.flatnonzero(mask.any(axis=1))
    return float((rows[-1] - rows[0] + 1) / h)


# ------------------------------------------------------------------------- captions


def label_word(label: int) -> str:
    return DIGIT_WORDS[label] if 0 <= label < len(DIGIT_WORDS) else f"class {label}"


def captions(label: int, attrs: dict[str, float], image_size: int) -> list[str]:
    """Several distinct phrasings of the same label + style, most specific first."""
    word = label_word(label)
    digit = f"digit {label}" if label < len(DIGIT_WORDS) else f"symbol of class {label}"
    thickness = attrs["thickness"] * 28.0 / image_size  # bins are defined at 28 px
    weight = "thin" if thickness < THIN_BELOW else "thick" if thickness > THICK_ABOVE else ""
    strokes = {"thin": "thin strokes", "thick": "bold strokes", "": "even strokes"}[weight]
    pen = {"thin": "fine", "thick": "heavy", "": "medium"}[weight]
    slant = attrs["slant"]
    lean = "leaning right" if slant > SLANT_MIN else "leaning left" if slant < -SLANT_MIN else "upright"
    slant_adj = "slanted" if abs(slant) > SLANT_MIN else "upright"
    size = "small" if attrs["size"] < SMALL_BELOW else "large" if attrs["size"] > LARGE_ABOVE else "medium-sized"

    adjectives = ", ".join(a for a in (weight, slant_adj) if a)
    out = [
        _article(f"{adjectives} {word}"),
        f"handwritten {digit}, {strokes}, {lean}",
        f"the number {word} written with a {pen} pen",
        _article(f"{size} handwritten {word}, {lean}"),
    ]
    return list(dict.fromkeys(out))  # distinct by construction; dedupe defensively


def pick_caption(key: str, options: list[str], seed: int) -> str:
    """One phrasing per sample, fixed by a hash of the key (no global RNG state)."""
    h = int.from_bytes(hashlib.sha256(f"caption:{seed}:{key}".encode()).digest()[:8], "big")
    return options[h % len(options)]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def label_from_prompt(prompt: str, num_classes: int, class_names: Sequence[str] | None = None) -> int | None:
    """A class named by a prompt for a label model (``tasks.io.labels.label_from_text``: the manifest's
    class names when it has them, else 'digit 7', 'a seven', '7'). None when it names none."""
    return label_from_text(prompt, num_classes, class_names)


def label_prompt(label: int) -> str:
    """The caption style of label_caption for a bare label (text models, CLIP guidance)."""
    return f"a handwritten digit {label}"
