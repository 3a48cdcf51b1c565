"""The parameter models of condgen's flows, in a module that imports only pydantic.

``RetrainParams`` (with ``TrainSpec``, ``GateParams``, ``ReportParams``) and
``BatchGenerateParams`` are what a params file, a Prefect deployment or the UI hands to
``flows/retrain.py`` and ``flows/batch_generate.py``. They live here, away from Prefect,
Ray and torch, so the CLI validates a params file (``extra="forbid"``: a typo such as
``"modles"`` is an error, never ignored) in milliseconds, before anything heavy starts
(``condgen/commands/checks.py``). The flows re-export them. The checks of model names and config
keys (``condgen.models.configs``, torch-free too) and of the MLflow registry stay in ``checks.py``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The diffusion samplers of tasks/generation/sampling.py (SAMPLERS), spelt out so that this module imports no
# torch; tests/test_prefect_conventions.py checks they match.
Sampler = Literal["ddim", "ddpm", "dpmpp_2m"]
SAMPLER_HELP = ("diffusion sampler: ddim (Song et al. 2021; eta 0 = deterministic), ddpm (ancestral, Ho et al. "
                "2020) or dpmpp_2m (DPM-Solver++(2M), Lu et al. 2022: few steps, deterministic)")


class TrainSpec(BaseModel):
    """One model to train in a retrain run (``RetrainParams.models``)."""

    model_config = ConfigDict(extra="forbid")  # a typo in a params file is an error, not ignored
    name: str = Field("cvae", description="a key of models.registry.MODELS")
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the model's config dataclass")
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536, description="the GLOBAL batch: samples per optimiser step over all "
                            "workers; num_workers only splits it (tasks/training/batching.py)")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="'none': config.lr is the rate for batch_size; 'linear'/'sqrt': scale it by "
        "batch_size / lr_reference_batch (or its square root)")
    lr_reference_batch: int | None = Field(None, ge=1, le=65_536,
                                           description="the global batch config.lr was tuned for (with lr_scaling)")
    lr_warmup_steps: int = Field(0, ge=0, le=1_000_000,
                                 description="optimiser steps over which the rate ramps up to the scaled one")
    registered_name: str | None = Field(None, description="MLflow registry name; default condgen-<name>")
    source_b: str | None = Field(None, description="second, unpaired domain (CycleGAN), e.g. bundled:uci_digits")
    grid_every: int = Field(1, ge=0, le=10_000, description="log a sample grid every N epochs (0: never)")
    data_mode: Literal["auto", "memory", "stream"] = Field(
        "auto", description="'memory': decode the split into each worker; 'stream': read shards through a shuffle "
        "buffer (memory bounded by buffers); 'auto': stream when the decoded split is large")
    stream_buffer: int | None = Field(None, ge=1, le=10_000_000, description="shuffle-buffer samples (stream)")
    loader_threads: int | None = Field(None, ge=1, le=64, description="decode threads per worker (stream)")
    stream_sharding: Literal["global", "span"] = Field(
        "global", description="'global': a streamed step takes the same samples for any num_workers; 'span': each "
        "worker reads only its span of shards (less IO; the model changes with num_workers)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="'bf16': autocast; weights stay fp32")
    grad_accumulation: int = Field(1, ge=1, le=1024, description="micro-batches per worker per optimiser step "
                                   "(models with one optimiser)")
    checkpoint_every_steps: int = Field(0, ge=0, le=10_000_000, description="also checkpoint every N optimiser "
                                        "steps (exact mid-epoch resume); 0: at the end of each epoch only")


class GateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a params file is an error, not ignored
    min_accuracy: float = Field(0.8, ge=0, le=1)
    tolerance: float = Field(0.0, ge=0, le=1)


class ReportParams(BaseModel):
    """The evaluation report written after all models (tasks/judging/report.py)."""

    model_config = ConfigDict(extra="forbid")  # a typo in a params file is an error, not ignored
    enabled: bool = True
    exploration: bool = Field(True, description="interpolation strips + attribute edits/leakage (first CVAE)")
    latent_maps: bool = Field(True, description="linear maps between every pair of models with a latent space")
    map_support: list[int] = Field(default_factory=lambda: [10, 100, 1000], description="support-set sizes")
    map_mode: str = Field("generated", pattern="^(real|generated)$",
                          description="support points: real images embedded in both spaces (a GAN side costs an "
                                      "inversion per image), or generated by one model and embedded in the other")
    map_test: int = Field(200, ge=1, le=100_000)
    inversion_steps: int = Field(100, ge=1, le=10_000)
    curves: dict[str, Any] = Field(default_factory=dict,
                                   description="optional curves {title: {series: {x: y}}}, e.g. accuracy vs guidance")


class RetrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a params file is an error, not ignored
    source: str = "bundled:mnist"
    shards_uri: str | None = Field(None, description="default: <storage>/shards/<source>")
    limit: int | None = Field(None, ge=1, description="ingest at most this many samples (tests, smoke runs)")
    shard_size: int = Field(1000, ge=1)
    image_size: int | None = Field(28, ge=8, le=1024, description="side of the stored square images; None infers "
                                   "it from the data (most common longer side, at most 64)")
    mode: str = Field("auto", pattern="^(auto|L|RGB)$", description="colour mode of the shards: auto (the "
                      "majority of the files), L (greyscale) or RGB")
    resize: str = Field("pad", pattern="^(pad|center_crop|resize)$", description="how non-square images become "
                        "square: pad (centred), center_crop or resize (stretch)")
    background: str = Field("white", description="colour transparency is composited onto and colour images are "
                            "padded with: white, black, #rrggbb or r,g,b")
    num_classes: int | None = Field(None, ge=1, description="None infers it: the number of class names, or 10 "
                                    "for integer labels")
    invert: str = Field("never", pattern="^(never|auto)$", description="auto: MNIST polarity for greyscale "
                        "digit scans (dark ink on paper is inverted)")
    models: list[TrainSpec] = Field(default_factory=lambda: [TrainSpec()])
    num_workers: int = Field(2, ge=1, le=1024)
    seed: int = 0
    eval_per_class: int = Field(100, ge=1, le=10_000)
    judge_epochs: int = Field(4, ge=1, le=100)
    gate: GateParams = Field(default_factory=GateParams)
    experiment: str = "condgen"
    report: ReportParams = Field(default_factory=ReportParams)
    clip: str | None = Field("embedded", description="CLIP for the embed step: 'embedded' (fitted on the data, "
                             "no download), a local/s3 checkpoint, or NAME:TAG; None skips embedding")
    clip_fit_steps: int = Field(300, ge=1, le=1_000_000, description="training steps of the embedded CLIP")

    def ingest_options(self) -> dict[str, Any]:
        """The keyword arguments of ``ingest`` this run sets (sources A and B alike)."""
        return {"shard_size": self.shard_size, "seed": self.seed, "limit": self.limit, "image_size": self.image_size,
                "mode": self.mode, "resize": self.resize, "background": self.background,
                "num_classes": self.num_classes, "invert": self.invert}


class BatchGenerateParams(BaseModel):
    """The ``batch_generate`` flow's parameters (``flows/batch_generate.py``; ``condgen generate``)."""

    model_config = ConfigDict(extra="forbid")  # a typo in a params file is an error, not ignored
    model_uri: str = Field("models:/condgen-cvae@champion", description="models:/NAME@ALIAS or models:/NAME/VERSION")
    out_uri: str | None = Field(None, description="default: <storage>/generated/<model>-<job fingerprint>")
    labels: list[int] = Field(default_factory=lambda: list(range(10)), max_length=10_000)
    prompts: list[str] = Field(default_factory=list, max_length=10_000)
    seeds_per_condition: int = Field(8, ge=1, le=1_000_000)
    seed_base: int = Field(0, ge=0, le=2**31 - 1)
    guidance: Literal["none", "cfg"] = "none"
    scale: float = Field(0.0, ge=0, le=50)
    sampler: Sampler = Field("ddim", description=SAMPLER_HELP)
    steps: int | None = Field(None, ge=1, le=1000)
    eta: float = Field(0.0, ge=0, le=1)
    shard_size: int = Field(256, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1, le=4096)
    watermark: bool = True
    judge_uri: str | None = Field(None, description="classifier for the output safety check")
    judge_min_prob: float = Field(0.5, ge=0, le=1)
    deny_list: list[str] | None = None
    use_ray: bool = True

    @model_validator(mode="after")
    def _some_condition(self):
        if not self.labels and not self.prompts:
            raise ValueError("give at least one label or prompt")
        if any(not 0 <= v <= 1_000_000 for v in self.labels):
            raise ValueError("labels must be in [0, 1000000]")
        return self
