"""Checker-based evaluation of text-to-image on ``bundled:shapes`` (``tasks/judging/shapes_eval.py``).

Fake samplers and editors with known behaviour pin the numbers: the data set's own renderer
scores 100 %, a sampler that ignores the colour ~1/6 on colour, an editor that returns its input
changes nothing and keeps everything. A tiny real text diffusion model runs the sampling and the
three edit paths (DDIM inversion, null-text inversion, SDEdit) end to end, and the pipeline's
evaluation logs ``eval/shapes/...`` for a text model on an ingested shapes set.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from condgen.models.classifier import ClassifierConfig
from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig
from condgen.tasks.data import shapes
from condgen.tasks.data.ingest import ingest
from condgen.tasks.data.sidecars import embeddings_uri, write_embeddings
from condgen.tasks.io import shards as shard_io
from condgen.tasks.io import storage
from condgen.tasks.judging import shapes_eval
from condgen.tasks.judging.evaluate import Judge, evaluate_model, fit_classifier, load_test
from condgen.tasks.judging.shapes_checker import JUDGED
from tests.tiny import TEXT_DIM

CANONICAL = re.compile(r"a (small|large) (\w+) (circle|square|triangle) in the (.+)")


def parse(prompt: str) -> dict[str, str]:
    size, colour, shape, position = CANONICAL.fullmatch(prompt).groups()
    return {"colour": colour, "shape": shape, "size": size, "position": position}


def split_data(n: int = 600, seed: int = 3, size: int = 32) -> dict[str, dict]:
    """``load_split``-like dicts (tags, captions, x) per split, straight from the generator."""
    out: dict[str, dict] = {}
    for r in shapes.iter_shapes(n, seed=seed, image_size=size):
        d = out.setdefault(r.split, {"tags": [], "captions": [], "x": []})
        d["tags"].append(shapes_eval.judged(r.attributes))
        d["captions"].append(r.captions)
        d["x"].append(r.image)
    return out


def oracle(colour_blind: bool = False, seed: int = 0):
    """Renders what the canonical prompt asks for; ``colour_blind``: any of the six colours instead."""
    rng = np.random.default_rng(seed)

    def sample(prompts, negatives=None):
        asked = [parse(p) for p in prompts]
        if colour_blind:
            asked = [{**a, "colour": shapes.COLOUR_NAMES[rng.integers(6)]} for a in asked]
        return np.stack([shapes_eval.render_request(a, 32, rng) for a in asked])

    return sample


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    return split_data()


def test_the_renderer_scores_100_percent_seen_and_unseen(data):
    sets = {}
    for split in ("test", "test_unseen"):
        prompts, requested, rows = shapes_eval.requests_from_split(data[split])
        assert len(prompts) == len(data[split]["tags"]) and list(rows) == list(range(len(prompts)))
        assert all(shapes_eval.caption(r) == p for p, r in zip(prompts, requested))  # captions[0] is canonical
        sets[split] = shapes_eval.PromptSet(prompts, requested)
    got = shapes_eval.seen_unseen(oracle(), sets["test"], sets["test_unseen"], samples_per_prompt=2, batch_size=50)
    assert got["unseen"]["n"] == 2 * len(sets["test_unseen"].prompts) > 0
    flat = shapes_eval.flat_metrics(got)
    assert set(flat) == {f"{p}{a}_acc" for p in ("", "unseen_") for a in (*shapes_eval.JUDGED, "joint")}
    assert all(v == 1.0 for v in flat.values()), flat


def test_a_sampler_that_ignores_colour_scores_a_sixth_on_colour(data):
    prompts, requested, _ = shapes_eval.requests_from_split(data["train"], n=300, seed=1)
    acc = shapes_eval.prompt_accuracy(oracle(colour_blind=True), prompts, requested, samples_per_prompt=2)
    assert acc["n"] == 600
    assert acc["colour"] == pytest.approx(1 / 6, abs=0.05)  # 3.3 binomial standard errors
    assert acc["shape"] == acc["size"] == acc["position"] == 1.0
    assert acc["joint"] == pytest.approx(acc["colour"])


def test_requests_subset_and_paraphrases_are_seeded(data):
    d = data["test"]
    a = shapes_eval.requests_from_split(d, n=20, seed=5, phrasing="paraphrase")
    b = shapes_eval.requests_from_split(d, n=20, seed=5, phrasing="paraphrase")
    assert a[0] == b[0] and list(a[2]) == sorted(a[2]) and len(set(a[2])) == 20
    for p, i in zip(a[0], a[2]):
        assert p in d["captions"][i][1:]
    assert shapes_eval.requests_from_split(d, n=20, seed=6)[2].tolist() != a[2].tolist()
    with pytest.raises(ValueError, match="phrasing"):
        shapes_eval.requests_from_split(d, phrasing="random")


def test_negative_prompt_rate():
    rng = np.random.default_rng(0)

    def avoider(prompts, negatives=None):  # a random colour, never the negated one
        out = []
        for i, p in enumerate(prompts):
            banned = None if negatives is None else negatives[i]
            colour = rng.choice([c for c in shapes.COLOUR_NAMES if c != banned])
            out.append(shapes_eval.render_request({"colour": colour, "shape": p[2:], "size": "large",
                                                   "position": "centre"}))
        return np.stack(out)

    r = shapes_eval.negative_prompt_rate(avoider, n_per_pair=10, batch_size=64)
    assert r["n"] == 180 and r["rate_with"] == 0.0
    assert r["rate_without"] == pytest.approx(1 / 6, abs=0.08)
    assert r["shape_acc_with"] == r["shape_acc_without"] == 1.0
    assert set(r["per_colour_with"]) == set(shapes.COLOUR_NAMES)

    def ignores(prompts, negatives=None):  # the negated colour every time: the worst case
        return np.stack([shapes_eval.render_request({"colour": negatives[i] if negatives else "red",
                                                     "shape": p[2:], "size": "small", "position": "top left"})
                         for i, p in enumerate(prompts)])

    assert shapes_eval.negative_prompt_rate(ignores, n_per_pair=2)["rate_with"] == 1.0


def test_edit_targets_change_exactly_one_attribute(data):
    source = data["test"]["tags"]
    for attr in shapes_eval.EDITABLE:
        targets = shapes_eval.edit_targets(source, attr, seed=2)
        assert targets == shapes_eval.edit_targets(source, attr, seed=2)
        for s, t in zip(source, targets):
            assert t[attr] != s[attr] and all(t[a] == s[a] for a in shapes_eval.JUDGED if a != attr)
            assert (t["colour"], t["shape"]) not in shapes.HELD_OUT
    with pytest.raises(ValueError, match="attribute"):
        shapes_eval.edit_targets(source, "texture")


def test_edit_scores_with_fake_editors(data):
    images, source = np.stack(data["test"]["x"][:40]), data["test"]["tags"][:40]
    rng = np.random.default_rng(0)

    def perfect(imgs, src, tgt):
        return np.stack([shapes_eval.render_request(parse(t), 32, rng) for t in tgt])

    def identity(imgs, src, tgt):
        return imgs.copy()

    def sloppy(imgs, src, tgt):  # does the edit but always draws a square
        return np.stack([shapes_eval.render_request({**parse(t), "shape": "square"}, 32, rng) for t in tgt])

    got = shapes_eval.edit_scores({"perfect": perfect, "identity": identity, "sloppy": sloppy}, images, source,
                                  batch_size=16)
    for attr in shapes_eval.EDITABLE:
        assert got["perfect"][attr] == {"changed": 1.0, "kept": 1.0, "score": 1.0, "n": 40}
        assert got["identity"][attr]["changed"] == 0.0 and got["identity"][attr]["score"] == 0.0
        assert got["identity"][attr]["kept"] >= 0.97  # the checker reads real images (>= 99 % per attribute)
        non_square = np.mean([s["shape"] != "square" for s in source])
        assert got["sloppy"][attr]["changed"] == 1.0
        assert got["sloppy"][attr]["kept"] == pytest.approx(1 - non_square)
    with pytest.raises(ValueError, match="uint8"):
        shapes_eval.edit_score(lambda i, s, t: i.astype(np.float32), images, source, "colour")
    with pytest.raises(ValueError, match="uint8 RGB"):
        shapes_eval.prompt_accuracy(lambda p, n: np.zeros((len(p), 32, 32), np.uint8), ["a x"], [source[0]])


def fake_encoder(dim: int = TEXT_DIM):
    """Prompt -> a fixed pseudo-random unit vector (a stand-in for CLIP's text tower)."""
    def encode(prompts):
        rows = [np.random.default_rng(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16)).standard_normal(dim)
                for p in prompts]
        return torch.from_numpy(np.stack(rows) / np.linalg.norm(rows, axis=1, keepdims=True)).float()
    return encode


def tiny_text_diffusion(size: int = 32) -> ConditionalDiffusion:
    torch.manual_seed(0)
    return ConditionalDiffusion(DiffusionConfig(image_size=size, in_channels=3, channels=(4, 8), condition="text",
                                                text_dim=TEXT_DIM, num_classes=18, timesteps=20, sample_steps=3)).eval()


def test_a_real_text_diffusion_model_samples_and_edits():
    """Only exercises the code paths (an untrained model): shapes, counts, bounds, determinism."""
    data = split_data(60, seed=4, size=16)
    model, encode = tiny_text_diffusion(16), fake_encoder()
    prompts, requested, _ = shapes_eval.requests_from_split(data["train"], n=3, seed=0)
    runs = [shapes_eval.diffusion_sampler(model, encode, guidance=1.0, steps=2, seed=0)(prompts) for _ in range(2)]
    assert runs[0].shape == (3, 16, 16, 3) and runs[0].dtype == np.uint8 and np.array_equal(*runs)  # seeded
    sampler = shapes_eval.diffusion_sampler(model, encode, guidance=1.0, steps=2, seed=0)
    acc = shapes_eval.prompt_accuracy(sampler, prompts, requested)
    assert acc["n"] == 3 and 0.0 <= acc["joint"] <= 1.0
    neg = shapes_eval.negative_prompt_rate(sampler, n_per_pair=1, colours=("red", "blue"), shape_names=("circle",))
    assert neg["n"] == 2 and 0.0 <= neg["rate_with"] <= 1.0
    editors = {m: shapes_eval.diffusion_editor(model, encode, m, guidance=1.0, steps=2, inner_steps=1)
               for m in ("ddim_inversion", "null_text", "sdedit")}
    images, source = np.stack(data["train"]["x"][:2]), data["train"]["tags"][:2]
    got = shapes_eval.edit_scores(editors, images, source, attributes=("colour",))
    assert set(got) == set(editors)
    for scores in got.values():
        s = scores["colour"]
        assert s["n"] == 2 and 0.0 <= s["score"] <= min(s["changed"], s["kept"])


