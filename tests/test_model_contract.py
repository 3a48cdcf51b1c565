"""The contract of models/base.py, checked for every registered model on its tiny config (tests/tiny.py).

For each name in ``condgen.models.registry.MODELS``: it builds and names its optimiser groups;
``train_step`` calls ``opt_step`` once per group and lowers the loss on a fixed batch; a
checkpoint (tasks/io/checkpoint.py) round trip gives bit-identical outputs; and a batch gives,
row for row, what each row gives alone with the same noise. Seconds in all, one CPU thread.
"""
from __future__ import annotations

import math

import pytest
import torch

from condgen.models.base import GenerativeModel, is_generator
from condgen.models.registry import MODELS
from condgen.tasks.io import checkpoint as ckpt_io
from tests import tiny
from tests.tiny import FROZEN, LOSS_KEY, TINY, build_tiny, opt_step_for, outputs, perturb, rows, tiny_batch

NAMES = sorted(MODELS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _frozen_part(name: str, model: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(model, FROZEN[name][0]) if name in FROZEN else None


def test_every_registered_model_has_a_tiny_config():
    assert sorted(TINY) == NAMES, "tests/tiny.py's TINY must name exactly the registered models"
    assert set(FROZEN) <= set(MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_train_step_calls_every_optimizer_group_once_and_never_the_frozen_part(name):
    model = build_tiny(name).train()
    groups = {k: list(v) for k, v in model.optimizer_groups().items()}
    assert groups and all(any(p.requires_grad for p in ps) for ps in groups.values()), name
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)), "a parameter in two optimizer groups"
    frozen = _frozen_part(name, model)
    if frozen is not None:
        assert not {id(p) for p in frozen.parameters()} & set(ids)
        assert not any(p.requires_grad for p in frozen.parameters())
        before = ckpt_io.state_fingerprint(frozen)
    calls: list[str] = []
    step = opt_step_for(model)

    def opt_step(group: str, loss: torch.Tensor) -> None:
        assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss), (group, loss)
        calls.append(group)
        step(group, loss)

    torch.manual_seed(0)
    logs = model.train_step(tiny_batch(name), opt_step)
    assert sorted(calls) == sorted(groups), calls
    assert logs and all(isinstance(v, float) and math.isfinite(v) for v in logs.values()), logs
    assert LOSS_KEY.get(name, "loss") in logs
    if frozen is not None:
        assert ckpt_io.state_fingerprint(frozen) == before
        assert all(p.grad is None for p in frozen.parameters())
    if is_generator(model):
        assert isinstance(model, GenerativeModel)


# Adam steps on one fixed batch, and the factor by which the loss must fall at fixed noise. Measured
# over 8-10 seeds (the worst case stands in for another CPU's rounding, which moves a trajectory
# far less than another seed): the loss falls to 0.01-0.6 x, so 0.7 holds with a margin.
STEPS = 40
FACTOR = 0.7
PROBES = 4  # fixed noise draws the loss is averaged over (t, eps, dropout, augmentation, fakes' z)


@pytest.mark.parametrize("name", NAMES)
def test_train_step_lowers_the_loss_on_a_fixed_batch(name):
    """train_step's loss (the LOSS_KEY entry of its logs) at PROBES fixed seeds of its noise, before and
    after STEPS Adam steps (optimisers as the training driver builds them): a relative criterion."""
    model = build_tiny(name).train()
    batch = tiny_batch(name)
    key = LOSS_KEY.get(name, "loss")

    def at_fixed_noise() -> float:
        total = 0.0
        for k in range(PROBES):
            torch.manual_seed(123 + k)
            total += model.train_step(batch, lambda group, loss: None)[key]
        return total / PROBES

    before = at_fixed_noise()
    step = opt_step_for(model)
    torch.manual_seed(0)
    for _ in range(STEPS):
        model.train_step(batch, step)
    after = at_fixed_noise()
    assert math.isfinite(before) and after < FACTOR * before, (name, key, before, after)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_gives_identical_outputs(name, tmp_path):
    """save_checkpoint -> load_checkpoint: same registry name and config, same weights (frozen part
    included: a checkpoint is self-contained), bit-identical outputs for the same generator seed
    (same weights, same batch, same kernels: identical arithmetic)."""
    model = perturb(build_tiny(name), seed=1, scale=0.05).eval()
    ckpt_io.save_checkpoint(tmp_path, model)
    loaded, meta = ckpt_io.load_checkpoint(tmp_path)
    assert meta["model"] == name and type(loaded) is type(model) and loaded.config == model.config
    assert ckpt_io.state_fingerprint(loaded) == ckpt_io.state_fingerprint(model)
    batch = rows(tiny_batch(name), 0, 3)
    ref = outputs(name, model, batch, _gen(7))
    assert torch.equal(outputs(name, loaded, batch, _gen(7)), ref)
    assert torch.equal(outputs(name, model, batch, _gen(7)), ref)  # deterministic given the seed
    # not vacuous: other weights give other outputs
    other = perturb(build_tiny(name, seed=1), seed=2, scale=0.05).eval()
    assert not torch.allclose(outputs(name, other, batch, _gen(7)), ref)
    if is_generator(model) or name == "superres":
        assert ref.shape == (3, 1, 28, 28) and ref.abs().max() <= 1  # samples: (B, C, H, W) in [-1, 1]


