"""LoRA adapters as artifacts: prepared on a frozen base, trained through the real Ray Train loop
(2 workers) as their own MLflow run, registered, and applied to a copy of the base."""
import pytest
import torch

from condgen.models.registry import build_model
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io.model_store import apply_adapter
from condgen.tasks.training.adapters import prepare, served_parameters, trained_adapter_parameters
from tests.tiny import TINY

TINY_GAN = TINY["cgan"]
TARGETS = ["G.up.convs.0", "G.to_img"]


def _digits_batch():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.rand(16, 1, 28, 28, generator=g) * 2 - 1, "y": torch.arange(16) % 10}


def test_prepare_freezes_the_generator_but_trains_the_critic_and_mirrors_the_ema():
    torch.manual_seed(0)
    model = build_model("cgan", TINY_GAN)
    served = served_parameters(model)
    assert served == sum(p.numel() for p in model.G.parameters())
    names = prepare(model, TARGETS, rank=1, alpha=1.0)
    assert names == ["G.to_img", "G.up.convs.0", "G_ema.to_img", "G_ema.up.convs.0"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("D.") or (n.startswith("G.") and "lora_" in n) for n in trainable)
    assert any(n.startswith("D.") for n in trainable)  # the critic trains in full
    assert trained_adapter_parameters(model) == sum(p.numel() for n, p in model.named_parameters()
                                                    if n.startswith("G.") and "lora_" in n)
    for (n1, p1), (n2, p2) in zip(model.G.named_parameters(), model.G_ema.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)  # the EMA restarts as the adapted generator
    base_g = {k: v.clone() for k, v in model.G.state_dict().items() if "lora_" not in k}
    from condgen.tasks.training.worker import make_opt_step, make_optimizers

    step = make_opt_step(make_optimizers(model))
    for _ in range(3):
        model.train_step(_digits_batch(), step)
    after = model.G.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_g.items())  # the base never moves
    assert int(model.ema_updates) == 3


@pytest.mark.slow
def test_adapter_run_trains_registers_and_applies_to_a_copy_of_the_base(tiny_shards, local_ray,
                                                                         use_mlflow_server, condgen_home):
    import mlflow

    from condgen.tasks.training.driver import AdapterSpec, TrainRequest, train

    torch.manual_seed(0)
    base = build_model("cgan", TINY_GAN)
    base_dir = condgen_home / "bases" / "cgan-tiny"
    ckpt_io.save_checkpoint(base_dir, base)
    before = ckpt_io.state_fingerprint(base)

    res = train(TrainRequest(model="", shards_uri=tiny_shards, epochs=2, batch_size=32, num_workers=2,
                             run_name="test-adapter",
                             adapter=AdapterSpec(base=base_dir.as_uri(), targets=TARGETS, rank=1,
                                                 register_as="test-cgan-adapter")))
    assert "/adapters/" in res.checkpoint_uri and len(res.history) == 2
    run = mlflow.get_run(res.run_id)
    assert run.data.tags["condgen.kind"] == "adapter"
    assert run.data.params["adapter.rank"] == "1"
    probe = build_model("cgan", TINY_GAN)
    prepare(probe, TARGETS, 1, 1.0)
    assert int(run.data.params["adapter.trained_parameters"]) == trained_adapter_parameters(probe)
    arts = sorted(a.path for a in mlflow.MlflowClient().list_artifacts(res.run_id, "adapter"))
    assert arts == ["adapter/adapter.json", "adapter/adapter.safetensors"]

    base_model, _ = ckpt_io.load_checkpoint(base_dir)
    adapted = apply_adapter(base_model, res.checkpoint_uri)
    registered = apply_adapter(base_model, "models:/test-cgan-adapter@latest-adapter")
    assert ckpt_io.state_fingerprint(base_model) == before  # applying never touches the base
    c, g = torch.arange(10), lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base_x, adapted_x = base_model.eval().sample(c, g()), adapted.sample(c, g())
    assert not torch.allclose(base_x, adapted_x, atol=1e-4)  # the adapter trained and is used in eval (EMA)
    assert torch.equal(registered.sample(c, g()), adapted_x)  # registry copy == storage copy

    from condgen.tasks.judging.evaluate import evaluate_run

    m = evaluate_run(res.run_id, res.checkpoint_uri, tiny_shards, adapter_base=base_dir.as_uri(), n_per_class=5,
                     judge_epochs=1)
    assert 0.0 <= m["eval/cond_accuracy"] <= 1.0


def test_an_unknown_target_fails_on_the_driver_before_any_worker_starts(condgen_home, tmp_path):
    from condgen.tasks.io.model_store import load_model_uri
    from condgen.tasks.training.driver import AdapterSpec, _adapter_setup

    torch.manual_seed(0)
    ckpt_io.save_checkpoint(tmp_path / "base", build_model("cgan", TINY_GAN))
    spec = AdapterSpec(base=(tmp_path / "base").as_uri(), targets=["G.nope"])
    base, meta = load_model_uri(spec.base)  # as the driver loads it, before the setup
    with pytest.raises(ValueError, match="matches no"):
        _adapter_setup(spec, base, meta)
