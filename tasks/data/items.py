"""What a source hands to ingest, and the checks every item passes on its way in.

A source (``tasks/data/sources.py``, ``tasks/data/file_sources.py``) yields
:class:`RawItem` (encoded bytes or a decoded array, a raw label, maybe a caption and
numeric attributes; a generated source also its phrasings, string tags, key and split) or
:class:`Reject` (an item refused while reading, with a reason). A source that knows its
labels without decoding (the bundled ones) can be sampled by :func:`stratified_indices`
under a ``limit``; one that knows everything about itself (a generator) declares it
(:class:`Declared`) so that ingest needs no first pass.
Ingest then decodes and validates each item here; a failed check raises
:class:`BadItem`, which ingest records in ``rejects.json`` instead of failing the run.

Input policy (schema v2):

- formats: only ``FORMATS`` (PNG, JPEG, WebP, and the GIF, BMP and PGM/PPM files the
  folder and tar sources name in ``IMAGE_EXTS``), decided from the file's header by
  PIL's format check before any pixel is decoded, whatever the file's extension; any
  other container (ICO, TIFF, PSD, ...) is never parsed past its magic bytes and is
  rejected as ``unsupported_format`` -- an ICO whose directory says 16 x 16 but which
  holds a 9000 x 9000 PNG is refused without decoding it;
- the header is checked before any pixel is decoded: sides from ``MIN_SIDE`` to
  ``MAX_SIDE`` px, at most ``MAX_PIXELS`` pixels, aspect ratio <= ``MAX_ASPECT``;
  anything else (a 1 x 10,000 strip, a tiny icon, a decompression bomb) is rejected as
  ``bad_size``, never padded (in the allowed formats the header's size is the size decoded);
- images are stored losslessly in the set's mode, ``L`` or ``RGB``: EXIF orientation is
  applied; animated GIF/WebP/PNG keep their first frame (counted as
  ``animated_first_frame`` in the manifest's ``conversions``); CMYK, YCbCr and LAB
  become RGB; RGBA, LA and palette/greyscale/RGB images with a transparency key are
  composited onto ``background`` (default white); 16-bit integer data is scaled by
  255/65535 (never clipped; wider integer or float data by its maximum); a colour file in
  a greyscale set becomes ITU-R 601 luma (PIL ``convert("L")``), a greyscale file in a
  colour set is replicated to three channels;
- nothing is inverted unless asked: ``invert="auto"`` (digit scans only, greyscale sets)
  turns dark ink on light paper into MNIST polarity when the border is mostly light;
- :func:`to_square` makes the image square by ``pad`` (centred, filled with ``fill``),
  ``center_crop`` or ``resize`` (stretch), then resizes to ``image_size`` (Lanczos);
- labels must be integers in ``[0, num_classes)`` spelt canonically -- ASCII digits, no sign,
  no leading zero or whitespace (``7``; not ``+7``, ``07``, `` 7``, ``-0`` or ``٧``) -- or
  class names matched exactly (``tasks/data/survey.py``); anything else is ``bad_label``;
- a caption (the source's own) has at most ``MAX_CAPTION_CHARS`` characters; a longer one
  is rejected as ``caption_too_long``, not truncated (half a caption may describe another
  image);
- a WebDataset sample has at most 16 members and 32 MiB in all (the settings
  ``CONDGEN_INGEST_MAX_SAMPLE_MEMBERS`` and ``..._BYTES``, ``tasks/io/settings.py``), checked
  on the tar headers before a member's bytes are read (``sample_too_large``);
- names that are absolute, drive-qualified or contain ``..`` are unsafe (:func:`unsafe_name`).
"""
from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 8, 8192, 2.0
MAX_PIXELS = 40_000_000  # checked on the header, like PIL's MAX_IMAGE_PIXELS
MAX_MEMBER_BYTES = 16 * 1024 * 1024  # bigger files are never loaded
RESIZE_POLICIES = ("pad", "center_crop", "resize")
MODES = ("auto", "L", "RGB")
INVERT_POLICIES = ("never", "auto")
WHITE = (255, 255, 255)
NAMED_BACKGROUNDS = {"white": WHITE, "black": (0, 0, 0), "grey": (128, 128, 128), "gray": (128, 128, 128)}
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
ORIENTATION_TAG = 0x0112
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "pgm", "ppm")
# PIL format names allowed (PPM covers PGM/PBM): one image each, or a first frame whose header
# size is what is decoded. TIFF (a multi-image container) is named by IMAGE_EXTS only so that
# a .tif file gets the clear reason ``unsupported_format``.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "PPM")
MAX_CAPTION_CHARS = 2000
CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]*")  # fullmatch: "7", "-1"; not "+7", "07", " 7", "-0", "٧"


