"""The retrain flow chains specs: a component (autoencoder) trains first, is neither
evaluated nor promoted, and the latent diffusion spec after it takes its weights through
``"@autoencoder"``. Real Prefect (ephemeral), Ray Train and MLflow (SQLite), tiny sizes."""
import pytest

pytestmark = pytest.mark.slow

AE = {"channels": [4, 8], "latent_channels": 4}
LD = {"channels": [4, 8], "timesteps": 20, "sample_steps": 4, "autoencoder_uri": "@autoencoder"}


def test_resolve_refs_fills_uri_and_architecture():
    from condgen.flows.retrain import resolve_refs

    trained = {"autoencoder": {"checkpoint": "file:///ck/ae", "config": {"channels": [4, 8], "latent_channels": 4}}}
    out = resolve_refs({"autoencoder_uri": "@autoencoder", "lr": 1e-3}, "latent_diffusion", trained)
    assert out == {"autoencoder_uri": "file:///ck/ae", "autoencoder": trained["autoencoder"]["config"], "lr": 1e-3}
    # An explicit architecture is kept as given.
    mine = {"channels": [8, 16]}
    assert resolve_refs({"autoencoder_uri": "@autoencoder", "autoencoder": mine}, "latent_diffusion",
                        trained)["autoencoder"] is mine
    with pytest.raises(ValueError, match="names no earlier model"):
        resolve_refs({"base_uri": "@diffusion"}, "controlnet", trained)


def test_components_train_then_feed_the_next_spec(condgen_home, local_ray):
    from mlflow.tracking import MlflowClient

    from condgen.flows.retrain import RetrainParams, retrain
    from condgen.tasks.io.model_store import load_trained

    params = RetrainParams.model_validate({
        "limit": 300, "shard_size": 300, "num_workers": 1, "eval_per_class": 3, "judge_epochs": 1, "clip": None,
        "gate": {"min_accuracy": 0.0}, "report": {"enabled": False},
        "models": [{"name": "autoencoder", "epochs": 1, "batch_size": 64, "config": AE, "grid_every": 0},
                   {"name": "latent_diffusion", "epochs": 1, "batch_size": 64, "config": LD, "grid_every": 0}]})
    out = retrain(params)
    (ae,) = out["components"]
    (ld,) = out["results"]
    assert ae["model"] == "autoencoder" and "promotion" not in ae
    assert ld["model"] == "latent_diffusion" and ld["promotion"]["promoted"] is True
    assert 0.0 <= ld["metrics"]["eval/cond_accuracy"] <= 1.0
    model, _ = load_trained(ld["checkpoint"])
    assert model.config.autoencoder_uri == ae["checkpoint"]
    assert model.config.autoencoder.latent_channels == 4
    client = MlflowClient()
    # Latent diffusion trained on latents precomputed once with that autoencoder.
    from condgen.tasks.data import latents as L

    fp = client.get_run(ld["run_id"]).data.params["latents"]
    assert fp == L.autoencoder_fingerprint(L.load_autoencoder(ae["checkpoint"]))
    assert L.load_latent_split(out["shards_uri"], "train", fp)["z"].shape[1:] == (4, 7, 7)
    assert not [m for m in client.search_registered_models() if m.name == "condgen-autoencoder"]
    assert "eval/cond_accuracy" not in client.get_run(ae["run_id"]).data.metrics


def test_batches_carry_precomputed_latents():
    import numpy as np

    from condgen.tasks.training.worker import batches

    arrays = {"x": np.zeros((10, 28, 28), np.uint8), "y": np.arange(10, dtype=np.int64),
              "z": np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((1, 4, 7, 7), np.float32)}
    for b in batches(arrays, 4, 0, 1, 0, 0):
        assert b["z"].shape == (4, 4, 7, 7)
        assert np.array_equal(b["z"][:, 0, 0, 0].numpy(), b["y"].numpy().astype(np.float32))  # rows stay aligned
