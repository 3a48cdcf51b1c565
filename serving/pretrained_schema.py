"""HTTP schema of the pretrained-pipeline service (``serving/pretrained_app.py``): bounded fields, unknown
fields refused, as ``serving/schema.py`` does for the model service."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictInt

from condgen.serving.schema import MAX_IMAGE_B64, MAX_PROMPT, MAX_SEED, MAX_TIMEOUT_S, _Strict

MAX_N = 8
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SIZE = 1024
MAX_ADAPTER = 300

ADAPTER_DOC = ("a configured adapter name (GET /v1/models), or a registered adapter models:/NAME@ALIAS or "
               "models:/NAME/VERSION; omit for the bare base. The header serve_multiplexed_model_id may name it "
               "instead (Ray Serve then routes the request to a replica that holds it)")


class PretrainedGenerate(_Strict):
    prompt: str = Field(..., max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT, description="guided away from (replaces the empty "
                                                                        "prompt of classifier-free guidance)")
    adapter: str | None = Field(None, min_length=1, max_length=MAX_ADAPTER, description=ADAPTER_DOC)
    guidance: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE, description="diffusers' guidance_scale: <= 1 unguided")
    steps: StrictInt = Field(20, ge=1, le=MAX_STEPS)
    sampler: Literal["ddim", "dpmpp_2m"] = "ddim"
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="image k of n starts from seed + k")
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    size: StrictInt | None = Field(None, ge=8, le=MAX_SIZE, description="pixels per side; default the base's")
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)


class PretrainedEdit(_Strict):
    image: str = Field(..., min_length=1, max_length=MAX_IMAGE_B64,
                       description="base64 PNG/JPEG/WebP; resized to size x size (RGB)")
    prompt: str = Field(..., max_length=MAX_PROMPT, description="what the edited image shows")
    source_prompt: str = Field("", max_length=MAX_PROMPT, description="what the image shows (ddim_inversion)")
    adapter: str | None = Field(None, min_length=1, max_length=MAX_ADAPTER, description=ADAPTER_DOC)
    method: Literal["sdedit", "ddim_inversion"] = "sdedit"
    strength: float = Field(0.6, ge=0.0, le=1.0, description="sdedit: how far the image is noised (0..1)")
    steps: StrictInt = Field(20, ge=1, le=MAX_STEPS)
    guidance: float = Field(1.0, ge=0.0, le=MAX_GUIDANCE)
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    size: StrictInt | None = Field(None, ge=8, le=MAX_SIZE)
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)


class AdapterInfo(BaseModel):
    name: str | None = Field(description="what the request named (None: the bare base)")
    uri: str | None = Field(None, description="the registry URI or configured name, never a storage path")
    version: str | None = None
    kind: str | None = None


class PretrainedGenerateResponse(BaseModel):
    adapter: AdapterInfo
    base_fingerprint: str
    n: int
    images: list[str] = Field(description="base64 RGB PNGs")
    parameters: dict[str, Any]
    batch: dict[str, int] = Field(default_factory=dict, description="requests and images in the forward pass")
    elapsed_ms: float


class PretrainedEditResponse(BaseModel):
    adapter: AdapterInfo
    base_fingerprint: str
    image: str
    parameters: dict[str, Any]
    elapsed_ms: float


class PretrainedModels(BaseModel):
    base: dict[str, Any] = Field(description="uri, fingerprint, image_size, loads (base.load calls in the replica)")
    adapters: list[str] = Field(description="configured adapter names")
    loaded: list[str] = Field(description="adapters in this replica's LRU, least recently used first")
    adapter_loads: dict[str, int] = Field(description="adapter -> times read from storage by this replica")
    max_adapters: int
