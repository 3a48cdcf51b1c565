"""The global batch: how it is split over workers, what an epoch is, and the learning-rate scaling option.

Scaling out must not change the model. ``TrainRequest.batch_size`` (and a retrain spec's
``batch_size``) is the **global** batch: the samples behind one optimiser step, summed over all
workers (Composer's ``global batch = per-device batch x devices x gradient accumulation``). The
worker count changes only how that batch is split:

* **Epoch.** One permutation of the ``n`` training samples per epoch (``seed + epoch``, the same on
  every worker). Optimiser step ``k`` of the epoch takes ``perm[k*G:(k+1)*G]``: ``n // G`` steps, and
  the ``n % G`` samples left at the end of that permutation are not used in this epoch (nothing wraps
  and nothing is padded; the next epoch's permutation differs, so no sample is left out for good). A
  set smaller than ``G`` makes one step over all ``n`` samples. The epoch is the same for any worker
  count: the same steps over the same sets of samples.
* **Streamed epoch** (``data_mode="stream"``, ``tasks/training/loader.py``). The split is read from its
  shards, never held whole: epoch ``e`` orders the shards by a permutation of ``(seed, e)`` and concatenates
  their samples of the split into one stream of ``n`` positions; the same ``n // G`` steps are taken, and the
  ``n % G`` positions at the end are the epoch's unused samples (``unused_per_epoch``; a new shard order next
  epoch). By default (``stream_sharding="global"``) every rank runs one shuffle buffer seeded by ``(seed, e)``
  over the whole epoch ``[0, steps x G)``: step ``k`` is draws ``k G .. k G + G - 1`` and rank ``r`` keeps
  ``rank_slice(r)`` of them, decoding only those, so a step's global batch is the same for any worker count,
  as in memory. ``stream_sharding="span"`` instead gives rank ``r`` the contiguous span ``rank_span`` of
  ``steps x share_r`` positions through a buffer seeded by ``(seed, e, r)``: a rank opens only the shards its
  span overlaps (for IO-bound clusters), and a step's global batch then changes with the worker count.
* **Split.** Rank ``r`` takes a contiguous slice of step ``k``'s samples; the shares differ by at most
  one sample (the first ``G % W`` ranks take one more: 64 on 3 workers is 22 + 21 + 21). With equal
  shares each rank's gradient (a mean over its share) is averaged over the ranks, as before. With
  unequal shares each rank's gradient is weighted by ``n_r / G`` before the sum, so the all-reduced
  gradient is the gradient of the mean loss over the ``G`` samples -- the average over samples, not over
  ranks -- and no sample is repeated or padded in. No gradient accumulation is needed for either case:
  ``grad_accumulation`` is 1 (recorded in MLflow with the split).
* **Schedules** count optimiser steps (EMA updates, an autoencoder's GAN start, warm-up) and never
  per-worker batches; every worker steps once per global batch.
* **Learning rate.** The config's ``lr`` is the rate for the global batch as given (``lr_scaling="none"``,
  the default). A run that does want to change the global batch may scale it relative to the batch the
  rate was tuned for (``lr_reference_batch``): ``"linear"`` (Goyal et al. 2017, for SGD) multiplies it by
  ``G / reference``, ``"sqrt"`` (the square-root rule suited to Adam) by ``sqrt(G / reference)``; with
  ``lr_warmup_steps`` the rate ramps linearly from the reference rate to the scaled one over that many
  optimiser steps (Goyal et al.'s gradual warm-up).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of workers: (0, 1) outside a torch.distributed group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


LR_SCALING = ("none", "linear", "sqrt")


def split(total: int, world: int) -> tuple[int, ...]:
    """Shares of ``total`` samples over ``world`` ranks, in rank order, differing by at most one."""
    base, extra = divmod(total, world)
    return tuple(base + (r < extra) for r in range(world))


@dataclass(frozen=True)
class BatchPlan:
    """One epoch of a run: ``steps_per_epoch`` optimiser steps of ``step_size`` samples, split in ``shares``."""

    global_batch: int  # as requested
    world_size: int
    samples: int  # n: training samples
    step_size: int  # samples per optimiser step: global_batch, or n when the set is smaller
    steps_per_epoch: int
    shares: tuple[int, ...]  # samples per rank per step
    grad_accumulation: int = 1  # micro-batches per rank per step

    @property
    def per_worker_batch(self) -> int:
        return max(self.shares)

    @property
    def unused_per_epoch(self) -> int:
        """Samples at the end of each epoch's permutation that no step of that epoch takes."""
        return self.samples - self.steps_per_epoch * self.step_size

    def weight(self, rank: int) -> float | None:
        """Rank ``rank``'s weight in the gradient sum: ``n_r / N`` when shares differ; None when they are
        equal (then the gradients are averaged over the ranks)."""
        if len(set(self.shares)) == 1:
            return None
        return self.shares[rank] / self.step_size

    def rank_slice(self, rank: int) -> slice:
        start = sum(self.shares[:rank])
        return slice(start, start + self.shares[rank])

    def summary(self) -> dict[str, Any]:
        """What an epoch is, for the run's ``batch_plan.json`` and the log."""
        return {"global_batch": self.global_batch, "world_size": self.world_size, "samples": self.samples,
                "step_size": self.step_size, "steps_per_epoch": self.steps_per_epoch, "shares": list(self.shares),
                "per_worker_batch": self.per_worker_batch, "grad_accumulation": self.grad_accumulation,
                "unused_per_epoch": self.unused_per_epoch}

    def describe(self) -> str:
        return (f"epoch = {self.steps_per_epoch} optimiser steps of {self.step_size} samples (global batch "
                f"{self.global_batch}) over {self.world_size} worker(s), shares {list(self.shares)}; "
                f"{self.unused_per_epoch} of {self.samples} samples unused per epoch (a new permutation each epoch)")


def split_params(global_batch: int, world: int) -> dict[str, Any]:
    """The split of a global batch, before the data is read: MLflow params of a run."""
    shares = check_split(global_batch, world)
    return {"global_batch": global_batch, "world_size": world, "per_worker_batch": max(shares),
            "grad_accumulation": 1, "shares": ",".join(map(str, shares))}


def check_split(global_batch: int, world: int) -> tuple[int, ...]:
    """The shares of ``global_batch`` over ``world`` ranks; ValueError when a rank would get no sample."""
    if global_batch < world:
        raise ValueError(f"a global batch of {global_batch} cannot be split over {world} workers (at least one "
                         "sample each); raise batch_size or use fewer workers")
    return split(global_batch, world)


def plan(samples: int, global_batch: int, world: int) -> BatchPlan:
    """The epoch of ``samples`` training samples in global batches of ``global_batch`` over ``world`` ranks."""
    check_split(global_batch, world)
    step_size = min(global_batch, samples)
    if step_size < world:
        raise ValueError(f"{samples} training samples cannot be split over {world} workers")
    return BatchPlan(global_batch, world, samples, step_size, samples // step_size, split(step_size, world))


def rank_span(bp: BatchPlan, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s positions ``[start, stop)`` in a streamed epoch (module docstring): ``steps x share``
    contiguous positions, the spans of all ranks back to back from position 0."""
    start = bp.steps_per_epoch * sum(bp.shares[:rank])
    return start, start + bp.steps_per_epoch * bp.shares[rank]


def epoch_steps(bp: BatchPlan, epoch: int, seed: int) -> Iterator[np.ndarray]:
    """The sample indices of each optimiser step of ``epoch``: the same on every rank and for every world size."""
    perm = np.random.default_rng(seed + epoch).permutation(bp.samples)
    for k in range(bp.steps_per_epoch):
        yield perm[k * bp.step_size:(k + 1) * bp.step_size]


# -- learning rate ---------------------------------------------------------------------------------------
def lr_factor(rule: str, global_batch: int, reference_batch: int) -> float:
    """The factor on the config's learning rate for ``global_batch`` under ``rule`` (module docstring)."""
    if rule not in LR_SCALING:
        raise ValueError(f"lr_scaling must be one of {LR_SCALING}, not {rule!r}")
    if rule == "none":
        return 1.0
    if reference_batch < 1:
        raise ValueError(f"lr_reference_batch must be >= 1, not {reference_batch}")
    ratio = global_batch / reference_batch
    return ratio if rule == "linear" else math.sqrt(ratio)


def lr_multiplier(step: int, factor: float, warmup_steps: int) -> float:
    """The multiplier of the config's rate at optimiser step ``step`` (0-based): a linear ramp from 1 to
    ``factor`` over ``warmup_steps`` steps, then ``factor``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return factor
    return 1.0 + (factor - 1.0) * (step + 1) / warmup_steps
