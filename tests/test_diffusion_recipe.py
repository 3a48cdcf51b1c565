"""The diffusion training recipe's pieces: Min-SNR-gamma weighting, self-attention at the lowest
resolution, and models that wrap the U-Net (ControlNet) on a v-prediction base with attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from condgen.models.controlnet import ControlNet, ControlNetConfig, control_image
from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig
from condgen.models.diffusion.unet import ResBlock, SelfAttention
from tests.tiny import perturb

TINY = {"channels": (4, 8), "timesteps": 50, "schedule": "cosine"}


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("weighting,floor,plus", [("min_snr", 0.0, 0.0), ("min_snr", 0.25, 0.25),
                                                  ("min_snr_plus_one", 0.0, 1.0), ("min_snr_plus_one", 0.25, 1.0)])
def test_min_snr_weights_the_x0_error_by_min_snr_gamma(prediction, weighting, floor, plus):
    """Hang et al. 2023: whatever the network predicts, the weighted loss is min(SNR, gamma) ||x0_hat - x0||^2;
    min(SNR, gamma) + min_snr_floor with a floor; min(SNR, gamma) + 1 with "min_snr_plus_one" (plain
    v-prediction's x0 weight SNR + 1, clipped), whatever the floor field says."""
    torch.manual_seed(0)
    model = ConditionalDiffusion(DiffusionConfig(**TINY, prediction=prediction, loss_weighting=weighting,
                                                 min_snr_gamma=5.0, min_snr_floor=floor))
    x0, eps = torch.rand(6, 1, 8, 8) * 2 - 1, torch.randn(6, 1, 8, 8)
    t = torch.tensor([0, 5, 15, 25, 40, 49])
    a = model.alpha_bars[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = torch.randn_like(x0)  # any network output
    target_err = ((out - model.target(x0, eps, a)) ** 2).flatten(1).mean(1)
    x0_hat = (x_t - (1 - a).sqrt() * model.to_eps(out, x_t, t)) / a.sqrt()  # Song et al. 2021, Eq. 12
    x0_err = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    snr = (a / (1 - a)).flatten()
    weighted = model.loss_weights(a.flatten()) * target_err
    assert torch.allclose(weighted, (snr.clamp(max=5.0) + plus) * x0_err, rtol=1e-4, atol=1e-6)
    # the weights actually differ from 1 (high-SNR steps are down-weighted)
    assert model.loss_weights(a.flatten()).min() < 0.5
    if prediction == "v":  # at the noisiest step the floor (plain v's weight 1 with "plus one"), ~SNR (~0) without
        assert model.loss_weights(a.flatten())[-1] == pytest.approx(plus, abs=0.02)


def test_a_negative_floor_is_refused():
    with pytest.raises(ValueError, match="min_snr_floor"):
        ConditionalDiffusion(DiffusionConfig(**TINY, loss_weighting="min_snr", min_snr_floor=-0.5))


def test_min_snr_loss_trains_and_none_is_the_plain_mse():
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8) * 2 - 1, torch.arange(64) % 10  # enough t draws to hit SNR > gamma
    plain = ConditionalDiffusion(DiffusionConfig(**TINY))
    weighted = ConditionalDiffusion(DiffusionConfig(**TINY, loss_weighting="min_snr"))
    weighted.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    a, _ = plain.loss(x, y)
    torch.manual_seed(1)
    b, _ = weighted.loss(x, y)
    assert torch.isfinite(b) and not torch.isclose(a, b)  # same draws, another weighting
    with pytest.raises(ValueError, match="loss_weighting"):
        ConditionalDiffusion(DiffusionConfig(**TINY, loss_weighting="snr"))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        ConditionalDiffusion(DiffusionConfig(**TINY, loss_weighting="min_snr", min_snr_gamma=0))


def test_self_attention_starts_as_identity_and_is_permutation_equivariant():
    torch.manual_seed(0)
    attn = SelfAttention(8, heads=2)
    h = torch.randn(2, 8, 3, 3)
    assert torch.equal(attn(h), h)  # zero-initialised output projection
    perturb(attn)
    out = attn(h)
    assert not torch.allclose(out, h)
    # no positional term: permuting the positions permutes the output the same way
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    hp = h.flatten(2)[:, :, perm].view_as(h)
    assert torch.allclose(attn(hp).flatten(2), out.flatten(2)[:, :, perm], atol=1e-6)
    # and every position sees every other: changing one position changes the output elsewhere
    h2 = h.clone()
    h2[:, :, 0, 0] += 1.0
    assert not torch.allclose(attn(h2)[:, :, 2, 2], out[:, :, 2, 2])


def test_adagn_block_scales_and_shifts_the_norm_by_the_embedding_and_starts_as_the_identity():
    """Dhariwal & Nichol 2021, §3: AdaGN(h, e) = (1 + y_s) GroupNorm(h) + y_b with (y_s, y_b) = Linear(SiLU(e))."""
    torch.manual_seed(0)
    block = ResBlock(8, 8, 16, scale_shift=True)
    x, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 16)
    assert torch.equal(block(x, emb), x)  # zero-initialised second conv
    perturb(block)
    h = block.conv1(F.silu(block.norm1(x)))
    scale, shift = block.emb(F.silu(emb)).chunk(2, dim=1)
    ref = x + block.conv2(F.silu(block.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]))
    assert torch.allclose(block(x, emb), ref, atol=1e-6)
    # unlike the additive block, the condition also changes how strongly each channel's features pass
    additive = ResBlock(8, 8, 16)
    assert additive.emb.out_features == 8 and block.emb.out_features == 16


