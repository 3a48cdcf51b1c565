"""Colour through the whole pipeline: a folder of RGB images with ``captions.jsonl`` and string labels
-> ingest (RGB shards) -> Ray Train (one short epoch of every label-conditioned family, 3 channels,
size and classes filled in from the manifest) -> checkpoints served in-process over HTTP
(``Service`` + ``bind_service`` + TestClient, no Ray Serve) -> decodable RGB PNGs of the trained size.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from condgen.serving.app import bind_service
from condgen.serving.config import ModelSpec, ServeConfig
from condgen.serving.service import Service
from condgen.tasks.data.ingest import ingest
from condgen.tasks.data.splits import dataset_info, load_split
from condgen.tasks.generation import watermark
from condgen.tasks.io.model_store import load_trained
from condgen.tasks.training.driver import TrainRequest, train
from tests.tiny import TINY

SIZE = 16
CLASSES = {"red square": (220, 30, 30), "green circle": (30, 180, 60), "blue triangle": (40, 60, 220)}
FAMILIES = ("cvae", "cgan", "acgan", "diffusion")


def _draw(shape: str, rgb: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    im = Image.new("RGB", (40, 40), (255, 255, 255))
    d = ImageDraw.Draw(im)
    x0, y0 = (int(v) for v in rng.integers(2, 10, 2))
    x1, y1 = x0 + int(rng.integers(22, 28)), y0 + int(rng.integers(22, 28))
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in rgb)
    if shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return im


@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory) -> str:
    """30 RGB images (3 classes named by strings) with captions, ingested at SIZE px."""
    src, out = tmp_path_factory.mktemp("colour-src"), tmp_path_factory.mktemp("colour-shards")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(30):
        name = list(CLASSES)[i % 3]
        _draw(name.split()[1], CLASSES[name], rng).save(src / f"img{i:02d}.png")
        lines.append({"file": f"img{i:02d}.png", "label": name, "caption": f"a {name} number {i}"})
    (src / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    ingest(str(src), out.as_uri(), image_size=SIZE, mode="RGB", shard_size=16)
    return out.as_uri()


@pytest.mark.slow
def test_colour_folder_trains_every_label_family_and_serves_rgb(colour_shards, local_ray, monkeypatch):
    info = dataset_info(colour_shards)
    assert info["channels"] == 3 and info["image_size"] == SIZE and info["num_classes"] == 3
    assert sorted(info["class_names"]) == sorted(CLASSES)
    data = load_split(colour_shards, "all")
    assert data["x"].shape[1:] == (SIZE, SIZE, 3) and len(data["x"]) == 30
    # the colour survives ingest: a red square's red channel dominates its non-white pixels
    red = data["x"][data["y"] == info["class_names"].index("red square")].reshape(-1, 3).astype(int)
    ink = red[red.sum(-1) < 600]
    assert (ink[:, 0] > ink[:, 1] + 60).mean() > 0.8

    checkpoints = {}
    for family in FAMILIES:
        res = train(TrainRequest(model=family, shards_uri=colour_shards, model_config=TINY[family], epochs=1,
                                 batch_size=8, num_workers=1, grid_every=0, run_name=f"test-colour-{family}"))
        assert res.history and all(np.isfinite(v) for v in res.history[-1].values()), res.history
        _, meta = load_trained(res.checkpoint_uri)
        cfg = meta["config"]
        assert (meta["model"], cfg["in_channels"], cfg["image_size"], cfg["num_classes"]) == (family, 3, SIZE, 3)
        checkpoints[family] = res.checkpoint_uri

    monkeypatch.setenv(watermark.KEY_ENV, "test-only-watermark-key")
    specs = [ModelSpec(uri=uri, name=family) for family, uri in checkpoints.items()]
    svc = Service(ServeConfig(models=specs, poll_s=0, deny_list=[]))
    try:
        with TestClient(bind_service(svc)) as client:
            for family in FAMILIES:
                r = client.post("/v1/generate", json={"model": family, "label": 1, "n": 1, "seed": 3})
                assert r.status_code == 200, r.text
                im = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
                im.load()
                assert im.mode == "RGB" and im.size == (SIZE, SIZE), (family, im.mode, im.size)
    finally:
        svc.close()
