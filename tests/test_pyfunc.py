"""Registered versions are MLflow pyfunc models (issue #19, item 1): promoted through
``tasks.judging.promote`` and loaded back in a fresh Python process with nothing but the tracking URI
and ``mlflow.pyfunc.load_model("models:/NAME@champion")``; the version's model card, the run's dataset
input and per-class table; a copied ``CONDGEN_HOME`` still loads after the original is deleted."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from condgen.tasks.data.attributes import label_from_prompt
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io import tracking
from condgen.tasks.io.labels import label_from_text
from condgen.tasks.io.model_store import load_registered
from condgen.tasks.io.pyfunc_model import CLASSES_FILE, CondgenModel, input_example, training_class_names
from condgen.tasks.judging.promote import ALIAS, Gate, promote
from tests.tiny import TINY, build_tiny

REQUESTS = [{"condition": 3, "n": 2, "seed": 7}, {"condition": "a handwritten seven", "n": 3, "seed": 1}]

LOAD_AND_PREDICT = """
import json, sys
import mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
images = model.predict(pd.DataFrame(json.loads(sys.argv[2])))
np.save(sys.argv[3], images)
print(json.dumps({"signature": model.metadata.signature.to_dict(), "flavors": sorted(model.metadata.flavors)}))
"""


def fresh_predict(uri: str, tracking_uri: str, requests: list[dict], tmp: Path) -> tuple[np.ndarray, dict]:
    """``mlflow.pyfunc.load_model(uri).predict(requests)`` in a new interpreter whose only condgen setting is
    ``MLFLOW_TRACKING_URI`` (run from an empty folder, so nothing is imported from the checkout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONDGEN_", "MLFLOW_"))}
    env.pop("PYTHONPATH", None)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    out = tmp / f"images-{uuid.uuid4().hex[:6]}.npy"
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, uri, json.dumps(requests), str(out)], env=env,
                          cwd=tempfile.mkdtemp(dir=tmp), capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out), json.loads(proc.stdout.strip().splitlines()[-1])


def train_run(model: torch.nn.Module, experiment: str, *, params: dict | None = None,
              metrics: dict | None = None) -> str:
    """A run as training + evaluation leave it: the checkpoint under ``model/``, params and eval metrics."""
    tracking.configure(experiment)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name="tiny") as run:
        ckpt_io.save_checkpoint(tmp, model)
        mlflow.log_artifacts(tmp, artifact_path="model")
        mlflow.log_params({"model": ckpt_io.model_name(model), "epochs": 1, "batch_size": 8, "seed": 0,
                           **(params or {})})
        mlflow.log_metrics(metrics or {})
    return run.info.run_id


def expected(model: torch.nn.Module, requests: list[dict]) -> np.ndarray:
    """What the requests must give: the model's own ``sample`` with each row's seeded CPU generator."""
    out = []
    for r, label in zip(requests, (3, 7), strict=True):
        g = torch.Generator().manual_seed(r["seed"])
        x = model.eval().sample(torch.full((r["n"],), label, dtype=torch.long), g)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


@pytest.mark.slow
def test_promoted_version_loads_with_plain_mlflow_in_a_fresh_process(condgen_home, tiny_shards, tmp_path):
    model = build_tiny("cvae", seed=3)
    metrics = {"eval/cond_accuracy": 0.9, "eval/fid": 12.5, **{f"eval/acc_class_{c}": 0.8 + c / 100 for c in range(10)}}
    run_id = train_run(model, "pyfunc-test", params={"shards_uri": tiny_shards}, metrics=metrics)
    name = f"condgen-pyfunc-{uuid.uuid4().hex[:6]}"
    decision = promote(run_id, name, 0.9, Gate(min_accuracy=0.5))
    assert decision.promoted

    images, meta = fresh_predict(f"models:/{name}@{ALIAS}", tracking.settings.tracking_uri(), REQUESTS, tmp_path)
    assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected(model, REQUESTS))  # same weights, same seeds, same pixels
    assert images[:2].std() > 0 and not np.array_equal(images[:2], images[2:4])
    assert meta["flavors"] == ["python_function"]
    inputs = [c["name"] for c in json.loads(meta["signature"]["inputs"])]
    assert inputs == ["condition", "n", "seed", "guidance", "steps"], inputs
    assert json.loads(meta["signature"]["outputs"])[0]["tensor-spec"]["shape"] == [-1, 28, 28, 1]

    client = MlflowClient()
    files = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run_id, "model")}
    assert {"MLmodel", "condgen_pyfunc.py", "input_example.json", ckpt_io.WEIGHTS, ckpt_io.CONFIG} <= files
    assert not any(f.endswith((".pkl", ".pickle")) for f in files), files  # models from code: nothing pickled
    # condgen's own loader reads the same folder: the weights are stored once
    loaded, _ = load_registered(f"models:/{name}@{ALIAS}")
    assert ckpt_io.state_fingerprint(loaded) == ckpt_io.state_fingerprint(model)

    version = client.get_model_version(name, decision.version)
    card = version.description
    for text in ("## Data", tiny_shards, "## Config", "## Metrics", "eval/fid", "promoted to @champion",
                 decision.reason, "mlflow.pyfunc.load_model"):
        assert text in card, (text, card)
    assert version.tags["condgen.pyfunc"] == "true"
    run = client.get_run(run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    assert json.loads(dataset_input.dataset.source)["uri"] == tiny_shards
    assert dataset_input.dataset.digest == version.tags["condgen.data_digest"]
    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=tracking.PER_CLASS_TABLE,
                                                                dst_path=str(tmp_path))).read_text())
    assert table["columns"] == ["class", "name", "accuracy"] and len(table["data"]) == 10
    assert table["data"][4][2] == pytest.approx(0.84)


