"""The Ray Train worker loop: ``train_loop_per_worker(config)`` and what it runs on.

The loop is a plain function of a config dict (DESIGN.md "Training loop"): it runs on
CPU in one process, and touches Ray only through ``get_context``, ``get_checkpoint``,
``get_device`` and ``report``. Gradients are averaged across workers with one flat
all-reduce per optimiser step instead of DDP, because GANs step two optimisers per batch
through methods other than ``forward`` (DDP only synchronises gradients produced through
its wrapped ``forward``). ``config["batch_size"]`` is the global batch; each rank trains on its
share of it (``tasks/training/batching.py``), so the optimiser steps, the data behind each step and
every schedule counted in optimiser steps are the same for any number of workers.

Each epoch ends in a checkpoint of ``model.safetensors`` + ``config.json`` +
``optimizer.safetensors`` + ``trainer_state.json`` (plus the adapter files of a LoRA run):
resumable with ``get_checkpoint()`` and never pickled. The driver side (``TrainRequest``,
``train``) is ``tasks/training/driver.py``.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file

from condgen.models.registry import build_model
from condgen.tasks.data.splits import load_arrays
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io.images import from_uint8, grid, to_uint8
from condgen.tasks.io.model_store import attach_frozen_parts, save_adapter
from condgen.tasks.io.tracking import MetricLogger
from condgen.tasks.training import batching
from condgen.tasks.training.adapters import prepare

OPTIMIZER_WEIGHTS = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"


# -- data --------------------------------------------------------------------------------
def batches(arrays: dict[str, np.ndarray], batch_size: int, rank: int, world: int, epoch: int, seed: int):
    """Rank ``rank``'s share of each global batch of ``batch_size`` samples in ``epoch``
    (``tasks.training.batching``: one permutation per epoch, the same on every rank; step k's global
    batch is the same set of samples for any ``world``, and rank r takes its contiguous slice of it).

    Every rank takes the same number of steps, so the per-step all-reduce never waits on a rank that
    has run out of data. Per-sample random choices (a caption phrasing, CycleGAN's unpaired draw) are
    drawn for the whole global batch and sliced, so they do not depend on ``world`` either.
    """
    bp = batching.plan(len(arrays["y"]), batch_size, world)
    part = bp.rank_slice(rank)
    rng = np.random.default_rng(seed * 1000 + epoch * 10)
    for step_idx in batching.epoch_steps(bp, epoch, seed):
        idx = step_idx[part]
        batch = {"x": from_uint8(arrays["x"][idx]), "y": torch.from_numpy(arrays["y"][idx])}
        if "z" in arrays:  # precomputed autoencoder latents: latent diffusion skips its encoder
            batch["z"] = torch.from_numpy(arrays["z"][idx])
        if "txt" in arrays:
            # One random caption phrasing per sample per step: text is not a lookup table.
            pick = rng.integers(0, arrays["txt"].shape[1], len(step_idx))[part]
            batch["txt"] = torch.from_numpy(arrays["txt"][idx, pick])
        if "x_b" in arrays:
            # Unpaired second domain (CycleGAN): an independent random draw per batch.
            batch["x_b"] = from_uint8(arrays["x_b"][rng.integers(0, len(arrays["x_b"]), len(step_idx))[part]])
        yield batch


def labelled_rows(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A label-conditioned model or a classifier trains on labelled samples only: caption-only samples
    carry the label -1 (``tasks.data.splits.dataset_info``). Text- and image-conditioned models keep all."""
    if getattr(model.config, "condition", "label") != "label" or (arrays["y"] >= 0).all():
        return arrays
    keep = arrays["y"] >= 0
    return {k: v[keep] for k, v in arrays.items()}


# -- distributed helpers ---------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def allreduce_grads(params: list[torch.nn.Parameter], weight: float | None = None) -> None:
    """Combine gradients across workers with a single flat all-reduce: the average over ranks, or, with
    ``weight`` (this rank's ``n_r / N`` when the shares of a global batch differ), the weighted sum, which
    is the average over the global batch's samples."""
    _, world = _world()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if weight is not None:
        flat *= weight
    dist.all_reduce(flat)
    if weight is None:
        flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of rank ``rank`` > 0 after the model is built (rank 0 keeps ``seed``): every rank
    draws its own noise (latents, timesteps, dropout) for its share of the global batch, never a copy of
    another rank's."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


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


# -- optimisers ------------------------------------------------------------------------
def group_lrs(model: torch.nn.Module) -> dict[str, float]:
    """The config's learning rate of each optimiser group (a model may give a group its own rate)."""
    cfg = model.config
    lr = getattr(model, "group_lr", lambda name: cfg.lr)
    return {name: lr(name) for name in model.optimizer_groups()}


def make_optimizers(model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    betas = tuple(getattr(model.config, "betas", (0.9, 0.999)))
    lrs = group_lrs(model)
    return {name: torch.optim.Adam([p for p in params if p.requires_grad], lr=lrs[name], betas=betas)
            for name, params in model.optimizer_groups().items()}


def set_lr(optimizers: dict[str, torch.optim.Optimizer], base: dict[str, float], multiplier: float) -> None:
    """Every group's rate = its config rate x ``multiplier`` (``tasks.training.batching.lr_multiplier``)."""
    for name, opt in optimizers.items():
        for group in opt.param_groups:
            group["lr"] = base[name] * multiplier


def make_opt_step(optimizers: dict[str, torch.optim.Optimizer], weight: float | None = None):
    """``opt_step(name, loss)`` of the training contract; ``weight``: this rank's share of the global batch
    when the shares differ (``allreduce_grads``)."""
    def opt_step(name: str, loss: torch.Tensor) -> None:
        opt = optimizers[name]
        params = [p for g in opt.param_groups for p in g["params"]]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_grads(params, weight)
        opt.step()

    return opt_step


# -- sample grids ----------------------------------------------------------------------
def grid_conditions(model: torch.nn.Module, arrays: dict[str, np.ndarray], per_class: int = 8) -> torch.Tensor:
    """Conditions for a class-by-class sample grid: labels, one caption embedding per class,
    or (image-conditioned models) condition images made from real images of each class (greyscale or
    colour: the grid is RGB for colour samples)."""
    classes = np.arange(getattr(model.config, "num_classes", 10))
    kind = getattr(model.config, "condition", "label")
    if kind != "label":  # made from examples: only classes the data has (a small set may miss one)
        classes = classes[np.isin(classes, arrays["y"])]
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
def _build(config: dict[str, Any]) -> torch.nn.Module:
    """The model of ``config``; a LoRA run loads the base's weights (safetensors bytes in Ray's object
    store) and wraps the target layers in adapters."""
    model = build_model(config["model"], config["model_config"])
    adapter = config.get("adapter")
    if adapter:
        model.load_state_dict(st_load(ray.get(adapter["weights_ref"])))
        prepare(model, adapter["targets"], adapter["rank"], adapter["alpha"])
    return model


def _resume(model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer], checkpoint) -> tuple[int, int]:
    """Weights and optimiser state from a Ray Train checkpoint; (first epoch to run, step)."""
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_file(os.path.join(d, ckpt_io.WEIGHTS)))
        state = json.loads(Path(d, TRAINER_STATE).read_text())
        ckpt_io.load_optimizer_tensors(optimizers, load_file(os.path.join(d, OPTIMIZER_WEIGHTS)),
                                       state["optimizers"])
    return state["epoch"] + 1, state["step"]