# ------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RawItem:
    """One source item before validation: encoded bytes or an already-decoded array."""

    ref: str  # where it came from (relative path, tar member), kept for traceability
    label: Any
    data: bytes | None = None
    array: np.ndarray | None = None  # (H, W) or (H, W, 3) uint8 (digits: bright ink on dark)
    caption: str | None = None
    attributes: dict[str, float] | None = None  # numeric attributes given by the source
    # Given by generated sources only (None elsewhere, so other sources' samples are unchanged):
    captions: tuple[str, ...] | None = None  # every phrasing, ``caption`` first
    tags: dict[str, str] | None = None  # string attributes, e.g. {"colour": "red"}
    key: str | None = None  # the sample key ([A-Za-z0-9_-], no dots); default ``{tag}-{index:06d}``
    split: str | None = None  # the source's own split; default a seeded hash of the key


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


@dataclass(frozen=True)
class Declared:
    """What a generated source states about its items (ingest then skips the first pass):
    mode, side, class names in label order, numeric attribute names, string tag names, the
    splits it assigns, extra manifest fields (licence, attribution, generator notes) and the
    background its images are drawn on."""

    mode: str  # "L" or "RGB"
    image_size: int
    class_names: tuple[str, ...]
    attribute_names: tuple[str, ...]
    tag_names: tuple[str, ...]
    splits: tuple[str, ...]
    manifest: dict[str, Any] = field(default_factory=dict)
    background: tuple[int, int, int] | None = None  # drawn on by the generator; None: ingest's option


@dataclass
class Source:
    """A source as ingest sees it: a key prefix, a content fingerprint (to skip a run that is
    already done), its items in a fixed order, and what to clean up afterwards.

    ``labels`` and ``pick`` (bundled sources) let a ``limit`` be stratified by class:
    ``labels()`` gives the class of every item of ``items()`` without decoding any, and
    ``pick(indices)`` yields just the items at those positions, in that order.
    """

    tag: str  # key prefix: [a-z0-9_]+, no dots (webdataset splits keys at the first dot)
    fingerprint: Callable[[], str]
    items: Callable[[], Iterator[RawItem | Reject]]
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    labels: Callable[[], Sequence[int]] | None = None
    pick: Callable[[Sequence[int]], Iterator[RawItem | Reject]] | None = None
    declared: Declared | None = None


def sha256_of(chunks: Iterator[bytes]) -> str:
    """``sha256:<hex>`` over a stream of chunks: a source's fingerprint."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def stratified_indices(labels: Sequence[int], n: int, seed: int) -> np.ndarray:
    """Positions of ``n`` items spread evenly over the classes of ``labels``, in source order.

    Every class gives an equal share (a class with fewer items gives all it has and the
    others share the rest); which items of a class, and which classes get the one extra item
    when ``n`` does not divide evenly, is a seeded random choice. The same labels, ``n`` and
    ``seed`` give the same positions on any machine, and a larger ``n`` keeps every item of a
    smaller one.
    """
    y = np.asarray(labels)
    if n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng([seed, 0x11A17])  # not n: a larger limit keeps a smaller one's items
    perm = rng.permutation(len(y))
    rank = np.empty(len(y), np.int64)  # position of each item within its class, in the seeded order
    classes, inverse = np.unique(y, return_inverse=True)
    for c in range(len(classes)):
        members = perm[inverse[perm] == c]
        rank[members] = np.arange(len(members))
    tie = rng.permutation(len(classes))[inverse]  # which classes go first within a rank
    return np.sort(np.lexsort((tie, rank))[:n])


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
        if not CANONICAL_INT.fullmatch(raw):
            raise BadItem("bad_label", raw[:80])
        raw = int(raw)
    label = int(raw)
    if not 0 <= label < num_classes:
        raise BadItem("label_out_of_range", f"{label} not in [0, {num_classes})")
    return label


def parse_background(value: Any) -> tuple[int, int, int]:
    """``"white"``, ``"black"``, ``"#rrggbb"``, ``"r,g,b"`` or a 3-sequence -> (r, g, b)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in NAMED_BACKGROUNDS:
            return NAMED_BACKGROUNDS[text]
        if re.fullmatch(r"#[0-9a-f]{6}", text):
            return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        value = text.split(",")
    try:
        rgb = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"background must be white, black, #rrggbb or r,g,b in 0..255, got {value!r}")
    return rgb  # type: ignore[return-value]


def open_checked(data: bytes) -> Image.Image:
    """Open encoded bytes in an allowed format and check the header size; no pixel is
    decoded. Raises BadItem."""
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)  # only these plugins look at the bytes
        width, height = im.size  # header only: check before decoding any pixels
    except UnidentifiedImageError:
        found = sniff_format(data)
        if found is not None and found not in FORMATS:
            raise BadItem("unsupported_format", f"{found}; allowed: {', '.join(FORMATS)}") from None
        raise BadItem("corrupt_image", "UnidentifiedImageError") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad input
        raise BadItem("corrupt_image", type(exc).__name__) from None
    if not (MIN_SIDE <= min(width, height) and max(width, height) <= MAX_SIDE
            and width * height <= MAX_PIXELS and max(width, height) <= MAX_ASPECT * min(width, height)):
        raise BadItem("bad_size", f"{width}x{height}")
    return im


