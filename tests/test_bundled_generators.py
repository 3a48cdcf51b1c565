"""Bundled generators: ``bundled:shapes`` to its exact spec, the pixel checker, ``bundled:openmoji``."""
from __future__ import annotations

import collections
import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from condgen.tasks.data import openmoji, shapes
from condgen.tasks.data.bundled_records import split_of_group
from condgen.tasks.data.openmoji_names import CATEGORIES, emoji_entries
from condgen.tasks.judging import shapes_checker

CANONICAL = re.compile(r"a (small|large) (red|green|blue|yellow|magenta|cyan) (circle|square|triangle) in the "
                       r"(top left|top right|bottom left|bottom right|centre)")


def _digest(records) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.key.encode() + r.image.tobytes() + json.dumps([r.captions, r.attributes, r.split]).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shape_records():
    return list(shapes.iter_shapes(3000, seed=7))


# ----------------------------------------------------------------------------- shapes


def test_shapes_palette_and_classes_are_the_spec():
    assert shapes.COLOURS == {"red": (230, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 240),
                              "yellow": (240, 220, 40), "magenta": (220, 50, 220), "cyan": (40, 210, 220)}
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert len(shapes.CLASS_NAMES) == 18 and shapes.CLASS_NAMES[0] == "red circle"
    assert shapes.CLASS_NAMES[17] == "cyan triangle" and shapes.class_index("blue", "triangle") == 8


def test_shapes_are_deterministic_by_seed():
    a, b = list(shapes.iter_shapes(150, seed=3)), list(shapes.iter_shapes(150, seed=3))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(shapes.iter_shapes(150, seed=4))
    tail = list(shapes.iter_shapes(50, seed=3, start=100))  # sample i does not depend on the run length
    assert _digest(tail) == _digest(a[100:])


def test_shapes_follow_the_spec(shape_records):
    for r in shape_records:
        a = r.attributes
        assert r.image.dtype == np.uint8 and r.image.shape == (32, 32, 3)
        assert r.label == shapes.class_index(a["colour"], a["shape"])
        lo, hi = shapes.SIZES[a["size"]]
        assert lo <= a["side"] <= hi
        ax, ay = shapes.POSITIONS[a["position"]]
        assert abs(a["cx"] - ax) <= 0.04 + 1e-12 and abs(a["cy"] - ay) <= 0.04 + 1e-12
        half = a["side"] / 2
        assert half <= a["cx"] <= 1 - half and half <= a["cy"] <= 1 - half  # fully inside
        assert r.caption == f"a {a['size']} {a['colour']} {a['shape']} in the {a['position']}"
        assert CANONICAL.fullmatch(r.caption) and r.captions[0] == r.caption
        assert len(set(r.captions[1:])) >= 3 and r.caption not in r.captions[1:]
        colour = np.asarray(shapes.COLOURS[a["colour"]], float)
        ink = r.image.reshape(-1, 3).astype(float)
        assert (ink.max(axis=1) == 0).mean() > 0.5  # black background
        full = ink[(ink == colour).all(axis=1)]
        assert len(full) > 0  # the object's inside is exactly the palette colour
        cov = ink @ colour / (colour @ colour)  # every pixel is coverage x colour (anti-aliased edges)
        assert np.abs(ink - cov[:, None] * colour).max() <= 1.0


def test_shapes_pixels_match_the_geometry(shape_records):
    """The inked pixels span the bounding box given by cx, cy, side (to the pixel grid)."""
    for r in shape_records[:500]:
        a, n = r.attributes, 32
        ys, xs = np.nonzero(r.image.max(axis=2) > 0)
        for lo, hi, c in ((xs.min(), xs.max() + 1, a["cx"]), (ys.min(), ys.max() + 1, a["cy"])):
            assert abs((lo + hi) / 2 - c * n) <= 1.0
            assert a["side"] * n - 0.5 <= hi - lo <= a["side"] * n + 2


def test_held_out_combinations_only_in_test_unseen(shape_records):
    by_split = collections.defaultdict(set)
    for r in shape_records:
        by_split[r.split].add((r.attributes["colour"], r.attributes["shape"]))
    assert set(by_split) == {"train", "val", "test", "test_unseen"}
    assert by_split["test_unseen"] == set(shapes.HELD_OUT)
    for split in ("train", "val", "test"):
        assert not by_split[split] & shapes.HELD_OUT
    assert len(by_split["train"]) == 15
    counts = collections.Counter(r.split for r in shape_records if r.split != "test_unseen")
    assert 0.75 < counts["train"] / sum(counts.values()) < 0.85


def test_shapes_info_is_json():
    info = shapes.shapes_info(100, image_size=64).to_dict()
    assert json.loads(json.dumps(info))["class_names"][0] == "red circle"
    assert info["splits"] == ["train", "val", "test", "test_unseen"] and info["image_size"] == 64


# ---------------------------------------------------------------------------- checker


