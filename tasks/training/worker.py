"""The Ray Train worker loop: ``train_loop_per_worker(config)`` and what it runs on.

A plain function of a config dict (DESIGN.md "Training loop"), one process per worker, touching Ray only
through ``get_checkpoint``, ``get_device`` and ``report``. Gradients are averaged with one flat all-reduce
per optimiser step, not DDP (GANs step two optimisers per batch outside ``forward``). ``batch_size`` is the
global batch, split over ranks (``batching.py``; data: ``loader.py``, in memory or streamed). A model with a
``models.base.BatchDraws`` draws each step's per-sample noise for the global batch from one stream every rank
shares (``share_rng``) and takes its rows (``train_batch(share=...)``): any worker count trains the same model.

* **Checkpoints** at each epoch's end and every ``checkpoint_every_steps`` optimiser steps: weights, config,
  optimiser state, ``rng.safetensors`` (every rank's torch CPU/CUDA, numpy and Python RNG states) and
  ``trainer_state.json`` (epoch, batches consumed in it, global step, the epoch's partial loss sums), never
  pickled. A resumed run continues the epoch at that batch with the same RNG streams, so a killed and
  resumed run ends with an uninterrupted run's weights (tests/test_resume.py).
* **Mixed precision** (``precision="bf16"``): ``torch.autocast`` around ``train_step``'s forward; backward
  and step outside it; weights, gradients and optimiser state fp32 (bf16 keeps fp32's exponent range: no
  loss scaling; Micikevicius et al. 2018). **Gradient accumulation**: ``train_batch``.
* **Progress**: rank 0 prints a line per epoch (and every ``progress_every_steps`` in long epochs); each
  epoch's metrics carry ``samples_per_s``, ``first_batch_seconds`` and each worker's ``peak_rss_mb``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file

from condgen.models.base import BatchDraws
from condgen.models.registry import build_model
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io.model_store import attach_frozen_parts, save_adapter
from condgen.tasks.io.tracking import MetricLogger
from condgen.tasks.training import batching
from condgen.tasks.training.adapters import prepare
from condgen.tasks.training.batching import rank_and_world as _world
from condgen.tasks.training.grids import grid_conditions, sample_grid, share_conditions
from condgen.tasks.training.loader import labelled, memory_batches, open_train_data

OPTIMIZER_WEIGHTS = "optimizer.safetensors"
RNG_STATE = "rng.safetensors"
TRAINER_STATE = "trainer_state.json"
PRECISIONS = ("fp32", "bf16")


batches = memory_batches  # rank r's share of each global batch of an epoch (tasks/training/loader.py)


def labelled_rows(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows ``model`` trains on: a label-conditioned model or a classifier skips caption-only ones (y = -1)."""
    return labelled(arrays) if getattr(model.config, "condition", "label") == "label" else arrays


# -- distributed helpers ---------------------------------------------------------------
def _comm_device() -> torch.device:
    """Where a collective's tensors live: the GPU under NCCL, the CPU under gloo."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def allreduce_grads(params: list[torch.nn.Parameter], weight: float | None = None) -> None:
    """Combine gradients across workers with one flat all-reduce: the average over ranks, or, with ``weight``
    (this rank's ``n_r / N`` when shares differ), the weighted sum: the average over the global batch."""
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
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


def rank_seed(seed: int, rank: int) -> int:
    """Rank ``rank`` > 0's torch seed after the model is built (rank 0 keeps ``seed``): its own noise stream."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def share_rng(device: torch.device) -> None:
    """Rank 0's torch RNG states (CPU, and the GPU's under CUDA) on every rank: one stream for global-batch draws."""
    if _world()[1] == 1:
        return
    states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])
    dist.broadcast_object_list(states, src=0)
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def broadcast_model(model: torch.nn.Module) -> None:
    if _world()[1] > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def mean_across_workers(logs: dict[str, float]) -> dict[str, float]:
    if _world()[1] == 1 or not logs:
        return logs
    keys = sorted(logs)
    t = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, (t / _world()[1]).tolist()))


def gather_floats(value: float) -> list[float]:
    """Every rank's ``value``, in rank order (a collective)."""
    out = [value] * _world()[1]
    if len(out) > 1:
        dist.all_gather_object(out, value)
    return out


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


