"""Ray Serve application: several registry models per replica, guided sampling, batching.

Routes (OpenAPI docs at ``/docs`` and ``/redoc``, served offline: ``serving/docs.py``):

* ``POST /v1/generate``  label | prompt, negative, guidance none|cfg|classifier|clip + scale,
  sampler ddim|ddpm|dpmpp_2m, steps, eta, seed | seeds, n -> base64 PNGs + the exact parameters and
  model version used. Compatible requests share one forward pass (``serving/batcher.py``).
* ``POST /v1/edit``  image + source/target condition, ddim_inversion | null_text | sdedit. The upload is
  decoded to the model's channels and size (``schema.UPLOAD_POLICY``, ``tasks/generation/inputs.py``).
* ``POST /v1/interpolate``  two seeds or latents, linear | slerp (CVAE, GAN, diffusion x_T).
* ``POST /v1/map``  source -> target model latent through a fitted linear map (config ``maps``):
  both latents and both decoded images.
* Every image returned is a PNG in the model's colour mode: ``L`` for a 1-channel model, ``RGB`` for a
  3-channel one (``GET /v1/models`` gives ``channels`` and ``image_size`` per model).
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /`` (web page).
* ``POST /generate``  the original endpoint: {label, n, seed} on the first model.

Bad input is a 4xx with a reason, never a 5xx: pydantic bounds (422), unknown model (404),
missing capability (409), model-side ``ValueError`` (422), overload (503), timeout (504), a body
over ``max_body_bytes`` (413, counted while it streams, chunked or not), an unparseable body (400).
Every 422 ``detail`` is a list of ``{loc, msg, type[, input, ctx]}``, inputs cut to 64 characters.
When ``CONDGEN_API_KEY`` is set, ``/v1/*`` and ``/generate`` need it in ``X-API-Key``
(or ``Authorization: Bearer``); otherwise 401, answered on the headers before any body byte is
read (``serving/guard.py``). Both checks run first in Ray Serve's HTTP proxy, where the bytes arrive, so
that a refused body never reaches a replica (``serving/proxy_guard.py``; ``run`` installs it), and again in
the replica. Only its sha256 travels to the replicas; Ray's processes start
without it and without credentials (``serving/launch.py``).

A user's pretrained diffusers pipeline with many LoRA adapters on one base is another app:
``serving/pretrained_app.py`` (``condgen serve --pretrained-base PATH``).

Deploying: ``condgen serve`` (flags or ``--config infra/ray/serve_config.yaml``), ``serve run`` /
``serve deploy infra/ray/serve_config.yaml`` (the builder ``condgen.serving.builder:app``), or a KubeRay
RayService. Replicas are a fixed count or Serve's autoscaling (``config.Deployment``); Ray itself starts
through ``tasks.io.cluster.ensure_ray`` (``RAY_ADDRESS``, dashboard only with ``CONDGEN_RAY_DASHBOARD=1``).
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from ray import serve

from condgen.serving import schema
from condgen.serving.config import Deployment, ModelSpec, ServeConfig, api_key_digest, config_error
from condgen.serving.docs import ASSET_PATH, add_offline_docs
from condgen.serving.errors import ApiError
from condgen.serving.guard import RequestGuard, install_error_handlers, key_error
from condgen.serving.launch import API_KEY_ENV, launch_env, refuse_busy_port, replica_env
from condgen.serving.proxy_guard import Policy, controller_options, proxy_env, replica_hooks
from condgen.serving.service import Service
from condgen.serving.ui import PAGE
from condgen.tasks.generation.batching import Cancelled
from condgen.tasks.io import settings
from condgen.tasks.io.cluster import ensure_ray
from condgen.tasks.io.redact import redact_uri

MAX_BODY_BYTES = 1024 * 1024  # default of ServeConfig.max_body_bytes
SMALL_BODY_BYTES = 64 * 1024  # routes without an upload (prompts of <= 200 characters, <= 64 seeds)
SMALL_BODY_PATHS = ("/v1/generate", "/generate")
PROTECTED = ("/v1/", "/generate")  # need the API key when one is configured ("/v1/": every path under it)
KNOWN_PATHS = ("/v1/generate", "/v1/edit", "/v1/interpolate", "/v1/map", "/v1/models", "/generate", "/health",
               "/metrics", "/", "/docs", "/redoc", "/openapi.json")

# The replica's service. Set by the deployment's constructor (or ``bind_service`` in tests);
# routes are module-level functions so they always read this module's state.
_STATE: dict[str, Any] = {}


class Metrics:
    """Prometheus collectors in a registry of their own (several apps may share a process in tests)."""

    def __init__(self, service: Service):

        r = self.registry = CollectorRegistry()
        self.requests = Counter("condgen_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.body_bytes = Counter("condgen_request_body_bytes", "request body bytes that reached the replica",
                                  ["endpoint"], registry=r)
        self.latency = Histogram("condgen_request_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.samples = Counter("condgen_samples", "images returned", ["model"], registry=r)
        self.blocked = Counter("condgen_safety_blocked", "requests/samples blocked by the safety filter", ["check"],
                               registry=r)
        self.reloads = Counter("condgen_model_reloads", "alias moves picked up without a restart", ["model"],
                               registry=r)
        self.batch = Histogram("condgen_batch_samples", "samples per forward-pass batch", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        queue = Gauge("condgen_queue_samples", "samples waiting for the compute thread", registry=r)
        queue.set_function(service.batcher.queued_samples)
        self.version = Gauge("condgen_model_version", "loaded registry version (value = version number)",
                             ["model"], registry=r)


def bind_service(service: Service) -> FastAPI:
    """Make ``api`` serve ``service`` (the deployment does this in its constructor)."""
    metrics = Metrics(service)
    service.metrics = metrics
    original = service.batcher.runner

    def runner(key, jobs):
        metrics.batch.observe(sum(j.samples for j in jobs))
        return original(key, jobs)

    service.batcher.runner = runner
    old = _STATE.get("service")
    if old is not None and old is not service:
        old.close()
    _STATE.update(service=service, metrics=metrics)
    return api


def _service() -> Service:
    svc = _STATE.get("service")
    if svc is None:
        raise ApiError(503, "the service is starting; retry shortly")
    return svc


api = FastAPI(title="condgen", version="1.0.0", docs_url=None, redoc_url=None,
              description="Guided sampling from conditional generative models in the MLflow registry.")
add_offline_docs(api)  # /docs and /redoc from local assets (no CDN)


# -- auth and the body limit (``serving/guard.py``: on the headers, before any body byte is read) -------------
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when CONDGEN_API_KEY is set")
_bearer = HTTPBearer(auto_error=False)


def _key_error(given: str | None) -> ApiError | None:
    svc = _STATE.get("service")
    return key_error(given, svc.config.api_key_sha256 if svc is not None else None)


def require_key(key: Annotated[str | None, Depends(_key_header)],
                bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    error = _key_error(key or (bearer.credentials if bearer is not None else None))
    if error is not None:
        raise error


def proxy_policy(config: ServeConfig | None = None, route_prefix: str = "/") -> Policy:
    """The key and the body limits of ``config``, enforced by Serve's proxy and again by the replica's guard:
    ``max_body_bytes`` (1 MiB: an upload of ``/v1/edit``), and at most ``SMALL_BODY_BYTES`` on the routes
    that take no upload: a valid generate body is ~2 KB, so a bigger one is refused while it streams, before
    the event loop spends time parsing and validating it (six 0.7 MB bodies in flight slowed /health to
    ~0.8 s at p99 in benchmarks/reliability.py)."""
    limit = config.max_body_bytes if config is not None else MAX_BODY_BYTES
    return Policy(route_prefix=route_prefix, default_limit=limit, protected=PROTECTED,
                  limits={p: min(limit, SMALL_BODY_BYTES) for p in SMALL_BODY_PATHS},
                  api_key_sha256=config.api_key_sha256 if config is not None else None)


def _policy() -> Policy:
    svc = _STATE.get("service")
    return proxy_policy(svc.config if svc is not None else None)



def _endpoint(path: str) -> str:
    """The metrics label of a path: a known route, the docs' assets, or "other"."""
    return path if path in KNOWN_PATHS else "/docs/assets" if path.startswith(ASSET_PATH) else "other"