def sniff_format(data: bytes) -> str | None:
    """The PIL format whose magic bytes ``data`` starts with (its ``accept`` check only: no
    plugin parses the file), or None; for the reason given to a refused file."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(data[:64]):
                return name
        except Exception:  # noqa: BLE001, S112 - a plugin's check on a short prefix
            continue
    return None


def header_mode(im: Image.Image) -> str:
    """``L`` for greyscale storage modes (palettes of greys included), else ``RGB``."""
    if im.mode in GREY_MODES:
        return "L"
    if im.mode in ("P", "PA"):
        palette = im.getpalette() or []
        if all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3)):
            return "L"
    return "RGB"


def decode_image(data: bytes, mode: str = "L", background: Sequence[int] = WHITE, invert: str = "never",
                 notes: list[str] | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 (H, W) for mode ``L`` or (H, W, 3) for ``RGB`` (policy above).

    ``notes`` collects what was done beyond decoding (``exif_rotated``, ``composited``, ...)
    for the manifest's ``conversions`` counts. Raises BadItem.
    """
    im = open_checked(data)
    notes = notes if notes is not None else []
    try:
        if getattr(im, "n_frames", 1) > 1:
            notes.append("animated_first_frame")  # Image.open stands on frame 0
        im.load()
        if im.getexif().get(ORIENTATION_TAG, 1) not in (1, None):
            notes.append("exif_rotated")
        im = ImageOps.exif_transpose(im)
        arr = _to_mode(im, mode, tuple(background), notes)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this item's, not the run's
        raise BadItem("corrupt_image", type(exc).__name__) from None
    if invert == "auto" and arr.ndim == 2:
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        if np.median(border) > 127:  # dark ink on paper -> MNIST polarity
            notes.append("inverted")
            arr = 255 - arr
    return arr


def array_to_mode(arr: np.ndarray, mode: str, notes: list[str]) -> np.ndarray:
    """A decoded (H, W) or (H, W, 3) uint8 array in the set's mode (unchanged when it is)."""
    arr = np.asarray(arr, dtype=np.uint8)
    if (arr.ndim == 2) == (mode == "L"):
        return arr
    notes.append(f"converted_to_{mode}")
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).convert(mode), dtype=np.uint8)


def _to_mode(im: Image.Image, mode: str, background: tuple[int, ...], notes: list[str]) -> np.ndarray:
    if im.mode in WIDE_MODES:
        notes.append("scaled_to_8bit")
        grey = Image.fromarray(_scale_wide(im))
        return np.asarray(grey if mode == "L" else grey.convert("RGB"), dtype=np.uint8)
    if "A" in im.getbands() or "transparency" in im.info:
        notes.append("composited")
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background[:3], 255)), rgba).convert("RGB")
    elif im.mode not in ("L", "RGB"):
        if im.mode == "CMYK":
            notes.append("cmyk_to_rgb")
        im = im.convert("L" if header_mode(im) == "L" else "RGB")
    if im.mode != mode:
        notes.append(f"converted_to_{mode}")
        im = im.convert(mode)
    return np.asarray(im, dtype=np.uint8)


def _scale_wide(im: Image.Image) -> np.ndarray:
    """16-bit data by 255/65535; wider integers and floats by their maximum (never clipped)."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode != "F" and a.min() >= 0 and a.max() <= 65535:
        return (a * (255.0 / 65535.0)).round().astype(np.uint8)
    a = np.clip(a, 0, None)
    top = a.max()
    return (a / top * 255.0).round().astype(np.uint8) if top > 0 else np.zeros(a.shape, np.uint8)


def to_square(img: np.ndarray, size: int, resize: str = "pad", fill: int | Sequence[int] = 0) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> size x size: ``pad`` (centred on ``fill``), ``center_crop``
    (the central square) or ``resize`` (stretch), then Lanczos to ``size``."""
    h, w = img.shape[:2]
    if h != w and resize == "pad":
        side = max(h, w)
        canvas = np.empty((side, side, *img.shape[2:]), np.uint8)
        canvas[...] = fill if img.ndim == 2 else np.broadcast_to(np.asarray(fill, np.uint8), (3,))
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = img
        img = canvas
    elif h != w and resize == "center_crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = img[top:top + side, left:left + side]
    elif resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(img, dtype=np.uint8)


def is_blank(img: np.ndarray) -> bool:
    """A non-digit image is blank when every pixel has the same colour (a spacer, a fully
    transparent icon): it carries nothing to learn, so ingest rejects it as ``blank_image``."""
    return bool((img == img.reshape(-1, *img.shape[2:])[0]).all())


def unsafe_name(name: str) -> bool:
    """Absolute, drive-qualified or parent-relative names could address files elsewhere."""
    norm = name.replace("\\", "/")
    return (not norm or norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) is not None
            or ".." in norm.split("/"))
