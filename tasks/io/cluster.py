"""One way to reach Ray: every step (training, embedding, batch generation, health checks,
the service) connects through :func:`ensure_ray`, so they all honour ``RAY_ADDRESS`` and the
dashboard setting the same way."""
from __future__ import annotations

import os

import ray

from condgen.tasks.io import settings


def dashboard_enabled() -> bool:
    """Ray's dashboard is opt-in (``CONDGEN_RAY_DASHBOARD=1``): off by default on every step."""
    return os.environ.get("CONDGEN_RAY_DASHBOARD", "").strip().lower() in ("1", "true", "yes")


def ensure_ray(address: str | None = None, *, log_to_driver: bool = False) -> bool:
    """Connect to Ray once per process (``RAY_ADDRESS``, else a fresh local instance).
    Returns True when this call started the connection (the caller may then shut it down)."""
    if ray.is_initialized():
        return False
    ray.init(address=address or settings.ray_address(), include_dashboard=dashboard_enabled(),
             log_to_driver=log_to_driver, ignore_reinit_error=True)
    return True