def _count_body(path: str, size: int) -> None:
    metrics: Metrics | None = _STATE.get("metrics")
    if metrics is not None:
        metrics.body_bytes.labels(_endpoint(path)).inc(size)


# inside _observe: 401/413 are counted
api.add_middleware(RequestGuard, **replica_hooks(_policy), on_body=_count_body)


# -- errors and metrics -------------------------------------------------------------------------------
# The model side refusing an input (ValueError, TypeError, KeyError, IndexError) is a 422 with the reason.
install_error_handlers(api, (ValueError, TypeError, KeyError, IndexError))


@api.exception_handler(Cancelled)
@api.exception_handler(asyncio.TimeoutError)
async def _timeout(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "timed out"}, status_code=504)


@api.middleware("http")
async def _observe(request: Request, call_next):
    t0 = time.perf_counter()
    endpoint = _endpoint(request.url.path)
    response: Response = await call_next(request)
    metrics: Metrics | None = _STATE.get("metrics")
    if metrics is not None and endpoint != "/metrics":
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
    return response


# -- routes -------------------------------------------------------------------------------------------
# Every POST route's 4xx/5xx, for the OpenAPI schema (422 is FastAPI's documented list of errors).
POST_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body could not be read as JSON text (e.g. not UTF-8)"},
    401: {"description": "missing or wrong API key (checked before the body is read)"},
    404: {"description": "unknown model or adapter"}, 409: {"description": "the model lacks a capability"},
    413: {"description": "body larger than the limit (1 MiB by default; 64 KiB on /v1/generate and /generate), "
                        "counted while it streams"},
    422: {"model": schema.ErrorList, "description": "invalid request (malformed JSON, bounds, model-side "
                                                      "checks): a list of errors, inputs cut to an excerpt"},
    503: {"description": "overloaded or starting"}, 504: {"description": "timed out"}}


@api.post("/v1/generate", response_model=schema.GenerateV1Response, dependencies=[Depends(require_key)],
          description="base64 PNGs in the model's colour mode: L (1 channel) or RGB (3 channels).",
          responses=POST_RESPONSES)
async def generate_v1(req: schema.GenerateV1) -> dict[str, Any]:
    return await _service().generate(req)


@api.post("/v1/edit", response_model=schema.EditV1Response, dependencies=[Depends(require_key)],
          description=f"Edit an image with a diffusion model. {schema.UPLOAD_POLICY} The edited image is a PNG in "
                      "the model's colour mode.", responses=POST_RESPONSES)
async def edit_v1(req: schema.EditV1) -> dict[str, Any]:
    return await _service().edit(req)


@api.post("/v1/interpolate", response_model=schema.InterpolateV1Response, dependencies=[Depends(require_key)],
          responses=POST_RESPONSES)
async def interpolate_v1(req: schema.InterpolateV1) -> dict[str, Any]:
    return await _service().interpolate(req)


@api.post("/v1/map", response_model=schema.MapV1Response, dependencies=[Depends(require_key)],
          responses=POST_RESPONSES)
async def map_v1(req: schema.MapV1) -> dict[str, Any]:
    return await _service().map(req)


@api.get("/v1/models", response_model=schema.ModelsV1Response, dependencies=[Depends(require_key)])
async def models_v1() -> dict[str, Any]:
    return _service().models()


@api.get("/health", response_model=schema.Health)
async def health() -> dict[str, Any]:
    svc = _service()
    out = svc.health()
    if svc.metrics is not None:
        for m in svc.pool.all():
            if m.version.isdigit():
                svc.metrics.version.labels(m.key).set(int(m.version))
    return out


@api.get("/metrics", include_in_schema=False)
async def metrics() -> Response:

    m: Metrics | None = _STATE.get("metrics")
    body = generate_latest(m.registry) if m is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@api.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> str:
    return PAGE


@api.post("/generate", response_model=schema.GenerateResponse, dependencies=[Depends(require_key)],
          responses=POST_RESPONSES)
