"""Ray Serve application for a user's pretrained pipeline with many LoRA adapters on one base (issue #21).

Routes (OpenAPI docs at ``/docs`` and ``/redoc``, offline):

* ``POST /v1/generate``  prompt, negative_prompt, guidance (diffusers' scale), steps, sampler
  ddim|dpmpp_2m, seed, n, size, adapter -> base64 PNGs + the parameters, adapter and version used.
  Requests that name the same adapter (and sampler, steps, size) share one forward pass.
* ``POST /v1/edit``  image + prompt, sdedit | ddim_inversion (source_prompt), adapter -> a base64 PNG.
* ``GET /v1/models``  the base (fingerprint, ``loads``: how often this replica called ``base.load``),
  the configured adapters, the replica's loaded adapters (LRU order) and how often each was read.
* ``GET /health``.

The adapter a request names (body field ``adapter``, or the header ``serve_multiplexed_model_id``,
which also lets Ray Serve's proxy route the request to a replica that already holds it) is loaded
through ``@serve.multiplexed(max_num_models_per_replica=max_adapters)``: Ray keeps the LRU and calls
the entry's ``__del__`` when it evicts one (``serving/pretrained_service.py``). An unknown adapter is
404, one of another kind or trained on another base 422, with the reason; bad input 422; overload
503; timeout 504. ``CONDGEN_API_KEY`` guards ``/v1/*`` as in the model service (``serving/guard.py``); the
key and the body limit are enforced first in Serve's proxy (``serving/proxy_guard.py``; ``run`` installs it).

Start it with ``condgen serve --pretrained-base PATH [--adapter NAME=URI ...]`` or ``run(...)``.
"""
from __future__ import annotations

import os
import time
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve

from condgen.serving import pretrained_schema as ps
from condgen.serving.config import Deployment, PretrainedServeConfig, api_key_digest, config_error
from condgen.serving.docs import add_offline_docs
from condgen.serving.errors import ApiError
from condgen.serving.guard import RequestGuard, install_error_handlers
from condgen.serving.launch import API_KEY_ENV, launch_env, refuse_busy_port, replica_env
from condgen.serving.pretrained_service import PretrainedService
from condgen.serving.proxy_guard import Policy, proxy_env, replica_hooks
from condgen.tasks.io import settings
from condgen.tasks.io.cluster import ensure_ray
from condgen.tasks.io.redact import redact_uri

MULTIPLEX_HEADER = "serve_multiplexed_model_id"
_STATE: dict[str, Any] = {}

api = FastAPI(title="condgen pretrained", version="1.0.0", docs_url=None, redoc_url=None,
              description="A pretrained diffusion pipeline with many LoRA adapters on one base.")
add_offline_docs(api)


def bind_service(service: PretrainedService) -> FastAPI:
    """Make ``api`` serve ``service`` (the deployment does this in its constructor)."""
    old = _STATE.get("service")
    if old is not None and old is not service:
        old.close()
    _STATE.update(service=service)
    return api


def _service() -> PretrainedService:
    svc = _STATE.get("service")
    if svc is None:
        raise ApiError(503, "the service is starting; retry shortly")
    return svc


def proxy_policy(config: PretrainedServeConfig | None = None, route_prefix: str = "/") -> Policy:
    """The key (``/v1/*``) and one body limit for every route (prompts and uploads), enforced by Serve's
    proxy and again by the replica's guard."""
    return Policy(route_prefix=route_prefix, default_limit=config.max_body_bytes if config else 4 * 1024 * 1024,
                  limits={}, protected=("/v1/",), api_key_sha256=config.api_key_sha256 if config else None)


def _policy() -> Policy:
    svc = _STATE.get("service")
    return proxy_policy(svc.config if svc is not None else None)



api.add_middleware(RequestGuard, **replica_hooks(_policy))


install_error_handlers(api)  # ApiError, validation, and ValueError from the pipeline: 4xx with a reason


def adapter_name(body: str | None, request: Request) -> str | None:
    """The adapter a request names: the body's ``adapter`` or the multiplexing header (422 if they differ)."""
    header = request.headers.get(MULTIPLEX_HEADER) or None
    if body and header and body != header:
        raise ApiError(422, f"the body names adapter {body!r} and the {MULTIPLEX_HEADER} header {header!r}: "
                            "name one, or the same in both")
    return body or header


RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong API key"}, 404: {"description": "unknown adapter"},
    413: {"description": "body too large"}, 422: {"description": "invalid request, or an adapter of another "
                                                                 "kind or base"},
    503: {"description": "overloaded or starting"}, 504: {"description": "timed out"}}


@api.post("/v1/generate", response_model=ps.PretrainedGenerateResponse, responses=RESPONSES)
async def generate_v1(req: ps.PretrainedGenerate, request: Request) -> dict[str, Any]:
    return await _service().generate(req, adapter_name(req.adapter, request))


@api.post("/v1/edit", response_model=ps.PretrainedEditResponse, responses=RESPONSES)
async def edit_v1(req: ps.PretrainedEdit, request: Request) -> dict[str, Any]:
    return await _service().edit(req, adapter_name(req.adapter, request))


@api.get("/v1/models", response_model=ps.PretrainedModels)
async def models_v1() -> dict[str, Any]:
    return _service().models()


@api.get("/health")
async def health() -> dict[str, Any]:
    svc = _service()
    return {"status": "ok", "base_fingerprint": svc.p.fingerprint, "time": time.time()}


# -- Ray Serve ---------------------------------------------------------------------------------------------
ACTOR_OPTIONS = {"num_cpus": 1.0}


@serve.deployment(num_replicas=1, ray_actor_options=ACTOR_OPTIONS, max_ongoing_requests=256,
                  health_check_period_s=10)
@serve.ingress(api)
class PretrainedDeployment:
    """One replica: the base loaded once; adapters through Ray Serve's model multiplexing (an LRU per replica)."""

    def __init__(self, config: dict[str, Any]):
        import condgen.serving.pretrained_app as this  # this module in the replica's process

        service = PretrainedService(PretrainedServeConfig.model_validate(config))

        async def load_adapter_by_id(adapter_id: str):
            return await service.load_adapter(adapter_id)

        self.load = serve.multiplexed(max_num_models_per_replica=service.config.max_adapters)(load_adapter_by_id)
        service.loader = self.load

        def loaded() -> list[str]:  # Ray keeps its LRU on the function it wrapped
            wrapper = getattr(load_adapter_by_id, "__serve_multiplex_wrapper", None)
            return list(wrapper.models) if wrapper is not None else []

        service.loaded = loaded
        this.bind_service(service)


def make_config(base: str, adapters: dict[str, str] | None = None, **options: Any) -> PretrainedServeConfig:
    """A PretrainedServeConfig; the API key (``CONDGEN_API_KEY``) travels only as its sha256."""
    key = os.environ.get(API_KEY_ENV)
    options.setdefault("api_key_sha256", api_key_digest(key) if key else None)
    options.setdefault("tracking_uri", settings.tracking_uri())
    try:
        return PretrainedServeConfig(base=base, adapters=dict(adapters or {}), **options)
    except ValidationError as exc:
        raise ValueError(config_error(exc, "pretrained serve config")) from None


def build_app(config: PretrainedServeConfig, deployment: Deployment | None = None):
    """The deployment bound to its config (the replica gets only the credentials it needs to load)."""
    deployment = deployment or Deployment()
    actor: dict[str, Any] = {**ACTOR_OPTIONS, **deployment.actor_options()}
    env = replica_env()
    if env:
        actor["runtime_env"] = {"env_vars": env}
    return PretrainedDeployment.options(max_ongoing_requests=max(64, 2 * config.max_queue), ray_actor_options=actor,
                                        **deployment.options()).bind(config.model_dump())


def run(config: PretrainedServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True, *,
        deployment: Deployment | None = None, name: str = "condgen-pretrained", route_prefix: str = "/"):
    """Start Ray (local unless RAY_ADDRESS), Serve's proxy on host:port and the app (as ``app.run``)."""
    application = build_app(config, deployment)
    refuse_busy_port(host, port)
    with launch_env(), proxy_env(proxy_policy(config, route_prefix)):
        ensure_ray(log_to_driver=True)
        serve.start(http_options={"host": host, "port": port})
        handle = serve.run(application, name=name, route_prefix=route_prefix, blocking=False)
    if blocking:
        print(f"serving {redact_uri(config.base)} with adapters {sorted(config.adapters)} on http://{host}:{port} "
              "(docs: /docs, Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle
