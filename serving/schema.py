"""HTTP schema of the serving app: bounds live here so bad input is a 4xx, not a 5xx.

``GenerateRequest`` / ``GenerateResponse`` / ``Health`` are the original ``/generate``
contract; the ``*V1`` models are the ``/v1`` API. Every number has bounds, every string a
length limit, floats must be finite, unknown fields are refused (``extra="forbid"``).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StringConstraints, model_validator

MAX_N = 64
MAX_SEED = 2**31 - 1
MAX_STEPS = 1000  # also capped by the model's own T
MAX_EDIT_STEPS = 50  # inversion + sampling per step, and null-text's inner optimisation
MAX_PROMPT = 200
MAX_NAME = 128
MAX_IMAGE_B64 = 512 * 1024  # characters of base64 (~384 KiB of PNG)
MAX_IMAGE_SIDE = 256  # decoded pixels per side; resized to the model's size after decoding
MAX_FRAMES = 32
MAX_LATENT = 4096
MAX_SCALE = 50.0
MAX_TIMEOUT_S = 300.0


# The upload policy of tasks/generation/inputs.py, as the OpenAPI description of every image input.
UPLOAD_POLICY = (
    f"base64 PNG, JPEG or WebP (no other format, one still image), greyscale or colour, at most {MAX_IMAGE_SIDE} "
    "px per side (checked on the header, before decoding). It is decoded to the served model's channels "
    "(GET /v1/models: channels, image_size): "
    "for a 1-channel model a colour image becomes luma (PIL 'L', alpha ignored); for a 3-channel model a "
    "greyscale image is replicated to RGB and transparency is composited onto white. Any other size is "
    "resized (stretched, bilinear) to image_size x image_size: send a square image to avoid distortion.")


def _not_blank(text: str) -> str:
    """A prompt of whitespace only is refused: CLIP would encode it as an empty caption, an image of nothing
    in particular, and a label model finds no class in it."""
    if not text.strip():
        raise ValueError("the prompt is blank: describe the image in words, e.g. 'a small red circle'")
    return text


# every prompt field: 1..MAX_PROMPT characters, then not blank
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT), AfterValidator(_not_blank)]


class _Strict(BaseModel):
    """A request body: unknown fields refused, floats finite, integers JSON integers (StrictInt: no
    ``true``/``false``, no "3")."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


# -- errors ----------------------------------------------------------------------------------
class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where: ['body', field, ...]")
    msg: str
    type: str
    input: Any = Field(None, description="the offending value, or its first 64 characters and an ellipsis")
    ctx: dict[str, Any] | None = None


class ErrorList(BaseModel):
    """Every 422: a list of errors (pydantic's shape, also for the service's own checks)."""

    detail: list[ErrorItem]


# -- the original endpoint -------------------------------------------------------------------
class GenerateRequest(_Strict):
    label: StrictInt = Field(..., ge=0, le=1_000_000, description="class to generate")
    n: StrictInt = Field(4, ge=1, le=MAX_N, description="number of images")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="RNG seed; the same seed gives the same images")


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
    models: dict[str, str] = Field(default_factory=dict, description="every loaded model -> version")


# -- /v1 -------------------------------------------------------------------------------------
class _Condition(_Strict):
    label: StrictInt | None = Field(None, ge=0, le=1_000_000, description="class label (label-conditioned models)")
    prompt: Prompt | None = Field(None, description="text prompt (text models; label models accept a prompt naming a "
                                                 "digit)")

    @model_validator(mode="after")
    def _one_condition(self):
        if (self.label is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'label' or 'prompt'")
        return self


class GenerateV1(_Condition):
    model: str | None = Field(None, min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9._@/:-]+$",
                              description="a name from GET /v1/models; default: the first loaded model")
    adapter: str | None = Field(None, min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9._-]+$",
                                description="a LoRA adapter of that model (GET /v1/models lists them)")
    negative_label: StrictInt | None = Field(None, ge=0, le=1_000_000, description="CFG: guide away from this class")
    negative_prompt: Prompt | None = Field(None, description="CFG: guide away from this text")
    guidance: Literal["none", "cfg", "classifier", "clip"] = "none"
    scale: float = Field(0.0, ge=0.0, le=MAX_SCALE, description="guidance weight w (CFG: (1+w) eps_c - w eps_u)")
    sampler: Literal["ddim", "ddpm", "dpmpp_2m"] = "ddim"
    steps: StrictInt | None = Field(None, ge=1, le=MAX_STEPS, description="sampling steps; default: the model's")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0 = deterministic)")
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="one RNG for all n images (default 0)")
    seeds: list[StrictInt] | None = Field(None, min_length=1, max_length=MAX_N,
                                    description="one image per seed, each from its own RNG")
    n: StrictInt | None = Field(None, ge=1, le=MAX_N, description="images (default 1, or len(seeds))")
    timeout_s: float | None = Field(None, gt=0.0, le=MAX_TIMEOUT_S, description="give up after this long (504)")

    @model_validator(mode="after")
    def _seeds(self):
        if self.seeds is not None:
            if self.seed is not None:
                raise ValueError("give 'seed' or 'seeds', not both")
            if any(not 0 <= s <= MAX_SEED for s in self.seeds):
                raise ValueError(f"seeds must be in [0, {MAX_SEED}]")
            if self.n is not None and self.n != len(self.seeds):
                raise ValueError(f"n={self.n} but {len(self.seeds)} seeds")
        if self.negative_label is not None and self.negative_prompt is not None:
            raise ValueError("give at most one of 'negative_label' or 'negative_prompt'")
        if (self.negative_label is not None or self.negative_prompt is not None) and self.guidance != "cfg":
            raise ValueError("a negative condition needs guidance='cfg'")
        return self


class Safety(BaseModel):
    blocked: int = 0
    reasons: dict[str, int] = Field(default_factory=dict)


class GenerateV1Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    registered_name: str
    version: str
    run_id: str
    adapter: str | None
    n: int = Field(description="images returned (requested minus blocked)")
    images: list[str] = Field(description="base64-encoded PNGs")
    parameters: dict[str, Any] = Field(description="the exact parameters used, defaults resolved")
    safety: Safety
    batch: dict[str, int] = Field(description="requests and samples in the forward pass this request rode in")
    elapsed_ms: float


class EditV1(_Strict):
    model: str | None = Field(None, min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9._@/:-]+$")
    image: str = Field(..., min_length=8, max_length=MAX_IMAGE_B64, description=UPLOAD_POLICY)
    source_label: StrictInt | None = Field(None, ge=0, le=1_000_000)
    source_prompt: Prompt | None = None
    target_label: StrictInt | None = Field(None, ge=0, le=1_000_000)
    target_prompt: Prompt | None = None
    method: Literal["ddim_inversion", "null_text", "sdedit"] = "sdedit"
    strength: float = Field(0.6, ge=0.0, le=1.0, description="sdedit: noise level t0 = strength * T")
    scale: float = Field(0.0, ge=0.0, le=20.0, description="CFG weight while re-generating (null_text needs > 0)")
    steps: StrictInt = Field(20, ge=1, le=MAX_EDIT_STEPS)
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    timeout_s: float | None = Field(None, gt=0.0, le=MAX_TIMEOUT_S)

    @model_validator(mode="after")
    def _conditions(self):
        if (self.source_label is None) == (self.source_prompt is None):
            raise ValueError("give exactly one of 'source_label' or 'source_prompt'")
        if (self.target_label is None) == (self.target_prompt is None):
            raise ValueError("give exactly one of 'target_label' or 'target_prompt'")
        return self


class EditV1Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    version: str
    image: str
    parameters: dict[str, Any]
    elapsed_ms: float


class InterpolateV1(_Condition):
    model: str | None = Field(None, min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9._@/:-]+$")
    seed_a: StrictInt = Field(0, ge=0, le=MAX_SEED)
    seed_b: StrictInt = Field(1, ge=0, le=MAX_SEED)
    latent_a: list[float] | None = Field(None, min_length=1, max_length=MAX_LATENT,
                                         description="explicit latent (CVAE/GAN: latent_dim numbers); overrides seed_a")
    latent_b: list[float] | None = Field(None, min_length=1, max_length=MAX_LATENT)
    frames: StrictInt = Field(8, ge=2, le=MAX_FRAMES)
    method: Literal["linear", "slerp"] = "slerp"
    steps: StrictInt | None = Field(None, ge=1, le=MAX_STEPS, description="diffusion: DDIM steps per frame")
    scale: float = Field(0.0, ge=0.0, le=MAX_SCALE, description="diffusion: CFG weight")
    timeout_s: float | None = Field(None, gt=0.0, le=MAX_TIMEOUT_S)


class InterpolateV1Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    version: str
    images: list[str]
    parameters: dict[str, Any]
    elapsed_ms: float


class MapV1(_Strict):
    source_model: str = Field(..., min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9._@/:-]+$")
    target_model: str = Field(..., min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9._@/:-]+$")
    label: StrictInt | None = Field(None, ge=0, le=1_000_000)
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    latent: list[float] | None = Field(None, min_length=1, max_length=MAX_LATENT)


class MapV1Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    source_model: str
    source_version: str
    target_model: str
    target_version: str
    label: int
    seed: int | None
    latent_source: list[float]
    latent_target: list[float]
    images: dict[str, str]  # "source", "target": base64 PNG
    map: dict[str, Any]
    elapsed_ms: float


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    registered_name: str
    uri: str | None = Field(description="the registry URI served (models:/NAME@ALIAS or /VERSION); null for a "
                                        "checkpoint folder (storage paths are never shown)")
    version: str
    run_id: str
    adapters: list[str]
    classifier_guidance: bool
    loaded_at: float
    channels: int = Field(description="1: greyscale PNGs (mode L); 3: colour PNGs (mode RGB)")
    image_size: int = Field(description="images are image_size x image_size pixels")
    info: dict[str, Any]


class ModelsV1Response(BaseModel):
    models: list[ModelInfo]
    clip: bool = Field(description="a CLIP model is loaded (text prompts for text models, CLIP guidance)")
    safety: dict[str, Any]
    batching: dict[str, Any]
