"""End to end at tiny scale against real engines: the Prefect `retrain` flow (ephemeral
Prefect), Ray Train, a real MLflow tracking server + registry, the promotion gate, and
the Ray Serve app over real HTTP."""
import base64
import io
import json
import urllib.error
import urllib.request

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

TINY = {"channels": [8, 16], "latent_dim": 8, "cond_dim": 8, "lr": 5e-3}
NAME = "condgen-cvae-test"


def _params(**over):
    from condgen.flows.retrain import RetrainParams

    base = {"limit": 1500, "shard_size": 500, "num_workers": 1, "eval_per_class": 10, "judge_epochs": 2,
            "models": [{"name": "cvae", "epochs": 3, "batch_size": 32, "config": TINY, "registered_name": NAME}],
            "gate": {"min_accuracy": 0.0, "tolerance": 0.0}, "clip_fit_steps": 10}
    base.update(over)
    return RetrainParams.model_validate(base)


@pytest.fixture(scope="module")
def flow_runs(use_mlflow_server_module, local_ray):
    """Two flow runs: a trained model, then a worse (untrained: lr=0) candidate."""
    from condgen.flows.retrain import retrain

    first = retrain(_params())
    worse = retrain(_params(models=[{"name": "cvae", "epochs": 1, "batch_size": 32,
                                     "config": {**TINY, "lr": 0.0}, "registered_name": NAME}]))
    return first, worse


def test_flow_end_to_end(flow_runs):
    from mlflow.tracking import MlflowClient

    from condgen.tasks.io import storage

    first, _ = flow_runs
    manifest = storage.read_json(first["manifest"])
    assert sum(s["n_samples"] for s in manifest["shards"]) == 1500
    r = first["results"][0]
    run = MlflowClient().get_run(r["run_id"])
    for key in ("loss", "eval/cond_accuracy", "eval/fid", "eval/judge_test_accuracy", "eval/acc_class_0"):
        assert key in run.data.metrics, key
    assert run.data.metrics["eval/judge_test_accuracy"] > 0.8  # the judge itself must be competent
    assert r["promotion"]["promoted"] is True
    arts = {a.path for a in MlflowClient().list_artifacts(r["run_id"], "eval")}
    assert "eval/class_grid.png" in arts and "eval/summary.json" in arts


def test_worse_model_does_not_take_the_alias(flow_runs):
    from mlflow.tracking import MlflowClient

    first, worse = flow_runs
    good, bad = first["results"][0], worse["results"][0]
    print(f"champion accuracy {good['metrics']['eval/cond_accuracy']:.3f}, "
          f"candidate (untrained) {bad['metrics']['eval/cond_accuracy']:.3f}")
    assert bad["metrics"]["eval/cond_accuracy"] < good["metrics"]["eval/cond_accuracy"]
    assert bad["promotion"]["promoted"] is False
    client = MlflowClient()
    assert client.get_model_version_by_alias(NAME, "champion").version == str(good["promotion"]["version"])
    tags = client.get_model_version(NAME, str(bad["promotion"]["version"])).tags
    assert tags["condgen.promoted"] == "false" and "worse than champion" in tags["condgen.reason"]


def _post(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_serve_generates_each_label_and_rejects_bad_input(flow_runs):
    from ray import serve

    from condgen.serving.app import run
    from tests.conftest import free_port, wait_http

    port = free_port()
    run(f"models:/{NAME}@champion", port=port, blocking=False)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", timeout=120)
        with urllib.request.urlopen(f"{base}/health") as r:
            health = json.loads(r.read())
        assert health["status"] == "ok" and health["model"] == NAME
        for label in range(10):
            status, body = _post(f"{base}/generate", {"label": label, "n": 2, "seed": 7})
            assert status == 200, body
            assert body["label"] == label and len(body["images"]) == 2
            img = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
            assert img.size == (28, 28)
        again = _post(f"{base}/generate", {"label": 3, "n": 2, "seed": 7})[1]
        assert again["images"] == _post(f"{base}/generate", {"label": 3, "n": 2, "seed": 7})[1]["images"]
        for bad in ({"label": 10}, {"label": -1}, {"label": 3, "n": 0}, {"label": 3, "n": 10_000},
                    {"label": "seven"}, {"label": 1, "unknown": 1}, {}):
            status, body = _post(f"{base}/generate", bad)
            assert 400 <= status < 500, (bad, status, body)
            assert body.get("detail"), body  # a reason, not just a code
        status, _ = _post(f"{base}/generate", b"{not json", raw=True)
        assert 400 <= status < 500
    finally:
        serve.delete("condgen")
