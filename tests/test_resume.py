"""Exact resume (issue #16 item 3): a checkpoint records the data position and every RNG state.

Fast: the RNG states round-trip through safetensors tensors; an epoch resumed at step k yields exactly
the batches from k on; a mid-epoch checkpoint restores its position; the progress line. Slow (real Ray
Train, tiny CVAE): a run killed mid-epoch after a mid-epoch checkpoint and resumed ends with the weights of
an uninterrupted run, bit-identical with one worker, within float tolerance with two.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import ray.train
import torch
from safetensors.torch import load_file

from condgen.tasks.io import storage
from condgen.tasks.io.images import to_uint8
from condgen.tasks.training.driver import TrainRequest, train
from condgen.tasks.training.worker import (
    _resume,
    _save,
    batches,
    gather_rng,
    make_optimizers,
    progress_line,
    restore_rng,
)
from tests.tiny import build_tiny, digits

TINY_CVAE = {"channels": [4, 8], "latent_dim": 4, "cond_dim": 4, "lr": 5e-3}


def _draws() -> tuple:
    return (torch.rand(3).tolist(), torch.randn(2, 2).tolist(), np.random.rand(3).tolist(), np.random.randn(),
            random.random(), random.gauss(0, 1))


def test_rng_states_round_trip_through_tensors():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn(), random.gauss(0, 1)  # a cached Gaussian in both (numpy's and Python's gauss_next)
    saved = gather_rng()
    assert all(isinstance(v, torch.Tensor) for v in saved.values()) and "rank0.torch_cpu" in saved
    first = _draws()
    _draws()
    restore_rng(saved, 0)
    assert _draws() == first


def _arrays(n: int = 100) -> dict[str, np.ndarray]:
    x, y = digits(n)
    return {"x": to_uint8(x), "y": y.numpy(), "txt": np.random.default_rng(0).normal(size=(n, 3, 5)).astype(np.float32),
            "x_b": to_uint8(x.flip(0))}


@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_resumed_at_step_k_yields_the_batches_from_k_on(world):
    arrays = _arrays()
    for rank in range(world):
        whole = list(batches(arrays, 24, rank, world, 1, 7))
        rest = list(batches(arrays, 24, rank, world, 1, 7, skip_steps=2))
        assert len(whole) == 4 and len(rest) == 2
        for a, b in zip(whole[2:], rest):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_mid_epoch_checkpoint_restores_weights_optimiser_position_and_rngs(tmp_path):
    model = build_tiny("cvae", seed=1)
    optimizers = make_optimizers(model)
    loss, _ = model.loss(*digits(8))
    loss.backward()
    optimizers["main"].step()
    torch.manual_seed(9)
    rng = gather_rng()
    _save(str(tmp_path), model, optimizers, {"epoch": 2, "batches": 5, "step": 33, "complete": False,
                                             "sums": {"loss": 1.5}, "world_size": 1}, rng, None)
    expected = torch.rand(4)
    other = build_tiny("cvae", seed=2)
    other_opts = make_optimizers(other)
    state = _resume(other, other_opts, ray.train.Checkpoint.from_directory(str(tmp_path)))
    assert (state["epoch"], state["batches"], state["step"], state["sums"]) == (2, 5, 33, {"loss": 1.5})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert torch.equal(other_opts["main"].state_dict()["state"][0]["exp_avg"],
                       optimizers["main"].state_dict()["state"][0]["exp_avg"])
    restore_rng(state["rng"], 0)
    assert torch.equal(torch.rand(4), expected)
    # an epoch-end checkpoint: the next epoch from its first batch
    _save(str(tmp_path), model, optimizers, {"epoch": 2, "batches": 9, "step": 37, "complete": True, "sums": {},
                                             "world_size": 1}, rng, None)
    state = _resume(other, other_opts, ray.train.Checkpoint.from_directory(str(tmp_path)))
    assert (state["epoch"], state["batches"], state["step"]) == (3, 0, 37)


def test_the_progress_line_is_one_line_with_epoch_step_losses_rate_and_eta():
    line = progress_line(1, 10, 140, 700, {"loss": 0.12345, "kl": 3.0, "d_loss": 0.5}, 1234.5, 3723)
    assert "\n" not in line
    assert line == "condgen train: epoch 2/10 step 140/700 d_loss 0.5 loss 0.1235 | 1234.5 samples/s | ETA 01:02:03"
    assert "kl 3" in progress_line(0, 1, 1, 2, {"kl": 3.0}, 1.0, float("inf"))


# -- under Ray Train -------------------------------------------------------------------------------------
def _weights(res) -> dict[str, torch.Tensor]:
    return load_file(storage.local_path(storage.join(res.checkpoint_uri, "model.safetensors")))


def _run(tiny_shards: str, workers: int, name: str, **kw):
    return train(TrainRequest(model="cvae", shards_uri=tiny_shards, model_config=TINY_CVAE, epochs=2, batch_size=32,
                              num_workers=workers, checkpoint_every_steps=4, grid_every=0, run_name=name, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tiny_shards, local_ray, workers):
    """The last worker dies after optimiser step 10 of epoch 0 (of ~14); the group restarts from the step-8
    checkpoint (epoch 0, 8 batches in), skips those 8 batches and restores every rank's RNGs."""
    whole = _run(tiny_shards, workers, f"resume-whole-{workers}w")
    killed = _run(tiny_shards, workers, f"resume-killed-{workers}w", fail_at_step=10, max_failures=1)
    assert [h["epoch"] for h in killed.history] == [0, 1] and killed.metrics["step"] == whole.metrics["step"]
    a, b = _weights(whole), _weights(killed)
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"{workers} worker(s): {whole.metrics['step']} steps; max |uninterrupted - resumed| = {diff:.3g}; "
          f"loss {whole.history[-1]['loss']:.6f} vs {killed.history[-1]['loss']:.6f}")
    if workers == 1:
        assert all(torch.equal(a[k], b[k]) for k in a), diff  # bit-identical
    else:
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert killed.history[-1]["loss"] == pytest.approx(whole.history[-1]["loss"], rel=1e-5)
