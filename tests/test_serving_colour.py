"""Colour end to end on the generation side: the service, batch generation and the CLI with 3-channel models.

Tiny RGB models at 32 px (a label diffusion model, two CVAEs with a fitted latent map between them)
and a greyscale diffusion model at 28 px are saved as checkpoint folders and served in-process
(``Service`` + ``bind_service`` + TestClient, no Ray, no registry), as tests/test_sampling_parity.py
does. RGB models answer with RGB PNGs that carry exactly the model's pixels; greyscale models still
answer with ``L`` PNGs, byte for byte what the greyscale-only service wrote; uploads are decoded to
the served model's channels and size (``tasks/generation/inputs.py``). The web page test (slow)
serves the same app with uvicorn and looks at it in headless Chromium.
"""
from __future__ import annotations

import asyncio
import base64
import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from condgen.cli import main
from condgen.models.registry import build_model
from condgen.serving import schema
from condgen.serving.app import bind_service
from condgen.serving.config import ModelSpec, ServeConfig
from condgen.serving.service import Service
from condgen.tasks.generation import batch as bg
from condgen.tasks.generation import watermark
from condgen.tasks.generation.inputs import BadImage, decode_for_model, match_channels
from condgen.tasks.generation.safety import LabelMatch, SafetyFilter
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io.images import from_uint8, to_uint8
from condgen.tasks.io.model_store import load_model_uri
from condgen.tasks.judging import latent_maps as ml
from tests.conftest import served_in_thread
from tests.tiny import decode_png, perturb

# channels (8, 16): see tests/test_sampling_parity.py (with 4 or 8 channels the label has ~no effect)
RGB_DIFF = {"channels": (8, 16), "timesteps": 20, "sample_steps": 4, "in_channels": 3, "image_size": 32}
GREY_DIFF = {"channels": (8, 16), "timesteps": 20, "sample_steps": 4}
RGB_CVAE = {"channels": (4, 8), "in_channels": 3, "image_size": 32}
RGB_CVAE_B = dict(RGB_CVAE, latent_dim=6)
MODELS = {"rgb-diff": ("diffusion", RGB_DIFF), "rgb-cvae": ("cvae", RGB_CVAE), "rgb-cvae-b": ("cvae", RGB_CVAE_B),
          "grey-diff": ("diffusion", GREY_DIFF), "grey-judge": ("classifier", {"channels": (4, 8)})}


pytestmark = pytest.mark.usefixtures("one_torch_thread", "watermark_key")  # tests/conftest.py




@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("colour")
    out = {}
    for i, (name, (kind, config)) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        ckpt_io.save_checkpoint(root / name, perturb(build_model(kind, config), seed=i).eval())
        out[name] = (root / name).as_uri()
    spaces = [ml.latent_space(load_model_uri(out[n])[0], name=n) for n in ("rgb-cvae", "rgb-cvae-b")]
    support = ml.build_support(*spaces, None, torch.arange(100) % 10, mode="generated")
    out["map"] = ml.save_map(ml.fit_map(support, *spaces), root / "map").as_uri()
    return out


@pytest.fixture(scope="module")
def service(folders):
    specs = [ModelSpec(uri=folders[n], name=n) for n in ("rgb-diff", "rgb-cvae", "rgb-cvae-b", "grey-diff")]
    svc = Service(ServeConfig(models=specs, poll_s=0, deny_list=[], maps=[folders["map"]]))
    yield svc
    svc.close()


@pytest.fixture
def client(service):
    with TestClient(bind_service(service)) as c:
        yield c


def _b64_png(arr: np.ndarray, mode: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _colourful(side: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1)
    return (255 * np.stack([xx, yy, 1 - xx * yy], -1)).astype(np.uint8)


def _assert_colour(im: Image.Image, side: int) -> np.ndarray:
    a = np.asarray(im)
    assert im.mode == "RGB" and a.shape == (side, side, 3)
    assert np.abs(a[..., 0].astype(int) - a[..., 1]).max() > 10  # three different channels, not grey in RGB
    return a


# -- /v1 ------------------------------------------------------------------------------------------------------
def test_models_report_channels_and_image_size(client):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert {n: (m["channels"], m["image_size"], m["info"]["mode"]) for n, m in models.items()} == {
        "rgb-diff": (3, 32, "RGB"), "rgb-cvae": (3, 32, "RGB"), "rgb-cvae-b": (3, 32, "RGB"),
        "grey-diff": (1, 28, "L")}
    spec = client.get("/openapi.json").json()
    assert "composited onto white" in spec["paths"]["/v1/edit"]["post"]["description"]
    assert "RGB" in spec["paths"]["/v1/generate"]["post"]["description"]


@pytest.mark.parametrize("name", ["rgb-diff", "rgb-cvae"])
def test_generate_returns_the_models_rgb_pixels(client, service, name):
    body = {"model": name, "label": 3, "n": 3, "seed": 5}
    if name == "rgb-diff":
        body.update(guidance="cfg", scale=2.0, steps=4)
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    got = np.stack([_assert_colour(decode_png(b), 32) for b in r.json()["images"]])
    model = service.pool.get(name).model
    labels, g = torch.full((3,), 3), torch.Generator().manual_seed(5)
    ref = model.sample(labels, g, steps=4, guidance_scale=2.0) if name == "rgb-diff" else model.sample(labels, g)
    assert np.array_equal(got, to_uint8(ref))  # channel order and values exactly the model's


def test_greyscale_model_still_answers_with_the_same_l_pngs(client, service):
    r = client.post("/v1/generate", json={"model": "grey-diff", "label": 2, "n": 2, "seed": 1, "guidance": "cfg",
                                          "scale": 1.0, "steps": 4}).json()
    ims = [decode_png(b) for b in r["images"]]
    assert all(im.mode == "L" and im.size == (28, 28) for im in ims)
    ref = service.pool.get("grey-diff").model.sample(torch.full((2,), 2), torch.Generator().manual_seed(1), steps=4,
                                                      guidance_scale=1.0)
    assert r["images"] == [_b64_png(a, "L") for a in to_uint8(ref)]  # the greyscale-only service's bytes


@pytest.mark.parametrize("upload,model,mode,side", [
    (_colourful(), "rgb-diff", "RGB", 32),
    (_colourful(48)[:, :40], "rgb-diff", "RGB", 32),  # another size, not square: stretched
    (_colourful(20)[..., 1], "rgb-diff", "RGB", 32),  # greyscale upload to a colour model
    (_colourful(28), "grey-diff", "L", 28),  # colour upload to a greyscale model
])
def test_edit_decodes_the_upload_to_the_models_channels(client, upload, model, mode, side):
    image = _b64_png(upload, "RGB" if upload.ndim == 3 else "L")
    for method in ("sdedit", "ddim_inversion"):
        r = client.post("/v1/edit", json={"model": model, "image": image, "source_label": 7, "target_label": 1,
                                          "method": method, "scale": 1.0, "steps": 3})
        assert r.status_code == 200, r.text
        im = decode_png(r.json()["image"])
        assert im.mode == mode and im.size == (side, side)
    big = _b64_png(np.zeros((300, 300, 3), np.uint8), "RGB")
    r = client.post("/v1/edit", json={"model": model, "image": big, "source_label": 1, "target_label": 2})
    assert r.status_code == 422 and "at most 256 per side" in r.json()["detail"][0]["msg"]


def test_interpolate_and_map_return_colour(client):
    for name in ("rgb-cvae", "rgb-diff"):
        r = client.post("/v1/interpolate", json={"model": name, "label": 2, "frames": 3, "steps": 3})
        assert r.status_code == 200, r.text
        for b in r.json()["images"]:
            _assert_colour(decode_png(b), 32)
    r = client.post("/v1/map", json={"source_model": "rgb-cvae", "target_model": "rgb-cvae-b", "label": 4, "seed": 3})
    assert r.status_code == 200, r.text
    assert len(r.json()["latent_target"]) == 6
    for side in ("source", "target"):
        _assert_colour(decode_png(r.json()["images"][side]), 32)


# -- the upload policy, the judge and the watermark on RGB ------------------------------------------------------
def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_upload_policy():
    rgb = Image.fromarray(_colourful(40))
    want = np.array(rgb.convert("L").resize((28, 28), Image.BILINEAR))  # the greyscale-only service's decoding
    assert torch.equal(decode_for_model(_png_bytes(rgb), 1, 28), from_uint8(want[None]))
    grey = decode_for_model(_png_bytes(rgb.convert("L")), 3, 32)
    assert grey.shape == (1, 3, 32, 32) and torch.equal(grey[:, 0], grey[:, 2])
    clear = decode_for_model(_png_bytes(Image.new("RGBA", (16, 16), (255, 0, 0, 0))), 3, 32)
    assert torch.equal(clear, torch.ones(1, 3, 32, 32))  # transparency onto white
    assert decode_for_model(_png_bytes(Image.new("RGB", (40, 20))), 3, 32).shape == (1, 3, 32, 32)
    huge = _png_bytes(Image.new("L", (5000, 5000)))  # small file, large header: refused before decoding
    with pytest.raises(BadImage, match="5000x5000; at most 256 per side"):
        decode_for_model(huge, 3, 32, max_side=256)
    with pytest.raises(BadImage, match="not a readable"):
        decode_for_model(b"\x89PNG not really", 3, 32)


def test_label_match_takes_rgb_samples(folders):
    judge = load_model_uri(folders["grey-judge"])[0]
    x = from_uint8(np.stack([_colourful(), 255 - _colourful()]))  # (2, 3, 32, 32)
    luma = match_channels(x, 1)
    want = from_uint8(np.stack([np.array(Image.fromarray(a).convert("L")) for a in to_uint8(x)]))
    assert (luma - want).abs().max() < 1 / 127.5 + 1e-6  # PIL's L of the same pixels, to its rounding
    labels = torch.softmax(judge(luma), -1).argmax(-1)
    keep, counts = SafetyFilter([], [LabelMatch(judge, 0.0)]).check_outputs(x, labels)
    assert keep.all() and not counts  # the greyscale judge saw the samples' luma
    rgb_judge = build_model("classifier", {"channels": (4, 8), "in_channels": 3}).eval()
    assert LabelMatch(rgb_judge).check_images(luma, labels).shape == (2,)  # grey samples, colour judge


def test_watermark_marks_every_channel_of_rgb():
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    marked, record = watermark.mark(img, {"model": "m", "seed": 1})
    changed = marked.astype(int) - img
    assert np.abs(changed).max() <= 1 and all(changed[..., c].any() for c in range(3))
    assert watermark.detect(marked, record) and not watermark.detect(img, record)


# -- batch generation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rgb-cvae", "rgb-diff"])
def test_batch_generation_writes_rgb_shards(folders, tmp_path, monkeypatch, name):
    model, _ = load_model_uri(folders[name])
    pinned = {"name": name, "version": "1", "run_id": "run", "uri": f"models:/{name}/1"}
    monkeypatch.setattr(bg, "resolve_model", lambda uri: {**pinned, "requested": uri})  # no registry here
    spec = bg.JobSpec(model_uri=f"models:/{name}@champion", out_uri=(tmp_path / "out").as_uri(), labels=(0, 1, 2),
                      seeds_per_condition=2, shard_size=4, guidance="cfg" if name == "rgb-diff" else "none",
                      scale=1.0 if name == "rgb-diff" else 0.0, steps=3, judge_uri=folders["grey-judge"],
                      judge_min_prob=0.0)
    plan = bg.make_plan(spec)
    bg.run_shards(plan, [k for k, _, _ in plan.shards], bg.payload_of(model, pinned), use_ray=False)
    manifest = bg.write_manifest(plan)
    assert manifest["n_samples"] + manifest["n_blocked"] == 6 and manifest["n_samples"] > 0
    for s in bg.read_samples(spec.out_uri):
        assert s["image"].shape == (32, 32, 3) and s["image"].std() > 0
        assert watermark.detect(s["image"], s["meta"]["provenance"])


# -- the CLI ----------------------------------------------------------------------------------------------------
def test_condgen_sample_and_edit_write_colour_like_the_service(folders, service, tmp_path):
    grid_png = tmp_path / "grid.png"
    assert main(["sample", "--model", folders["rgb-diff"], "--labels", "3", "--per-label", "3", "--nrow", "3",
                 "--zoom", "1", "--seed", "7", "--guidance", "cfg", "--scale", "2", "--steps", "4",
                 "--out", str(grid_png), "--no-progress"]) == 0
    grid = np.asarray(Image.open(grid_png)).astype(int)
    assert Image.open(grid_png).mode == "RGB" and grid.shape == (36, 104, 3)
    cli = np.stack([grid[2:34, 2 + 34 * i: 34 + 34 * i] for i in range(3)])
    served = asyncio.run(service.generate(schema.GenerateV1(model="rgb-diff", label=3, n=3, seed=7, guidance="cfg",
                                                            scale=2.0, steps=4)))
    assert np.abs(cli - np.stack([np.asarray(decode_png(b)) for b in served["images"]])).max() <= 1
    src = tmp_path / "in.png"
    src.write_bytes(base64.b64decode(_b64_png(_colourful(), "RGB")))
    out = tmp_path / "edited.png"
    assert main(["edit", str(src), "--model", folders["rgb-diff"], "--method", "sdedit", "--source", "7", "--target",
                 "1", "--strength", "0.5", "--steps", "6", "--scale", "2", "--seed", "3", "--out", str(out),
                 "--no-progress"]) == 0
    edited = _assert_colour(Image.open(out), 32).astype(int)
    answer = asyncio.run(service.edit(schema.EditV1(model="rgb-diff", image=_b64_png(_colourful(), "RGB"),
                                                    source_label=7, target_label=1, strength=0.5, steps=6, scale=2.0,
                                                    seed=3)))
    assert np.abs(edited - np.asarray(decode_png(answer["image"]))).max() <= 1


# -- the web page -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_web_page_shows_colour_images_in_headless_chromium(service, tmp_path):
    script = Path(__file__).resolve().parents[1] / "infra" / "scripts" / "ensure_chromium.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.skip(f"no headless Chromium: {proc.stderr.strip()[-300:]}")
    browser = proc.stdout.strip().splitlines()[-1]
    with served_in_thread(bind_service(service)) as port:
        url = f"http://127.0.0.1:{port}/?autorun=1&model=rgb-diff&label=4&n=8&seed=3&guidance=cfg&scale=1.5&steps=4"
        flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--window-size=900,700", f"--user-data-dir={tmp_path / 'profile'}",
                 "--virtual-time-budget=15000"]
        shot = tmp_path / "page.png"
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
        subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120, check=False)
    assert 'data-loaded="8"' in dom.stdout and 'data-mode="RGB"' in dom.stdout, dom.stdout[-2000:]
    assert "RGB 32\u00d732" in dom.stdout  # the model list names the colour mode and size
    page = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    saturated = (page.max(-1) - page.min(-1)) > 60
    assert saturated.sum() > 2000, saturated.sum()  # the grid's colour pixels, not a grey page
    out = Path(__file__).resolve().parents[1] / ".condgen" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_page_colour.png").write_bytes(shot.read_bytes())
