"""Ray Train integration: the real TorchTrainer with 1 and 2 CPU workers, MLflow
tracking, checkpoint to storage, and recovery from a killed worker process."""
import pytest

from condgen.tasks.io.model_store import load_trained
from condgen.tasks.training.driver import TrainRequest, train

pytestmark = pytest.mark.slow

TINY_CVAE = {"channels": [4, 8], "latent_dim": 4, "cond_dim": 4, "lr": 5e-3}


@pytest.mark.parametrize("workers", [1, 2])
def test_torchtrainer_loss_falls(tiny_shards, local_ray, workers):
    res = train(TrainRequest(model="cvae", shards_uri=tiny_shards, model_config=TINY_CVAE, epochs=3,
                             batch_size=32, num_workers=workers, run_name=f"test-{workers}w"))
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 3, res.history
    assert losses[-1] < losses[0], losses
    model, meta = load_trained(res.checkpoint_uri)
    assert meta["model"] == "cvae" and tuple(meta["config"]["channels"]) == (4, 8)

    import mlflow

    run = mlflow.get_run(res.run_id)
    assert run.data.params["num_workers"] == str(workers)
    assert run.data.params["cfg.channels"] == "(4, 8)"
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(res.run_id, "model")]
    assert sorted(arts) == ["model/config.json", "model/model.safetensors"]


def test_killed_worker_resumes_from_checkpoint(tiny_shards, local_ray, capsys):
    """A worker process dies (os._exit) mid-epoch 1; FailureConfig restarts the group from
    the epoch-0 checkpoint and the run still ends with 3 epochs, each logged once."""
    res = train(TrainRequest(model="cvae", shards_uri=tiny_shards, model_config=TINY_CVAE, epochs=3,
                             batch_size=32, num_workers=2, max_failures=2, fail_at_epoch=1, run_name="test-fault"))
    epochs = [h["epoch"] for h in res.history]
    print(f"injected: worker killed in epoch 1; recovered: epochs logged {epochs}, final {res.metrics.get('epoch')}")
    assert res.metrics["epoch"] == 2
    assert sorted(set(epochs)) == [0, 1, 2]
    model, _ = load_trained(res.checkpoint_uri)
    assert model is not None
