"""``condgen serve``: the Ray Serve app for registered models, or (``--pretrained-base PATH``, ``--adapter
NAME=URI`` repeated) for a pretrained pipeline with many LoRA adapters on one base (``serving/pretrained_app.py``).

``--config`` takes a JSON file of ``ServeConfig`` fields, or a Ray Serve config file (``.yaml``/``.yml``,
``infra/ray/serve_config.yaml``: the one ``serve run`` and ``serve deploy`` take), whose application
``args``, replicas or autoscaling, and ``http_options`` host and port apply; flags override the file.
Replicas: ``--replicas N`` (fixed), or autoscaling with ``--max-replicas`` (and ``--min-replicas``,
``--target-ongoing-requests``). Every model, adapter, classifier, judge and CLIP the app would load is
checked in the registry (or storage) before Ray or Serve starts; ``condgen.serving`` (Ray, ~7 s to import)
is imported inside :func:`serve`, after the checks.
"""
from __future__ import annotations

from typing import Annotated, Any

import typer
from pydantic import ValidationError

from condgen.commands import checks
from condgen.commands.embed import clip_spec

DEFAULT_MODEL = "models:/condgen-cvae@champion"
TRAIN_FIX = "train and promote one with `condgen demo` or `condgen retrain --params FILE`"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def serve_inputs(models: list[Any], raw: dict[str, Any], where: str) -> Any:
    """The ``ServeConfig`` of ``models`` + ``raw``, every reference in it checked."""
    from condgen.serving.config import ServeConfig, config_error

    specs = [m if isinstance(m, dict) else {"uri": m} for m in models]
    try:
        config = ServeConfig.model_validate({**raw, "models": specs})
    except ValidationError as exc:
        raise checks.InputError(config_error(exc, where)) from None
    for spec in config.models:
        checks.model_ref(spec.uri, TRAIN_FIX)
        if spec.classifier:
            checks.model_ref(spec.classifier)
        for uri in spec.adapters.values():
            checks.adapter(uri)
    if config.judge:
        checks.model_ref(config.judge)
    if config.clip:
        clip_spec(config.clip)
    return config


def read_config(path: str) -> tuple[dict[str, Any], Any]:
    """(ServeConfig fields, the Serve file or None) of ``--config``: JSON fields, or a Ray Serve YAML file."""
    if path.lower().endswith((".yaml", ".yml")):
        from condgen.serving.serve_file import parse_serve_file

        try:
            found = parse_serve_file(checks.local_file(path, "--config").read_text(), path)
        except ValueError as exc:
            raise checks.InputError(str(exc)) from None
        return dict(found.args), found
    return checks.json_file(path, "--config"), None


