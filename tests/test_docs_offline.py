"""``/docs`` (Swagger UI) and ``/redoc`` work without internet (``serving/docs.py``): their pages name no
other host, the assets come from the app, and headless Chromium, with every host but 127.0.0.1
unreachable, renders the operations list (the DOM holds ``/v1/generate``, which the served HTML does
not) while its network log shows no request to any other host.

The app is served in-process by uvicorn on 127.0.0.1 with a tiny checkpoint-folder model (no Ray).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from condgen.serving.app import api, bind_service
from condgen.serving.config import ModelSpec, ServeConfig
from condgen.serving.docs import ASSET_DIR, ASSETS, asset_bytes
from condgen.serving.service import Service
from condgen.tasks.io import checkpoint as ckpt_io
from tests.conftest import free_port, wait_http
from tests.tiny import build_tiny

REPO = Path(__file__).resolve().parents[1]
PAGES = ("/docs", "/redoc")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs") / "docs-cvae"
    ckpt_io.save_checkpoint(folder, build_tiny("cvae").eval())
    svc = Service(ServeConfig(models=[ModelSpec(uri=folder.as_uri(), name="docs-cvae")], poll_s=0, deny_list=[]))
    bind_service(svc)
    yield svc
    svc.close()


def test_doc_pages_load_only_local_assets(service):
    with TestClient(api) as client:
        for page in PAGES:
            r = client.get(page)
            assert r.status_code == 200, (page, r.status_code)
            urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", r.text)
            assert urls and all(u.startswith("/") for u in urls), (page, urls)  # nothing from a CDN
            for url in urls:
                assert client.get(url).status_code == 200, url
        for name, media in ASSETS.items():
            r = client.get(f"/docs/assets/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(media)
            assert r.content == asset_bytes(name) and len(r.content) > 1000
            assert b"cdn.redoc.ly" not in r.content and b"cdn.jsdelivr.net" not in r.content
        assert asset_bytes("swagger-ui-bundle.js") == (ASSET_DIR / "swagger-ui-bundle.js").read_bytes()
        assert client.get("/docs/assets/..%2Fcore.py").status_code == 404  # a fixed list: no path from a request
        root = TestClient(api, root_path="/condgen").get("/condgen/docs").text  # behind a route prefix
        assert "/condgen/openapi.json" in root and "/condgen/docs/assets/swagger-ui-bundle.js" in root


def _page_requests(netlog: Path) -> set[str]:
    """URLs the page asked for, from Chromium's NetLog: the requests in the page's network partition
    (its network isolation key names the page's site), not Chromium's own (update checks, spelling
    dictionaries), which the offline flags fail anyway."""
    text = netlog.read_text(errors="replace")
    try:
        log = json.loads(text)
    except ValueError:  # a log cut short (the browser stopped before closing it) ends inside "events"
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    params = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    return {p["url"] for p in params if p.get("network_isolation_key", "").startswith("http://127.0.0.1 ")}


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    proc = subprocess.run(["bash", str(REPO / "infra" / "scripts" / "ensure_chromium.sh")], capture_output=True,
                          text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.skip(f"no headless Chromium on this machine: {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_docs_render_in_headless_chromium_without_internet(service, tmp_path, page):
    browser = _browser()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    netlog = tmp_path / "netlog.json"
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        offline = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no name resolves
                   "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1"]  # no IP is reached
        dom = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-features=AutofillServerCommunication",
                              f"--user-data-dir={tmp_path / 'profile'}", f"--log-net-log={netlog}", *offline,
                              "--virtual-time-budget=20000", "--dump-dom", f"http://127.0.0.1:{port}{page}"],
                             capture_output=True, text=True, timeout=120, check=False)
    finally:
        server.should_exit = True
        thread.join(10)
    html = dom.stdout
    assert "/v1/generate" in html and "/v1/edit" in html, (dom.stderr[-1500:], html[-1500:])
    if page == "/docs":
        assert 'class="opblock-summary-path"' in html and "swagger-ui" in html  # Swagger's operations list
    else:
        assert "ReDoc" in html or "redoc" in html.lower()
    requested = _page_requests(netlog)
    outside = {u for u in requested if not u.startswith(f"http://127.0.0.1:{port}/")}
    assert f"http://127.0.0.1:{port}/openapi.json" in requested and not outside, sorted(outside)[:10]
