"""The per-epoch sample grid is made by every worker (tasks/training/grids.py): one worker makes the grid it always
made; two (a real gloo group of 2 spawned processes) each sample half, rank 0 gets the whole grid, the other rank
None, and neither rank's RNG moves; a model that does not generate (an autoencoder) gives None on every rank without a hang."""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from condgen.models.registry import build_model
from condgen.tasks.io.images import grid, to_uint8
from condgen.tasks.training.grids import piece_seed, sample_grid, share_conditions

DIFFUSION = {"channels": [8, 8], "timesteps": 20, "sample_steps": 4}
AUTOENCODER = {"channels": [4, 8]}


def _model(name: str, config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, config)


def _labels() -> torch.Tensor:
    return torch.arange(10).repeat_interleave(8)


def test_one_worker_makes_the_grid_it_made_before_and_leaves_the_rng_alone():
    model = _model("diffusion", DIFFUSION)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    image = sample_grid(model, _labels())
    assert torch.equal(torch.get_rng_state(), before)
    model.eval()
    with torch.no_grad():
        old = grid(to_uint8(model.sample(_labels(), generator=torch.Generator().manual_seed(0))), nrow=8)
    assert image is not None and image.shape == old.shape and np.array_equal(image, old)
    assert model.training is False  # eval() above; sample_grid itself restores train mode:
    model.train()
    sample_grid(model, _labels())
    assert model.training
    assert sample_grid(_model("autoencoder", AUTOENCODER), _labels()) is None


def test_piece_seeds_differ_by_rank_and_world():
    assert piece_seed(0, 0, 1) == 0
    seeds = {piece_seed(0, r, w) for w in (2, 4) for r in range(w)}
    assert len(seeds) == 6


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model("diffusion", DIFFUSION)
        torch.manual_seed(100 + rank)
        before = torch.get_rng_state()
        cond = share_conditions(_labels() if rank == 0 else None)
        image = sample_grid(model, cond)
        none = sample_grid(_model("autoencoder", AUTOENCODER), cond)
        torch.set_rng_state(before)  # _model above reseeds; what matters is sample_grid's own draws:
        sample_grid(model, cond)
        result = {"cond": cond.tolist(), "none": none is None, "rng_kept": torch.equal(torch.get_rng_state(), before),
                  "shape": None if image is None else list(image.shape)}
        if image is not None:
            np.save(f"{out}/grid.npy", image)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_workers_each_sample_half_and_rank_0_gets_the_whole_grid(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["cond"] for r in ranks] == [_labels().tolist()] * 2  # rank 0's conditions reached rank 1
    assert ranks[1]["shape"] is None and all(r["none"] and r["rng_kept"] for r in ranks)
    image = np.load(tmp_path / "grid.npy")
    model = _model("diffusion", DIFFUSION).eval()
    with torch.no_grad():
        halves = [model.sample(_labels()[i * 40:(i + 1) * 40], generator=torch.Generator().manual_seed(piece_seed(0, i, 2)))
                  for i in range(2)]
    expected = grid(to_uint8(torch.cat(halves)), nrow=8)
    assert image.shape == expected.shape == tuple(ranks[0]["shape"])
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1  # the same pieces, in rank order
