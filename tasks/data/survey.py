"""A first pass over a source's items, before any shard is written: the set's colour
mode, its label scheme, its numeric attribute names and (when asked) its image size.

Declared policies (ingest records the outcome in the manifest):

- **mode** ``auto``: the majority of the items' storage modes by header (greyscale:
  ``1``, ``L``, ``LA``, 16-bit, float and grey palettes; everything else counts as
  colour); a tie goes to ``RGB``, which loses nothing. ``L`` or ``RGB`` force the mode.
- **labels**: integers when at least half of the distinct raw labels are integers in
  their canonical spelling (``7``; a digit folder with one stray ``cat/`` folder stays a
  digit set, the stray one is rejected as ``bad_label``); otherwise every label is a class
  name and classes are numbered by sorted name, like torchvision's ImageFolder
  (``class_names`` in the manifest). Integer labels are checked against ``num_classes``
  (default 10, the digits). Labels are taken exactly as written: ``+7``, ``07``, `` 7``,
  ``-0`` and ``٧`` are not 7 or 0 but ``bad_label`` in an integer set, and a name with
  leading or trailing whitespace or an unprintable character is never a class name.
- **caption-only** items (a caption and no label) get label -1 (``cls`` "-1"): text
  conditioning uses them, class-conditional training must skip them.
- **attributes**: the sorted union of the numeric attribute names the source gives.
- **image_size** ``None``: the most common longer side, capped at ``MAX_INFERRED_SIZE``.

A generated source states all this itself (:class:`~condgen.tasks.data.items.Declared`:
its class names in label order, numeric attribute and string tag names, its splits and
image side), so :func:`make_plan` skips the pass for it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from condgen.tasks.data import attributes
from condgen.tasks.data.items import (
    CANONICAL_INT,
    MIN_SIDE,
    BadItem,
    Declared,
    RawItem,
    Reject,
    Source,
    header_mode,
    open_checked,
    parse_label,
)

MAX_INFERRED_SIZE = 64
DEFAULT_NUM_CLASSES = 10


@dataclass
class Survey:
    modes: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    labels: set = field(default_factory=set)  # distinct raw labels (see _norm)
    attribute_names: set = field(default_factory=set)

    def mode(self, requested: str) -> str:
        if requested in ("L", "RGB"):
            return requested
        return "L" if self.modes["L"] > self.modes["RGB"] else "RGB"

    def image_size(self, requested: int | None) -> int:
        if requested is not None:
            return requested
        if not self.sizes:
            return 28
        best = max(self.sizes.items(), key=lambda kv: (kv[1], -kv[0]))[0]
        return int(min(max(best, MIN_SIDE), MAX_INFERRED_SIZE))


def survey(items: Iterable[RawItem | Reject]) -> Survey:
    """One pass over the items: header modes and sizes, raw labels, attribute names."""
    out = Survey()
    for item in items:
        if isinstance(item, Reject):
            continue
        label = _norm(item.label)
        if label is not None:
            out.labels.add(label)
        out.attribute_names.update(numeric_attributes(item.attributes))
        if item.array is not None:
            out.modes["RGB" if item.array.ndim == 3 else "L"] += 1
            out.sizes[max(item.array.shape[:2])] += 1
            continue
        try:
            im = open_checked(item.data or b"")
        except BadItem:
            continue  # rejected later, with its reason
        out.modes[header_mode(im)] += 1
        out.sizes[max(im.size)] += 1
    return out


def numeric_attributes(attrs: Any) -> dict[str, float]:
    """The numeric (finite int/float, not bool) entries of a source's attribute mapping."""
    if not isinstance(attrs, dict):
        return {}
    return {str(k): float(v) for k, v in attrs.items()
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and np.isfinite(float(v))}