@pytest.mark.parametrize("size,n", [(32, 3000), (64, 1000)])
def test_checker_reads_generated_shapes(size, n, shape_records):
    recs = shape_records if size == 32 else list(shapes.iter_shapes(n, image_size=size, seed=11))
    preds, acc = shapes_checker.check(np.stack([r.image for r in recs]), [r.attributes for r in recs])
    assert acc["n"] == n
    for attr in ("colour", "shape", "size", "position", "joint"):
        assert acc[attr] >= 0.99, (size, acc)
    err = np.asarray([[p["cx"] - r.attributes["cx"], p["cy"] - r.attributes["cy"], p["side"] - r.attributes["side"]]
                      for p, r in zip(preds, recs)])
    assert np.abs(err).max() * size < 0.5  # sub-pixel centre and side


def test_checker_handles_empty_and_specks():
    empty = shapes_checker.measure(np.zeros((32, 32, 3), np.uint8))
    assert empty["colour"] == empty["shape"] == empty["size"] == empty["position"] == "none"
    rec = next(shapes.iter_shapes(1, seed=5))
    noisy = rec.image.copy()
    far = (0, 31) if rec.attributes["cx"] < 0.5 else (0, 0)
    noisy[far] = (255, 255, 255)  # a one-pixel speck away from the object is ignored
    got = shapes_checker.measure(noisy)
    assert all(got[a] == rec.attributes[a] for a in shapes_checker.JUDGED)
    acc = shapes_checker.accuracy([empty, got], [rec.attributes, rec.attributes])
    assert acc["colour"] == acc["joint"] == 0.5 and acc["n"] == 2


# --------------------------------------------------------------------------- openmoji


@pytest.fixture(scope="module")
def emoji_records():
    return list(openmoji.iter_openmoji(32))


def test_openmoji_classes_and_images(emoji_records):
    x = np.stack([r.image for r in emoji_records])
    assert x.dtype == np.uint8 and x.shape == (len(emoji_records), 32, 32, 3) and len(emoji_records) > 3500
    counts = collections.Counter(r.label for r in emoji_records)
    assert len(CATEGORIES) >= 8 and all(counts[c] >= 20 for c in range(len(CATEGORIES))), counts
    corners = x[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.mean() > 245  # white background, glyph centred with a margin
    assert x.std(axis=(1, 2, 3)).min() > 5  # every image has content
    assert len({r.key for r in emoji_records}) == len(emoji_records)


def test_openmoji_names_and_attributes(emoji_records):
    by_name = {r.caption: r for r in emoji_records}
    r = by_name["person: medium skin tone, red hair"]
    assert (r.attributes["skin_tone"], r.attributes["skin_tone_level"], r.attributes["hair"],
            r.attributes["gender"]) == ("medium", 3.0, "red", "person")
    assert by_name["woman detective: medium-dark skin tone"].attributes["gender"] == "woman"
    assert by_name["man: bald"].attributes["hair"] == "bald"
    apple = by_name["red apple"]
    assert CATEGORIES[apple.label] == "food & drink"
    assert "an emoji of a red apple" in apple.captions and "red apple emoji" in apple.captions
    assert CATEGORIES[by_name["flag: Kuwait"].label] == "flags"
    assert CATEGORIES[by_name["grinning face"].label] == "smileys & emotion"
    assert CATEGORIES[by_name["dog face"].label] == "animals & nature"
    assert by_name["family: man, woman, boy"].attributes["gender"] == "mixed"  # a ZWJ sequence, one glyph


def test_openmoji_groups_keep_variants_in_one_split(emoji_records):
    by_name = {r.caption: r for r in emoji_records}
    assert by_name["woman detective"].group == by_name["detective"].group == by_name[
        "man detective: dark skin tone"].group
    assert by_name["person: red hair"].group == by_name["woman: light skin tone, red hair"].group
    splits = collections.defaultdict(set)
    for r in emoji_records:
        splits[r.group].add(r.split)
        assert r.split == split_of_group(r.group, 0)
    assert all(len(s) == 1 for s in splits.values())
    assert {s for v in splits.values() for s in v} == {"train", "val", "test"}


def test_openmoji_render_options_and_info(tmp_path):
    seq = "\U0001F34E"
    a = openmoji.render_emoji(seq, 64, background=(0, 0, 0))
    assert a.shape == (64, 64, 3) and a[0, 0].max() == 0 and a.max() > 200
    assert np.array_equal(a, openmoji.render_emoji(seq, 64, background=(0, 0, 0)))
    info = openmoji.openmoji_info()
    d = json.loads(json.dumps(info.to_dict()))
    assert d["license"] == "CC BY-SA 4.0" and "OpenMoji" in d["attribution"]
    assert d["notes"]["n_items"] + d["notes"]["skipped_not_one_glyph"] == len(emoji_entries())
    assert d["notes"]["skipped_not_one_glyph"] < 100
    sheet = openmoji.openmoji_contact_sheet(tmp_path / "sheet.png", per_class=2)
    assert Image.open(sheet).size[1] == len(CATEGORIES) * (64 + 2)
