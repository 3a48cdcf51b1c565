"""``condgen serve``: the Ray Serve app for registered models.

Every model, adapter, classifier, judge and CLIP the app would load is checked in the registry
(or storage) before Ray or Serve starts; ``condgen.serving`` (Ray, ~7 s to import) is imported
inside :func:`serve`, after the checks.
"""
from __future__ import annotations

from typing import Annotated, Any

import typer
from pydantic import ValidationError

from condgen.commands import checks
from condgen.commands.embed import clip_spec

DEFAULT_MODEL = "models:/condgen-cvae@champion"
TRAIN_FIX = "train and promote one with `condgen demo` or `condgen retrain --params FILE`"


def serve_inputs(models: list[Any], raw: dict[str, Any], where: str) -> Any:
    """The ``ServeConfig`` of ``models`` + ``raw``, every reference in it checked."""
    from condgen.serving.config import ServeConfig

    specs = [m if isinstance(m, dict) else {"uri": m} for m in models]
    try:
        config = ServeConfig.model_validate({**raw, "models": specs})
    except ValidationError as exc:
        raise checks.validation_error(exc, where) from None
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


def serve(
    model: Annotated[list[str] | None, typer.Option(
        help=f"models:/NAME@ALIAS or models:/NAME/N (repeatable; default {DEFAULT_MODEL})")] = None,
    config: Annotated[str | None, typer.Option(
        help="JSON file with ServeConfig fields (models with adapters/classifiers, ...)")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    clip: Annotated[str | None, typer.Option(help="CLIP spec for text prompts / CLIP guidance")] = None,
    judge: Annotated[str | None, typer.Option(help="classifier URI for the output safety check")] = None,
    max_batch: Annotated[int | None, typer.Option(help="samples per forward pass (default 32)")] = None,
    no_batching: Annotated[bool, typer.Option("--no-batching", help="one forward pass per request")] = False,
    map_: Annotated[list[str] | None, typer.Option("--map", help="a fitted latent map for /v1/map (runs:/RUN/maps/"
                                                   "A__B, s3://..., a folder; repeatable)")] = None,
    poll_s: Annotated[float | None, typer.Option(help="registry alias poll period (default 30; 0 = off)")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="per-request timeout (default 60)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per replica (default 1)")] = None,
) -> int:
    """Ray Serve app for registered models (/v1 API, web page at /)."""
    raw: dict[str, Any] = checks.json_file(config, "--config") if config else {}
    models = model or raw.pop("models", None) or [DEFAULT_MODEL]
    raw.pop("models", None)
    for key, value in (("clip", clip), ("judge", judge), ("max_batch", max_batch), ("poll_s", poll_s),
                       ("request_timeout_s", timeout_s), ("torch_threads", threads)):
        if value is not None:
            raw[key] = value
    if no_batching:
        raw["batching"] = False
    if map_:
        raw["maps"] = [*raw.get("maps", []), *map_]
    serve_inputs(models, raw, config or "serve options")

    from condgen.serving.app import make_config, run

    run(host=host, port=port, blocking=True, config=make_config(models, **raw))
    return 0


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
