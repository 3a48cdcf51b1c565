"""Ray Serve entry points for config-driven deploys.

* ``app``: the application builder that ``serve run`` / ``serve deploy`` call with a config file's
  ``args`` (``infra/ray/serve_config.yaml``; a KubeRay ``RayService``'s ``serveConfigV2``,
  infra/k8s/rayservice.yaml): ``import_path: condgen.serving.builder:app``. ``args`` holds ``models``
  (a list of ``models:/NAME@alias`` URIs or ``serving.config.ModelSpec`` mappings; ``model_uri`` for one),
  optional ``tracking_uri`` (default ``MLFLOW_TRACKING_URI``), and any other ``ServeConfig`` field; an
  unknown key is a one-line error naming the valid ones. Also ``serve run condgen.serving.builder:app
  models=models:/NAME@champion`` (``key=value`` args).
* ``pretrained``: the builder of the pretrained-pipeline app (many LoRA adapters on one base,
  ``serving/pretrained_app.py``): ``import_path: condgen.serving.builder:pretrained`` with ``args``
  ``base`` (a pipeline folder or ``s3://`` prefix), ``adapters`` (name -> URI) and any other
  ``PretrainedServeConfig`` field.
* ``application``: the default application (``models:/condgen-cvae@champion``), built when first read, for
  ``serve build condgen.serving.builder:application`` (which wants an application, not a builder) and
  ``serve run condgen.serving.builder:application``.

Replicas and autoscaling are Serve's own deployment options in the config file
(``deployments: [{name: CondgenService, autoscaling_config: ...}]``), applied by Serve over the code's.

The body limits and the API key are enforced in Serve's HTTP proxy only when the proxy starts with
``serving/proxy_guard.py``'s callback: a config file gives it in its top-level ``controller_options:
{runtime_env: {env_vars: {RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: "condgen.serving.proxy_guard:middlewares",
CONDGEN_PROXY_GUARD: ...}}}`` (``proxy_guard.env_vars(app.proxy_policy(config))`` gives both; without
``CONDGEN_PROXY_GUARD``, the model app's default limits and no key). Without it the replica's guard is
the only one, as before.
"""
from __future__ import annotations

from typing import Any

from condgen.serving.app import build_app


def app(args: dict[str, Any]):
    """The condgen application for a Serve config's ``args`` (see the module docstring)."""
    args = dict(args or {})
    models = args.pop("models", None)
    uri = args.pop("model_uri", None)
    return build_app(models or uri, args.pop("tracking_uri", None), **args)


def pretrained(args: dict[str, Any]):
    """The pretrained-pipeline application for a Serve config's ``args`` (``base``, ``adapters``, options)."""
    from condgen.serving.pretrained_app import build_app as build_pretrained
    from condgen.serving.pretrained_app import make_config

    args = dict(args or {})
    if not args.get("base"):
        raise ValueError("pretrained serve config: args.base is required (a diffusers pipeline folder or s3:// prefix)")
    return build_pretrained(make_config(args.pop("base"), args.pop("adapters", None), **args))


def __getattr__(name: str):
    if name == "application":  # built on first read: importing this module for ``app`` builds nothing
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