def _save(directory: str, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer], epoch: int,
          step: int, adapter: dict[str, Any] | None) -> None:
    """One epoch's checkpoint (rank 0): weights + config, optimiser state, trainer state, adapter files."""
    ckpt_io.save_checkpoint(directory, model)
    tensors, meta = ckpt_io.optimizer_tensors(optimizers)
    save_file(tensors, os.path.join(directory, OPTIMIZER_WEIGHTS))
    Path(directory, TRAINER_STATE).write_text(json.dumps({"epoch": epoch, "step": step, "optimizers": meta}))
    if adapter:
        save_adapter(Path(directory).as_uri(), model, rank=adapter["rank"], alpha=adapter["alpha"],
                     base=adapter["base"])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build, (resume), train ``epochs`` epochs, report + checkpoint each epoch."""
    rank, world = _world()
    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, config.get("threads_per_worker", 1)))
    model = _build(config)
    adapter = config.get("adapter")
    model.to(ray.train.torch.get_device())
    broadcast_model(model)
    if rank > 0:  # rank 0 keeps the seed's stream (one worker trains as before); the others draw their own noise
        torch.manual_seed(rank_seed(config["seed"], rank))
    optimizers = make_optimizers(model)
    base_lrs = group_lrs(model)

    start_epoch, step = 0, 0
    resumed = ray.train.get_checkpoint()
    if resumed:
        start_epoch, step = _resume(model, optimizers, resumed)
    # A frozen part the config names by URI (autoencoder, ControlNet / cascade base), loaded here and
    # handed in; a resumed or adapter run already holds it, so its URI is not read again.
    attach_frozen_parts(model)

    arrays = labelled_rows(model, load_arrays(config["shards_uri"], "train", config.get("embeddings"),
                                              config.get("latents")))
    if config.get("shards_b_uri"):
        arrays["x_b"] = load_arrays(config["shards_b_uri"], "train")["x"]
    bp = batching.plan(len(arrays["y"]), config["batch_size"], world)
    opt_step = make_opt_step(optimizers, bp.weight(rank))
    factor = batching.lr_factor(config.get("lr_scaling", "none"), config["batch_size"],
                                config.get("lr_reference_batch") or config["batch_size"])
    warmup = int(config.get("lr_warmup_steps") or 0)
    placement = worker_placement()  # every rank takes part in the gather
    logger = None
    if rank == 0 and config.get("run_id"):
        logger = MetricLogger(config["tracking_uri"], config["run_id"])
        # Where the workers ran (one entry per rank): on a cluster, the first question
        # about a slow or failed run. Rewritten when a restarted worker group resumes.
        logger.log_dict({"workers": placement, "num_nodes": len({w["node_id"] for w in placement})},
                        "placement.json")
        logger.log_dict({**bp.summary(), "lr_factor": factor, "lr_warmup_steps": warmup}, "batch_plan.json")
        print(f"condgen train: {bp.describe()}", flush=True)
    cond = grid_conditions(model, arrays) if rank == 0 else None
    fail_at = config.get("fail_at_epoch")  # fault injection for tests: die once, mid-run

    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        t0, sums, count = time.perf_counter(), {}, 0
        for batch in batches(arrays, config["batch_size"], rank, world, epoch, config["seed"]):
            if factor != 1.0 or warmup:
                set_lr(optimizers, base_lrs, batching.lr_multiplier(step, factor, warmup))
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
                _save(tmp, model, optimizers, epoch, step, adapter)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if logger:
                    logger.log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
                    if config.get("grid_every", 1) and (epoch + 1) % config.get("grid_every", 1) == 0:
                        image = sample_grid(model, cond)
                        if image is not None:
                            logger.log_image(image, f"grids/epoch_{epoch:03d}.png")
            ray.train.report(metrics, checkpoint=checkpoint)
