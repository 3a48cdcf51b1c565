"""Serving configuration: which registry models a replica serves, and how (``ServeConfig``)."""
from __future__ import annotations

import hashlib

from pydantic import BaseModel, Field


class ModelSpec(BaseModel):
    uri: str = Field(..., description="models:/NAME@ALIAS or models:/NAME/VERSION")
    name: str | None = Field(None, description="name in the API; default: the registered name")
    classifier: str | None = Field(None, description="noise-aware classifier for classifier guidance (URI)")
    adapters: dict[str, str] = Field(default_factory=dict,
                                   description="LoRA adapter name -> storage folder URI or models:/NAME@alias")


class ServeConfig(BaseModel):
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


def api_key_digest(key: str) -> str:
    """The sha256 of an API key: the only form of the key that travels to the replicas."""
    return hashlib.sha256(key.encode()).hexdigest()
