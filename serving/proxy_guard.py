"""The body limit and the API key enforced in Ray Serve's HTTP proxy, where the bytes arrive (issue #20).

Why the replica's guard (``serving/guard.py``) is not enough: Ray Serve 2.60's proxy
(``ray/serve/_private/proxy.py``, ``HTTPProxy.send_request_to_replica``) starts ``proxy_asgi_receive``
as a task of its own that calls uvicorn's ``receive()`` in a loop and appends every message to an
unbounded ``MessageQueue`` (``http_util.py``) until the client disconnects or the response ends; the
replica pulls those messages with actor calls (``receive_asgi_messages``). So the proxy reads a body
as fast as the client sends it, whatever the replica does, and ships it to the replica, which
only then counts it and answers 413. Six 64 MiB chunked bodies in flight cost /health 242 ms at p99
and the replica ~130 MB of RSS (``docs/reliability.md``).

The hook: Serve 2.60 removed ``HTTPOptions.middlewares``; what is left is the callback that the
environment variable ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names (``constants.py``). The proxy
calls it once when it starts (``http_util.configure_http_middlewares``) and wraps its ASGI app in the
starlette ``Middleware`` list it returns, outermost (``http_util._apply_middlewares``): the middleware
sees uvicorn's own ``receive``, before Serve's queue. The policy travels as JSON in ``POLICY_ENV``.
Two ways get both variables (``env_vars(policy)``) into the proxy's process:

* ``proxy_env(policy)``: set in the driver's environment while it starts a local Ray; the raylet and
  every Ray process it starts inherit it (as ``serving/launch.py`` relies on). ``app.run`` does this.
* ``controller_options(policy)``: ``serve.start(controller_options=...)`` (``ray.serve.config.
  ControllerOptions``) when Ray is already running: the proxies are actors the Serve controller
  creates, and inherit its runtime_env. A ``serve deploy`` file's top-level ``controller_options`` and
  a cluster's own environment (KubeRay pod spec) carry the same two variables.

Trade-offs, said once: (1) both apply only when the proxy starts: a Ray that ``app.run`` did not start
(``RAY_ADDRESS``) or a Serve already running keeps its proxy as it is, and the replica's guard is then
the only one. (2) One proxy serves every app of the cluster; the policy names the route prefix it
guards and leaves other paths alone. (3) The variable is Serve's own (``constants.py``, read in
``http_util.py``) but not in its API reference: a Serve upgrade must re-check it (the tests fail if
it goes), and Serve's optional HAProxy or direct-ingress modes (``RAY_SERVE_ENABLE_HA_PROXY``,
``RAY_SERVE_ENABLE_DIRECT_INGRESS``) bypass this proxy. (4) A chunked body on a guarded path is
held in the proxy up to the limit (64 KiB on generate routes, ``max_body_bytes`` elsewhere) before
it is forwarded, since a body already on its way to the replica cannot be taken back; a body with
Content-Length streams through, as the server delivers no more bytes than it announces. The replica
keeps its own guard (defence in depth, and the only one when the proxy has none).
"""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware

from condgen.serving.guard import BodyTooLarge, key_error, presented_key

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # read by Ray Serve's proxy when it starts
CALLBACK = "condgen.serving.proxy_guard:middlewares"
POLICY_ENV = "CONDGEN_PROXY_GUARD"  # the Policy as JSON
# Wait this long between a refusal's body and closing: the kernel drops what it has not sent yet when
# it closes a socket with unread bytes (a reset), so give the answer time to leave; nothing is read.
CLOSE_DELAY_S = 0.2

Scope = dict[str, Any]
Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Policy:
    """What the proxy enforces on the paths under ``route_prefix`` (paths below are relative to it):
    ``limits`` (exact path -> bytes), else ``default_limit``; ``protected`` paths need the API key whose
    sha256 is ``api_key_sha256`` (an entry ending in ``/`` is a prefix, any other an exact path; no
    digest: no key needed). The defaults are the model app's (``serving/app.py``)."""

    route_prefix: str = "/"
    default_limit: int = 1024 * 1024
    limits: dict[str, int] = field(default_factory=lambda: {"/v1/generate": 64 * 1024, "/generate": 64 * 1024})
    protected: tuple[str, ...] = ("/v1/", "/generate")
    api_key_sha256: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{POLICY_ENV}: unknown keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        if "protected" in data:
            data["protected"] = tuple(data["protected"])
        return cls(**data)

    def relative(self, path: str) -> str | None:
        """``path`` relative to the route prefix ("/" at least), or None when it is outside it."""
        prefix = self.route_prefix.rstrip("/")
        if not prefix:
            return path or "/"
        if path == prefix or path.startswith(prefix + "/"):
            return path[len(prefix):] or "/"
        return None

    def limit(self, path: str) -> int:
        return self.limits.get(path, self.default_limit)

    def needs_key(self, path: str) -> bool:
        return bool(self.api_key_sha256) and any(path.startswith(p) if p.endswith("/") else path == p
                                                  for p in self.protected)


