"""What stands in front of the routes: the API key checked on the headers before any body byte is
read, the body limit enforced while the body streams in (413 as soon as it is passed, chunked or
not), and 422 details that are always the documented list and never echo more than an excerpt
of the input.
"""
from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from condgen.serving.config import api_key_digest
from condgen.serving.errors import ApiError

EXCERPT_CHARS = 64  # the most of a client's input a 422 detail repeats

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when the body passes the limit; an HTTPException so that FastAPI's
    body parsing passes it on (anything else it turns into a 400) and it renders as a 413."""

    def __init__(self, limit: int):
        # Connection: close, so that the server drops the connection rather than reading the rest to discard it
        super().__init__(413, f"request body larger than {limit} bytes; send at most {limit}",
                         headers={"Connection": "close"})


def excerpt(value: Any) -> Any:
    """``value`` if its JSON is short, else the first ``EXCERPT_CHARS`` characters of it and an ellipsis."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[:4 * EXCERPT_CHARS]).decode("utf-8", "replace")
    if isinstance(value, str):
        return value if len(value) <= EXCERPT_CHARS else value[:EXCERPT_CHARS] + "…"
    try:
        text = json.dumps(jsonable_encoder(value))
    except (TypeError, ValueError):
        text = repr(value)
    else:
        if len(text) <= EXCERPT_CHARS:
            return jsonable_encoder(value)
    return text[:EXCERPT_CHARS] + "…"


def validation_detail(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic/FastAPI errors -> the documented ``detail`` list, inputs and contexts cut to an excerpt."""
    out = []
    for err in errors:
        item = {"type": str(err.get("type", "value_error")), "loc": list(err.get("loc", ("body",))),
                "msg": str(err.get("msg", ""))[:500]}
        if "input" in err:
            item["input"] = excerpt(err["input"])
        if err.get("ctx"):
            item["ctx"] = {str(k): excerpt(v if isinstance(v, (str, int, float, bool, type(None))) else str(v))
                           for k, v in err["ctx"].items()}
        out.append(item)
    return out


def reason_detail(message: str, type_: str = "value_error") -> list[dict[str, Any]]:
    """A 422 reason (a string) in the documented list shape."""
    return [{"type": type_, "loc": ["body"], "msg": message}]


async def send_json(send: Callable[[Message], Awaitable[None]], status: int, detail: Any,
                    headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: ``authorise(path, headers)`` (an ApiError to refuse, else None) runs on the
    headers alone; ``limit(path)`` is the body limit in bytes of that route, checked on Content-Length and
    again on every chunk received; ``on_body(path, n)`` (optional) is told once per request how many body
    bytes it received, so that ``/metrics`` shows the body bytes that reached the replica (none of a body the proxy refused:
    ``serving/proxy_guard.py``)."""

    def __init__(self, app, *, authorise: Callable[[str, Headers], ApiError | None], limit: Callable[[str], int],
                 on_body: Callable[[str, int], None] | None = None):
        self.app, self.authorise, self.limit, self.on_body = app, authorise, limit, on_body

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        denied = self.authorise(path, headers)
        if denied is not None:
            await send_json(send, denied.status, denied.detail, denied.headers)
            return
        limit = self.limit(path)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await send_json(send, 413, BodyTooLarge(limit).detail)
            return
        received, started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # read outside FastAPI's body parsing (which renders it itself)
            if started:
                raise
            await send_json(send, 413, exc.detail)  # send_json closes the connection too
        finally:
            if self.on_body is not None and received:
                self.on_body(path, received)


# -- shared by the service's apps (serving/app.py, serving/pretrained_app.py) ----------------------------------
def presented_key(headers) -> str | None:
    """The API key a request presents: ``X-API-Key``, else an ``Authorization: Bearer`` token."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    return headers.get("x-api-key") or (token.strip() if scheme.lower() == "bearer" else None)


def key_error(given: str | None, digest: str | None) -> ApiError | None:
    """None when no key is configured (``digest`` None) or ``given`` is it; else the 401 to answer."""
    if not digest or (given and hmac.compare_digest(api_key_digest(given), digest)):
        return None
    return ApiError(401, "missing or wrong API key (send it in the X-API-Key header)",
                    headers={"WWW-Authenticate": "Bearer"})


def install_error_handlers(api: FastAPI, model_errors: tuple[type[Exception], ...] = (ValueError,)) -> None:
    """The documented error bodies: an ``ApiError`` as its status (a 422's reason as the detail list),
    request validation as the short 422 list, and ``model_errors`` raised by the model side (a shape or
    range check inside models/) as a 422 with the reason: the request was the problem, not the server."""
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        detail = reason_detail(exc.detail) if exc.status == 422 else exc.detail
        return JSONResponse({"detail": detail}, status_code=exc.status, headers=exc.headers)

    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)

    async def model_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": reason_detail(f"{type(exc).__name__}: {str(exc)[:200]}")}, status_code=422)

    api.add_exception_handler(ApiError, api_error)
    api.add_exception_handler(RequestValidationError, invalid)
    for kind in model_errors:
        api.add_exception_handler(kind, model_error)
