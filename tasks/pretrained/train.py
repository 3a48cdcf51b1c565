"""The Ray Train worker loop of a LoRA fine-tune of a pretrained pipeline (one process per worker).

Per step (diffusers' ``train_text_to_image_lora.py``, Ho et al. 2020's simple loss): draw rows of the
global batch, z = mean + std * n from the cached VAE posterior, t ~ U[0, T), z_t = sqrt(a) z +
sqrt(1 - a) eps, and regress the U-Net's output on eps (or v, Salimans & Ho 2022, for a
v-prediction base) with the caption's cached hidden states, replaced by the empty prompt's with
probability ``cond_dropout`` so the adapted model keeps an unconditional branch for CFG (Ho &
Salimans 2022, §3.1). Only the LoRA tensors train; their gradients are averaged over workers with
one flat all-reduce (as in ``tasks.training.worker``).

Exact resume: every random draw of step s comes from a generator seeded by (seed, s, rank), and a
checkpoint holds the live adapter, its EMA, the optimiser state and s, so a run resumed from a
checkpoint takes the same steps as one that never stopped. The loop touches Ray only through
``get_context``/``get_checkpoint``/``report``.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from condgen.models.diffusion import cfg as guide
from condgen.models.diffusion import sample_ddim
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io.images import grid, to_uint8
from condgen.tasks.io.tracking import MetricLogger
from condgen.tasks.pretrained import base, cache, lora
from condgen.tasks.training.batching import rank_and_world as _world
from condgen.tasks.training.worker import allreduce_grads

LIVE, EMA, OPT, STATE = "live.safetensors", "ema.safetensors", "optimizer.safetensors", "trainer_state.json"


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of every random draw of (step, rank): resuming at step s replays exactly."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def loss_on_batch(p: base.Pretrained, data: dict[str, torch.Tensor], rows: torch.Tensor, g: torch.Generator,
                  config: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The denoising loss of one worker's rows of the global batch (all randomness from ``g``)."""
    schedule = p.schedule
    mean, std = data["mean"][rows].float(), data["std"][rows].float()
    z = mean + std * torch.randn(mean.shape, generator=g)
    t = torch.randint(0, schedule.T, (len(rows),), generator=g)
    eps = torch.randn(z.shape, generator=g)
    drop = torch.rand(len(rows), generator=g) < float(config["cond_dropout"])
    z_t = schedule.q_sample(z, t, eps)
    if config["adapter"]["targets"].get("text_encoder"):
        ids = data["ids"][data["index"][rows]]
        ids[drop] = data["null_ids"][0]
        cond = p.text_encoder(ids.to(device))[0]
    else:
        cond = data["emb"][data["index"][rows]].float()
        cond[drop] = data["null"][0].float()
    if p.scheduler_config.get("prediction_type", "epsilon") == "v_prediction":
        a = schedule.alpha_bar_like(t, z)
        target = a.sqrt() * eps - (1 - a).sqrt() * z  # v = sqrt(a) eps - sqrt(1 - a) x_0
    else:
        target = eps
    bf16 = config["mixed_precision"] == "bf16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = p.unet(z_t.to(device), t.to(device), encoder_hidden_states=cond.to(device)).sample
    return F.mse_loss(pred.float(), target.to(device))


@torch.no_grad()
def validation_grid(p: base.Pretrained, config: dict[str, Any]) -> np.ndarray:
    """Images of the fixed validation prompts x seeds (condgen's DDIM + CFG), one row per prompt."""
    prompts, seeds = config["validation_prompts"], config["validation_seeds"]
    device = next(p.unet.parameters()).device
    rows = []
    for prompt in prompts:
        cond = base.encode_prompts(p, [prompt]).float()
        D = guide(base.denoiser(p), float(config["guidance_scale"]) - 1, base.encode_prompts(p, [""]).float())
        for seed in seeds:
            x = base.initial_latents(p, 1, config["image_size"], torch.Generator().manual_seed(int(seed))).to(device)
            z = sample_ddim(D, x, p.schedule, cond=cond,
                            timesteps=base.timesteps(p.scheduler_config, int(config["validation_steps"])))
            rows.append(to_uint8(base.decode_latents(p, z))[0])
    return grid(np.stack(rows), nrow=len(seeds), scale=1)


def _resume(checkpoint, params: list[torch.nn.Parameter], ema: list[torch.Tensor] | None,
            opt: torch.optim.Optimizer) -> int:
    with checkpoint.as_directory() as d:
        live, state = load_file(str(Path(d, LIVE))), json.loads(Path(d, STATE).read_text())
        with torch.no_grad():
            for i, prm in enumerate(params):
                prm.copy_(live[str(i)])
            if ema is not None:
                saved = load_file(str(Path(d, EMA)))
                for i, e in enumerate(ema):
                    e.copy_(saved[str(i)])
        ckpt_io.load_optimizer_tensors({"adamw": opt}, load_file(str(Path(d, OPT))), state["optimizer"])
    return int(state["step"])


def _save(d: str, p: base.Pretrained, config: dict[str, Any], params: list[torch.nn.Parameter],
          ema: list[torch.Tensor] | None, opt: torch.optim.Optimizer, step: int) -> None:
    """A training checkpoint: the served adapter (EMA weights when on) + everything exact resume needs."""
    adapter_cfg = config["adapter"]
    if ema is not None:
        with _swapped(params, ema):
            lora.save(d, p, adapter_cfg)
        save_file({str(i): e.detach().cpu().contiguous() for i, e in enumerate(ema)}, str(Path(d, EMA)))
    else:
        lora.save(d, p, adapter_cfg)
    save_file({str(i): prm.detach().cpu().contiguous() for i, prm in enumerate(params)}, str(Path(d, LIVE)))
    tensors, meta = ckpt_io.optimizer_tensors({"adamw": opt})
    save_file(tensors, str(Path(d, OPT)))
    Path(d, STATE).write_text(json.dumps({"step": step, "optimizer": meta}))


@contextlib.contextmanager
def _swapped(params: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """Temporarily load ``values`` (the EMA) into ``params``."""
    saved = [prm.detach().clone() for prm in params]
    with torch.no_grad():
        for prm, v in zip(params, values):
            prm.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for prm, v in zip(params, saved):
                prm.copy_(v)


def train_step(p: base.Pretrained, data: dict[str, torch.Tensor], params: list[torch.nn.Parameter],
               opt: torch.optim.Optimizer, ema: list[torch.Tensor] | None, config: dict[str, Any], step: int,
               device: torch.device) -> dict[str, float]:
    """Optimiser step ``step`` (0-based): this rank's rows of the global batch, gradients averaged over ranks,
    clipping, AdamW, the EMA update. Every draw comes from (seed, step, rank), so it replays exactly."""
    rank, world = _world()
    g = step_generator(config["seed"], step, 0)  # the global batch's rows: the same on every rank
    rows = torch.randint(0, len(data["mean"]), (int(config["batch_size"]),), generator=g)[rank::world]
    loss = loss_on_batch(p, data, rows, step_generator(config["seed"], step, rank + 1), config, device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    allreduce_grads(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, float(config["max_grad_norm"]))
    opt.step()
    if ema is not None:
        with torch.no_grad():
            for e, prm in zip(ema, params):
                e.lerp_(prm.detach(), 1 - float(config["ema_decay"]))
    logged = loss.detach().double().reshape(1)
    if world > 1:  # the global batch's mean loss (equal shares)
        torch.distributed.all_reduce(logged)
        logged /= world
    return {"loss": float(logged), "grad_norm": float(grad_norm), "step": step + 1}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: load the base, add the adapter, (resume), run ``steps`` optimiser steps."""
    rank, _ = _world()
    torch.manual_seed(config["seed"])  # peft's LoRA A init: the same on every rank
    torch.set_num_threads(max(1, int(config.get("threads_per_worker") or 1)))  # as tasks.training.worker
    device = ray.train.torch.get_device()
    p = base.load(config["base"], device=device)
    params = lora.inject(p, config["adapter"])
    if config["gradient_checkpointing"]:
        p.unet.enable_gradient_checkpointing()
    p.unet.train()
    data = {**cache.read(config["latents_uri"]), **cache.read(config["text_uri"])}
    opt = torch.optim.AdamW(params, lr=float(config["lr"]), weight_decay=1e-2)
    ema = [prm.detach().clone() for prm in params] if config["ema_decay"] else None
    step, resumed = 0, ray.train.get_checkpoint()
    if resumed:
        step = _resume(resumed, params, ema, opt)
    logger = MetricLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None
    total = int(config["steps"])
    while step < total:
        metrics = train_step(p, data, params, opt, ema, config, step, device)
        step += 1
        if logger:
            logger.log({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}, step=step)
            every = int(config["validate_every"] or 0)
            if every and config["validation_prompts"] and (step % every == 0 or step == total):
                p.unet.eval()
                with _swapped(params, ema) if ema is not None else contextlib.nullcontext():
                    logger.log_image_series(validation_grid(p, config), "validation", step)
                p.unet.train()
        if step % int(config["checkpoint_every"]) == 0 or step == total:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    _save(tmp, p, config, params, ema, opt, step)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
    if logger:
        logger.flush()
