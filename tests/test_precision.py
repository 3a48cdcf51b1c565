"""Mixed precision and gradient accumulation in the worker loop (tasks/training/worker.py).

Accumulating ``m`` micro-batches of a rank's share gives the weights one batch gives (a tiny CVAE with its
noise fixed, SGD as in tests/test_scale_out.py), with equal and unequal micro-batches; the diffusion model's
EMA moves once per optimiser step, not once per micro-batch; a GAN refuses accumulation in one line; bf16
autocast runs the forward in bf16 while weights and gradients stay fp32, and its loss falls.
"""
from __future__ import annotations

import pytest
import torch

from condgen.tasks.training.driver import TrainRequest, batch_params
from condgen.tasks.training.worker import check_options, make_opt_step, make_optimizers, train_batch
from tests.tiny import build_tiny, digits, tiny_batch

SEED, STEPS = 5, 4


def _sgd(model: torch.nn.Module, lr: float = 1e-3) -> dict[str, torch.optim.Optimizer]:
    """The worker's groups with SGD: Adam's 1/sqrt(v) magnifies rounding on near-zero gradients
    (tests/test_scale_out.py's docstring), SGD compares the gradients themselves."""
    return {name: torch.optim.SGD(opt.param_groups[0]["params"], lr=lr) for name, opt in make_optimizers(model).items()}


def _train_cvae(accumulation: int, n: int) -> dict[str, torch.Tensor]:
    model = build_tiny("cvae", seed=SEED)
    opt_step = make_opt_step(_sgd(model))
    x, y = digits(n * STEPS)
    for k in range(STEPS):
        batch = {"x": x[k * n:(k + 1) * n], "y": y[k * n:(k + 1) * n]}
        train_batch(model, batch, opt_step, accumulation)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("accumulation, n", [(3, 24), (5, 24), (4, 25)])
def test_accumulated_micro_batches_give_the_weights_of_one_batch(accumulation, n, monkeypatch):
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # z = mu: no per-sample noise
    torch.set_num_threads(1)
    start = build_tiny("cvae", seed=SEED).state_dict()
    one, acc = _train_cvae(1, n), _train_cvae(accumulation, n)
    moved = max((one[k] - start[k]).abs().max().item() for k in one if one[k].is_floating_point())
    diff = max((one[k] - acc[k]).abs().max().item() for k in one if one[k].is_floating_point())
    print(f"{accumulation} micro-batches of {n}: weights moved {moved:.3g}, max |one - accumulated| {diff:.3g}")
    assert moved > 1e-3
    for k in one:
        torch.testing.assert_close(acc[k], one[k], rtol=1e-5, atol=1e-6, msg=k)


def test_accumulation_logs_are_the_share_weighted_mean_and_a_share_too_small_is_an_error(monkeypatch):
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    model = build_tiny("cvae", seed=SEED)
    batch = tiny_batch("cvae", 12)
    parts = []
    for lo, hi in ((0, 6), (6, 12)):  # the micro-batches' losses before any step
        loss, _ = model.loss(batch["x"][lo:hi], batch["y"][lo:hi])
        parts.append(loss.item())
    logs = train_batch(model, batch, make_opt_step(_sgd(model)), 2)
    assert logs["loss"] == pytest.approx(sum(parts) / 2, rel=1e-5)  # step applied after both
    with pytest.raises(ValueError, match="cannot make 13 micro-batches"):
        train_batch(model, batch, make_opt_step(_sgd(model)), 13)


def test_the_diffusion_ema_moves_once_per_optimiser_step():
    model = build_tiny("diffusion", seed=SEED, ema_decay=0.9)
    opt_step = make_opt_step(make_optimizers(model))
    batch = {k: v for k, v in tiny_batch("diffusion", 12).items() if k in ("x", "y")}
    for _ in range(3):
        train_batch(model, batch, opt_step, 4)
    assert int(model.ema_updates) == 3
    assert not any(k == "update_ema" for k in vars(model))  # the method is restored


def test_a_gan_refuses_accumulation_and_bad_options_fail_before_training():
    with pytest.raises(ValueError, match="one optimiser group.*grad_accumulation=1"):
        check_options(build_tiny("cgan"), "fp32", 2)
    check_options(build_tiny("cgan"), "bf16", 1)
    with pytest.raises(ValueError, match="precision must be one of"):
        check_options(build_tiny("cvae"), "fp16", 1)
    params = batch_params(TrainRequest(model="cvae", shards_uri="x", batch_size=32, num_workers=2,
                                       grad_accumulation=4, precision="bf16"))
    assert (params["grad_accumulation"], params["micro_batch"], params["precision"]) == (4, 4, "bf16")
    with pytest.raises(ValueError, match=r"grad_accumulation must be in \[1, 16\]"):
        batch_params(TrainRequest(model="cvae", shards_uri="x", batch_size=32, num_workers=2, grad_accumulation=17))
    with pytest.raises(ValueError, match="data_mode"):
        batch_params(TrainRequest(model="cvae", shards_uri="x", data_mode="disk"))
    with pytest.raises(ValueError, match="checkpoint_every_steps"):
        batch_params(TrainRequest(model="cvae", shards_uri="x", checkpoint_every_steps=-1))


def test_bf16_autocast_runs_the_forward_in_bf16_keeps_fp32_weights_and_the_loss_falls():
    torch.manual_seed(SEED)
    model = build_tiny("cvae", seed=SEED)
    opt_step = make_opt_step(make_optimizers(model))
    conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    seen: list[torch.dtype] = []
    hook = conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    batch = tiny_batch("cvae", 32)
    losses = [train_batch(model, batch, opt_step, 1, "bf16")["loss"] for _ in range(40)]
    hook.remove()
    assert seen == [torch.bfloat16] * 40  # the forward ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    train_batch(model, batch, opt_step)  # fp32 again outside
    print(f"bf16 loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