def deployment_inputs(base: Any, flags: dict[str, Any]) -> Any:
    """The replicas (``serving.config.Deployment``) of the config file's ``base`` with the flags on top."""
    from condgen.serving.config import Deployment, config_error

    if flags.get("num_replicas") is not None and any(
            flags.get(k) is not None for k in ("min_replicas", "max_replicas", "target_ongoing_requests")):
        raise checks.InputError("give --replicas (a fixed count) or autoscaling (--min-replicas/--max-replicas/"
                                "--target-ongoing-requests), not both")
    try:
        return (base or Deployment()).override(**flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "missing" and first["loc"][-1] == "max_replicas":
            raise checks.InputError("autoscaling needs --max-replicas (or autoscaling_config.max_replicas in the "
                                    "config file)") from None
        raise checks.InputError(config_error(exc, "replicas")) from None


def serve(
    model: Annotated[list[str] | None, typer.Option(
        help=f"models:/NAME@ALIAS or models:/NAME/N (repeatable; default {DEFAULT_MODEL})")] = None,
    config: Annotated[str | None, typer.Option(
        help="a Ray Serve config (.yaml: infra/ray/serve_config.yaml, as `serve run` takes) or a JSON file of "
             "ServeConfig fields; flags override it")] = None,
    host: Annotated[str | None, typer.Option(help=f"default {DEFAULT_HOST} (or the config's http_options)")] = None,
    port: Annotated[int | None, typer.Option(help=f"default {DEFAULT_PORT} (or the config's http_options)")] = None,
    replicas: Annotated[int | None, typer.Option(
        help="a fixed number of replicas (default 1, or the config's)", min=1)] = None,
    min_replicas: Annotated[int | None, typer.Option(help="autoscaling: fewest replicas (default 1)", min=0)] = None,
    max_replicas: Annotated[int | None, typer.Option(help="autoscaling: most replicas (turns autoscaling on)",
                                                     min=1)] = None,
    target_ongoing_requests: Annotated[float | None, typer.Option(
        help="autoscaling: requests in flight per replica before Serve adds one (default 32)")] = None,
    clip: Annotated[str | None, typer.Option(help="CLIP spec for text prompts / CLIP guidance")] = None,
    judge: Annotated[str | None, typer.Option(help="classifier URI for the output safety check")] = None,
    max_batch: Annotated[int | None, typer.Option(help="samples per forward pass (default 32)")] = None,
    no_batching: Annotated[bool, typer.Option("--no-batching", help="one forward pass per request")] = False,
    map_: Annotated[list[str] | None, typer.Option("--map", help="a fitted latent map for /v1/map (runs:/RUN/maps/"
                                                   "A__B, s3://..., a folder; repeatable)")] = None,
    poll_s: Annotated[float | None, typer.Option(help="registry alias poll period (default 30; 0 = off)")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="per-request timeout (default 60)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per replica (default 1)")] = None,
    pretrained_base: Annotated[str | None, typer.Option(
        help="serve a diffusers-layout pipeline (folder or s3:// prefix) with LoRA adapters instead of registered "
             "models: /v1/generate and /v1/edit name an adapter per request")] = None,
    adapter: Annotated[list[str] | None, typer.Option(
        help="with --pretrained-base: an adapter NAME=URI (storage folder or models:/NAME@ALIAS; a bare "
             "models:/ URI is its own name; repeatable). Requests may also name any registered adapter")] = None,
    max_adapters: Annotated[int | None, typer.Option(
        help="with --pretrained-base: adapters kept per replica, least recently used evicted (default 4)",
        min=1)] = None,
    device: Annotated[str | None, typer.Option(help="with --pretrained-base: torch device (default cpu)")] = None,
) -> int:
    """Ray Serve app for registered models (/v1 API, docs at /docs, web page at /), or with --pretrained-base a
    pretrained pipeline with many LoRA adapters on one base. Ray's dashboard only with CONDGEN_RAY_DASHBOARD=1,
    as for every step."""
    if pretrained_base is not None:
        if model or config or clip or judge or map_:
            raise checks.InputError("--pretrained-base serves a pipeline and its adapters: drop --model, --config, "
                                    "--clip, --judge and --map")
        deployment = deployment_inputs(None, {
            "num_replicas": replicas, "min_replicas": min_replicas, "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests})
        options = {k: v for k, v in (("max_batch", max_batch), ("request_timeout_s", timeout_s),
                                     ("torch_threads", threads), ("max_adapters", max_adapters),
                                     ("device", device)) if v is not None}
        if no_batching:
            options["batching"] = False
        return serve_pretrained(pretrained_base, adapter or [], options, host or DEFAULT_HOST,
                                port or DEFAULT_PORT, deployment)
    if adapter or max_adapters or device:
        raise checks.InputError("--adapter, --max-adapters and --device go with --pretrained-base PATH")
    raw, found = read_config(config) if config else ({}, None)
    models = model or raw.pop("models", None) or ([raw.pop("model_uri")] if raw.get("model_uri") else None) \
        or [DEFAULT_MODEL]
    raw.pop("models", None)
    raw.pop("model_uri", None)
    for key, value in (("clip", clip), ("judge", judge), ("max_batch", max_batch), ("poll_s", poll_s),
                       ("request_timeout_s", timeout_s), ("torch_threads", threads)):
        if value is not None:
            raw[key] = value
    if no_batching:
        raw["batching"] = False
    if map_:
        raw["maps"] = [*raw.get("maps", []), *map_]
    deployment = deployment_inputs(found.deployment if found else None, {
        "num_replicas": replicas, "min_replicas": min_replicas, "max_replicas": max_replicas,
        "target_ongoing_requests": target_ongoing_requests})
    serve_inputs(models, raw, config or "serve options")
    host = host or (found.host if found and found.host else DEFAULT_HOST)
    port = port or (found.port if found and found.port else DEFAULT_PORT)
    app_name = found.name if found else "condgen"
    route = found.route_prefix if found else "/"

    from condgen.serving.app import make_config, run

    run(host=host, port=port, blocking=True, config=make_config(models, **raw), deployment=deployment,
        name=app_name, route_prefix=route)
    return 0


def adapter_inputs(values: list[str]) -> dict[str, str]:
    """``NAME=URI`` (or a bare ``models:/`` URI, its own name) per ``--adapter``, each checked."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, uri = value.partition("=")
        if not sep:
            if not value.startswith("models:/"):
                raise checks.InputError(f"--adapter {value!r}: give NAME=URI (a storage folder needs a name)")
            name, uri = value, value
        if not name or name in out:
            raise checks.InputError(f"--adapter {value!r}: every adapter needs a name of its own")
        out[name] = checks.adapter(uri)
    return out


def serve_pretrained(base: str, adapters: list[str], options: dict[str, Any], host: str, port: int,
                     deployment: Any) -> int:
    """``condgen serve --pretrained-base``: inputs checked before Ray starts, then the multi-adapter app."""
    if "://" not in base or base.startswith("file://"):
        from pathlib import Path

        folder = Path(base.removeprefix("file://")).expanduser()
        if not (folder / "model_index.json").is_file():
            raise checks.InputError(f"--pretrained-base {base!r} has no model_index.json: point it at a diffusers "
                                    "pipeline folder (docs/pretrained.md)")
    named = adapter_inputs(adapters)
    from condgen.serving.pretrained_app import make_config, run

    try:
        config = make_config(base, named, **options)
    except ValueError as exc:
        raise checks.InputError(str(exc)) from None
    run(config, host=host, port=port, blocking=True, deployment=deployment)
    return 0


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
