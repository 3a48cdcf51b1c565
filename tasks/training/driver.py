"""Train one conditional model with Ray Train (``TorchTrainer``), tracked in MLflow: the driver side.

``train(TrainRequest)`` fits the model config to the data (``tasks.training.data_config``: channels,
image size and classes from the shard manifest, unless the spec sets them, when a disagreement is an
error here, before Ray starts) and validates it, opens one MLflow run, runs the worker
loop of ``tasks/training/worker.py`` on ``num_workers`` Ray Train workers (``batch_size`` is the global batch,
split over them: ``tasks/training/batching.py``), copies the final
checkpoint (``model.safetensors`` + ``config.json``; the adapter files of a LoRA run) to
storage and the run's artifacts, and returns the per-epoch history the workers logged. The request's
``precision``, ``grad_accumulation``, ``checkpoint_every_steps`` and data options (``data_mode``,
``stream_buffer``, ``loader_threads``, ``stream_sharding``) are checked here, before Ray starts, and logged as MLflow params.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import pyarrow.fs
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import save as st_save

from condgen.models.base import config_to_dict, flatten_params, json_normalised
from condgen.models.registry import build_model, recipe_config
from condgen.tasks.data.splits import dataset_info
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io import cluster, settings, storage, tracking
from condgen.tasks.io.cluster import ensure_ray
from condgen.tasks.io.model_store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_model_uri, register
from condgen.tasks.io.shards import read_manifest
from condgen.tasks.training import batching
from condgen.tasks.training.adapters import prepare, served_parameters, trained_adapter_parameters
from condgen.tasks.training.data_config import fit_to_data
from condgen.tasks.training.loader import MODES, SHARDINGS
from condgen.tasks.training.watch import progress_lines
from condgen.tasks.training.worker import PRECISIONS, check_options, group_lrs, train_loop_per_worker


# -- requests and results ----------------------------------------------------------------
@dataclass
class TrainRequest:
    model: str
    shards_uri: str
    # The spec's config: in_channels / image_size / num_classes (and a frozen part's architecture) come
    # from the data and its *_uri checkpoints when left out (tasks.training.data_config.fit_to_data).
    model_config: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    # The GLOBAL batch: samples per optimiser step, summed over all workers. The worker count only
    # splits it (tasks.training.batching): 1 and N workers take the same optimiser steps on the same data.
    batch_size: int = 128
    num_workers: int = 2
    # The learning rate: the config's lr is the rate for this global batch ("none", the default). To
    # train with another global batch than the rate was tuned for, "linear" (x G/reference) or "sqrt"
    # (x sqrt(G/reference), suited to Adam) scales it relative to lr_reference_batch, ramping up from the
    # config's rate over lr_warmup_steps optimiser steps (Goyal et al. 2017).
    lr_scaling: str = "none"
    lr_reference_batch: int | None = None
    lr_warmup_steps: int = 0
    seed: int = 0
    embeddings: str | None = None  # CLIP fingerprint of precomputed embeddings (text conditioning)
    latents: str | None = None  # autoencoder fingerprint of precomputed latents (latent diffusion)
    shards_b_uri: str | None = None  # a second, unpaired domain (CycleGAN)
    experiment: str = "condgen"
    run_name: str | None = None
    max_failures: int = 2
    fail_at_epoch: int | None = None  # fault injection (tests only): a worker dies in this epoch
    fail_at_step: int | None = None  # fault injection (tests only): a worker dies after this optimiser step
    # Checkpoints: at each epoch's end, and every this many optimiser steps inside an epoch (0: epoch ends
    # only). Each records the data position and every RNG state: a resumed run continues exactly.
    checkpoint_every_steps: int = 0
    precision: str = "fp32"  # "bf16": autocast around the forward (CPU and CUDA); weights stay fp32
    # Micro-batches per worker per optimiser step (memory: the same global batch in smaller pieces);
    # models with one optimiser group only (not GANs).
    grad_accumulation: int = 1
    # Training data (tasks/training/loader.py): "memory" decodes the split into each worker, "stream" reads
    # shards through a shuffle buffer of stream_buffer samples with loader_threads decoders, "auto" picks
    # by the split's decoded size. None = the loader's default. stream_sharding "global": every streamed step
    # takes the same samples for any num_workers; "span": each worker reads only its span (less IO, but the
    # model changes with num_workers).
    data_mode: str = "auto"
    stream_buffer: int | None = None
    loader_threads: int | None = None
    stream_sharding: str = "global"
    grid_every: int = 1
    use_gpu: bool = False
    # Cluster placement. None = one CPU per worker (plus the GPU when use_gpu). A custom
    # resource that only some nodes advertise pins workers to that node group, e.g.
    # {"CPU": 1, "trainer": 1}; "SPREAD"/"STRICT_SPREAD" puts workers on different nodes.
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: str = "PACK"
    # Where Ray Train keeps run state and checkpoints; None = settings.ray_storage().
    # Must be shared by all nodes on a real multi-node cluster (s3://… or a shared mount).
    storage_path: str | None = None
    # A LoRA adapter run: ``AdapterSpec`` of a trained base; ``model``/``model_config`` are taken
    # from the base and only the adapters train (plus a GAN's critic).
    adapter: AdapterSpec | None = None


@dataclass
class AdapterSpec:
    base: str  # models:/NAME@alias, models:/NAME/3 or a checkpoint folder URI
    targets: list[str]  # layer names (or suffixes) to wrap: nn.Linear / nn.Conv2d / nn.ConvTranspose2d
    rank: int = 4
    alpha: float | None = None  # None = rank (scale 1)
    register_as: str | None = None  # register the adapter in the MLflow registry under this name


@dataclass
class TrainResult:
    run_id: str
    checkpoint_uri: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)  # the model config as trained (fitted to the data), JSON form


# -- the driver ----------------------------------------------------------------------------
def train(req: TrainRequest) -> TrainResult:
    """Run one TorchTrainer fit as one MLflow run; copy the final checkpoint to storage."""
    split = batch_params(req)  # a bad split or LR option fails here, before Ray starts
    tracking.configure(req.experiment)  # an adapter's base may be a models:/ URI
    model, adapter_cfg = _model_for_data(req)  # validates the config against the data, then starts Ray
    with mlflow.start_run(run_name=req.run_name or req.model) as run:
        tracking.log_params({"model": req.model, "epochs": req.epochs, "batch_size": req.batch_size,
                             "shards_b_uri": req.shards_b_uri or "",
                             "num_workers": req.num_workers, "seed": req.seed, "shards_uri": req.shards_uri,
                             "embeddings": req.embeddings or "", "latents": req.latents or "",
                             **split, **_lr_params(req, model), **flatten_params(model.config, "cfg.")})
        mlflow.log_dict({"model": req.model, "config": _config_dict(model)}, "model_config.json")
        mlflow.set_tags({"condgen.model": req.model, "condgen.shards": req.shards_uri,
                         "condgen.condition": getattr(model.config, "condition", "label")})
        # the shard set as the run's dataset input: lineage (source, digest of the manifest) in the UI
        tracking.log_shard_input(run.info.run_id, req.shards_uri, read_manifest(req.shards_uri))
        if adapter_cfg:
            mlflow.set_tags({"condgen.kind": "adapter", "condgen.adapter_base": adapter_cfg["base"]})
            tracking.log_params({"adapter.targets": ",".join(adapter_cfg["targets"]),
                                 "adapter.rank": adapter_cfg["rank"], "adapter.alpha": adapter_cfg["alpha"],
                                 "adapter.trained_parameters": adapter_cfg["trained"],
                                 "adapter.share": adapter_cfg["share"]})
        loop_config = {
            "model": req.model, "model_config": _config_dict(model), "shards_uri": req.shards_uri,
            "epochs": req.epochs, "batch_size": req.batch_size, "seed": req.seed, "embeddings": req.embeddings,
            "run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri(), "fail_at_epoch": req.fail_at_epoch,
            "grid_every": req.grid_every, "shards_b_uri": req.shards_b_uri, "latents": req.latents,
            "adapter": adapter_cfg, "lr_scaling": req.lr_scaling, "lr_reference_batch": req.lr_reference_batch,
            "lr_warmup_steps": req.lr_warmup_steps, "fail_at_step": req.fail_at_step,
            "checkpoint_every_steps": req.checkpoint_every_steps, "precision": req.precision,
            "grad_accumulation": req.grad_accumulation, "data_mode": req.data_mode,
            "stream_buffer": req.stream_buffer, "loader_threads": req.loader_threads,
            "stream_sharding": req.stream_sharding,
        }
        storage_path, storage_fs = ray_storage(req.storage_path or settings.ray_storage())
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=req.num_workers, use_gpu=req.use_gpu,
                                         resources_per_worker=dict(req.resources_per_worker or {"CPU": 1}),
                                         placement_strategy=req.placement_strategy),
            run_config=RunConfig(name=f"{req.model}-{run.info.run_id[:8]}", storage_path=storage_path,
                                 storage_filesystem=storage_fs,
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=req.max_failures),
                                 # Ray Train's INFO lines ("Checkpoint successfully created") stay out of view;
                                 # the worker prints its own progress (CONDGEN_RAY_VERBOSE=1 shows them)
                                 logging_config=LoggingConfig(log_level="INFO" if cluster.verbose() else "WARNING")),
        )
        with progress_lines(run.info.run_id, req.epochs):  # one line per epoch on this terminal
            result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training {req.model} produced no checkpoint: {result.error}")
        if adapter_cfg:  # the product is the adapter, never a copy of the base
            files, folder = (ADAPTER_WEIGHTS, ADAPTER_CONFIG), "adapters"
        else:
            files, folder = (ckpt_io.WEIGHTS, ckpt_io.CONFIG), "checkpoints"
        dest = storage.join(settings.storage_root(), folder, run.info.run_id)
        with result.checkpoint.as_directory() as d:
            for name in files:
                storage.write_bytes(storage.join(dest, name), Path(d, name).read_bytes())
                mlflow.log_artifact(os.path.join(d, name), artifact_path="adapter" if adapter_cfg else "model")
        history = _history(run.info.run_id)
        mlflow.set_tag("condgen.adapter" if adapter_cfg else "condgen.checkpoint", dest)
        if adapter_cfg and req.adapter.register_as:
            version = register(run.info.run_id, req.adapter.register_as, artifact_path="adapter",
                               tags={"condgen.kind": "adapter", "condgen.adapter_base": adapter_cfg["base"]})
            MlflowClient().set_registered_model_alias(req.adapter.register_as, "latest-adapter", version)
        return TrainResult(run.info.run_id, dest, dict(result.metrics or {}), history,
                           json_normalised(_config_dict(model)))


def batch_params(req: TrainRequest) -> dict[str, Any]:
    """The split of the global batch over the workers, the LR, precision, accumulation, checkpoint and
    data options, as MLflow params (``tasks.training.batching``); ValueError on a batch smaller than the
    worker count, a share smaller than ``grad_accumulation`` or a bad option."""
    if req.lr_scaling != "none" and not req.lr_reference_batch:
        raise ValueError(f"lr_scaling={req.lr_scaling!r} scales the rate relative to lr_reference_batch: set it "
                         "(the global batch the config's lr was tuned for)")
    if req.lr_warmup_steps < 0:
        raise ValueError(f"lr_warmup_steps must be >= 0, not {req.lr_warmup_steps}")
    batching.lr_factor(req.lr_scaling, req.batch_size, req.lr_reference_batch or req.batch_size)
    split, smallest = batching.split_params(req.batch_size, req.num_workers), req.batch_size // req.num_workers
    if not 1 <= req.grad_accumulation <= smallest:
        raise ValueError(f"grad_accumulation must be in [1, {smallest}] (micro-batches of a worker's share of the "
                         f"global batch {req.batch_size}), not {req.grad_accumulation}")
    if req.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {req.precision!r}")
    if req.data_mode not in MODES:
        raise ValueError(f"data_mode must be one of {MODES}, not {req.data_mode!r}")
    if req.stream_sharding not in SHARDINGS:
        raise ValueError(f"stream_sharding must be one of {SHARDINGS}, not {req.stream_sharding!r}")
    for name in ("checkpoint_every_steps", "stream_buffer", "loader_threads"):
        value = getattr(req, name)
        if value is not None and value < (0 if name == "checkpoint_every_steps" else 1):
            raise ValueError(f"{name} must be >= {0 if name == 'checkpoint_every_steps' else 1}, not {value}")
    return {**split, "grad_accumulation": req.grad_accumulation,
            "micro_batch": -(-split["per_worker_batch"] // req.grad_accumulation), "precision": req.precision,
            "lr_scaling": req.lr_scaling, "lr_reference_batch": req.lr_reference_batch or "",
            "lr_warmup_steps": req.lr_warmup_steps, "checkpoint_every_steps": req.checkpoint_every_steps,
            "data_mode": req.data_mode, "stream_buffer": req.stream_buffer or "",
            "loader_threads": req.loader_threads or "", "stream_sharding": req.stream_sharding}


def _lr_params(req: TrainRequest, model: torch.nn.Module) -> dict[str, float]:
    """The effective learning rate of each optimiser group after warm-up (``lr`` for a single group)."""
    factor = batching.lr_factor(req.lr_scaling, req.batch_size, req.lr_reference_batch or req.batch_size)
    lrs = {name: lr * factor for name, lr in group_lrs(model).items()}
    if len(lrs) == 1:
        return {"lr_effective": next(iter(lrs.values()))}
    return {f"lr_effective.{name}": lr for name, lr in lrs.items()}


def _model_for_data(req: TrainRequest) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The model to train, its config fitted to (or, for an adapter run, checked against) the data of
    ``req.shards_uri``; a CycleGAN's second domain must have the same channels and size. Then Ray starts
    (``ensure_ray``), and a LoRA run's setup puts the base's weights in its object store (None otherwise)."""
    info = dataset_info(req.shards_uri)
    if req.shards_b_uri:
        info_b = dataset_info(req.shards_b_uri)
        for key in ("channels", "image_size"):
            if info_b[key] != info[key]:
                raise ValueError(f"the two domains differ in {key}: {req.shards_uri} has {info[key]}, "
                                 f"{req.shards_b_uri} has {info_b[key]}")
    if req.adapter is None:
        model = build_model(req.model, fit_to_data(req.model, recipe_config(req.model, req.model_config), info,
                                                   where=req.shards_uri))
        check_options(model, req.precision, req.grad_accumulation)  # a GAN refuses accumulation here
        ensure_ray()
        return model, None
    base, meta = load_model_uri(req.adapter.base)
    req.model = ckpt_io.model_name(base)
    req.model_config = _config_dict(base)
    fit_to_data(req.model, req.model_config, info, where=req.shards_uri)  # the base fixes every field: a check
    check_options(base, req.precision, req.grad_accumulation)
    ensure_ray()
    return base, _adapter_setup(req.adapter, base, meta)


