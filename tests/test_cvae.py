"""CVAE unit tests: tiny configs (tests/tiny.py), seconds each."""
import numpy as np
import pytest
import torch

from condgen.models.cvae import CVAE, _gaussian_kl
from condgen.models.registry import build_model
from condgen.tasks.io import checkpoint as ckpt_io
from tests.tiny import TEXT_DIM, TINY, tiny_config
from tests.tiny import digits as _digits  # sklearn digits, 8x8 -> 24x24 nearest upscale, centred in 28x28


@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_loss_falls(prior):
    torch.manual_seed(0)
    model = CVAE(tiny_config("cvae", prior=prior, lr=1e-2))
    opt = torch.optim.Adam(model.parameters(), lr=model.config.lr)

    def opt_step(_, loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    x, y = _digits()
    losses = [model.train_step({"x": x, "y": y}, opt_step)["loss"] for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_kl_is_zero_for_identical_gaussians_and_positive_otherwise():
    mu, lv = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(_gaussian_kl(mu, lv, mu, lv), torch.zeros(3), atol=1e-6)
    assert (_gaussian_kl(mu, lv, mu + 1, lv) > 0).all()


def test_learned_prior_starts_at_standard_normal_and_depends_on_condition():
    model = CVAE(tiny_config("cvae", prior="learned"))
    y = torch.arange(10)
    mu, lv = model.prior(y)
    assert torch.all(mu == 0) and torch.all(lv == 0)  # zero-initialised: N(0, I) at start
    with torch.no_grad():
        model.prior_net.weight.normal_()
    mu, _ = model.prior(y)
    assert not torch.allclose(mu[0], mu[1])


def test_sample_uses_condition_and_generator():
    torch.manual_seed(0)
    model = CVAE(tiny_config("cvae")).eval()
    a = model.sample(torch.zeros(4, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    b = model.sample(torch.zeros(4, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    c = model.sample(torch.full((4,), 7, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_text_condition_accepts_embeddings_and_rejects_labels():
    model = CVAE(tiny_config("cvae", condition="text", text_dim=TEXT_DIM)).eval()
    out = model.sample(torch.randn(3, TEXT_DIM), generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 28, 28)
    with pytest.raises(TypeError):
        model.sample(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("name,cfg", [("cvae", TINY["cvae"]), ("cvae", {**TINY["cvae"], "prior": "learned"}),
                                      ("classifier", TINY["classifier"])])
def test_checkpoint_round_trip_is_identical(tmp_path, name, cfg):
    torch.manual_seed(0)
    model = build_model(name, cfg).eval()
    ckpt_io.save_checkpoint(tmp_path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, meta = ckpt_io.load_checkpoint(tmp_path)
    assert meta["model"] == name
    assert ckpt_io.state_fingerprint(loaded) == ckpt_io.state_fingerprint(model)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    if name == "classifier":
        assert torch.equal(model(x), loaded(x))
    else:
        y = torch.tensor([3, 5])
        assert torch.equal(model.sample(y, torch.Generator().manual_seed(0)),
                           loaded.sample(y, torch.Generator().manual_seed(0)))


def test_checkpoint_refuses_unknown_model_and_bad_config(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model": "os.system", "config": {}}))
    with pytest.raises(KeyError):
        ckpt_io.load_checkpoint(tmp_path)
    with pytest.raises(ValueError):
        build_model("cvae", {"no_such_field": 1})


def test_optimizer_state_round_trip_without_pickle():
    torch.manual_seed(0)
    model = CVAE(tiny_config("cvae"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _digits(8)
    loss, _ = model.loss(x, y)
    loss.backward()
    opt.step()
    tensors, meta = ckpt_io.optimizer_tensors({"main": opt})
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    ckpt_io.load_optimizer_tensors({"main": opt2}, tensors, meta)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for f in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][f], s2["state"][k][f])
