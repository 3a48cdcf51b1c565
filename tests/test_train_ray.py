"""Ray Train integration: the real TorchTrainer with 1 and 2 CPU workers, MLflow
tracking, checkpoint to storage, recovery from a killed worker process, in-memory and streamed training
data, and a colour shard set whose channels, size and classes reach the model config from its manifest alone."""
import mlflow
import numpy as np
import pytest
from PIL import Image

from condgen.tasks.data.ingest import ingest
from condgen.tasks.data.splits import dataset_info
from condgen.tasks.io.model_store import load_trained
from condgen.tasks.io.tracking import logged_image_steps
from condgen.tasks.judging.evaluate import evaluate_run
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
    _model, meta = load_trained(res.checkpoint_uri)
    assert meta["model"] == "cvae" and tuple(meta["config"]["channels"]) == (4, 8)

    import mlflow

    run = mlflow.get_run(res.run_id)
    assert run.data.params["num_workers"] == str(workers)
    assert run.data.params["cfg.channels"] == "(4, 8)"
    # batch_size is the global batch: the workers split it; the epoch is the same optimiser steps
    params = run.data.params
    assert (params["global_batch"], params["world_size"]) == ("32", str(workers))
    assert (params["per_worker_batch"], params["grad_accumulation"]) == (str(32 // workers), "1")
    assert (params["lr_scaling"], float(params["lr_effective"])) == ("none", TINY_CVAE["lr"])
    plan = mlflow.artifacts.load_dict(f"runs:/{res.run_id}/batch_plan.json")
    assert plan["shares"] == [32 // workers] * workers and plan["steps_per_epoch"] == plan["samples"] // 32
    assert res.metrics["step"] == 3 * plan["steps_per_epoch"]
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(res.run_id, "model")]
    assert sorted(arts) == ["model/config.json", "model/model.safetensors"]
    # every epoch's sample grid, made by all workers together (tasks/training/grids.py) and logged once by rank 0
    assert logged_image_steps(mlflow.MlflowClient(), res.run_id) == {("samples", e) for e in range(3)}


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


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_both_data_modes_train_under_ray_and_report_throughput_and_memory(tiny_shards, local_ray, mode):
    """In memory and streamed from the shards, 2 workers; the streamed run also in bf16 with 2 micro-batches
    per worker step. Each epoch reports samples/s, time to first batch and every worker's peak RSS."""
    extra = {"precision": "bf16", "grad_accumulation": 2, "stream_buffer": 64, "loader_threads": 1} if mode == "stream" else {}
    res = train(TrainRequest(model="cvae", shards_uri=tiny_shards, model_config=TINY_CVAE, epochs=2, batch_size=32,
                             num_workers=2, data_mode=mode, run_name=f"test-{mode}", **extra))
    losses = [h["loss"] for h in res.history]
    print(f"{mode}: losses {losses}; samples/s {[round(h['samples_per_s']) for h in res.history]}; peak RSS MiB "
          f"{[(round(h['peak_rss_mb.rank0']), round(h['peak_rss_mb.rank1'])) for h in res.history]}")
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    for h in res.history:
        assert h["samples_per_s"] > 0 and h["first_batch_seconds"] >= 0
        assert h["peak_rss_mb"] == max(h["peak_rss_mb.rank0"], h["peak_rss_mb.rank1"]) > 50
    assert res.metrics["samples_per_s"] > 0 and res.metrics["peak_rss_mb"] > 50
    params = mlflow.get_run(res.run_id).data.params
    assert params["data_mode"] == mode and params["precision"] == extra.get("precision", "fp32")
    assert params["grad_accumulation"] == str(extra.get("grad_accumulation", 1))
    plan = mlflow.artifacts.load_dict(f"runs:/{res.run_id}/batch_plan.json")
    assert plan["data"]["data_mode"] == mode and plan["grad_accumulation"] == extra.get("grad_accumulation", 1)
    assert res.metrics["step"] == 2 * plan["steps_per_epoch"]


@pytest.fixture(scope="module")
def shapes_shards(condgen_home):
    """400 coloured shapes (bundled:shapes: RGB, 18 colour x shape classes), ingested once per module."""
    out = (condgen_home / "shards-shapes").as_uri()
    ingest("bundled:shapes", out, limit=400, shard_size=200)
    return out


def test_a_colour_set_trains_and_evaluates_without_repeating_its_shape(shapes_shards, local_ray):
    """The spec names widths only: in_channels / image_size / num_classes come from the manifest; the
    evaluation's judge has the data's channels and classes; KID and an RGB class grid reach MLflow."""
    info = dataset_info(shapes_shards)
    assert info["channels"] == 3 and info["num_classes"] > 10
    res = train(TrainRequest(model="cvae", shards_uri=shapes_shards, model_config=TINY_CVAE, epochs=1,
                             batch_size=32, num_workers=1, run_name="test-colour"))
    _, meta = load_trained(res.checkpoint_uri)
    cfg = meta["config"]
    assert (cfg["in_channels"], cfg["image_size"], cfg["num_classes"]) == (3, info["image_size"], info["num_classes"])
    assert res.config == cfg
    metrics = evaluate_run(res.run_id, res.checkpoint_uri, shapes_shards, n_per_class=2, judge_epochs=1)
    for key in ("eval/cond_accuracy", "eval/fid", "eval/kid", "eval/kid_std", "eval/judge_test_accuracy"):
        assert np.isfinite(metrics[key]), key
    run = mlflow.get_run(res.run_id)
    assert run.data.metrics["eval/kid"] == pytest.approx(metrics["eval/kid"])
    weak = metrics["eval/judge_test_accuracy"] < 0.6  # 1 judge epoch on 18 classes may well be weak
    assert ("condgen.judge_warning" in run.data.tags) == weak
    client = mlflow.MlflowClient()
    assert "eval/per_class.json" in [f.path for f in client.list_artifacts(res.run_id, "eval")]  # one table
    # the per-epoch sample grids are one MLflow image series ("samples", by step)
    series = [f.path for f in client.list_artifacts(res.run_id, "images") if f.path.endswith(".png")]
    assert any("samples+step+0+" in p for p in series), series
    for path in ("eval/class_grid.png", next(p for p in series if "samples+step+0+" in p)):
        local = client.download_artifacts(res.run_id, path)
        with Image.open(local) as image:
            assert image.mode == "RGB", path
