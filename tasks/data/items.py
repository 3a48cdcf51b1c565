"""What a digit source hands to ingest, and the checks every item passes on its way in.

A source (``tasks/data/sources.py``, ``tasks/data/file_sources.py``) yields
:class:`RawItem` (encoded bytes or a decoded array, a raw label, maybe a caption) or
:class:`Reject` (an item refused while reading, with a reason). Ingest then decodes and
validates each item here; a failed check raises :class:`BadItem`, which ingest records in
``rejects.json`` instead of failing the run.

Input policy:

- images are converted to greyscale with bright ink on dark (MNIST polarity: an image
  whose border is mostly light is inverted; transparency is composited onto white);
- sides from ``MIN_SIDE`` to ``MAX_SIDE`` px with aspect ratio <= ``MAX_ASPECT`` are
  padded to a square and resized to ``image_size``; anything else is ``bad_size``
  (a tiny image holds no digit; a huge one is not a digit crop and costs memory);
- labels must be integers in ``[0, num_classes)``;
- names that are absolute, drive-qualified or contain ``..`` are unsafe (:func:`unsafe_name`).
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 8, 1024, 2.0
MAX_MEMBER_BYTES = 16 * 1024 * 1024  # bigger files are not digit images; never load them
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "pgm", "ppm")


# ------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RawItem:
    """One source item before validation: encoded bytes or an already-decoded array."""

    ref: str  # where it came from (relative path, tar member), kept for traceability
    label: Any
    data: bytes | None = None
    array: np.ndarray | None = None  # (H, W) uint8, bright ink on dark
    caption: str | None = None


@dataclass(frozen=True)
class Reject:
    ref: str
    reason: str
    detail: str = ""


class BadItem(Exception):
    """An item that fails a check: ``reason`` is its rejects.json category."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Source:
    """A source as ingest sees it: a key prefix, a content fingerprint (to skip a run that is
    already done), its items in a fixed order, and what to clean up afterwards."""

    tag: str  # key prefix: [a-z0-9_]+, no dots (webdataset splits keys at the first dot)
    fingerprint: Callable[[], str]
    items: Callable[[], Iterator[RawItem | Reject]]
    cleanups: list[Callable[[], None]] = field(default_factory=list)


def sha256_of(chunks: Iterator[bytes]) -> str:
    """``sha256:<hex>`` over a stream of chunks: a source's fingerprint."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------- checks


def parse_label(raw: Any, num_classes: int) -> int:
    """A raw label (int, text or bytes) as an int in ``[0, num_classes)``; raises BadItem."""
    if raw is None or (isinstance(raw, (str, bytes)) and not raw.strip()):
        raise BadItem("missing_label")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, bool) or not isinstance(raw, (int, np.integer, str)):
        raise BadItem("bad_label", repr(raw)[:80])
    if isinstance(raw, str):
        if not re.fullmatch(r"\s*[+-]?\d+\s*", raw):
            raise BadItem("bad_label", raw[:80])
        raw = int(raw)
    label = int(raw)
    if not 0 <= label < num_classes:
        raise BadItem("label_out_of_range", f"{label} not in [0, {num_classes})")
    return label


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> (H, W) uint8 with bright ink on dark; raises BadItem."""
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size  # header only: check before decoding any pixels
    except Exception as exc:  # PIL raises many types for bad input
        raise BadItem("corrupt_image", type(exc).__name__) from None
    if not (MIN_SIDE <= min(width, height) and max(width, height) <= MAX_SIDE
            and max(width, height) <= MAX_ASPECT * min(width, height)):
        raise BadItem("bad_size", f"{width}x{height}")
    try:
        im.load()
        arr = _greyscale(im)
    except Exception as exc:
        raise BadItem("corrupt_image", type(exc).__name__) from None
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return 255 - arr if np.median(border) > 127 else arr  # dark ink on paper -> MNIST polarity


def _greyscale(im: Image.Image) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float data: scale by the maximum; convert("L") would clip at 255.
        a = np.asarray(im, dtype=np.float64)
        top = a.max()
        return (a / top * 255.0).round().astype(np.uint8) if top > 0 else np.zeros(a.shape, np.uint8)
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def to_square(img: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square (background 0, centred) and resize to size x size."""
    h, w = img.shape
    if h != w:
        side = max(h, w)
        canvas = np.zeros((side, side), np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = img
        img = canvas
    if img.shape[0] != size:
        img = np.asarray(Image.fromarray(img, mode="L").resize((size, size), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(img, dtype=np.uint8)


def unsafe_name(name: str) -> bool:
    """Absolute, drive-qualified or parent-relative names could address files elsewhere."""
    norm = name.replace("\\", "/")
    return (not norm or norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) is not None
            or ".." in norm.split("/"))