def test_scale_shift_is_off_by_default_so_older_checkpoints_keep_their_keys():
    off = ConditionalDiffusion(DiffusionConfig(**TINY)).state_dict()
    on = ConditionalDiffusion(DiffusionConfig(**TINY, scale_shift=True)).state_dict()
    assert set(off) == set(on)
    assert any(off[k].shape != on[k].shape for k in off if k.endswith("emb.weight"))
    assert ConditionalDiffusion(DiffusionConfig(**TINY)).net.mid1.scale_shift is False


def test_attention_is_off_by_default_so_older_checkpoints_keep_their_keys():
    off = ConditionalDiffusion(DiffusionConfig(**TINY)).state_dict()
    on = ConditionalDiffusion(DiffusionConfig(**TINY, attention=True)).state_dict()
    assert not any("self_attn" in k for k in off)
    assert {k for k in on if "self_attn" in k} and set(off) < set(on)


@pytest.mark.parametrize("condition,scale_shift", [("label", False), ("text", False), ("label", True)])
def test_controlnet_on_a_v_prediction_base_with_attention_equals_the_base_at_init(condition, scale_shift):
    torch.manual_seed(0)
    cfg = DiffusionConfig(channels=(4, 8), timesteps=20, prediction="v", attention=True, condition=condition,
                          text_dim=12, scale_shift=scale_shift)
    base = perturb(ConditionalDiffusion(cfg)).eval()
    net = ControlNet(ControlNetConfig(base=cfg), base=base)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([2, 9, 19])
    cond = torch.tensor([1, 4, 7]) if condition == "label" else base.embed_condition(torch.randn(3, 12)).detach()
    c = control_image(torch.rand(3, 1, 28, 28) * 2 - 1)
    with torch.no_grad():
        ref = base.eps(x, t, cond)
        assert torch.equal(net.eps(x, t, cond, c), ref)  # eps, not the raw v output
        assert torch.equal(net.eps(x, t, cond, None), ref)
        for z in [*net.zero_convs, net.zero_mid]:
            z.weight.normal_(0, 0.1)
        assert not torch.allclose(net.eps(x, t, cond, c), ref)
    assert any("self_attn" in k for k in net.control.state_dict())  # the trainable copy has the attention too


