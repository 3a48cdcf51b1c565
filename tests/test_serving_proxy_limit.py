"""The request-body limit and the API key enforced in Ray Serve's HTTP proxy (issue #20, ``serving/proxy_guard.py``).

Ray Serve's proxy reads a request body as fast as the client sends it and ships it to the replica; the
replica's guard answered 413 only after the bytes had crossed. The guard in the proxy refuses on the
headers (401, or 413 on Content-Length) or after ``limit`` bytes of a chunked body, closes the
connection, and forwards nothing. In-process tests drive ``ProxyGuard`` with a recording app; the slow
ones start the real service (Serve's proxy on a free port, a tiny diffusion checkpoint folder, no registry)
and measure what the socket accepted and what ``/metrics`` says reached the replica.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
import torch

from condgen.serving import app as app_module
from condgen.serving import proxy_guard
from condgen.serving.config import ModelSpec, ServeConfig, api_key_digest
from condgen.serving.pretrained_app import proxy_policy as pretrained_policy
from condgen.serving.proxy_guard import Policy, ProxyGuard
from tests.conftest import free_port, wait_http

CHUNK = 64 * 1024
LIMIT = 64 * 1024


def _scope(path: str, headers: dict[str, str]) -> dict:
    return {"type": "http", "method": "POST", "path": path, "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}


def _drive(policy: Policy, path: str, headers: dict[str, str], chunks: list[bytes]) -> dict:
    """Run one request through ProxyGuard around a recording app: what was answered, pulled and forwarded."""
    out: dict = {"pulled": 0, "forwarded": None, "sent": []}
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        if out["pulled"] < len(queue):
            out["pulled"] += 1
            return queue[out["pulled"] - 1]
        return {"type": "http.disconnect"}

    async def send(message):
        out["sent"].append(message)

    async def inner(scope, receive_, send_):
        first = await receive_()
        out["forwarded"] = first
        out["after"] = await receive_() if not first.get("more_body") else None
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": b"ok"})

    guard = ProxyGuard(inner, policy)
    asyncio.run(guard(_scope(path, headers), receive, send))
    start = out["sent"][0]
    out["status"] = start["status"]
    out["headers"] = {k.decode(): v.decode() for k, v in start["headers"]}
    out["body"] = b"".join(m.get("body", b"") for m in out["sent"][1:])
    return out


@pytest.fixture(autouse=True)
def no_close_delay(monkeypatch):
    monkeypatch.setattr(proxy_guard, "CLOSE_DELAY_S", 0.0)


def test_oversize_chunked_body_is_refused_at_the_limit_and_never_forwarded():
    r = _drive(Policy(), "/v1/generate", {"transfer-encoding": "chunked"}, [b"[" * CHUNK] * 128)  # 8 MiB
    assert r["status"] == 413 and r["forwarded"] is None
    assert r["pulled"] <= LIMIT // CHUNK + 1  # read up to the limit, not the 8 MiB
    detail = json.loads(r["body"])["detail"]
    assert detail == f"request body larger than {LIMIT} bytes; send at most {LIMIT}" and "\n" not in detail
    assert r["headers"]["connection"] == "close"


def test_chunked_body_within_the_limit_is_forwarded_whole():
    chunks = [bytes([65 + i]) * 10_000 for i in range(3)]
    r = _drive(Policy(), "/v1/generate", {"transfer-encoding": "chunked"}, chunks)
    assert r["status"] == 200 and r["forwarded"] == {"type": "http.request", "body": b"".join(chunks),
                                                     "more_body": False}
    assert r["after"] == {"type": "http.disconnect"}  # then the server's own messages


def test_content_length_over_the_limit_is_refused_before_a_byte_is_read():
    r = _drive(Policy(default_limit=1000), "/v1/edit", {"content-length": "1001"}, [b"x" * 1001])
    assert r["status"] == 413 and r["pulled"] == 0 and r["forwarded"] is None
    r = _drive(Policy(default_limit=1000), "/v1/edit", {"content-length": "1000"}, [b"x" * 1000])
    assert r["status"] == 200 and r["forwarded"]["body"] == b"x" * 1000  # streamed through
    assert _drive(Policy(), "/v1/edit", {"content-length": "-1"}, [b""])["status"] == 413


def test_missing_key_is_refused_on_the_headers():
    policy = Policy(api_key_sha256=api_key_digest("s3cret"))
    r = _drive(policy, "/v1/generate", {"transfer-encoding": "chunked"}, [b"[" * CHUNK] * 16)
    assert r["status"] == 401 and r["pulled"] == 0 and r["headers"]["www-authenticate"] == "Bearer"
    ok = _drive(policy, "/v1/generate", {"x-api-key": "s3cret", "transfer-encoding": "chunked"}, [b"{}"])
    assert ok["status"] == 200 and ok["forwarded"]["body"] == b"{}"
    assert _drive(policy, "/health", {}, [b""])["status"] == 200  # not protected


def test_only_the_apps_route_prefix_is_guarded():
    policy = Policy(route_prefix="/condgen")
    big = [b"[" * CHUNK] * 4
    assert _drive(policy, "/condgen/v1/generate", {"transfer-encoding": "chunked"}, big)["status"] == 413
    other = _drive(policy, "/other/v1/generate", {"transfer-encoding": "chunked"}, big)
    assert other["status"] == 200 and other["forwarded"]["body"] == big[0]  # another app's request, untouched
    assert policy.relative("/condgen") == "/" and policy.relative("/condgenx/v1") is None


def test_the_policy_travels_to_the_proxy_as_its_callback(monkeypatch):
    policy = Policy(route_prefix="/x", default_limit=5000, limits={"/a": 10}, protected=("/v1/",),
                    api_key_sha256="ab" * 32)
    env = proxy_guard.controller_options(policy)["runtime_env"]["env_vars"]
    assert env[proxy_guard.CALLBACK_ENV] == "condgen.serving.proxy_guard:middlewares"
    monkeypatch.setenv(proxy_guard.POLICY_ENV, env[proxy_guard.POLICY_ENV])
    (mw,) = proxy_guard.middlewares()
    assert mw.cls is ProxyGuard and mw.kwargs["policy"] == policy
    monkeypatch.delenv(proxy_guard.POLICY_ENV)
    assert proxy_guard.middlewares()[0].kwargs["policy"] == Policy()  # the model app's defaults
    with pytest.raises(ValueError, match="unknown keys \\['limt'\\]"):
        Policy.from_json('{"limt": 3}')


def test_apps_give_the_proxy_the_limits_their_replicas_enforce():
    config = ServeConfig(models=[ModelSpec(uri="models:/m@champion")], max_body_bytes=200_000,
                         api_key_sha256=api_key_digest("k"))
    policy = app_module.proxy_policy(config)
    assert policy == Policy(default_limit=200_000, api_key_sha256=api_key_digest("k"))
    assert policy.limit("/v1/generate") == policy.limit("/generate") == LIMIT and policy.limit("/v1/edit") == 200_000
    small = app_module.proxy_policy(config.model_copy(update={"max_body_bytes": 32_000}))
    assert small.limit("/v1/generate") == 32_000  # never more than max_body_bytes
    assert app_module.proxy_policy().limit("/v1/edit") == app_module.MAX_BODY_BYTES
    assert pretrained_policy().limit("/v1/generate") == 4 * 1024 * 1024 and pretrained_policy().protected == ("/v1/",)


def test_run_starts_ray_with_the_guard_for_its_proxy(monkeypatch):
    """``run`` puts the callback and its policy in the environment of the Ray it starts, and takes them out after."""
    seen: list[dict] = []
    monkeypatch.setattr(app_module, "ensure_ray", lambda **kw: seen.append(dict(app_module.os.environ)))
    monkeypatch.setattr(app_module.serve, "start", lambda **kw: None)
    monkeypatch.setattr(app_module.serve, "run", lambda application, **kw: None)
    monkeypatch.setenv("CONDGEN_API_KEY", "s3cret")
    monkeypatch.delenv(proxy_guard.POLICY_ENV, raising=False)
    app_module.run("models:/m@champion", port=free_port(), blocking=False, route_prefix="/cg")
    env = seen[0]
    assert env[proxy_guard.CALLBACK_ENV] == proxy_guard.CALLBACK
    policy = Policy.from_json(env[proxy_guard.POLICY_ENV])
    assert policy.route_prefix == "/cg" and policy.api_key_sha256 == api_key_digest("s3cret")
    assert "s3cret" not in env[proxy_guard.POLICY_ENV].replace(api_key_digest("s3cret"), "")  # only the digest
    assert proxy_guard.POLICY_ENV not in app_module.os.environ  # the driver's environment as it was


# -- the real service: Serve's proxy, a replica ----------------------------------------------------------------
@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory):
    from ray import serve

    from condgen.models.registry import build_model
    from condgen.tasks.io import checkpoint as ckpt_io
    from tests.tiny import perturb

    folder = tmp_path_factory.mktemp("proxy-limit") / "pl-diff"
    torch.manual_seed(0)
    model = build_model("diffusion", {"channels": (8, 16), "timesteps": 20, "sample_steps": 4})
    ckpt_io.save_checkpoint(folder, perturb(model, seed=0).eval())
    serve.shutdown()  # the guard is installed when Serve starts its proxy
    port = free_port()
    config = ServeConfig(models=[ModelSpec(uri=folder.as_uri(), name="pl-diff")], poll_s=0, deny_list=[],
                         torch_threads=1)
    # Ray is already running (the session's), so the guard comes with Serve's controller, not Ray's environment
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                controller_options=proxy_guard.controller_options(app_module.proxy_policy(config)))
    serve.run(app_module.build_app(config=config), name="proxy-limit", route_prefix="/", blocking=False)
    wait_http(f"http://127.0.0.1:{port}/health", timeout=180)
    yield port
    serve.delete("proxy-limit")
    serve.shutdown()


def upload(port: int, total: int, pause: float = 0.0, path: str = "/v1/generate") -> tuple[int, bytes]:
    """Send a chunked body of ``total`` bytes (64 KiB chunks, ``pause`` s apart) on a raw socket with a
    small send buffer: the bytes the server's side accepted before it stopped reading, and its answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
              "Transfer-Encoding: chunked\r\n\r\n".encode())
    frame, accepted = b"%x\r\n" % CHUNK + b"[" * CHUNK + b"\r\n", 0
    try:
        while accepted < total:
            view = memoryview(frame)
            while view:
                n = s.send(view)
                accepted, view = accepted + n, view[n:]
            time.sleep(pause)
        s.sendall(b"0\r\n\r\n")
    except OSError:  # reset, or the server stopped reading (timeout): what we measure
        pass
    answer = b""
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except OSError:
        pass
    s.close()
    return accepted, answer


def _metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{want}\}} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


@pytest.mark.slow
def test_oversize_chunked_body_is_cut_off_in_the_proxy_and_never_reaches_the_replica(served):
    port = served
    junk = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=b"{" * 1000, method="POST",
                                  headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError, match="422"):
        urllib.request.urlopen(junk, timeout=60)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # a chunked body under the limit
    conn.request("POST", "/v1/generate", body=iter([b"{" * 100] * 5), encode_chunked=True,
                 headers={"content-type": "application/json"})
    assert conn.getresponse().status == 422  # read whole by the proxy, handed on, refused by the replica's parser
    conn.close()
    seen = _metric(port, "condgen_request_body_bytes_total", endpoint="/v1/generate")
    assert seen == 1500  # the replica counts what reaches it
    for total, pause in ((8 << 20, 0.005), (16 << 20, 0.0)):  # sent slowly, then as fast as the socket takes it
        accepted, answer = upload(port, total, pause)
        print(f"{total >> 20} MiB chunked body (pause {pause} s): the server side accepted {accepted} bytes")
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"request body larger than 65536 bytes" in answer and b"connection: close" in answer.lower()
        assert accepted < total // 4, accepted  # 64 KiB read, plus what the kernels' buffers hold (~0.5-1.5 MB)
    assert _metric(port, "condgen_request_body_bytes_total", endpoint="/v1/generate") == seen  # not one byte
    assert _metric(port, "condgen_requests_total", endpoint="/v1/generate", status="413") == 0


@pytest.mark.slow
def test_health_answers_while_oversize_uploads_are_in_flight(served):
    port, done = served, threading.Event()
    answers: list[int] = []

    def attacker():
        while not done.is_set():
            _, answer = upload(port, 64 << 20)
            answers.append(int(answer[9:12] or 0))

    threads = [threading.Thread(target=attacker) for _ in range(4)]
    for t in threads:
        t.start()
    lat = []
    try:
        time.sleep(0.5)
        for _ in range(40):
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
                assert r.status == 200
            lat.append(time.perf_counter() - t0)
            time.sleep(0.05)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    lat.sort()
    print(f"/health during 4 uploads: median {1000 * lat[20]:.0f} ms, max {1000 * lat[-1]:.0f} ms; "
          f"answers {Counter(answers)}")
    assert answers and set(answers) == {413}
    assert lat[20] < 0.25 and lat[-1] < 2.0  # loose bounds for a busy 2-core CI box; the benchmark measures p99
