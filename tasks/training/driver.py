"""Train one conditional model with Ray Train (``TorchTrainer``), tracked in MLflow.

The worker loop is a plain function of a config dict (DESIGN.md "Training loop"):
it runs on CPU in one process, and touches Ray only through ``get_context``,
``get_checkpoint``, ``get_device`` and ``report``. Gradients are averaged across
workers with one flat all-reduce per optimiser step instead of DDP, because GANs
step two optimisers per batch through methods other than ``forward`` (DDP only
synchronises gradients produced through its wrapped ``forward``).

Checkpoints are ``model.safetensors`` + ``config.json`` + ``optimizer.safetensors``
+ ``trainer_state.json``: resumable with ``get_checkpoint()`` and never pickled.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import save as st_save

from condgen.models.base import config_to_dict, flatten_params
from condgen.models.registry import build_model
from condgen.tasks.data.splits import load_arrays
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io import settings, storage, tracking
from condgen.tasks.io.cluster import ensure_ray
from condgen.tasks.io.images import from_uint8, grid, to_uint8
from condgen.tasks.io.model_store import load_model_uri
from condgen.tasks.training.adapters import prepare, served_parameters, trained_adapter_parameters


# -- data --------------------------------------------------------------------------------
def batches(arrays: dict[str, np.ndarray], batch_size: int, rank: int, world: int, epoch: int, seed: int):
    """Shuffled, rank-disjoint mini-batches (a DistributedSampler over in-memory arrays).

    Every rank sees the same number of batches (the permutation is padded by wrapping)
    so the per-step all-reduce never waits on a rank that has run out of data.
    """
    n = len(arrays["y"])
    perm = np.random.default_rng(seed + epoch).permutation(n)
    per_rank = -(-n // world)
    perm = np.resize(perm, per_rank * world)[rank::world]
    rng = np.random.default_rng(seed * 1000 + epoch * 10 + rank)
    for i in range(0, per_rank - batch_size + 1 if per_rank >= batch_size else 1, batch_size):
        idx = perm[i:i + batch_size]
        batch = {"x": from_uint8(arrays["x"][idx]), "y": torch.from_numpy(arrays["y"][idx])}
        if "z" in arrays:  # precomputed autoencoder latents: latent diffusion skips its encoder
            batch["z"] = torch.from_numpy(arrays["z"][idx])
        if "txt" in arrays:
            # One random caption phrasing per sample per step: text is not a lookup table.
            pick = rng.integers(0, arrays["txt"].shape[1], len(idx))
            batch["txt"] = torch.from_numpy(arrays["txt"][idx, pick])
        if "x_b" in arrays:
            # Unpaired second domain (CycleGAN): an independent random draw per batch.
            batch["x_b"] = from_uint8(arrays["x_b"][rng.integers(0, len(arrays["x_b"]), len(idx))])
        yield batch


# -- distributed helpers ---------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients across workers with a single flat all-reduce."""
    _, world = _world()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_model(model: torch.nn.Module) -> None:
    if _world()[1] > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def mean_across_workers(logs: dict[str, float]) -> dict[str, float]:
    if _world()[1] == 1 or not logs:
        return logs
    keys = sorted(logs)
    t = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= _world()[1]
    return dict(zip(keys, t.tolist()))


def worker_placement() -> list[dict[str, Any]]:
    """``{rank, node_id, host, pid}`` of every worker, in rank order (a collective: all ranks call it)."""


    rank, world = _world()
    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
          "pid": os.getpid()}
    if world == 1:
        return [me]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, me)  # tiny dicts of str/int, once per worker group
    return everyone


