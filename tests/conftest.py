"""Shared pytest fixtures. One section per engine; keep each section self-contained.

S3: a real S3-compatible HTTP server (``moto_server``) on 127.0.0.1, started once per
session, with fake credentials and ``CONDGEN_S3_ENDPOINT_URL`` pointing at it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------ S3

S3_TEST_BUCKET = "condgen-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto_server(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start moto's S3 server on 127.0.0.1:port (returns at once; see ``wait_until_up``).

    Launched through ``tests/s3_server.py``, which fixes the one reply of moto's that
    pyarrow's S3 client rejects (see that module)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, str(Path(__file__).with_name("s3_server.py")), "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)


def wait_until_up(endpoint: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    # No proxies: a proxy from the environment must not answer for 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            opener.open(endpoint + "/", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto_server at {endpoint} did not answer in {timeout_s}s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def s3_test_env(endpoint: str, scratch: Path) -> dict[str, str | None]:
    """Environment for talking to a test S3 server (None = unset)."""
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CONDGEN_S3_ENDPOINT_URL": endpoint,
        # Keep a developer's real AWS setup out of the tests.
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
        "AWS_ENDPOINT_URL": None,
        "AWS_CONFIG_FILE": str(scratch / "aws-config-absent"),
        "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "aws-credentials-absent"),
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a moto S3 server with bucket ``S3_TEST_BUCKET``; env set for it."""
    from condgen.tasks.io import storage

    scratch = tmp_path_factory.mktemp("s3")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start_moto_server(port, scratch / "moto_server.log")
    try:
        wait_until_up(endpoint, proc)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in s3_test_env(endpoint, scratch).items():
                if value is None:
                    mp.delenv(name, raising=False)
                else:
                    mp.setenv(name, value)
            storage.reset_clients()  # a client cached before the env change would be stale
            storage.s3_client().create_bucket(Bucket=S3_TEST_BUCKET)
            yield endpoint
    finally:
        stop_server(proc)
        storage.reset_clients()


@pytest.fixture
def s3_uri(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty ``s3://`` prefix for one test."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"s3://{S3_TEST_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ Ray, MLflow, shards
# Every engine binds to loopback only.


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session", autouse=True)
def condgen_home(tmp_path_factory):
    """A private CONDGEN_HOME (storage, MLflow SQLite, Ray results) for the whole session."""
    home = tmp_path_factory.mktemp("condgen_home")
    old = {k: os.environ.get(k) for k in ("CONDGEN_HOME", "MLFLOW_TRACKING_URI", "CONDGEN_STORAGE")}
    os.environ["CONDGEN_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("CONDGEN_STORAGE", None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_shards(condgen_home):
    """600 real MNIST digits in 3 shards (ingested once per session)."""
    from condgen.tasks.data.ingest import ingest

    out = (condgen_home / "shards-tiny").as_uri()
    ingest("bundled:mnist", out, limit=600, shard_size=200)
    return out


@pytest.fixture(scope="session")
def local_ray(condgen_home):
    """A local Ray instance shared by the integration tests (multi-node tests make their own)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"CONDGEN_HOME": str(condgen_home)}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server + registry (SQLite backend, proxied artifacts) on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(exe), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc=proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def use_mlflow_server(mlflow_server, monkeypatch):
    """Point the code under test at the MLflow server for one test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server


@pytest.fixture(scope="module")
def use_mlflow_server_module(mlflow_server):
    """Point the code under test at the MLflow server for one test module."""
    import mlflow

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    mp.undo()


# ------------------------------------------------------------ cluster operations
# Multi-node Ray, a restartable MLflow server, PostgreSQL. Used by tests/test_faults.py,
# tests/test_mlflow_postgres.py and tests/test_zz_cluster.py.

import signal  # noqa: E402 - this section's own import, kept with it

# Environment the Ray workers of a test cluster need (storage, S3 endpoint, credentials).
CLUSTER_ENV_VARS = ("CONDGEN_HOME", "CONDGEN_STORAGE", "CONDGEN_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
                    "AWS_SHARED_CREDENTIALS_FILE", "NO_PROXY", "no_proxy")


def start_mlflow_server(backend_uri: str, artifacts_destination: str, port: int, log_path: Path,
                        env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``mlflow server`` on 127.0.0.1:port in its own process group (see ``kill_process_group``)."""
    exe = Path(sys.executable).with_name("mlflow")
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(exe), "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
             artifacts_destination, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)


def kill_process_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal a process started with ``start_new_session=True`` and all its children
    (servers fork workers; a flow run starts a Prefect server); SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    try:  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def ray_cluster(condgen_home, monkeypatch):
    """A real multi-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``).

    A head node with 1 CPU and two worker nodes with 1 CPU and one ``trainer`` slot each,
    so training workers that ask for ``{"CPU": 1, "trainer": 1}`` can only land one per
    worker node. Every node binds to 127.0.0.1 only. It replaces whatever Ray this process
    was connected to: the session's ``local_ray`` is shut down and NOT restored, so tests
    using this fixture live in ``tests/test_zz_cluster.py``, which sorts (and runs) last.
    """
    import tempfile

    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # A private Ray temp dir: Cluster records its address in <tmp>/ray_current_cluster,
    # where any other `ray.init()` on this machine would otherwise find and join it.
    # (Short path: Ray's unix sockets live under it.)
    ray_tmp = tempfile.mkdtemp(prefix="cgray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    # ray.init(address=...) rewrites a loopback address to the machine's outward IP, where
    # nothing listens (nodes below bind 127.0.0.1 only); Ray skips that rewrite when
    # "clusters are disabled", which is all this flag does on the driver side.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"trainer": 1}, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        env = {k: os.environ[k] for k in CLUSTER_ENV_VARS if os.environ.get(k)}
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> Iterator[dict[str, str | int]]:
    """A private PostgreSQL server on 127.0.0.1:<free port> (trust auth, throwaway data dir).

    ``infra/scripts/ensure_postgres.sh`` installs Debian's ``postgresql`` if initdb/pg_ctl
    are missing; the test is skipped only if that is impossible (no root, no apt). As root,
    initdb and the server run as the ``postgres`` user (PostgreSQL refuses root).
    Yields ``{"host", "port", "user", "bindir"}``.
    """
    import pwd
    import tempfile

    script = Path(__file__).resolve().parents[1] / "infra" / "scripts" / "ensure_postgres.sh"
    found = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    if found.returncode != 0:
        pytest.skip(f"PostgreSQL cannot be installed here: {found.stderr.strip()[-500:]}")
    bindir = Path(found.stdout.strip().splitlines()[-1])

    prefix: list[str] = []
    # Outside pytest's 0700 tmp tree: the postgres user must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="condgen-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        os.chown(root, pg.pw_uid, pg.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    try:
        subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=300)
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                        "-t", "120", "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off",
                        "start"], check=True, capture_output=True, timeout=180)
    except subprocess.CalledProcessError as exc:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr!r}\n{log[-2000:]}") from exc
    try:
        yield {"host": "127.0.0.1", "port": port, "user": "postgres", "bindir": str(bindir)}
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME (SQLite); yields the API URL.

    Flow runs pointed at it (``PREFECT_API_URL``) skip ephemeral mode's per-process server start.
    """
    home = tmp_path_factory.mktemp("prefect_server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": ""}
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api}/health", timeout=180, proc=proc)
        yield api
    finally:
        kill_process_group(proc, signal.SIGTERM)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop Prefect's ephemeral API server while pytest's streams are still open: left to
    its atexit hook, it logs "Stopping temporary server" to a closed stream, and Python
    prints a logging traceback after the test summary."""
    server_mod = sys.modules.get("prefect.server.api.server")
    if server_mod is None:
        return
    for server in list(server_mod.SubprocessASGIServer._instances.values()):
        try:
            server.stop()
        except Exception as exc:  # shutting down: report, never fail the session over it
            print(f"prefect ephemeral server did not stop cleanly: {exc!r}", file=sys.stderr)


@pytest.fixture(scope="module")
def watermark_key() -> Iterator[str]:
    """Signing needs a configured key (there is no built-in one): a test-only key, set explicitly
    for the module that asks for it (``pytestmark = pytest.mark.usefixtures("watermark_key")``)."""
    from condgen.tasks.generation import watermark

    key = "test-only-watermark-key"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(watermark.KEY_ENV, key)
        yield key


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny tensors gain nothing from threads, and on a shared 2-core machine their spin-waits made model tests
    ~10x slower (7 s vs 70 s measured under load). Module scope, so it is set before module-scoped fixtures
    that train (a judge, a tiny model); restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def served_in_thread(app) -> Iterator[int]:
    """An ASGI ``app`` served by uvicorn on a free 127.0.0.1 port in a daemon thread (a browser can load
    it); yields the port once ``/health`` answers, and stops the server on exit."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