def _adapter_setup(spec: AdapterSpec, base: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """The base, loaded on the driver (fail fast on a bad URI or target): its weights in Ray's object store
    as safetensors bytes, its target layers wrapped (validated here, not in a worker)."""
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in base.state_dict().items()})
    alpha = float(spec.alpha if spec.alpha is not None else spec.rank)
    served = served_parameters(base)
    prepare(base, list(spec.targets), spec.rank, alpha)  # validates the targets here, not in a worker
    trained = trained_adapter_parameters(base)
    cfg = {"base": spec.base, "targets": list(spec.targets), "rank": spec.rank, "alpha": alpha,
           "weights_ref": ray.put(weights), "trained": trained, "share": trained / served,
           "base_version": str(meta.get("version", ""))}
    return cfg


def ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's ``RunConfig``.

    A local path or ``file://`` URI goes as a plain path. ``s3://`` goes through pyarrow's
    S3 filesystem with the same endpoint as ``tasks.storage`` (``CONDGEN_S3_ENDPOINT_URL``,
    so MinIO/Ceph/moto work) and credentials from the standard AWS chain.
    """
    if not storage.is_s3(uri):
        return str(storage.local_path(uri)), None
    endpoint = storage.endpoint_url()
    if endpoint is None:
        return uri, None  # AWS: pyarrow resolves s3:// itself
    parsed = urlparse(endpoint)
    fs = pyarrow.fs.S3FileSystem(endpoint_override=parsed.netloc or endpoint, scheme=parsed.scheme or "https",
                                 region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
                                 or "us-east-1")
    return uri.removeprefix("s3://"), fs


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    return config_to_dict(model.config)


def _history(run_id: str) -> list[dict[str, Any]]:
    """Per-epoch metrics as the rank-0 worker logged them to the MLflow run."""
    client = MlflowClient()
    by_epoch: dict[int, dict[str, Any]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            by_epoch.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [by_epoch[e] for e in sorted(by_epoch)]
