"""HTTP schema of the serving app: bounds live here so bad input is a 4xx, not a 5xx."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 64


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: int = Field(..., ge=0, le=1_000_000, description="class to generate")
    n: int = Field(4, ge=1, le=MAX_N, description="number of images")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="RNG seed; the same seed gives the same images")


class GenerateResponse(BaseModel):
    model: str
    version: str
    label: int
    n: int
    seed: int
    images: list[str] = Field(description="base64-encoded PNGs")


class Health(BaseModel):
    status: str
    model: str
    version: str