@pytest.mark.slow
def test_a_copied_home_loads_after_the_original_is_deleted(monkeypatch, tmp_path):
    previous_uri = mlflow.get_tracking_uri()
    old, new = tmp_path / "old-home", tmp_path / "new-home"
    monkeypatch.setenv("CONDGEN_HOME", str(old))
    for var in ("MLFLOW_TRACKING_URI", "CONDGEN_ARTIFACTS", "CONDGEN_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    try:
        model = build_tiny("diffusion", seed=1)
        run_id = train_run(model, "relocate")
        name = "condgen-relocated"
        assert promote(run_id, name, 0.9, Gate(min_accuracy=0.5)).promoted
        assert MlflowClient().get_run(run_id).info.artifact_uri.startswith(old.as_uri())

        shutil.copytree(old, new)
        shutil.rmtree(old)
        monkeypatch.setenv("CONDGEN_HOME", str(new))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exported the old one
        mlflow.set_tracking_uri(tracking.settings.tracking_uri())  # as the service does: no tracking.configure
        loaded, meta = load_registered(f"models:/{name}@{ALIAS}")  # resolving rewrites the copied store first
        assert MlflowClient().get_run(run_id).info.artifact_uri.startswith(new.as_uri())
        assert ckpt_io.state_fingerprint(loaded) == ckpt_io.state_fingerprint(model) and meta["run_id"] == run_id
        steps = TINY["diffusion"]["sample_steps"]
        requests = [{"condition": 2, "n": 2, "seed": 5, "guidance": 1.5, "steps": steps}]
        images, _ = fresh_predict(f"models:/{name}@{ALIAS}", tracking.settings.tracking_uri(), requests, tmp_path)
        assert images.shape == (2, 28, 28, 1) and images.dtype == np.uint8
        x = model.eval().sample(torch.full((2,), 2), torch.Generator().manual_seed(5), steps=steps, guidance_scale=1.5)
        np.testing.assert_array_equal(images[..., 0], ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
        assert tracking.relocate_home() == 0  # in place now: nothing left to rewrite
        assert not old.exists()
    finally:
        mlflow.set_tracking_uri(previous_uri)


def test_rewrite_prefix_touches_only_the_old_root(tmp_path):
    import sqlite3

    db = tmp_path / "store.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE runs (artifact_uri TEXT)")
        con.execute("CREATE TABLE experiments (artifact_location TEXT)")
        con.executemany("INSERT INTO runs VALUES (?)", [("file:///a/home/mlartifacts/1/r/artifacts",),
                                                       ("file:///a/home/mlartifacts2/x",), ("s3://b/x",)])
        con.execute("INSERT INTO experiments VALUES ('file:///a/home/mlartifacts')")
    assert tracking.rewrite_prefix(db, "file:///a/home/mlartifacts", "file:///b/mlartifacts") == 2
    assert tracking.rewrite_prefix(db, "file:///a/home/mlartifacts", "file:///b/mlartifacts") == 0
    with sqlite3.connect(db) as con:
        runs = [r for (r,) in con.execute("SELECT artifact_uri FROM runs")]
        (exp,) = con.execute("SELECT artifact_location FROM experiments").fetchone()
    assert runs == ["file:///b/mlartifacts/1/r/artifacts", "file:///a/home/mlartifacts2/x", "s3://b/x"]
    assert exp == "file:///b/mlartifacts"


@pytest.mark.parametrize("caption", ["a handwritten seven", "digit 7", "7", "Seven!", "one or two", "12 apples",
                                     "nothing here", "zero", "11"])
def test_caption_rule_is_the_services(caption):
    for num_classes in (3, 10):
        assert label_from_text(caption, num_classes) == label_from_prompt(caption, num_classes)
    names = ["cat", "black cat", "dog"] + [f"thing {i}" for i in range(7)]
    assert label_from_text(caption, 10, names) == label_from_prompt(caption, 10, names) is None


NAMES = ["cat", "black cat", "dog", "red circle", "owl", "fox", "bee", "ant", "elk", "yak"]


def test_a_caption_names_a_class_of_the_training_set_when_its_manifest_names_them(tmp_path):
    """A pyfunc of a set with class names (``class_names.json`` beside the weights, as ``log_pyfunc`` writes
    it) reads "a small red circle" as class 3 and refuses a digit sentence, naming the classes."""
    ckpt_io.save_checkpoint(tmp_path, build_tiny("cvae"))
    (tmp_path / CLASSES_FILE).write_text(json.dumps(NAMES))
    wrapper = CondgenModel(tmp_path)
    by_name = wrapper.predict(None, [{"condition": "a small red circle", "seed": 4}])
    np.testing.assert_array_equal(by_name, wrapper.predict(None, [{"condition": 3, "seed": 4}]))
    with pytest.raises(ValueError, match=r"names none of the classes \(cat, black cat, dog, red circle, owl, fox, \.\.\.\)"):
        wrapper.predict(None, [{"condition": "a handwritten seven"}])
    assert input_example({"model": "cvae", "config": {}}, NAMES)["condition"].tolist() == [1, "a red circle"]


def test_log_pyfunc_reads_the_class_names_of_the_runs_shard_set(condgen_home, tmp_path):
    from condgen.tasks.io.shards import MANIFEST

    named, digits = tmp_path / "named", tmp_path / "digits"
    for folder, manifest in ((named, {"class_names": NAMES}), (digits, {"digits": True})):
        folder.mkdir()
        (folder / MANIFEST).write_text(json.dumps(manifest))
    tracking.configure("pyfunc-names-test")
    client = MlflowClient()
    runs = {}
    for key, tags in (("named", {"condgen.shards": named.as_uri()}), ("digits", {"condgen.shards": digits.as_uri()}),
                      ("untagged", {}), ("missing", {"condgen.shards": (tmp_path / "gone").as_uri()})):
        with mlflow.start_run(run_name=key, tags=tags) as run:
            runs[key] = run.info.run_id
    assert training_class_names(client, runs["named"]) == NAMES
    assert [training_class_names(client, runs[k]) for k in ("digits", "untagged", "missing")] == [None] * 3


def test_bad_requests_fail_in_one_line(tmp_path):
    ckpt_io.save_checkpoint(tmp_path, build_tiny("cvae"))
    wrapper = CondgenModel(tmp_path)
    for request, message in [({"condition": 12}, "condition must be a label in [0, 9]"),
                             ({"condition": "a cat"}, "names no class"),
                             ({"condition": 2.5}, "whole number"),
                             ({"condition": 1, "n": 0}, "n must be in [1, 256]")]:
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            wrapper.predict(None, request)
        assert "\n" not in str(err.value)
    assert wrapper.predict(None, [{"condition": 1}]).shape == (1, 28, 28, 1)


@pytest.mark.slow
def test_a_checkpoint_the_pyfunc_cannot_wrap_is_still_promoted(condgen_home):
    """A component (no sampling from a condition) registers as before, tagged ``condgen.pyfunc=false``."""
    run_id = train_run(build_tiny("autoencoder"), "pyfunc-test", metrics={"eval/cond_accuracy": 0.9})
    name = f"condgen-component-{uuid.uuid4().hex[:6]}"
    decision = promote(run_id, name, 0.9, Gate(min_accuracy=0.5))
    version = MlflowClient().get_model_version(name, decision.version)
    assert decision.promoted and version.tags["condgen.pyfunc"] == "false"
    files = {f.path.rsplit("/", 1)[-1] for f in MlflowClient().list_artifacts(run_id, "model")}
    assert files == {ckpt_io.WEIGHTS, ckpt_io.CONFIG}
    assert "promoted to @champion" in version.description