# -- optimisers, precision, accumulation -------------------------------------------------
def group_lrs(model: torch.nn.Module) -> dict[str, float]:
    """The config's learning rate of each optimiser group (a model may give a group its own rate)."""
    lr = getattr(model, "group_lr", lambda name: model.config.lr)
    return {name: lr(name) for name in model.optimizer_groups()}


def make_optimizers(model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    betas, lrs = tuple(getattr(model.config, "betas", (0.9, 0.999))), group_lrs(model)
    return {name: torch.optim.Adam([p for p in params if p.requires_grad], lr=lrs[name], betas=betas)
            for name, params in model.optimizer_groups().items()}


def set_lr(optimizers: dict[str, torch.optim.Optimizer], base: dict[str, float], multiplier: float) -> None:
    """Every group's rate = its config rate x ``multiplier`` (``tasks.training.batching.lr_multiplier``)."""
    for name, opt in optimizers.items():
        for group in opt.param_groups:
            group["lr"] = base[name] * multiplier


def make_opt_step(optimizers: dict[str, torch.optim.Optimizer], weight: float | None = None, device_type: str = "cpu"):
    """``opt_step(name, loss)`` of the training contract, backward and step outside autocast; ``weight``: this
    rank's share when shares differ (``allreduce_grads``). ``train_batch`` sets ``opt_step.micro``."""
    micro = {"first": True, "last": True, "scale": 1.0}

    def opt_step(name: str, loss: torch.Tensor) -> None:
        opt = optimizers[name]
        params = [p for g in opt.param_groups for p in g["params"]]
        with torch.autocast(device_type, enabled=False):
            if micro["first"]:
                opt.zero_grad(set_to_none=True)
            (loss if micro["scale"] == 1.0 else loss * micro["scale"]).backward()
            if micro["last"]:
                allreduce_grads(params, weight)
                opt.step()

    opt_step.micro = micro
    return opt_step


def check_options(model: torch.nn.Module, precision: str, accumulation: int) -> None:
    """ValueError on an unknown precision or on accumulation for a model with several optimiser groups: a
    GAN steps D, then G through the D just updated, so micro-batches cannot add up to one step of each."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if accumulation < 1 or (accumulation > 1 and len(groups := list(model.optimizer_groups())) > 1):
        raise ValueError(f"grad_accumulation must be >= 1, not {accumulation}" if accumulation < 1 else
                         f"grad_accumulation={accumulation} needs a model with one optimiser group, and "
                         f"{type(model).__name__} steps {groups} in turn: use grad_accumulation=1")


def train_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor], opt_step, accumulation: int = 1,
                precision: str = "fp32", device_type: str = "cpu", share: tuple[int, int] | None = None) -> dict[str, float]:
    """One optimiser step on this rank's share of a global batch, in ``accumulation`` micro-batches: the
    mean loss of micro-batch i (n_i of n samples) is scaled by n_i / n, so the summed gradient is one
    batch's (up to rounding; BatchNorm sees smaller batches, running statistics kept per ``train_step`` call
    see m updates). Noise: with ``share`` (this rank's first row in the global batch, the global batch's size)
    a model with ``BatchDraws`` draws the global batch's noise once and each micro-batch takes its rows, so
    the step is the same for any split; other models draw per micro-batch. Logs: the micro-batches' weighted mean."""
    n = len(next(iter(batch.values())))
    if n < accumulation:
        raise ValueError(f"a share of {n} samples cannot make {accumulation} micro-batches: lower grad_accumulation")
    logs, start = {}, 0
    draws = getattr(model, "draws", None) if share else None
    if draws is not None:
        draws.begin(*share)
    try:
        for i, size in enumerate(batching.split(n, accumulation)):
            micro = batch if accumulation == 1 else {k: v[start:start + size] for k, v in batch.items()}
            if draws is not None:
                draws.at(share[0] + start)
            start, last = start + size, i == accumulation - 1
            opt_step.micro.update(first=i == 0, last=last, scale=size / n)
            if not last and hasattr(model, "update_ema"):  # no step yet: the EMA moves once per optimiser step
                model.__dict__["update_ema"] = lambda: None
            with torch.autocast(device_type, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
                out = model.train_step(micro, opt_step)
            model.__dict__.pop("update_ema", None)
            for k, v in out.items():
                logs[k] = logs.get(k, 0.0) + v * (size / n)
    finally:
        opt_step.micro.update(first=True, last=True, scale=1.0)
        model.__dict__.pop("update_ema", None)
        if draws is not None:
            draws.end()
    return logs


# -- RNG states (exact resume) -----------------------------------------------------------
def rng_tensors(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors: torch CPU (and CUDA), numpy's and Python's global generators."""
    (_, keys, pos, has_gauss, gauss), (version, words, py_gauss) = np.random.get_state(), random.getstate()
    out = {"torch_cpu": torch.get_rng_state(), "numpy": torch.tensor([*keys.tolist(), pos, has_gauss]),
           "python": torch.tensor([version, *words]),
           "gauss": torch.tensor([gauss, math.nan if py_gauss is None else py_gauss], dtype=torch.float64)}
    if device is not None and device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def gather_rng(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Every rank's ``rng_tensors``, keyed ``rank{r}.{name}`` (a collective: all ranks call it)."""
    mine, world, out = rng_tensors(device), _world()[1], {}
    for name, t in sorted(mine.items()):
        parts = [t.to(_comm_device()).clone() for _ in range(world)]
        if world > 1:
            dist.all_gather(parts, t.to(_comm_device()))
        out.update({f"rank{r}.{name}": p.cpu() for r, p in enumerate(parts)})
    return out


def restore_rng(tensors: dict[str, torch.Tensor], rank: int, device: torch.device | None = None) -> None:
    """Set this process's RNG states to rank ``rank``'s entries of ``gather_rng``."""
    t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{rank}.")}
    torch.set_rng_state(t["torch_cpu"])
    if device is not None and device.type == "cuda" and "torch_cuda" in t:
        torch.cuda.set_rng_state(t["torch_cuda"], device)
    a, words, (gauss, py_gauss) = t["numpy"].numpy(), t["python"].tolist(), t["gauss"].tolist()
    np.random.set_state(("MT19937", a[:624].astype(np.uint32), int(a[624]), int(a[625]), gauss))
    random.setstate((words[0], tuple(words[1:]), None if math.isnan(py_gauss) else py_gauss))


# -- progress and resources ------------------------------------------------------------
def progress_line(epoch: int, epochs: int, step: int, total_steps: int, logs: dict[str, float],
                  samples_per_s: float, eta_s: float) -> str:
    """One line of training progress: epoch i/n, optimiser step, losses, global samples/s, time left."""
    losses = " ".join(f"{k} {v:.4g}" for k, v in sorted(({k: v for k, v in logs.items() if "loss" in k} or logs).items()))
    s = int(max(eta_s, 0)) if math.isfinite(eta_s) else -1
    eta = "?" if s < 0 else f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return (f"condgen train: epoch {epoch + 1}/{epochs} step {step}/{total_steps} {losses} | "
            f"{samples_per_s:.1f} samples/s | ETA {eta}")


# -- checkpoints -------------------------------------------------------------------------
def _build(config: dict[str, Any]) -> torch.nn.Module:
    """The model of ``config``; a LoRA run loads the base's weights (from Ray's object store) and wraps them."""
    model = build_model(config["model"], config["model_config"])
    if adapter := config.get("adapter"):
        model.load_state_dict(st_load(ray.get(adapter["weights_ref"])))
        prepare(model, adapter["targets"], adapter["rank"], adapter["alpha"])
    return model


def _resume(model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer], checkpoint) -> dict[str, Any]:
    """Weights and optimiser state from a Ray Train checkpoint, and where to continue: ``epoch``, ``batches``
    consumed in it, ``step``, the epoch's partial loss ``sums``, the ``rng`` states ({} in an older one)."""
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_file(os.path.join(d, ckpt_io.WEIGHTS)))
        state = json.loads(Path(d, TRAINER_STATE).read_text())
        ckpt_io.load_optimizer_tensors(optimizers, load_file(os.path.join(d, OPTIMIZER_WEIGHTS)), state["optimizers"])
        rng = load_file(os.path.join(d, RNG_STATE)) if Path(d, RNG_STATE).exists() else {}
    done = state.get("complete", True)
    return {"epoch": state["epoch"] + int(done), "batches": 0 if done else state["batches"], "step": state["step"],
            "sums": {} if done else state["sums"], "rng": rng, "world_size": state.get("world_size")}


def _save(directory: str, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
          trainer: dict[str, Any], rng: dict[str, torch.Tensor], adapter: dict[str, Any] | None) -> None:
    """One checkpoint (rank 0): weights + config, optimiser state, RNG states, trainer state, adapter files."""
    ckpt_io.save_checkpoint(directory, model)
    tensors, meta = ckpt_io.optimizer_tensors(optimizers)
    save_file(tensors, os.path.join(directory, OPTIMIZER_WEIGHTS))
    save_file({k: v.contiguous() for k, v in rng.items()}, os.path.join(directory, RNG_STATE))
    Path(directory, TRAINER_STATE).write_text(json.dumps({**trainer, "optimizers": meta}))
    if adapter:
        save_adapter(Path(directory).as_uri(), model, rank=adapter["rank"], alpha=adapter["alpha"], base=adapter["base"])


def _checkpoint(metrics: dict[str, Any], trainer: dict[str, Any], model, optimizers, config, device) -> None:
    """All ranks gather the RNG states and the epoch's partial sums; rank 0 writes the checkpoint; all report."""
    rank, world = _world()
    rng, sums = gather_rng(device), mean_across_workers(trainer["sums"])
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            _save(tmp, model, optimizers, {**trainer, "sums": sums, "world_size": world}, rng, config.get("adapter"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def _inject_fault(config: dict[str, Any], epoch: int, count: int, step: int, resumed: Any) -> None:
    """Fault injection for tests: the last rank dies once (never after a restart) at the 2nd batch of epoch
    ``fail_at_epoch`` or after optimiser step ``fail_at_step`` (place it after a checkpoint)."""
    rank, world = _world()
    if resumed is None and rank == world - 1 and (
            (epoch == config.get("fail_at_epoch") and count == 2) or step == config.get("fail_at_step")):
        time.sleep(6)  # Ray Train collects reports on its 2 s poll: a crash right after one would lose it
        os._exit(1)  # a killed worker process, not a Python exception


# -- the worker loop -------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build, (resume), train ``epochs`` epochs, report + checkpoint each epoch (and every
    ``checkpoint_every_steps`` optimiser steps)."""
    (rank, world), device = _world(), ray.train.torch.get_device()
    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, config.get("threads_per_worker", 1)))
    model = _build(config).to(device)
    broadcast_model(model)
    # A model whose draws are the global batch's (models.base.BatchDraws) keeps one stream on every rank; for the
    # others, rank 0 keeps the seed's stream (one worker trains as before) and the other ranks draw their own noise.
    shared = isinstance(getattr(model, "draws", None), BatchDraws)
    if rank > 0 and not shared:
        torch.manual_seed(rank_seed(config["seed"], rank))
    optimizers, base_lrs = make_optimizers(model), group_lrs(model)
    precision, accumulation = config.get("precision", "fp32"), int(config.get("grad_accumulation") or 1)
    check_options(model, precision, accumulation)
    resumed = ray.train.get_checkpoint()
    state = _resume(model, optimizers, resumed) if resumed else {"epoch": 0, "batches": 0, "step": 0, "rng": {}}
    step = state["step"]
    attach_frozen_parts(model)  # a frozen part named by URI (autoencoder, base) unless the model holds it
    data = open_train_data(config, rank, world, labelled_only=getattr(model.config, "condition", "label") == "label")
    bp = dataclasses.replace(data.plan, grad_accumulation=accumulation)
    opt_step = make_opt_step(optimizers, bp.weight(rank), device.type)
    factor = batching.lr_factor(config.get("lr_scaling", "none"), config["batch_size"],
                                config.get("lr_reference_batch") or config["batch_size"])
    warmup, every = int(config.get("lr_warmup_steps") or 0), int(config.get("checkpoint_every_steps") or 0)
    placement = worker_placement()  # every rank takes part in the gather
    logger = None
    if rank == 0 and config.get("run_id"):
        logger = MetricLogger(config["tracking_uri"], config["run_id"])
        # Where the workers ran: on a cluster, the first question about a slow or failed run.
        logger.log_dict({"workers": placement, "num_nodes": len({w["node_id"] for w in placement})}, "placement.json")
        logger.log_dict({**bp.summary(), "lr_factor": factor, "lr_warmup_steps": warmup, "precision": precision,
                         "checkpoint_every_steps": every, "data": data.summary()}, "batch_plan.json")
        print(f"condgen train: {bp.describe()} ({data.mode} data)", flush=True)
    grid_every = int(config.get("grid_every", 1) or 0) if config.get("run_id") else 0  # the same on every rank
    cond = share_conditions(grid_conditions(model, data.grid_examples(8)) if rank == 0 else None) if grid_every else None
    if state["rng"] and state["world_size"] == world:  # last: after everything above that draws
        restore_rng(state["rng"], rank, device)
    if shared:
        share_rng(device)
    epochs, total, t_run, step_run = config["epochs"], config["epochs"] * bp.steps_per_epoch, time.perf_counter(), step
    show_every = int(config.get("progress_every_steps") or max(50, bp.steps_per_epoch // 10))

    def show(epoch: int, logs: dict[str, float], samples_per_s: float) -> None:
        rate = max(step - step_run, 1) / (time.perf_counter() - t_run)
        print(progress_line(epoch, epochs, step, total, logs, samples_per_s, (total - step) / rate), flush=True)

    for epoch in range(state["epoch"], epochs):
        model.train()
        skip = state["batches"] if epoch == state["epoch"] else 0
        sums, count = (dict(state["sums"]), skip) if skip else ({}, 0)
        t0, first = time.perf_counter(), 0.0
        for batch in data.epoch(epoch, skip_steps=skip):
            first = first or time.perf_counter() - t0
            if factor != 1.0 or warmup:
                set_lr(optimizers, base_lrs, batching.lr_multiplier(step, factor, warmup))
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            share = (bp.rank_slice(rank).start, bp.step_size) if shared else None
            for k, v in train_batch(model, batch, opt_step, accumulation, precision, device.type, share).items():
                sums[k] = sums.get(k, 0.0) + v
            count, step = count + 1, step + 1
            _inject_fault(config, epoch, count, step, resumed)
            if every and step % every == 0 and count < bp.steps_per_epoch:
                pos = {"epoch": epoch, "batches": count, "step": step}
                _checkpoint(pos, {**pos, "complete": False, "sums": sums}, model, optimizers, config, device)
            if rank == 0 and count % show_every == 0 and count < bp.steps_per_epoch:
                show(epoch, {k: v / count for k, v in sums.items()},
                     (count - skip) * bp.step_size / (time.perf_counter() - t0))
        seconds = time.perf_counter() - t0
        rss = gather_floats(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # peak MiB (Linux: KiB)
        metrics = mean_across_workers({k: v / max(count, 1) for k, v in sums.items()})
        metrics.update(epoch=epoch, step=step, epoch_seconds=seconds, first_batch_seconds=first,
                       samples_per_s=(count - skip) * bp.step_size / seconds, peak_rss_mb=max(rss),
                       **{f"peak_rss_mb.rank{r}": v for r, v in enumerate(rss)})
        if rank == 0:
            show(epoch, metrics, metrics["samples_per_s"])
            if logger:
                logger.log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        # every rank samples a share of the grid (grids.py); rank 0 logs it: MLflow's slider by epoch
        if grid_every and (epoch + 1) % grid_every == 0 and (image := sample_grid(model, cond)) is not None and logger:
            logger.log_image_series(image, key="samples", step=epoch)
        _checkpoint(metrics, {"epoch": epoch, "batches": count, "step": step, "complete": True, "sums": {}},
                    model, optimizers, config, device)
