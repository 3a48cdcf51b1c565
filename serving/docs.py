"""The API's documentation pages, served without internet: ``/docs`` (Swagger UI 5) and ``/redoc``
(ReDoc 2) load their JavaScript, CSS and icon from this app, never from a CDN.

FastAPI's built-in pages fetch Swagger UI and ReDoc from jsDelivr and render blank on a machine
without internet, which is condgen's default. The assets come from the ``fastapi-offline`` wheel
(pinned in pyproject.toml; its files are read from its package folder, its factory is not used) and
are served from ``/docs/assets/<name>`` (a fixed list of names: no path from a request reaches the
file system); ReDoc's bundle is served with its one CDN URL (a logo) replaced by an inline image. Every URL is relative to the request's ``root_path``, so the pages work behind Ray
Serve's ``route_prefix`` and a reverse proxy alike. ``tests/test_docs_offline.py`` renders both pages
in headless Chromium with every host but 127.0.0.1 unreachable.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

ASSET_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
          "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
ASSET_PATH = "/docs/assets"
# ReDoc's sidebar shows Redocly's logo from their CDN; an empty inline SVG instead, so the page asks no other host
REDOC_LOGO = b'"https://cdn.redoc.ly/redoc/logo-mini.svg"'
EMPTY_SVG = b'"data:image/svg+xml,%3Csvg xmlns=%27http://www.w3.org/2000/svg%27/%3E"'
# validatorUrl none: Swagger UI would otherwise ask validator.swagger.io to check the schema
SWAGGER_PARAMETERS = {"validatorUrl": None, "deepLinking": True, "displayRequestDuration": True}


@cache
def asset_bytes(name: str) -> bytes:
    """The bytes served for asset ``name`` (read once)."""
    data = (ASSET_DIR / name).read_bytes()
    return data.replace(REDOC_LOGO, EMPTY_SVG) if name == "redoc.standalone.js" else data


def add_offline_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve ``docs_url`` and ``redoc_url`` on ``app`` (created with ``docs_url=None, redoc_url=None``)
    from local assets."""
    if app.docs_url or app.redoc_url:
        raise ValueError("create the app with docs_url=None and redoc_url=None: add_offline_docs serves them")
    oauth2 = app.swagger_ui_oauth2_redirect_url or f"{docs_url}/oauth2-redirect"

    def root(request: Request) -> str:
        return (request.scope.get("root_path") or "").rstrip("/")

    @app.get(docs_url, include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        base = root(request)
        return get_swagger_ui_html(openapi_url=base + app.openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{base}{ASSET_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{base}{ASSET_PATH}/swagger-ui.css",
                                   swagger_favicon_url=f"{base}{ASSET_PATH}/favicon.png",
                                   oauth2_redirect_url=base + oauth2, swagger_ui_parameters=SWAGGER_PARAMETERS)

    @app.get(oauth2, include_in_schema=False)
    async def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        return get_redoc_html(openapi_url=base + app.openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{base}{ASSET_PATH}/redoc.standalone.js",
                              redoc_favicon_url=f"{base}{ASSET_PATH}/favicon.png", with_google_fonts=False)

    @app.get(ASSET_PATH + "/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, f"no such asset; the docs pages use {', '.join(sorted(ASSETS))}")
        return Response(asset_bytes(name), media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})
