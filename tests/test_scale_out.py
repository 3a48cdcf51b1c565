"""Scaling out must not change the model (tasks/training/batching.py).

``batch_size`` is the global batch: the split of 64 samples over 1-4 workers, what an epoch is, the
learning-rate option; each optimiser step's global batch is the same set of samples for any worker count
(and one worker's batches are exactly today's); and a tiny CVAE with its noise fixed trained a few optimiser
steps by 1 worker and by 2 workers (a real gloo group of 2 spawned processes running the worker loop's
functions) ends with the same weights -- with equal shares (24 = 12 + 12) and unequal ones (25 = 13 + 12).
A Ray Train version of the same check (two TorchTrainer fits) is marked slow.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from condgen.tasks.io.images import to_uint8
from condgen.tasks.training import batching
from condgen.tasks.training.driver import TrainRequest, batch_params
from condgen.tasks.training.worker import batches, broadcast_model, make_opt_step, make_optimizers
from tests.tiny import build_tiny, digits

SEED, EPOCHS, SAMPLES = 3, 2, 100


# -- the arithmetic ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("world, shares", [(1, (64,)), (2, (32, 32)), (3, (22, 21, 21)), (4, (16, 16, 16, 16))])
def test_a_global_batch_of_64_splits_over_1_to_4_workers(world, shares):
    bp = batching.plan(1000, 64, world)
    assert bp.shares == shares and sum(bp.shares) == 64
    assert bp.per_worker_batch == max(shares) and bp.grad_accumulation == 1
    assert bp.steps_per_epoch == 15 and bp.unused_per_epoch == 40  # the same epoch for every worker count
    weights = [bp.weight(r) for r in range(world)]
    if len(set(shares)) == 1:
        assert weights == [None] * world  # equal shares: the average over ranks, as before
    else:
        assert weights == [s / 64 for s in shares] and math.isclose(sum(weights), 1.0)
    assert [bp.rank_slice(r) for r in range(world)] == [slice(sum(shares[:r]), sum(shares[:r + 1]))
                                                        for r in range(world)]
    params = batch_params(TrainRequest(model="cvae", shards_uri="x", batch_size=64, num_workers=world))
    assert params["global_batch"] == 64 and params["world_size"] == world
    assert params["per_worker_batch"] == max(shares) and params["grad_accumulation"] == 1
    assert params["lr_scaling"] == "none"


def test_a_set_smaller_than_the_global_batch_makes_one_step_and_a_batch_smaller_than_the_workers_is_an_error():
    bp = batching.plan(50, 64, 2)
    assert (bp.step_size, bp.steps_per_epoch, bp.shares, bp.unused_per_epoch) == (50, 1, (25, 25), 0)
    with pytest.raises(ValueError, match="cannot be split over 3 workers"):
        batching.plan(1000, 2, 3)
    with pytest.raises(ValueError, match="cannot be split"):
        batching.plan(2, 64, 3)


def test_learning_rate_scaling_is_opt_in_relative_to_a_reference_batch_with_a_warm_up():
    assert batching.lr_factor("none", 256, 128) == 1.0
    assert batching.lr_factor("linear", 256, 128) == 2.0
    assert batching.lr_factor("sqrt", 512, 128) == 2.0
    assert [batching.lr_multiplier(s, 2.0, 4) for s in (0, 1, 3, 10)] == [1.25, 1.5, 2.0, 2.0]
    assert batching.lr_multiplier(0, 2.0, 0) == 2.0
    with pytest.raises(ValueError, match="lr_scaling"):
        batching.lr_factor("cubic", 256, 128)
    with pytest.raises(ValueError, match="lr_reference_batch"):
        batch_params(TrainRequest(model="cvae", shards_uri="x", lr_scaling="linear"))


# -- the data order ---------------------------------------------------------------------------------------
def _arrays(n: int = SAMPLES, captions: bool = False) -> dict[str, np.ndarray]:
    x, y = digits(n)
    arrays = {"x": to_uint8(x), "y": y.numpy()}
    if captions:  # 3 phrasings per sample, and an unpaired second domain
        arrays["txt"] = np.random.default_rng(0).normal(size=(n, 3, 5)).astype(np.float32)
        arrays["x_b"] = to_uint8(x.flip(0))
    return arrays


@pytest.mark.parametrize("global_batch", [24, 25, 64, 128])
def test_each_step_takes_the_same_samples_for_any_worker_count(global_batch):
    arrays = _arrays(captions=True)
    one = list(batches(arrays, global_batch, 0, 1, 1, SEED))
    for world in (2, 3, 4):
        per_rank = [list(batches(arrays, global_batch, r, world, 1, SEED)) for r in range(world)]
        assert {len(steps) for steps in per_rank} == {len(one)}  # every rank steps together
        for k, whole in enumerate(one):
            for key, value in whole.items():
                joined = torch.cat([per_rank[r][k][key] for r in range(world)])
                assert torch.equal(joined, value), (world, k, key)


def test_one_worker_takes_the_batches_it_took_before():
    """Before the global batch, one worker drew ``perm[i:i + B]`` for i in range(0, n - B + 1, B)."""
    arrays = _arrays()
    for batch_size, epoch in ((32, 0), (24, 1), (128, 2)):
        perm = np.random.default_rng(SEED + epoch).permutation(SAMPLES)
        starts = range(0, SAMPLES - batch_size + 1, batch_size) if SAMPLES >= batch_size else [0]
        got = [b["y"] for b in batches(arrays, batch_size, 0, 1, epoch, SEED)]
        want = [torch.from_numpy(arrays["y"][perm[i:i + batch_size]]) for i in starts]
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


# -- the same weights with 1 and 2 workers ----------------------------------------------------------------
def _train(rank: int, world: int, global_batch: int, out: str, store: str) -> None:
    """The worker loop's functions on rank ``rank`` of ``world``: a tiny CVAE, its noise fixed (z = mu)."""
    torch.set_num_threads(1)
    torch.randn_like = torch.zeros_like  # a spawned process of its own (or under monkeypatch in-process)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = build_tiny("cvae", seed=SEED)
    broadcast_model(model)
    optimizers = {name: torch.optim.SGD(opt.param_groups[0]["params"], lr=1e-4)
                  for name, opt in make_optimizers(model).items()}  # the worker's groups; SGD: see the test
    opt_step = make_opt_step(optimizers, batching.plan(SAMPLES, global_batch, world).weight(rank))
    arrays = _arrays()
    for epoch in range(EPOCHS):
        for batch in batches(arrays, global_batch, rank, world, epoch, SEED):
            model.train_step(batch, opt_step)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}.{rank}")
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("global_batch", [24, 25])
def test_one_and_two_workers_reach_the_same_weights(global_batch, tmp_path, monkeypatch):
    """The gradient each step applies is the same, so SGD's weights agree to rounding. (Adam, the worker's
    optimiser, divides by the root of its second moment: the biases right before the CVAE's 1-channel
    GroupNorm groups have a gradient of zero up to rounding (~1e-9), which Adam blows up to steps of size lr
    whose sign is the rounding's; there one worker with another summation order differs just as much.)"""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    n = torch.get_num_threads()
    _train(0, 1, global_batch, str(tmp_path / "one"), "")
    torch.set_num_threads(n)
    mp.spawn(_train, args=(2, global_batch, str(tmp_path / "two"), str(tmp_path / "store")), nprocs=2)
    one, two0, two1 = (load_file(tmp_path / name) for name in ("one.0", "two.0", "two.1"))
    assert all(torch.equal(two0[k], two1[k]) for k in two0)  # the ranks stay identical
    start = build_tiny("cvae", seed=SEED).state_dict()
    moved = max((one[k] - start[k]).abs().max().item() for k in one if one[k].is_floating_point())
    diff = max((one[k] - two0[k]).abs().max().item() for k in one if one[k].is_floating_point())
    print(f"global batch {global_batch}: {EPOCHS * (SAMPLES // global_batch)} optimiser steps, weights moved "
          f"up to {moved:.3g}; max |1 worker - 2 workers| = {diff:.3g}")
    assert moved > 1e-3  # the steps did train
    for k in one:
        torch.testing.assert_close(two0[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
