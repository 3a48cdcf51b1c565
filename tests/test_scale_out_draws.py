"""Scaling out does not change a diffusion model, a cGAN or a CVAE: their per-sample draws (diffusion: timesteps,
noise, condition dropout; cGAN: z and DiffAugment; CVAE: the reparameterisation noise) are made for the whole global batch and sliced per worker
(models.base.BatchDraws), so 1 worker, 2 workers (a real gloo group of 2 spawned processes running the worker loop's
functions) and 2 micro-batches per step take the same optimiser steps; without the shared draws, 2 workers train
another model."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from condgen.models.base import BatchDraws
from condgen.tasks.io.images import to_uint8
from condgen.tasks.training import batching
from condgen.tasks.training.worker import (
    batches,
    broadcast_model,
    make_opt_step,
    make_optimizers,
    rank_seed,
    share_rng,
    train_batch,
)
from tests.tiny import build_tiny, digits

SEED, EPOCHS, SAMPLES, GLOBAL = 5, 2, 64, 16


def test_batch_draws_slice_one_draw_per_step():
    d, calls = BatchDraws(), []

    def make(n):
        calls.append(n)
        return torch.arange(n)

    assert torch.equal(d.take("t", 3, make), torch.arange(3))  # outside a step: a draw of its own size
    d.begin(4, 10)
    assert torch.equal(d.take("t", 3, make), torch.arange(4, 7))
    d.at(7)
    assert torch.equal(d.take("t", 3, make), torch.arange(7, 10))  # the next micro-batch: same draw, its rows
    assert calls == [3, 10]
    with pytest.raises(ValueError, match="outside a global batch of 10"):
        d.take("t", 4, make)
    d.end()
    assert d.total is None and torch.equal(d.take("t", 2, make), torch.arange(2))


def _arrays():
    x, y = digits(SAMPLES)
    return {"x": to_uint8(x), "y": y.numpy()}


MODELS = {"diffusion": {"prediction": "v", "loss_weighting": "min_snr", "p_uncond": 0.3},
          "cgan": {"augment": "translation,cutout,brightness,contrast"}, "cvae": {}}
LR = {"diffusion": 0.05, "cgan": 0.05, "cvae": 2e-4}  # the CVAE's loss sums over pixels


def _train(rank: int, world: int, name: str, accumulation: int, shared: bool, out: str, store: str) -> None:
    """The worker loop on rank ``rank`` of ``world``: a tiny v-prediction diffusion model (Min-SNR, CFG dropout)
    or a tiny cGAN with DiffAugment or a tiny CVAE, SGD."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = build_tiny(name, seed=SEED, **MODELS[name])
    broadcast_model(model)
    if shared:
        share_rng(torch.device("cpu"))
    elif rank > 0:
        torch.manual_seed(rank_seed(SEED, rank))
    optimizers = {group: torch.optim.SGD(opt.param_groups[0]["params"], lr=LR[name])
                  for group, opt in make_optimizers(model).items()}
    plan = batching.plan(SAMPLES, GLOBAL, world)
    opt_step = make_opt_step(optimizers, plan.weight(rank))
    for epoch in range(EPOCHS):
        for batch in batches(_arrays(), GLOBAL, rank, world, epoch, SEED):
            share = (plan.rank_slice(rank).start, plan.step_size) if shared else None
            train_batch(model, batch, opt_step, accumulation, share=share)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}.{rank}")
    if world > 1:
        dist.destroy_process_group()


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("name", list(MODELS))
def test_one_and_two_workers_and_micro_batches_train_the_same_model(name, tmp_path):
    n = torch.get_num_threads()
    runs = {"one": (1, 1, True), "two": (2, 1, True), "own": (2, 1, False)}
    if name != "cgan":  # a GAN steps D then G: no micro-batches (worker.check_options)
        runs["accum"] = (1, 2, True)
    for run, (world, accumulation, shared) in runs.items():
        args = (world, name, accumulation, shared, str(tmp_path / run), str(tmp_path / f"store-{run}"))
        if world == 1:
            _train(0, *args)
            torch.set_num_threads(n)
        else:
            mp.spawn(_train, args=args, nprocs=2)
    w = {run: load_file(tmp_path / f"{run}.0") for run in runs}
    start = build_tiny(name, seed=SEED, **MODELS[name]).state_dict()
    moved = _max_diff(w["one"], start)
    diffs = {run: _max_diff(w["one"], w[run]) for run in runs if run != "one"}
    print(f"{name}: {EPOCHS * SAMPLES // GLOBAL} SGD steps moved the weights up to {moved:.3g}; "
          f"max |1 worker - run|: {diffs}")
    assert moved > 1e-3
    assert _max_diff(w["two"], load_file(tmp_path / "two.1")) == 0.0  # the ranks stay identical
    for run in set(runs) - {"one", "own"}:
        for k in w["one"]:
            torch.testing.assert_close(w[run][k], w["one"][k], rtol=1e-4, atol=1e-5, msg=f"{run}: {k}")
    assert diffs["own"] > 100 * max(diffs["two"], 1e-7)  # the draws are what differed