def test_new_diffusion_runs_start_from_the_recipe_and_stored_configs_load_as_written():
    from condgen.models.base import config_to_dict
    from condgen.models.registry import RECIPES, build_model, recipe_config

    fresh = build_model("diffusion", recipe_config("diffusion", {"channels": [4, 8], "attention": False}))
    c = fresh.config
    assert (c.prediction, c.schedule, c.loss_weighting, c.min_snr_floor, c.ema_decay) == ("v", "linear", "min_snr",
                                                                                          0.25, 0.999)
    assert c.attention is False and c.channels == (4, 8)  # the spec's own fields win
    assert recipe_config("cvae", {"latent_dim": 2}) == {"latent_dim": 2} and "cvae" not in RECIPES
    gan = build_model("cgan", recipe_config("cgan", {"channels": [8, 16]})).config
    assert gan.augment == "translation" and build_model("cgan", {"channels": [8, 16]}).config.augment == ""
    assert recipe_config("cgan", {"augment": ""})["augment"] == ""  # a spec can turn it off
    # a checkpoint's JSON written before the recipe (or before these fields existed) keeps its meaning
    old = config_to_dict(DiffusionConfig(channels=(4, 8)))
    for added in ("loss_weighting", "min_snr_gamma", "min_snr_floor", "attention"):
        old.pop(added)
    loaded = build_model("diffusion", old).config
    assert (loaded.prediction, loaded.loss_weighting, loaded.attention, loaded.ema_decay) == ("eps", "none", False, 0.0)
    assert loaded.min_snr_floor == 0.0  # a Min-SNR checkpoint from before the floor keeps Hang et al.'s weight


def test_controlnet_locks_the_base_s_ema_weights():
    torch.manual_seed(0)
    cfg = DiffusionConfig(channels=(4, 8), timesteps=20, prediction="v", ema_decay=0.9)
    base = perturb(ConditionalDiffusion(cfg))
    base.ema.load_state_dict(perturb(ConditionalDiffusion(cfg), seed=3).net.state_dict())  # EMA != trained
    base.eval()
    net = ControlNet(ControlNetConfig(base=cfg), base=base)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 15]), torch.tensor([2, 5])
    with torch.no_grad():
        assert torch.equal(net.eps(x, t, y, control_image(torch.rand(2, 1, 28, 28))), base.eps(x, t, y))
    ema = base.ema.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in net.control.state_dict().items())  # theta_c = the EMA weights


def test_the_benchmark_loop_trains_under_bf16_autocast_with_fp32_weights():
    """benchmarks/diffusion_recipe.py --precision bf16: the same data order and steps, the loss under CPU
    bfloat16 autocast; the weights and EMA stay fp32 and the model still learns (loss falls)."""
    from benchmarks.diffusion_recipe import train_steps

    x, y = torch.rand(64, 1, 8, 8) * 2 - 1, torch.arange(64) % 10
    config = DiffusionConfig(**TINY, ema_decay=0.9, lr=3e-3)
    runs = {p: train_steps(config, x, y, steps=40, batch=16, seed=0, warmup=5, precision=p) for p in ("fp32", "bf16")}
    for model, losses, _ in runs.values():
        assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
        assert sum(losses[-10:]) < sum(losses[:10])
    fp32, bf16 = (runs[p][0].state_dict() for p in ("fp32", "bf16"))
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)  # autocast did run the convolutions in bf16
    with pytest.raises(ValueError, match="precision must be"):
        train_steps(config, x, y, steps=1, batch=4, seed=0, precision="fp16")


def test_power_function_ema_of_the_recipe_benchmark():
    """benchmarks/diffusion_recipe.py --ema-gammas: beta = (1 - 1/t)^(gamma + 1) (Karras et al. 2024). gamma = 0
    is the plain mean of every iterate; a larger gamma weights the recent ones; sigma_rel matches the paper's
    pairs (gamma 6.94 -> 0.10, 16.97 -> 0.05)."""
    from benchmarks.diffusion_recipe import power_ema_update, sigma_rel

    def run(gamma: float, steps: int = 50) -> float:
        net, avg, n = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False), torch.zeros((), dtype=torch.long)
        for k in range(1, steps + 1):
            net.weight.data.fill_(float(k))
            power_ema_update(avg, net, n, gamma)
        return float(avg.weight)

    assert run(0.0) == pytest.approx(25.5, rel=1e-6)
    assert 25.5 < run(3.0) < run(16.0) < 50.0
    assert sigma_rel(6.94) == pytest.approx(0.10, rel=0.01) and sigma_rel(16.97) == pytest.approx(0.05, rel=0.01)