async def generate(req: schema.GenerateRequest) -> dict[str, Any]:
    return await _service().generate_legacy(req)


# -- Ray Serve ---------------------------------------------------------------------------------------------
ACTOR_OPTIONS = {"num_cpus": 0.5}


@serve.deployment(num_replicas=1, ray_actor_options=ACTOR_OPTIONS, max_ongoing_requests=512,
                  health_check_period_s=10)
@serve.ingress(api)
class CondgenService:
    def __init__(self, config: dict[str, Any]):
        import condgen.serving.app as this  # this module in the replica's process, whatever pickling did

        this.bind_service(Service(ServeConfig.model_validate(config)))


Generator = CondgenService  # the original name


def make_config(models: str | list[str] | None = None, tracking_uri: str | None = None, **options: Any
                ) -> ServeConfig:
    """A ServeConfig from model URIs (``models:/NAME@alias`` | ``models:/NAME/3``) and options.

    The API key is read from ``CONDGEN_API_KEY`` here, on the driver; only its sha256 is
    put in the config that travels to the replicas. An unknown option or a bad value is a
    one-line ``ValueError`` naming the valid keys (``config.config_error``).
    """

    if isinstance(models, str):
        models = [models]
    key = os.environ.get(API_KEY_ENV)
    options.setdefault("api_key_sha256", api_key_digest(key) if key else None)
    try:
        specs = [m if isinstance(m, ModelSpec) else ModelSpec.model_validate(m) if isinstance(m, dict)
                 else ModelSpec(uri=m) for m in (models or ["models:/condgen-cvae@champion"])]
        return ServeConfig(models=specs, tracking_uri=tracking_uri or settings.tracking_uri(), **options)
    except ValidationError as exc:
        raise ValueError(config_error(exc, "serve config")) from None


def build_app(model_uri: str | list[str] | None = None, tracking_uri: str | None = None, *,
              config: ServeConfig | None = None, deployment: Deployment | None = None, **options: Any):
    """The deployment bound to its config, with its replicas (``deployment``: a fixed count or autoscaling;
    default one replica); the replica gets the credentials it needs to load models
    (``launch.replica_env``) in its own runtime_env, and nothing else of the driver's environment."""
    config = config or make_config(model_uri, tracking_uri, **options)
    deployment = deployment or Deployment()
    env = replica_env()
    actor: dict[str, Any] = {**ACTOR_OPTIONS, **deployment.actor_options()}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    return CondgenService.options(max_ongoing_requests=max(64, 2 * config.max_queue), ray_actor_options=actor,
                                  **deployment.options()).bind(config.model_dump())


def run(model_uri: str | list[str] | None = None, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
        *, config: ServeConfig | None = None, deployment: Deployment | None = None, name: str = "condgen",
        route_prefix: str = "/", **options: Any):
    """Start Ray (local unless RAY_ADDRESS; its dashboard only with CONDGEN_RAY_DASHBOARD=1, as every
    step: ``tasks.io.cluster``), Serve's proxy on host:port with the app's key and body limits
    (``proxy_guard``: in the environment of the Ray this call starts, and in the Serve controller's
    runtime_env, which its proxies inherit, for a Ray that was already running), and
    the app with its replicas.

    PortInUse (one line) when host:port is taken. Ray's processes start without the API key and
    credentials (``serving/launch.py``); the key leaves this process's environment for good.
    """
    config = config or make_config(model_uri, **options)
    deployment = deployment or Deployment()
    application = build_app(config=config, deployment=deployment)  # reads the key and the replica's credentials
    refuse_busy_port(host, port)
    policy = proxy_policy(config, route_prefix)
    with launch_env(), proxy_env(policy):
        ensure_ray(log_to_driver=True)
        # the controller's runtime_env carries the guard to its proxies on a Ray that was already running too
        serve.start(http_options={"host": host, "port": port}, controller_options=controller_options(policy))
        handle = serve.run(application, name=name, route_prefix=route_prefix, blocking=False)
    if blocking:
        print(f"serving {[redact_uri(m.uri) for m in config.models]} on http://{host}:{port} with "
              f"{deployment.describe()}  (docs: /docs, page: /, Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle
