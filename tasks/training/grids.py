"""The sample grid a training run logs every ``grid_every`` epochs, made by all workers together.

A diffusion grid is 80 samples of 25 denoising steps (with CFG, 50 U-Net passes): on a CPU worker it takes
about as long as a tenth of an epoch of training. When rank 0 made it alone, the other ranks waited at the
next collective, so the grid did not get cheaper with more workers and capped the speed-up of a short-epoch
run. Now each rank samples a contiguous ``1/W`` of the grid and rank 0 gathers the pieces (``sample_grid``).

* One worker makes exactly the grid it made before: one generator seeded ``seed`` for all samples.
* With W > 1, rank r's piece draws from a generator seeded from ``(seed, r, W)``, so a grid repeats run to run
  at a given worker count; the pictures differ between worker counts, the model does not.
* Every rank leaves its global RNGs as they were (``fork_rng``), so a grid never changes the training after it.
* A model that does not generate (an autoencoder) raises ``NotImplementedError`` on every rank; each rank still
  takes part in the gather (with nothing), so no rank waits for another, and the result is None.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from condgen.tasks.io.images import from_uint8, grid, to_uint8
from condgen.tasks.training.batching import rank_and_world as _world


def grid_conditions(model: torch.nn.Module, arrays: dict[str, np.ndarray], per_class: int = 8) -> torch.Tensor:
    """Conditions for a class-by-class sample grid: labels, one caption embedding per class, or (image-conditioned
    models) condition images made from real images of each class (greyscale or colour)."""
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


def share_conditions(cond: torch.Tensor | None) -> torch.Tensor | None:
    """Rank 0's grid conditions on every rank (a collective; the identity for one worker)."""
    if _world()[1] == 1:
        return cond
    box = [None if cond is None else cond.cpu()]  # sent as bytes; each rank moves it to its own device
    dist.broadcast_object_list(box, src=0)
    return box[0]


def piece_seed(seed: int, rank: int, world: int) -> int:
    """The generator seed of rank ``rank``'s piece of a ``world``-worker grid (``seed`` itself for one worker)."""
    return seed if world == 1 else int(np.random.SeedSequence([seed, rank, world]).generate_state(1)[0])


def _sample_piece(model: torch.nn.Module, cond: torch.Tensor, seed: int) -> np.ndarray | None:
    if cond.shape[0] == 0:
        return None
    cond = cond.to(next(model.parameters()).device)
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            return to_uint8(model.sample(cond, generator=torch.Generator().manual_seed(seed)))
    except NotImplementedError:
        return None
    finally:
        model.train()


def sample_grid(model: torch.nn.Module, cond: torch.Tensor, seed: int = 0, per_row: int = 8) -> np.ndarray | None:
    """A class-by-class grid of samples on rank 0 (None on the other ranks, and for models that do not generate).
    A collective: every rank calls it with the same ``cond`` (``share_conditions``) and samples its share."""
    rank, world = _world()
    part = np.array_split(np.arange(cond.shape[0]), world)[rank]
    piece = _sample_piece(model, cond[part[0]: part[-1] + 1] if len(part) else cond[:0], piece_seed(seed, rank, world))
    pieces = [piece] * world
    if world > 1:
        dist.all_gather_object(pieces, piece)
    made = [p for p in pieces if p is not None]
    if rank != 0 or not made or sum(len(p) for p in made) != cond.shape[0]:
        return None
    return grid(np.concatenate(made), nrow=per_row)
