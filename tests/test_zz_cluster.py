"""Multi-node Ray Train: the same ``tasks.train.train`` against a real 3-node Ray cluster.

This module sorts last on purpose: ``ray_cluster`` shuts down the session's ``local_ray``
and does not restore it (see tests/conftest.py).
"""
from __future__ import annotations

import time

import pytest

from condgen.tasks.data.ingest import ingest
from condgen.tasks.io import storage
from condgen.tasks.io.model_store import load_trained
from condgen.tasks.training.driver import TrainRequest, train

TINY_CVAE = {"channels": [4, 8], "latent_dim": 4, "cond_dim": 4, "lr": 5e-3}


@pytest.mark.slow
def test_training_spreads_over_two_nodes_reading_s3(s3_uri, ray_cluster, capsys):
    """Head + 2 worker nodes (1 CPU and one ``trainer`` slot each): the 2 training workers
    must run on 2 different nodes, stream their shares of the shards from S3 (moto on 127.0.0.1) and keep
    Ray Train's checkpoints on S3 too (a multi-node cluster has no shared local disk)."""
    import mlflow
    import ray

    t0 = time.monotonic()
    shards = storage.join(s3_uri, "shards")
    ing = ingest("bundled:mnist", shards, limit=300, shard_size=100)
    assert ing.manifest_uri.startswith("s3://") and sum(ing.counts.values()) == 300

    nodes = [n for n in ray.nodes() if n["Alive"]]
    trainer_nodes = {n["NodeID"] for n in nodes if n["Resources"].get("trainer")}
    assert len(nodes) == 3 and len(trainer_nodes) == 2

    res = train(TrainRequest(model="cvae", shards_uri=shards, model_config=TINY_CVAE, epochs=2, batch_size=32,
                             num_workers=2, resources_per_worker={"CPU": 1, "trainer": 1}, data_mode="stream",
                             storage_path=storage.join(s3_uri, "ray_results"), run_name="test-multinode"))

    placement = mlflow.artifacts.load_dict(f"runs:/{res.run_id}/placement.json")
    used = [w["node_id"] for w in placement["workers"]]
    print(f"cluster: {len(nodes)} nodes; workers by rank on nodes {[u[:8] for u in used]}; "
          f"history {[(h['epoch'], round(h['loss'], 4)) for h in res.history]}; {time.monotonic() - t0:.1f}s")
    assert [w["rank"] for w in placement["workers"]] == [0, 1]
    assert len(set(used)) == 2 and set(used) == trainer_nodes, (used, trainer_nodes)
    assert placement["num_nodes"] == 2

    assert [h["epoch"] for h in res.history] == [0, 1]
    # Each worker streamed its share of the split from S3 instead of decoding the whole split (issue #16 item 5).
    plan = mlflow.artifacts.load_dict(f"runs:/{res.run_id}/batch_plan.json")
    assert plan["data"]["data_mode"] == "stream" and mlflow.get_run(res.run_id).data.params["data_mode"] == "stream"
    _model, meta = load_trained(res.checkpoint_uri)
    assert meta["model"] == "cvae"
    # Ray Train's own checkpoints went to S3, not to a node's disk.
    ray_objects = [k for k, _, _ in storage.list_objects(storage.join(s3_uri, "ray_results"))]
    assert any(k.endswith("model.safetensors") for k in ray_objects), ray_objects[:20]


def test_placement_defaults_are_the_laptops():
    req = TrainRequest(model="cvae", shards_uri="file:///x")
    assert req.resources_per_worker is None and req.placement_strategy == "PACK" and req.storage_path is None


def test_ray_storage_paths(monkeypatch, tmp_path):
    import pyarrow.fs

    from condgen.tasks.training.driver import ray_storage

    assert ray_storage(str(tmp_path)) == (str(tmp_path), None)
    assert ray_storage(tmp_path.as_uri()) == (str(tmp_path), None)
    monkeypatch.delenv("CONDGEN_S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert ray_storage("s3://bucket/runs") == ("s3://bucket/runs", None)  # AWS: pyarrow resolves it
    monkeypatch.setenv("CONDGEN_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    path, fs = ray_storage("s3://bucket/runs")
    assert path == "bucket/runs" and isinstance(fs, pyarrow.fs.S3FileSystem)
