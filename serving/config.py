"""Serving configuration: which registry models a replica serves, and how (``ServeConfig``), and how many
replicas serve them (``Deployment``: a fixed count or Ray Serve's autoscaling).

``ServeConfig`` travels to every replica (it is the deployment's init argument) and holds no secret;
``Deployment`` stays with the driver and becomes Ray Serve deployment options. Both refuse unknown keys;
``config_error`` turns a ``ValidationError`` into one line that names the valid keys.
"""
from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# per replica: a replica batches concurrent requests into one forward pass (serving/batcher.py), so it
# should hold many of them before Serve adds a replica (Ray's own default target, 2, suits one-at-a-time models)
TARGET_ONGOING_REQUESTS = 32.0


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str = Field(..., description="models:/NAME@ALIAS or models:/NAME/VERSION")
    name: str | None = Field(None, description="name in the API; default: the registered name")
    classifier: str | None = Field(None, description="noise-aware classifier for classifier guidance (URI)")
    adapters: dict[str, str] = Field(default_factory=dict,
                                   description="LoRA adapter name -> storage folder URI or models:/NAME@alias")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec]
    tracking_uri: str | None = None
    clip: str | None = Field(None, description="load_clip spec: text prompts and CLIP guidance")
    judge: str | None = Field(None, description="classifier URI for the output safety check (label match)")
    judge_min_prob: float = 0.5
    deny_list: list[str] | None = Field(None, description="prompt deny-list; default: CONDGEN_DENYLIST or built-in")
    batching: bool = True
    max_batch: int = Field(32, ge=1, le=1024, description="samples per forward pass")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000)
    max_queue: int = Field(1024, ge=1, description="queued samples before 503")
    request_timeout_s: float = Field(60.0, gt=0)
    poll_s: float = Field(30.0, ge=0, description="registry alias poll period; 0 = never")
    torch_threads: int = Field(1, ge=1, le=256)
    api_key_sha256: str | None = Field(None, description="sha256 of the API key (never the key itself)")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024,
                                description="largest request body, counted while it streams (413 beyond); the "
                                            "largest valid body (a 512 KiB base64 image) fits with room to spare")
    maps: list[str] = Field(default_factory=list,
                            description="fitted latent maps (tasks.map_latents.load_map URIs: runs:/…, s3://…, a "
                                        "folder); /v1/map uses the one fitted on the loaded models' weights")


class PretrainedServeConfig(BaseModel):
    """One replica serving a user's pretrained pipeline with many LoRA adapters (``serving/pretrained_app.py``):
    the base is loaded once, adapters lazily into an LRU of ``max_adapters`` (Ray Serve model multiplexing)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(..., description="a diffusers-layout pipeline folder or s3:// prefix (safetensors only)")
    adapters: dict[str, str] = Field(default_factory=dict,
                                     description="adapter name -> storage folder or models:/NAME@alias; requests "
                                                 "may also name any registered models:/ adapter")
    max_adapters: int = Field(4, ge=1, le=256, description="adapters kept per replica (LRU)")
    device: str = Field("cpu", description="torch device of the replica: cpu, cuda, cuda:0, ...")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    tracking_uri: str | None = None
    batching: bool = True
    max_batch: int = Field(16, ge=1, le=1024, description="images per forward pass")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000)
    max_queue: int = Field(256, ge=1, description="queued images before 503")
    request_timeout_s: float = Field(120.0, gt=0)
    torch_threads: int = Field(1, ge=1, le=256)
    api_key_sha256: str | None = Field(None, description="sha256 of the API key (never the key itself)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)


class Autoscaling(BaseModel):
    """Ray Serve's ``autoscaling_config``: replicas between ``min_replicas`` and ``max_replicas``, added when
    a replica holds more than ``target_ongoing_requests``. Ray's other keys (``upscale_delay_s``, ...) pass
    through to Ray, which checks them."""

    model_config = ConfigDict(extra="allow")

    min_replicas: int = Field(1, ge=0, le=1024)
    max_replicas: int = Field(..., ge=1, le=1024)
    target_ongoing_requests: float = Field(TARGET_ONGOING_REQUESTS, gt=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class Deployment(BaseModel):
    """How many replicas serve the app, and what each one reserves: the Ray Serve deployment options
    that ``condgen serve`` takes from its flags and from a Serve config file."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | Literal["auto"] | None = Field(None, description="a fixed count (default 1), or 'auto'")
    autoscaling_config: Autoscaling | None = None
    num_cpus: float | None = Field(None, ge=0, description="CPUs reserved per replica (default 0.5)")
    num_gpus: float | None = Field(None, ge=0, description="GPUs reserved per replica (default 0)")

    @model_validator(mode="after")
    def _one_way(self):
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise ValueError("give a fixed number of replicas or autoscaling (min/max replicas), not both")
        if isinstance(self.num_replicas, int) and self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        return self

    def override(self, **flags: Any) -> Deployment:
        """These options with ``flags`` on top (None = not given): a fixed count replaces autoscaling and
        the other way round; autoscaling flags update the file's ``autoscaling_config`` key by key."""
        data = self.model_dump(exclude_none=True)
        scale = {k: flags[k] for k in ("min_replicas", "max_replicas", "target_ongoing_requests")
                 if flags.get(k) is not None}
        if flags.get("num_replicas") is not None:
            data.pop("autoscaling_config", None)
            data["num_replicas"] = flags["num_replicas"]
        if scale:
            data.pop("num_replicas", None)
            data["autoscaling_config"] = {**data.get("autoscaling_config", {}), **scale}
        data.update({k: flags[k] for k in ("num_cpus", "num_gpus") if flags.get(k) is not None})
        return Deployment.model_validate(data)

    def options(self) -> dict[str, Any]:
        """``Deployment.options(**...)`` keywords for the replica count (actor options: ``actor_options``)."""
        if self.autoscaling_config is not None:
            return {"autoscaling_config": self.autoscaling_config.model_dump()}
        return {"num_replicas": self.num_replicas} if self.num_replicas is not None else {}

    def actor_options(self) -> dict[str, float]:
        return {k: v for k, v in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus)) if v is not None}

    def describe(self) -> str:
        if self.autoscaling_config is not None:
            a = self.autoscaling_config
            return (f"autoscaling {a.min_replicas}-{a.max_replicas} replicas (target {a.target_ongoing_requests:g} "
                    "ongoing requests each)")
        n = self.num_replicas if self.num_replicas is not None else 1
        return "replicas: auto" if n == "auto" else f"{n} replica{'s' if n != 1 else ''}"


def config_error(exc: ValidationError, where: str) -> str:
    """A ``ServeConfig`` / ``ModelSpec`` / ``Deployment`` ``ValidationError`` as one line: an unknown key with
    the valid ones, else the first problem (its input cut to an excerpt), and the count of the rest."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        model = {"ServeConfig": ServeConfig, "Deployment": Deployment,
                 "PretrainedServeConfig": PretrainedServeConfig}.get(exc.title, ModelSpec)
        if exc.title == "ServeConfig" and loc[0] == "models" and len(loc) > 2:
            model = ModelSpec
        return f"{where}: unknown key {'.'.join(loc)!r}; valid keys: {', '.join(model.model_fields)}{more}"
    shown = repr(first.get("input"))
    shown = shown if len(shown) <= 64 else shown[:64] + "…"
    return f"{where}: {'.'.join(loc) or '(top level)'}: {first['msg']}, got {shown}{more}"


def api_key_digest(key: str) -> str:
    """The sha256 of an API key: the only form of the key that travels to the replicas."""
    return hashlib.sha256(key.encode()).hexdigest()
