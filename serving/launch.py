"""Starting the service's processes: what each one may see, and a port that is really free.

* ``launch_env()``: Ray's processes (GCS, raylet, the Serve controller and the HTTP proxy) are
  started from the driver's environment, so they start inside it: the raw API key leaves
  ``os.environ`` for good (only its sha256 travels, ``ServeConfig.api_key_sha256``), and storage
  and tracking credentials and signing keys are set aside while Ray starts and put back after.
* ``replica_env()``: the credentials the replica itself needs to load models (S3, MLflow), handed
  to its deployment explicitly (``runtime_env.env_vars``), to that process only.
* ``refuse_busy_port()``: Serve's proxy binds with SO_REUSEPORT, so a second ``condgen serve``
  on a port in use would start silently beside the first; bind without it first and refuse.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

API_KEY_ENV = "CONDGEN_API_KEY"
# what a replica needs to read models from the registry and its artifact store
REPLICA_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# what no serving process needs
DRIVER_ONLY = ("CONDGEN_WATERMARK_KEY", "CONDGEN_PROVENANCE_KEY")


class PortInUse(SystemExit):
    """The port is taken (a one-line message; exits the CLI with status 1)."""


def replica_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in REPLICA_SECRETS if environ.get(k)}


@contextmanager
def launch_env() -> Iterator[None]:
    os.environ.pop(API_KEY_ENV, None)
    saved = {k: os.environ.pop(k) for k in (*REPLICA_SECRETS, *DRIVER_ONLY) if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def refuse_busy_port(host: str, port: int) -> None:
    """PortInUse when something already listens on host:port (a local Ray only: a cluster's proxies
    bind on its own nodes)."""
    if os.environ.get("RAY_ADDRESS", "local") not in ("", "local"):
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"cannot serve on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"; a listener is
        try:
            s.bind(addr)
        except OSError as exc:
            raise PortInUse(f"port {port} on {host} is in use ({exc.strerror}): stop the other server or pick "
                            "another --port") from None