@dataclass(frozen=True)
class LabelScheme:
    """How raw labels become class indices: integers, or sorted class names."""

    num_classes: int
    class_names: tuple[str, ...] | None = None  # None: integer labels

    def parse(self, raw: Any, has_caption: bool) -> int:
        """The class index of a raw label; -1 for a caption-only item. Raises BadItem."""
        absent = raw is None or (isinstance(raw, (str, bytes)) and _norm(raw) is None)
        if absent and has_caption:
            return -1
        if self.class_names is None:
            return parse_label(raw, self.num_classes)
        if absent:
            raise BadItem("missing_label")
        name = _norm(raw)
        if name is None:
            raise BadItem("bad_label", repr(raw)[:80])
        if str(name) not in self.class_names:
            raise BadItem("bad_label", str(name)[:80])
        return self.class_names.index(str(name))


def label_scheme(labels: set, num_classes: int | None) -> LabelScheme:
    """Integer labels or class names, by the majority rule in the module docstring."""
    ints = [v for v in labels if isinstance(v, int) or CANONICAL_INT.fullmatch(str(v))]
    if 2 * len(ints) >= len(labels):
        return LabelScheme(num_classes if num_classes is not None else DEFAULT_NUM_CLASSES)
    names = tuple(sorted(name for name in {str(v) for v in labels} if _valid_name(name)))
    if num_classes is not None and num_classes != len(names):
        raise ValueError(f"num_classes={num_classes} but the data names {len(names)} classes: {list(names)[:20]}")
    return LabelScheme(len(names), names)


def _valid_name(name: str) -> bool:
    """A class name: printable, without leading or trailing whitespace (`` cat`` is not ``cat``)."""
    return name == name.strip() and name.isprintable()


def _norm(raw: Any) -> int | str | None:
    """A raw label as an int or the string exactly as given; None when absent, blank or of
    another type."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        return raw if raw.strip() else None
    if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
        return int(raw)
    return None


# ------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Plan:
    """What the first pass settled: the set's mode, size, labels and attributes."""

    mode: str  # "L" or "RGB"
    image_size: int
    labels: LabelScheme
    attribute_names: tuple[str, ...]
    digits: bool  # greyscale with integer labels: digit attributes, captions and ink check
    background: tuple[int, int, int]
    declared: Declared | None = None  # a generated source's own statement (tags, splits, licence)


def make_plan(src: Source, config: dict[str, Any]) -> Plan:
    """Settle mode, labels, size and attributes from a first pass (or the source's declaration)."""
    if src.declared is not None:
        return _declared_plan(src.declared, config)
    found = survey(src.items())
    mode = found.mode(config["mode"])
    labels = label_scheme(found.labels, config["num_classes"])
    digits = mode == "L" and labels.class_names is None
    if config["invert"] != "never" and not digits:
        raise ValueError("invert is for greyscale digit sources (integer labels); this source is "
                         f"{mode} with {'class names' if labels.class_names else 'integer labels'}")
    names = attributes.ATTRIBUTE_NAMES if digits else tuple(sorted(found.attribute_names))
    return Plan(mode, found.image_size(config["image_size"]), labels, tuple(names), digits,
                tuple(config["background"]))  # type: ignore[arg-type]


def _declared_plan(declared: Declared, config: dict[str, Any]) -> Plan:
    names = declared.class_names
    if config["num_classes"] is not None and config["num_classes"] != len(names):
        raise ValueError(f"num_classes={config['num_classes']} but the source names {len(names)} classes")
    if config["invert"] != "never":
        raise ValueError("invert is for greyscale digit sources; this source declares class names")
    mode = config["mode"] if config["mode"] in ("L", "RGB") else declared.mode
    background = declared.background or tuple(config["background"])
    return Plan(mode, declared.image_size, LabelScheme(len(names), names), declared.attribute_names, False,
                background, declared)  # type: ignore[arg-type]


def describe(p: Plan, config: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields a plan settles (a declaring source adds its tag names and its own fields)."""
    out: dict[str, Any] = {
        "channels": 1 if p.mode == "L" else 3, "image_size": p.image_size, "mode": p.mode,
        "resize": config["resize"], "background": list(p.background), "num_classes": p.labels.num_classes,
        "attribute_names": list(p.attribute_names), "digits": p.digits,
    }
    if p.labels.class_names is not None:
        out["class_names"] = list(p.labels.class_names)
    if p.declared is not None:
        out["tag_names"] = list(p.declared.tag_names)
        out.update(p.declared.manifest)
    return out
