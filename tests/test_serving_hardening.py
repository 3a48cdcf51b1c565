"""Hardening of the serving app: request bodies bounded while they stream and never read before
the API key is checked, short 422 details in the documented list shape, image bombs refused on
the header and decoded off the request loop (/health stays fast under hostile uploads), no secrets
in Ray's processes, a busy port refused, no storage paths in /v1/models, strict integers, an
unsigned watermark mode instead of a built-in key, and credentials redacted from printed URIs.

The app runs in-process over ``httpx.ASGITransport`` (which pulls request chunks lazily, so the
bytes the server consumed can be counted) with a tiny greyscale diffusion model saved as a
checkpoint folder: no Ray, no registry.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import struct
import time
import zlib
from functools import cache

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from condgen.models.registry import build_model
from condgen.serving import app as app_module
from condgen.serving.app import api, bind_service
from condgen.serving.config import ModelSpec, ServeConfig, api_key_digest
from condgen.serving.launch import REPLICA_SECRETS, PortInUse
from condgen.serving.service import Service
from condgen.tasks.generation import watermark
from condgen.tasks.generation.inputs import BadImage, decode_for_model
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io.redact import redact_uri
from tests.conftest import free_port
from tests.tiny import perturb

MODEL = "hard-diff"
CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("hardening") / MODEL
    torch.manual_seed(0)
    model = build_model("diffusion", {"channels": (8, 16), "timesteps": 20, "sample_steps": 4})
    ckpt_io.save_checkpoint(folder, perturb(model, seed=0).eval())
    svc = Service(ServeConfig(models=[ModelSpec(uri=folder.as_uri(), name=MODEL)], poll_s=0, deny_list=[]))
    bind_service(svc)
    yield svc
    svc.close()
    torch.set_num_threads(n)


@pytest.fixture
def configure(service):
    """Change the bound service's config for one test (the limit, the API key), then restore it."""
    original = service.config

    def set_(**update):
        service.config = original.model_copy(update=update)

    yield set_
    service.config = original


def _call(fn):
    """Run ``fn(client)`` (a coroutine function) against the app in-process."""
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test",
                                     timeout=60) as client:
            return await fn(client)
    return asyncio.run(main())


def _chunked(total: int, counter: dict[str, int]):
    async def body():
        sent = 0
        while sent < total:
            counter["pulled"] += CHUNK
            sent += CHUNK
            yield b"[" * CHUNK
    return body()


# -- 1. request bodies ------------------------------------------------------------------------------------
def test_chunked_body_is_cut_off_at_the_limit_while_streaming(configure):
    limit = 64 * 1024
    configure(max_body_bytes=limit)
    counter = {"pulled": 0}
    r = _call(lambda c: c.post("/v1/generate", content=_chunked(4 << 20, counter),
                               headers={"content-type": "application/json"}))
    print(f"4 MiB chunked body, limit {limit}: {counter['pulled']} bytes read before the {r.status_code}")
    assert r.status_code == 413, r.text[:200]
    assert "larger than" in r.json()["detail"] and len(r.content) < 500
    assert r.headers["connection"] == "close"  # the server drops the rest instead of reading it to discard it
    assert counter["pulled"] <= limit + 2 * CHUNK  # stopped at the limit, not after 4 MiB


def test_generate_takes_at_most_64_kib_while_uploads_keep_the_configured_limit(service):
    """A generate body is ~2 KB; a 0.7 MB one is refused as it streams in, before it is parsed (parsing six of
    them at once held /health up to ~0.8 s at p99), while /v1/edit still takes its ~512 KiB uploads."""
    big = json.dumps({"label": 1, "seeds": list(range(100_000))}).encode()  # 0.7 MB of valid JSON

    async def calls(c):
        return [await c.post("/v1/generate", content=big, headers={"content-type": "application/json"}),
                await c.post("/generate", content=big, headers={"content-type": "application/json"}),
                await c.post("/v1/edit", json={"image": "A" * 600_000, "source_label": 1, "target_label": 2})]
    generate, legacy, edit = _call(calls)
    assert generate.status_code == legacy.status_code == 413 and "65536 bytes" in generate.json()["detail"]
    _assert_short_422(edit)  # read in full (under 1 MiB) and refused by validation, not by size


def test_unauthenticated_body_is_never_read(configure):
    configure(api_key_sha256=api_key_digest("s3cret"))
    counter = {"pulled": 0}
    r = _call(lambda c: c.post("/v1/generate", content=_chunked(4 << 20, counter),
                               headers={"content-type": "application/json"}))
    assert r.status_code == 401 and counter["pulled"] <= CHUNK, (r.status_code, counter)
    assert r.headers["connection"] == "close"
    ok = _call(lambda c: c.post("/v1/generate", json={"label": 1, "steps": 2}, headers={"x-api-key": "s3cret"}))
    assert ok.status_code == 200, ok.text[:300]


def _assert_short_422(r: httpx.Response) -> list[dict]:
    assert r.status_code == 422, r.text[:300]
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    for item in detail:
        assert {"loc", "msg", "type"} <= set(item), item
        if isinstance(item.get("input"), str):
            assert len(item["input"]) <= 65, item["input"][:100]
    assert len(r.content) < 4000, len(r.content)
    return detail


def test_422_details_are_short_documented_lists(service):
    huge = "A" * 600_000  # over the image's max_length (and under the 1 MiB body limit)

    async def calls(c):
        return [await c.post("/v1/edit", json={"image": huge, "source_label": 1, "target_label": 2}),
                await c.post("/v1/generate", content=b"{not json" + b"x" * 50_000,  # under generate's 64 KiB
                             headers={"content-type": "application/json"}),
                await c.post("/v1/generate", json={"label": 1, "prompt": "p" * 150, "junk": "j" * 50_000}),
                await c.post("/v1/generate", json={"label": 50}),  # an ApiError 422 (the model has 10 classes)
                await c.post("/v1/edit", json={"image": "iVBORw0K" * 50, "source_label": 1, "target_label": 2})]
    for r in _call(calls):
        _assert_short_422(r)


@pytest.mark.parametrize("body", [{"label": 1, "seed": False}, {"label": True}, {"label": 1, "seeds": [1, True]},
                                  {"label": 1, "n": True}, {"label": 1, "steps": "3"}])
def test_booleans_are_not_integers(service, body):
    r = _call(lambda c: c.post("/v1/generate", json=body))
    _assert_short_422(r)


def test_openapi_documents_400_413_and_the_422_list(service):
    spec = _call(lambda c: c.get("/openapi.json")).json()
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert set(posts) >= {"/v1/generate", "/v1/edit", "/v1/interpolate", "/v1/map", "/generate"}
    for path, op in posts.items():
        assert {"400", "401", "413", "422"} <= set(op["responses"]), (path, sorted(op["responses"]))
        ref = op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert spec["components"]["schemas"][ref]["properties"]["detail"]["type"] == "array", path


def test_models_show_registry_names_never_storage_paths(service):
    body = _call(lambda c: c.get("/v1/models")).json()
    text = str(body)
    assert "file://" not in text and "/tmp" not in text and "hardening" not in text, text[:500]
    assert body["models"][0]["name"] == MODEL and body["models"][0]["uri"] is None


# -- 2. image bombs ---------------------------------------------------------------------------------------
def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@cache
def ico_bomb(side: int = 9000, claimed: int = 16) -> str:
    """base64 ICO whose directory says ``claimed`` px but holds a ``side`` x ``side`` greyscale PNG
    (all zeros: ~80 KB compressed, 81 MB decoded), built row by row without the pixels in memory."""
    comp = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + a row of zeros
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    entry = struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(png), 6 + 16)
    return base64.b64encode(struct.pack("<HHH", 0, 1, 1) + entry + png).decode()


def _edit(image: str) -> dict:
    return {"image": image, "source_label": 1, "target_label": 2, "steps": 2}


def test_ico_bomb_is_refused_on_the_header_quickly(service):
    bomb = ico_bomb()
    assert len(bomb) < 512 * 1024
    with pytest.raises(BadImage, match="PNG, JPEG or WebP"):
        decode_for_model(base64.b64decode(bomb), 1, 28, max_side=256)
    t0 = time.perf_counter()
    r = _call(lambda c: c.post("/v1/edit", json=_edit(bomb)))
    elapsed = time.perf_counter() - t0
    print(f"ICO bomb ({len(bomb)} base64 chars): {r.status_code} in {elapsed * 1000:.1f} ms")
    _assert_short_422(r)
    assert elapsed < 0.25


def test_animated_and_other_formats_are_refused():
    frames = [Image.new("L", (16, 16), v) for v in (0, 255)]
    for fmt in ("PNG", "WEBP", "GIF", "TIFF", "BMP"):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=fmt in ("PNG", "WEBP"), append_images=frames[1:])
        with pytest.raises(BadImage):
            decode_for_model(buf.getvalue(), 1, 28, max_side=256)
    still = io.BytesIO()
    frames[1].save(still, format="WEBP", lossless=True)
    assert decode_for_model(still.getvalue(), 1, 28, max_side=256).shape == (1, 1, 28, 28)


def test_health_stays_fast_while_hostile_edits_are_in_flight(service):
    bomb, done = ico_bomb(), asyncio.Event()

    async def hostile(c):
        sent = 0
        while not done.is_set() and sent < 2000:
            r = await c.post("/v1/edit", json=_edit(bomb))
            assert r.status_code == 422
            sent += 1
        return sent

    async def scenario(c):
        await c.get("/health")  # warm: first-request costs are not what is measured
        attackers = [asyncio.create_task(hostile(c)) for _ in range(6)]
        await asyncio.sleep(0.05)  # all six in flight
        latencies, deadline = [], time.perf_counter() + 30  # bounded even when /health is stalled
        while len(latencies) < 200 and time.perf_counter() < deadline:  # p99 of 200: one blip is not the p99
            t0 = time.perf_counter()
            assert (await c.get("/health")).status_code == 200
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.002)
        done.set()
        return latencies, await asyncio.gather(*attackers)

    latencies, sent = _call(scenario)
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    print(f"/health under 6 hostile edit loops ({sum(sent)} bombs sent): p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    assert min(sent) >= 1 and p99 < 100, sorted(np.round(np.array(latencies) * 1000, 1))[-5:]


# -- 3. secrets ------------------------------------------------------------------------------------------------
def _fake_ray(monkeypatch) -> list[tuple[str, dict]]:
    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(app_module, "ensure_ray", lambda **kw: calls.append(("ray", dict(app_module.os.environ))))
    monkeypatch.setattr(app_module.serve, "start", lambda **kw: calls.append(("start", dict(app_module.os.environ))))
    monkeypatch.setattr(app_module.serve, "run", lambda application, **kw: calls.append(("run", application)))
    return calls


def test_ray_processes_start_without_secrets(monkeypatch):
    calls = _fake_ray(monkeypatch)
    for name in REPLICA_SECRETS:  # other tests' S3 fixtures may have set some of them for the session
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CONDGEN_API_KEY", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-s3cret")
    monkeypatch.setenv(watermark.KEY_ENV, "wm-s3cret")
    app_module.run("models:/m@champion", port=free_port(), blocking=False)
    for what, env in calls[:2]:
        leaked = [k for k in ("CONDGEN_API_KEY", "AWS_SECRET_ACCESS_KEY", watermark.KEY_ENV) if k in env]
        assert not leaked, (what, leaked)
    assert "CONDGEN_API_KEY" not in app_module.os.environ  # gone for good: only its digest travels
    assert app_module.os.environ["AWS_SECRET_ACCESS_KEY"] == "aws-s3cret"  # the driver keeps its own
    deployment = calls[2][1]._bound_deployment
    env_vars = deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert env_vars == {"AWS_SECRET_ACCESS_KEY": "aws-s3cret"}  # the replica's credentials, explicitly
    config = str(deployment._replica_config.init_args)
    assert "s3cret" not in config and api_key_digest("s3cret") in config


def test_a_busy_port_is_refused_before_serve_starts(monkeypatch):
    calls = _fake_ray(monkeypatch)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is in use") as err:
            app_module.run("models:/m@champion", host="127.0.0.1", port=port, blocking=False)
    assert "\n" not in str(err.value) and not calls


def test_watermark_is_unsigned_without_a_configured_key(monkeypatch):
    monkeypatch.delenv(watermark.KEY_ENV, raising=False)
    monkeypatch.delenv(watermark.LEGACY_KEY_ENV, raising=False)
    img = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    marked, record = watermark.mark(img, {"model": "m", "seed": 1})
    assert record["key_id"] == "unsigned" and record["signature"] is None
    assert np.array_equal(marked, img) and not watermark.verify(record) and not watermark.detect(marked, record)
    monkeypatch.setenv(watermark.KEY_ENV, "test-only-key")
    marked, record = watermark.mark(img, {"model": "m", "seed": 1})
    assert record["key_id"] not in ("unsigned", "dev") and watermark.detect(marked, record)


def test_redact_uri_hides_credentials():
    assert redact_uri("postgresql://mlflow:pa55@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact_uri("https://token@mlflow.example/") == "https://***@mlflow.example/"
    assert "abc" not in redact_uri("https://h/x?X-Amz-Signature=abc&part=1")
    for plain in ("file:///home/u/mlruns", "sqlite:///mlflow.db", "http://127.0.0.1:5000", None):
        assert redact_uri(plain) == plain
