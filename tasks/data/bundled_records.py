"""What a bundled (generated, no-download) source yields, and helpers shared by them.

The bundled sources (``tasks/data/openmoji.py``: ``bundled:openmoji``,
``tasks/data/shapes.py``: ``bundled:shapes``) generate their items in memory from data
that ships in installed wheels. Each yields :class:`Record` s and describes itself with a
:class:`BundledInfo` (class names, attribute names, licence, attribution) for the manifest.

Splits are assigned per *group* (:func:`split_of_group`): items that are variants of
one another (an emoji in five skin tones) share a group, so they land in one split and
a model is never tested on a recoloured copy of a training image.

:func:`record_source` turns a generator into an ingest
:class:`~condgen.tasks.data.items.Source`: each record becomes a RawItem with its own key,
split, phrasings, numeric attributes and string tags, and the source declares its classes,
attributes, licence and attribution, so ingest needs no first pass over the images.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from condgen.tasks.data.items import Declared, RawItem, Source, sha256_of

DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass(frozen=True)
class Record:
    """One generated item.

    ``image`` is RGB uint8 (H, W, 3); ``caption`` the canonical phrasing and ``captions``
    every phrasing, the canonical one first; ``attributes`` maps names (see
    ``BundledInfo.attribute_names``) to floats or strings; ``group`` ties variants
    together for :func:`split_of_group`; ``split`` is None when the caller splits.
    """

    key: str
    image: np.ndarray
    label: int
    caption: str
    captions: list[str]
    attributes: dict[str, float | str]
    group: str
    split: str | None


@dataclass(frozen=True)
class BundledInfo:
    """Manifest metadata of a bundled source (JSON-able through :meth:`to_dict`)."""

    name: str  # the source spec, e.g. "bundled:shapes"
    class_names: tuple[str, ...]
    attribute_names: tuple[str, ...]
    license: str
    attribution: str
    image_size: int
    splits: tuple[str, ...]
    notes: dict[str, Any] = field(default_factory=dict)  # counts, skipped items, config
    numeric_attributes: tuple[str, ...] = ()  # those of attribute_names whose values are numbers; the rest are strings

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("class_names", "attribute_names", "splits", "numeric_attributes"):
            d[name] = list(getattr(self, name))
        return d


def unit_hash(text: str, seed: int) -> float:
    """A deterministic number in [0, 1) from ``text`` and ``seed`` (SHA-256, not ``hash()``)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_of_group(group: str, seed: int = 0, fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> str:
    """The split of every item in ``group``: a seeded hash compared with the cumulative
    ``fractions`` (in their order; they are normalised, so {"train": 8, "val": 1,
    "test": 1} works). Same group and seed -> same split, on any machine."""
    total = float(sum(fractions.values()))
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise ValueError(f"fractions must be non-negative with a positive sum, got {dict(fractions)}")
    u, acc = unit_hash(group, seed) * total, 0.0
    names = list(fractions)
    for name in names:
        acc += fractions[name]
        if u < acc:
            return name
    return names[-1]


def _label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def contact_sheet(records: Iterable[Record], class_names: Sequence[str], path: str | Path, *, per_class: int = 8,
                  scale: int = 2, background: tuple[int, int, int] = (128, 128, 128)) -> Path:
    """Write a grid PNG: one row per class (its name at the left), ``per_class`` items
    spread evenly over that class's records, each image enlarged ``scale`` times
    (nearest neighbour, so the pixels stay visible). Returns the path."""
    by_class: dict[int, list[Record]] = {i: [] for i in range(len(class_names))}
    for rec in records:
        by_class.setdefault(rec.label, []).append(rec)
    side = max((r.image.shape[0] for rows in by_class.values() for r in rows), default=32) * scale
    label_w, gap = 170, 2
    sheet = Image.new("RGB", (label_w + per_class * (side + gap), len(class_names) * (side + gap)), background)
    draw, font = ImageDraw.Draw(sheet), _label_font(12)
    for row, name in enumerate(class_names):
        recs = by_class.get(row, [])
        y = row * (side + gap)
        draw.text((4, y + side // 2 - 7), f"{row} {name} ({len(recs)})", fill=(0, 0, 0), font=font)
        if not recs:
            continue
        picks = np.unique(np.linspace(0, len(recs) - 1, min(per_class, len(recs))).round().astype(int))
        for col, i in enumerate(picks):
            tile = Image.fromarray(recs[i].image).resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_w + col * (side + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# ---------------------------------------------------------------------- as a source


def record_item(rec: Record, class_names: Sequence[str]) -> RawItem:
    """A record as ingest's RawItem: label by class name, numbers as attributes, strings as tags."""
    return RawItem(ref=rec.key, label=class_names[rec.label], array=rec.image, caption=rec.caption,
                   attributes={k: float(v) for k, v in rec.attributes.items() if not isinstance(v, str)},
                   captions=tuple(rec.captions), tags={k: v for k, v in rec.attributes.items() if isinstance(v, str)},
                   key=rec.key, split=rec.split)


def record_source(info: BundledInfo, options: Mapping[str, Any], modules: Sequence[ModuleType],
                  records: Callable[[Iterable[int]], Iterable[Record]], *, count: int,
                  labels: Callable[[], Sequence[int]], background: tuple[int, int, int]) -> Source:
    """An ingest Source over records ``0 .. count - 1`` of a generator.

    ``records(indices)`` yields the records at those positions, ``labels()`` the class of
    every position without rendering; ``modules`` are the generator's code, hashed into the
    fingerprint with ``info`` and ``options``, so a changed generator is ingested again;
    ``background`` is the colour the images are drawn on (the manifest's ``background``).
    """
    tags = tuple(a for a in info.attribute_names if a not in info.numeric_attributes)
    manifest = {"license": info.license, "attribution": info.attribution,
                "bundled": {"name": info.name, "options": dict(options), "notes": info.notes}}
    declared = Declared("RGB", info.image_size, info.class_names, info.numeric_attributes, tags, info.splits,
                        manifest, tuple(background))  # type: ignore[arg-type]

    def fingerprint() -> str:
        head = json.dumps({"info": info.to_dict(), "options": dict(options)}, sort_keys=True).encode()
        code = [Path(str(m.__file__)).read_bytes() for m in modules] + [Path(__file__).read_bytes()]
        return sha256_of(iter([head, *code]))

    def pick(indices: Iterable[int]) -> Iterator[RawItem]:
        for rec in records(indices):
            yield record_item(rec, info.class_names)

    return Source(info.name.removeprefix("bundled:"), fingerprint, lambda: pick(range(count)), labels=labels,
                  pick=pick, declared=declared)