def write_fake_embeddings(shards_uri: str, encode, fingerprint: str = "f" * 64) -> str:
    """An embeddings side-car as ``condgen embed`` writes it, with ``encode`` for the captions."""
    out = embeddings_uri(shards_uri, fingerprint)
    entries = []
    for entry in shard_io.read_manifest(shards_uri)["shards"]:
        samples = list(shard_io.read_samples(storage.join(shards_uri, entry["name"])))
        keys = [s["__key__"] for s in samples]
        txt = [encode(json.loads(s["json"])["captions"]).numpy().astype(np.float16) for s in samples]
        write_embeddings(storage.join(out, entry["name"]), keys, np.zeros((len(keys), TEXT_DIM), np.float16), txt)
        entries.append({"name": entry["name"], "count": len(keys)})
    storage.write_json(storage.join(out, "manifest.json"), {"fingerprint": fingerprint, "embed_dim": TEXT_DIM,
                                                            "shards": entries})
    return fingerprint


def test_the_pipeline_evaluation_logs_shapes_metrics_for_a_text_model(tmp_path: Path):
    uri = (tmp_path / "shapes").as_uri()
    ingest("bundled:shapes:size=16", uri, limit=144, shard_size=100)
    fp = write_fake_embeddings(uri, fake_encoder())
    sets = shapes_eval.load_eval_sets(uri, fp, n=6)
    assert sets is not None and len(sets.seen.prompts) == 6 and len(sets.unseen.prompts) == 6
    assert all((r["colour"], r["shape"]) in shapes.HELD_OUT for r in sets.unseen.requested)
    assert not any((r["colour"], r["shape"]) in shapes.HELD_OUT for r in sets.seen.requested)
    np.testing.assert_allclose(sets.table[sets.seen.prompts[0]], fake_encoder()([sets.seen.prompts[0]])[0].numpy(),
                               atol=1e-3)  # row 0 of the side-car: the canonical caption, stored as float16
    assert not shapes_eval.is_shapes_set({"bundled": {"name": "bundled:openmoji"}})
    assert not shapes_eval.is_shapes_set({"source": "bundled:mnist"})

    model = tiny_text_diffusion(16)
    metrics = shapes_eval.evaluate_text_model(model, sets)
    assert set(metrics) == set(shapes_eval.flat_metrics({"seen": {a: 0 for a in (*JUDGED, "joint")},
                                                         "unseen": {a: 0 for a in (*JUDGED, "joint")}}))
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics == shapes_eval.evaluate_text_model(model, sets)  # seeded: the same numbers twice

    test = load_test(uri, fp)
    judge_model = fit_classifier(test["x"], test["y"], config=ClassifierConfig(in_channels=3, num_classes=18,
                                                                               channels=(4, 8), feature_dim=16),
                                 epochs=1)
    judge = Judge(judge_model, 0.9, "stub")
    result = evaluate_model(model, judge, test, n_per_class=1, shapes=sets)
    assert result.shapes == metrics  # the same seed, so the same samples as evaluate_text_model's
    logged = result.metrics()
    for name in ("colour_acc", "shape_acc", "size_acc", "position_acc", "joint_acc", "unseen_joint_acc"):
        assert logged[f"eval/shapes/{name}"] == metrics[name]
    label_model = ConditionalDiffusion(DiffusionConfig(image_size=16, in_channels=3, channels=(4, 8), num_classes=18,
                                                       timesteps=20, sample_steps=2)).eval()
    assert evaluate_model(label_model, judge, test, n_per_class=1, shapes=sets).shapes == {}  # text models only