def make_optimizers(model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    cfg = model.config
    betas = tuple(getattr(cfg, "betas", (0.9, 0.999)))
    lr = getattr(model, "group_lr", lambda name: cfg.lr)  # a model may give a group its own rate
    return {name: torch.optim.Adam([p for p in params if p.requires_grad], lr=lr(name), betas=betas)
            for name, params in model.optimizer_groups().items()}


def make_opt_step(optimizers: dict[str, torch.optim.Optimizer]):
    def opt_step(name: str, loss: torch.Tensor) -> None:
        opt = optimizers[name]
        params = [p for g in opt.param_groups for p in g["params"]]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_grads(params)
        opt.step()

    return opt_step


def grid_conditions(model: torch.nn.Module, arrays: dict[str, np.ndarray], per_class: int = 8) -> torch.Tensor:
    """Conditions for a class-by-class sample grid: labels, one caption embedding per class,
    or (image-conditioned models) condition images made from real digits of each class."""
    classes = np.arange(getattr(model.config, "num_classes", 10))
    kind = getattr(model.config, "condition", "label")
    if kind == "image":
        idx = np.concatenate([np.flatnonzero(arrays["y"] == c)[:per_class] for c in classes])
        return model.condition_image(from_uint8(arrays["x"][idx]))
    if kind == "text":
        rows = [arrays["txt"][np.flatnonzero(arrays["y"] == c)[0], 0] for c in classes]
        return torch.from_numpy(np.repeat(np.stack(rows), per_class, 0)).float()
    return torch.from_numpy(np.repeat(classes, per_class)).long()


def sample_grid(model: torch.nn.Module, cond: torch.Tensor, seed: int = 0, per_row: int = 8) -> np.ndarray | None:
    """A class-by-class grid of samples; None for models that do not generate (classifiers)."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    try:
        x = model.sample(cond, generator=g)
    except NotImplementedError:
        return None
    finally:
        model.train()
    return grid(to_uint8(x), nrow=per_row)


# -- the worker loop -------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build, (resume), train ``epochs`` epochs, report + checkpoint each epoch."""

    rank, world = _world()
    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, config.get("threads_per_worker", 1)))
    model = build_model(config["model"], config["model_config"])
    adapter = config.get("adapter")
    if adapter:  # LoRA run: the base weights (safetensors bytes in Ray's object store), then adapters
        from safetensors.torch import load as st_load

        from condgen.tasks.training.adapters import prepare

        model.load_state_dict(st_load(ray.get(adapter["weights_ref"])))
        prepare(model, adapter["targets"], adapter["rank"], adapter["alpha"])
    model.to(ray.train.torch.get_device())
    broadcast_model(model)
    optimizers = make_optimizers(model)
    opt_step = make_opt_step(optimizers)

    start_epoch, step = 0, 0
    resumed = ray.train.get_checkpoint()
    if resumed:
        from safetensors.torch import load_file

        with resumed.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, ckpt_io.WEIGHTS)))
            state = json.loads(Path(d, "trainer_state.json").read_text())
            ckpt_io.load_optimizer_tensors(optimizers, load_file(os.path.join(d, "optimizer.safetensors")),
                                           state["optimizers"])
            start_epoch, step = state["epoch"] + 1, state["step"]

    arrays = load_arrays(config["shards_uri"], "train", config.get("embeddings"), config.get("latents"))
    if config.get("shards_b_uri"):
        arrays["x_b"] = load_arrays(config["shards_b_uri"], "train")["x"]
    placement = worker_placement()  # every rank takes part in the gather
    logger = None
    if rank == 0 and config.get("run_id"):
        from condgen.tasks.io.tracking import MetricLogger

        logger = MetricLogger(config["tracking_uri"], config["run_id"])
        # Where the workers ran (one entry per rank): on a cluster, the first question
        # about a slow or failed run. Rewritten when a restarted worker group resumes.
        logger.log_dict({"workers": placement, "num_nodes": len({w["node_id"] for w in placement})},
                        "placement.json")
    cond = grid_conditions(model, arrays) if rank == 0 else None
    fail_at = config.get("fail_at_epoch")  # fault injection for tests: die once, mid-run

    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        t0, sums, count = time.perf_counter(), {}, 0
        for batch in batches(arrays, config["batch_size"], rank, world, epoch, config["seed"]):
            logs = model.train_step(batch, opt_step)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            count, step = count + 1, step + 1
            if fail_at is not None and epoch == fail_at and count == 2 and resumed is None and rank == world - 1:
                # Ray Train's controller collects reports on its health-check poll (2 s), so a
                # crash within that window of the last report would also lose that report; a
                # real crash comes seconds into an epoch, and so does this one.
                time.sleep(6)
                os._exit(1)  # a killed worker process, not a Python exception
        metrics = mean_across_workers({k: v / max(count, 1) for k, v in sums.items()})
        metrics.update(epoch=epoch, step=step, epoch_seconds=time.perf_counter() - t0)

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                ckpt_io.save_checkpoint(tmp, model)
                tensors, meta = ckpt_io.optimizer_tensors(optimizers)
                from safetensors.torch import save_file

                save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
                Path(tmp, "trainer_state.json").write_text(json.dumps({"epoch": epoch, "step": step, "optimizers": meta}))
                if adapter:
                    from condgen.tasks.io.model_store import save_adapter

                    save_adapter(Path(tmp).as_uri(), model, rank=adapter["rank"], alpha=adapter["alpha"],
                                 base=adapter["base"])
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if logger:
                    logger.log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
                    if config.get("grid_every", 1) and (epoch + 1) % config.get("grid_every", 1) == 0:
                        image = sample_grid(model, cond)
                        if image is not None:
                            logger.log_image(image, f"grids/epoch_{epoch:03d}.png")
            ray.train.report(metrics, checkpoint=checkpoint)