def _shape_of(args: tuple, kwargs: dict) -> tuple[int, ...]:
    """The size argument of a torch.randn call: randn(2, 3), randn((2, 3)), randn(torch.Size(...)), size=."""
    if "size" in kwargs:
        return tuple(kwargs["size"])
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return tuple(int(a) for a in args)


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_gives_what_each_row_gives_alone(name, monkeypatch):
    """Batched sampling equals single-item sampling: the noise of the batched call (every torch.randn
    draw, recorded) is replayed row by row, so only the batch size differs. CPU kernels choose their
    blocking by batch size, so one forward may differ by float32 rounding (~1e-7) and a few sampling
    steps by ~1e-5: the bound is 2e-3 of the outputs' scale (samples are in [-1, 1]), as
    tasks/generation/batched.py documents for serving."""
    model = perturb(build_tiny(name), seed=1, scale=0.05).eval()
    n = 4
    batch = rows(tiny_batch(name), 0, n)
    real_randn = torch.randn
    drawn: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        out = real_randn(*args, **kwargs)
        drawn.append(out)
        return out

    monkeypatch.setattr(torch, "randn", recording)
    full = outputs(name, model, batch, _gen(5))
    assert all(d.shape[0] == n for d in drawn), [tuple(d.shape) for d in drawn]
    assert full.shape[0] == n
    for i in range(n):
        replay = iter(drawn)

        def replaying(*args, _i=i, _replay=replay, **kwargs):
            ref = next(_replay, None)
            assert ref is not None, "the single-row call drew more noise than the batched call"
            assert _shape_of(args, kwargs) == (1, *ref.shape[1:]), (_shape_of(args, kwargs), tuple(ref.shape))
            return ref[_i:_i + 1].clone().to(device=kwargs.get("device") or ref.device,
                                              dtype=kwargs.get("dtype") or ref.dtype)

        monkeypatch.setattr(torch, "randn", replaying)
        one = outputs(name, model, rows(batch, i, i + 1), _gen(5))
        assert next(replay, None) is None, "the single-row call drew less noise than the batched call"
        scale = max(1.0, float(full.abs().max()))
        torch.testing.assert_close(one, full[i:i + 1], rtol=0, atol=2e-3 * scale)
    monkeypatch.setattr(torch, "randn", real_randn)


def test_tiny_optimizers_are_the_training_loop_s():
    """tests/tiny.py builds optimisers as tasks/training/worker.py does (same groups, parameters, lr, betas)."""
    from condgen.tasks.training.worker import make_optimizers

    for name in NAMES:
        model = build_tiny(name)
        ours, loop = tiny.make_optimizers(model), make_optimizers(model)
        assert sorted(ours) == sorted(loop), name
        for group in loop:
            a, b = ours[group].param_groups, loop[group].param_groups
            assert len(a) == len(b) == 1, name
            assert [id(p) for p in a[0]["params"]] == [id(p) for p in b[0]["params"]], (name, group)
            assert (a[0]["lr"], tuple(a[0]["betas"])) == (b[0]["lr"], tuple(b[0]["betas"])), (name, group)
