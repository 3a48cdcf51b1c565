"""One way to reach Ray: every step (training, embedding, batch generation, health checks,
the service) connects through :func:`ensure_ray`, so they all honour ``RAY_ADDRESS`` and the
dashboard setting the same way, and show the same amount of Ray's own output.

Ray's own noise stays out of the default view while its errors still show: the driver's
``ray`` logger at WARNING (no "Started a local Ray instance" banner; warnings and errors
remain), worker output not copied to the driver unless asked (``log_to_driver``: the
service wants its replicas' logs; Ray Train's "Checkpoint successfully created" lines
come from its workers, and a failed task's traceback still reaches the driver as the
raised exception), and on a local instance no preemption watcher (there is no node to
drain on one machine). ``CONDGEN_RAY_VERBOSE=1`` restores Ray's defaults for debugging.
"""
from __future__ import annotations

import logging
import os

import ray

from condgen.tasks.io import settings

VERBOSE_ENV = "CONDGEN_RAY_VERBOSE"
# Ray Train V2 settings that only add output on one machine; set when unset, for local instances only.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}


def dashboard_enabled() -> bool:
    """Ray's dashboard is opt-in (``CONDGEN_RAY_DASHBOARD=1``): off by default on every step."""
    return settings.ray_dashboard()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def init_kwargs(address: str | None = None, *, log_to_driver: bool = False) -> dict:
    """The arguments of ``ray.init`` for ``address`` (default ``RAY_ADDRESS`` or a local instance)."""
    loud = verbose()
    return {"address": address or settings.ray_address(), "include_dashboard": dashboard_enabled(),
            "log_to_driver": log_to_driver or loud, "logging_level": logging.INFO if loud else logging.WARNING,
            "ignore_reinit_error": True}


def ensure_ray(address: str | None = None, *, log_to_driver: bool = False) -> bool:
    """Connect to Ray once per process (``RAY_ADDRESS``, else a fresh local instance).
    Returns True when this call started the connection (the caller may then shut it down)."""
    if ray.is_initialized():
        return False
    kwargs = init_kwargs(address, log_to_driver=log_to_driver)
    if kwargs["address"] == "local" and not verbose():
        for key, value in LOCAL_RAY_ENV.items():  # inherited by the raylet and workers this call starts
            os.environ.setdefault(key, value)
    ray.init(**kwargs)
    return True