# -- driver side -------------------------------------------------------------------------
@dataclass
class TrainRequest:
    model: str
    shards_uri: str
    model_config: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    num_workers: int = 2
    seed: int = 0
    embeddings: str | None = None  # CLIP fingerprint of precomputed embeddings (text conditioning)
    latents: str | None = None  # autoencoder fingerprint of precomputed latents (latent diffusion)
    shards_b_uri: str | None = None  # a second, unpaired domain (CycleGAN)
    experiment: str = "condgen"
    run_name: str | None = None
    max_failures: int = 2
    fail_at_epoch: int | None = None  # fault injection (tests only)
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
    adapter: "AdapterSpec | None" = None


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


def train(req: TrainRequest) -> TrainResult:
    """Run one TorchTrainer fit as one MLflow run; copy the final checkpoint to storage."""


    ensure_ray()
    tracking.configure(req.experiment)
    adapter_cfg = None
    if req.adapter is not None:
        model, adapter_cfg = _adapter_setup(req)
    else:
        model = build_model(req.model, req.model_config)  # validates the config before any worker starts
    with mlflow.start_run(run_name=req.run_name or req.model) as run:
        tracking.log_params({"model": req.model, "epochs": req.epochs, "batch_size": req.batch_size,
                             "shards_b_uri": req.shards_b_uri or "",
                             "num_workers": req.num_workers, "seed": req.seed, "shards_uri": req.shards_uri,
                             "embeddings": req.embeddings or "", "latents": req.latents or "",
                             **flatten_params(model.config, "cfg.")})
        mlflow.log_dict({"model": req.model, "config": _config_dict(model)}, "model_config.json")
        mlflow.set_tags({"condgen.model": req.model, "condgen.shards": req.shards_uri,
                         "condgen.condition": getattr(model.config, "condition", "label")})
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
            "adapter": adapter_cfg,
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
                                 failure_config=FailureConfig(max_failures=req.max_failures)),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training {req.model} produced no checkpoint: {result.error}")
        if adapter_cfg:  # the product is the adapter, never a copy of the base
            from condgen.tasks.io.model_store import ADAPTER_CONFIG, ADAPTER_WEIGHTS

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
            from condgen.tasks.io.model_store import register

            version = register(run.info.run_id, req.adapter.register_as, artifact_path="adapter",
                               tags={"condgen.kind": "adapter", "condgen.adapter_base": adapter_cfg["base"]})
            mlflow.tracking.MlflowClient().set_registered_model_alias(req.adapter.register_as, "latest-adapter",
                                                                      version)
        return TrainResult(run.info.run_id, dest, dict(result.metrics or {}), history)


def _adapter_setup(req: TrainRequest) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the base on the driver (fail fast on a bad URI or target), put its weights in Ray's
    object store as safetensors bytes, and fill ``req.model`` / ``req.model_config`` from it."""


    spec = req.adapter
    base, meta = load_model_uri(spec.base)
    req.model = ckpt_io.model_name(base)
    req.model_config = _config_dict(base)
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in base.state_dict().items()})
    alpha = float(spec.alpha if spec.alpha is not None else spec.rank)
    served = served_parameters(base)
    prepare(base, list(spec.targets), spec.rank, alpha)  # validates the targets here, not in a worker
    trained = trained_adapter_parameters(base)
    cfg = {"base": spec.base, "targets": list(spec.targets), "rank": spec.rank, "alpha": alpha,
           "weights_ref": ray.put(weights), "trained": trained, "share": trained / served,
           "base_version": str(meta.get("version", ""))}
    return base, cfg


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

    import pyarrow.fs

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