def replica_hooks(policy: Callable[[], Policy]) -> dict[str, Callable[..., Any]]:
    """``RequestGuard``'s ``authorise`` and ``limit`` from an app's current ``policy()``: the replica applies the
    proxy's rules again (defence in depth), before FastAPI reads the body."""
    def authorise(path: str, headers: Any) -> Any:
        p = policy()
        return key_error(presented_key(headers), p.api_key_sha256) if p.needs_key(path) else None

    def limit(path: str) -> int:
        return policy().limit(path)

    return {"authorise": authorise, "limit": limit}


def env_vars(policy: Policy) -> dict[str, str]:
    """The variables Ray Serve's proxy needs to run ``ProxyGuard`` with ``policy``."""
    return {CALLBACK_ENV: CALLBACK, POLICY_ENV: policy.to_json()}


def controller_options(policy: Policy) -> dict[str, Any]:
    """``serve.start(controller_options=...)``: the controller's runtime_env, inherited by its proxies."""
    return {"runtime_env": {"env_vars": env_vars(policy)}}


@contextmanager
def proxy_env(policy: Policy) -> Iterator[None]:
    """``env_vars(policy)`` in this process's environment while a local Ray starts (its processes inherit
    them), then the environment as it was."""
    saved = {k: os.environ.get(k) for k in (CALLBACK_ENV, POLICY_ENV)}
    os.environ.update(env_vars(policy))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def middlewares() -> list[Middleware]:
    """The callback Ray Serve's proxy calls when it starts (``CALLBACK``): the guard, with the policy
    in ``POLICY_ENV`` (the model app's defaults when it is unset)."""
    text = os.environ.get(POLICY_ENV)
    return [Middleware(ProxyGuard, policy=Policy.from_json(text) if text else Policy())]


async def refuse(send: Send, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
    """A one-line JSON answer, then the connection closed (``Connection: close``) without reading on."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": True})
    await asyncio.sleep(CLOSE_DELAY_S)
    await send({"type": "http.response.body", "body": b""})  # uvicorn closes the connection here


class ClientGone(Exception):
    """The client disconnected before the end of its body."""


async def read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` bytes; ClientGone if the client leaves."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


class ProxyGuard:
    """ASGI middleware for Ray Serve's proxy: on a path the policy guards, the API key is checked on
    the headers (401) and the body limit on Content-Length (413), both before a body byte is read;
    a chunked body is read here up to the limit, then handed on whole or refused with 413. A refused
    request never reaches Serve's router nor a replica."""

    def __init__(self, app, policy: Policy):
        self.app, self.policy = app, policy
        self.refused: dict[int, int] = {}  # status -> count, for tests and logs

    async def __call__(self, scope: Scope, receive, send: Send) -> None:
        path = self.policy.relative(self._path(scope)) if scope["type"] == "http" else None
        if path is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.policy.needs_key(path):
            denied = key_error(presented_key(headers), self.policy.api_key_sha256)
            if denied is not None:
                await self._refuse(send, denied.status, denied.detail, denied.headers)
                return
        limit = self.policy.limit(path)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                await self._refuse(send, 413, BodyTooLarge(limit).detail)
                return
            await self.app(scope, receive, send)  # the server hands on no more than Content-Length bytes
            return
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            await self.app(scope, receive, send)  # no body
            return
        try:
            body = await read_body(receive, limit)
        except ClientGone:
            return
        if body is None:
            await self._refuse(send, 413, BodyTooLarge(limit).detail)
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    def _path(scope: Scope) -> str:
        path, root = scope["path"], scope.get("root_path") or ""
        return (path[len(root):] or "/") if root and path.startswith(root) else path

    async def _refuse(self, send: Send, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1
        await refuse(send, status, detail, headers)


def _replay(body: bytes, receive):
    """``receive`` that gives ``body`` in one message, then the server's own messages (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
