"""Evaluation of any labelled set (tasks/judging/evaluate.py, tasks/judging/feature_metrics.py).

A judge trained on a 3-class RGB toy set (coloured squares: the class is the colour) with the data's
channels and classes; the warning for a judge too weak to judge; KID (Bińkowski et al. 2018) against a
direct O(n^2) evaluation of its unbiased estimator, ~0 for two samples of one distribution and clearly
positive for two different ones; NaN with a reason, not a crash, for a split too small to measure; the
MLflow log of eval/kid, eval/kid_std and an RGB class grid. Seconds, one CPU thread.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from condgen.models.classifier import ClassifierConfig, DigitClassifier, JudgeClassifier
from condgen.models.registry import build_model
from condgen.tasks.io import storage, tracking
from condgen.tasks.judging import evaluate
from condgen.tasks.judging.evaluate import Judge, evaluate_model, fit_classifier, judge_accuracy, judge_warning
from condgen.tasks.judging.feature_metrics import (
    frechet_distance,
    kernel_inception_distance,
    kid_subset_size,
    mmd2_unbiased,
    polynomial_kernel,
)
from condgen.tasks.judging.promote import Gate, decide
from tests.tiny import TINY

SIZE = 16
JUDGE = {"channels": (8, 16), "feature_dim": 32, "dropout": 0.0, "lr": 3e-3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def squares(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, size, size, 3) dark noise with one bright square of the class's colour (red, green, blue)
    at a random place, and the labels (n,) in {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    for i, (r, c) in enumerate(rng.integers(0, size - 7, (n, 2))):
        x[i, r:r + 7, c:c + 7, y[i]] = 255
    return x, y.astype(np.int64)


@pytest.fixture(scope="module")
def judge() -> Judge:
    x, y = squares(300, seed=0)
    model = fit_classifier(x, y, config=ClassifierConfig(in_channels=3, num_classes=3, **JUDGE), epochs=3)
    tx, ty = squares(120, seed=1)
    return Judge(model, judge_accuracy(model, tx, ty), "toy")


def colour_cvae(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cvae", {**TINY["cvae"], "in_channels": 3, "image_size": SIZE, "num_classes": num_classes})


# -- the judge -----------------------------------------------------------------------------------------
def test_the_judge_learns_a_3_class_rgb_set(judge):
    assert isinstance(judge.model, JudgeClassifier) and JudgeClassifier is DigitClassifier  # the old name loads
    assert (judge.model.config.in_channels, judge.num_classes) == (3, 3)
    assert judge.test_accuracy > 0.9 and judge.warning is None
    x, y = squares(60, seed=2)
    unlabelled = np.concatenate([y[:30], -np.ones(30, np.int64)])  # caption-only rows carry -1
    inferred = fit_classifier(x, unlabelled, epochs=1)  # channels and classes from the arrays
    assert (inferred.config.in_channels, inferred.config.num_classes) == (3, 3)


def test_get_judge_takes_channels_and_classes_from_the_manifest(tmp_path, monkeypatch):
    (x, y), (tx, ty) = squares(150, seed=0), squares(60, seed=1)
    shards = tmp_path.as_uri()
    storage.write_json(storage.join(shards, "manifest.json"), {"source_fingerprint": "toy", "shards": []})
    info = {"channels": 3, "image_size": SIZE, "num_classes": 3, "class_names": ["red", "green", "blue"]}
    monkeypatch.setattr(evaluate, "dataset_info", lambda uri: info)
    monkeypatch.setattr(evaluate, "load_split", lambda uri, split: {"train": {"x": x, "y": y},
                                                                     "test": {"x": tx, "y": ty}}[split])
    first = evaluate.get_judge(shards, epochs=1, log_to_mlflow=False)
    assert (first.model.config.in_channels, first.num_classes) == (3, 3)
    assert 0 <= first.test_accuracy <= 1
    again = evaluate.get_judge(shards, epochs=1, log_to_mlflow=False)  # cached under the same key
    assert again.fingerprint == first.fingerprint and again.test_accuracy == first.test_accuracy
    with pytest.raises(ValueError, match="num_classes=10 but the data has num_classes=3"):
        evaluate.get_judge(shards, epochs=1, config=ClassifierConfig(in_channels=3), log_to_mlflow=False)


def test_a_weak_judge_is_reported():
    assert judge_warning(0.9, 10) is None and judge_warning(0.59, 10)  # 0.6 floor
    assert judge_warning(0.66, 3) and judge_warning(0.67, 3) is None  # twice chance: 2/3
    assert judge_warning(0.74, 2) and judge_warning(0.75, 2) is None  # capped at halfway: 0.75
    assert judge_warning(float("nan"), 3)
    ok, reason = decide(0.9, None, Gate(min_accuracy=0.5), judge_warning="weak")
    assert ok and "judge warning: weak" in reason
    assert not decide(0.9, None, Gate(min_accuracy=0.5, require_competent_judge=True), judge_warning="weak")[0]


def test_evaluation_with_an_untrained_judge_carries_its_warning(caplog):
    torch.manual_seed(0)
    weak = Judge(JudgeClassifier(ClassifierConfig(in_channels=3, num_classes=3, **JUDGE)).eval(), 0.34, "weak")
    x, y = squares(30, seed=3)
    with caplog.at_level(logging.WARNING, logger=evaluate.__name__):
        res = evaluate_model(colour_cvae(), weak, {"x": x, "y": y}, n_per_class=4)
    assert res.judge_warning and res.judge_warning in res.notes and res.judge_accuracy == 0.34
    assert "judge's own test accuracy 0.340" in caplog.text


# -- evaluation of a colour model ------------------------------------------------------------------------
def test_a_colour_model_gets_fid_kid_and_an_rgb_grid(judge):
    x, y = squares(45, seed=4)
    res = evaluate_model(colour_cvae(), judge, {"x": x, "y": y}, n_per_class=10)
    m = res.metrics()
    for key in ("eval/cond_accuracy", "eval/fid", "eval/kid", "eval/kid_std", "eval/precision", "eval/diversity"):
        assert key in m and math.isfinite(m[key]), key
    assert sorted(k for k in m if k.startswith("eval/acc_class_")) == [f"eval/acc_class_{c}" for c in range(3)]
    assert res.grid.ndim == 3 and res.grid.shape[2] == 3 and res.notes == []
    assert m["eval/kid_std"] > 0  # half-size subsets differ (kid_subset_size)
    with pytest.raises(ValueError, match="the model has 10 classes and the judge of this data 3"):
        evaluate_model(colour_cvae(10), judge, {"x": x, "y": y}, n_per_class=2)


def test_colorization_is_asked_only_for_classes_the_test_split_has(judge):
    torch.manual_seed(0)
    p2p = build_model("pix2pix", {**TINY["pix2pix"], "in_channels": 3, "image_size": SIZE, "pairing": "colorize"})
    x, y = squares(60, seed=5)
    keep = y != 1  # no green square in this split
    res = evaluate_model(p2p, judge, {"x": x[keep], "y": y[keep]}, n_per_class=5)
    assert res.n_samples == 10 and math.isnan(res.per_class_accuracy[1])
    assert "eval/acc_class_1" not in res.metrics() and "eval/acc_class_2" in res.metrics()


def test_a_tiny_split_gives_nan_with_a_reason_not_a_crash(judge):
    x, y = squares(2, seed=6)
    res = evaluate_model(colour_cvae(), judge, {"x": x, "y": y}, n_per_class=2)
    assert math.isfinite(res.cond_accuracy)
    assert all(math.isnan(v) for v in (res.fid, res.kid, res.kid_std, res.precision, res.recall))
    assert any("got 2 real and 6 generated" in note for note in res.notes), res.notes
    assert math.isnan(frechet_distance(np.zeros((1, 4)), np.ones((5, 4))))  # one row: no covariance


def test_log_eval_records_kid_and_an_rgb_grid(judge, condgen_home):
    x, y = squares(30, seed=7)
    res = evaluate_model(colour_cvae(), judge, {"x": x, "y": y}, n_per_class=4)
    tracking.configure("test-evaluate-colour")
    with mlflow.start_run() as run:
        evaluate.log_eval(run.info.run_id, res, judge)
    client = MlflowClient()
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["eval/kid"] == pytest.approx(res.kid) and metrics["eval/kid_std"] == pytest.approx(res.kid_std)
    assert {"eval/class_grid.png", "eval/summary.json"} <= {a.path for a in client.list_artifacts(run.info.run_id,
                                                                                                  "eval")}
    summary = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/eval/summary.json")
    assert summary["kid"] == pytest.approx(res.kid) and summary["judge_warning"] is None


# -- KID -----------------------------------------------------------------------------------------------
def brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, term by term (Bińkowski et al. 2018, Eq. 4)."""
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_of_the_cubic_polynomial_kernel():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.3, 1.2, size=(9, 5))
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    direct = brute_force_mmd2(x, y)
    got = mmd2_unbiased(polynomial_kernel(tx, tx), polynomial_kernel(ty, ty), polynomial_kernel(tx, ty))
    assert got == pytest.approx(direct, rel=1e-10, abs=1e-12)
    # one subset of all rows (a permutation of each set): the estimator on the whole sets, std 0
    kid, std = kernel_inception_distance(x, y[:7], subsets=1, subset_size=100)
    assert kid == pytest.approx(brute_force_mmd2(x, y[:7]), rel=1e-10, abs=1e-12) and std == 0.0
    assert kernel_inception_distance(x[:1], y) == (pytest.approx(float("nan"), nan_ok=True),) * 2


def test_kid_is_zero_within_its_std_for_one_distribution_and_clearly_positive_for_two():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, same_std = kernel_inception_distance(a, b, subset_size=100)
    assert same_std > 0 and abs(same) < same_std, (same, same_std)
    other = rng.normal(0.5, 1.0, size=(400, 16))
    diff, diff_std = kernel_inception_distance(a, other, subset_size=100)
    assert diff > 3 * diff_std and diff > 20 * abs(same) and diff > 5 * same_std, (diff, diff_std, same, same_std)
    kid, std = kernel_inception_distance(a, other, subset_size=100)  # fixed seed: the same subsets
    assert (kid, std) == (diff, diff_std)
    # evaluation's subsets: the cap, at most half the smaller set (whole-set subsets would all be the same)
    assert (kid_subset_size(5000, 3000), kid_subset_size(1000, 1000), kid_subset_size(45, 30)) == (1000, 500, 15)


def test_eval_result_fields_include_kid():
    names = {f.name for f in dataclasses.fields(evaluate.EvalResult)}
    assert {"kid", "kid_std", "judge_warning", "notes"} <= names


def test_clip_prompts_name_the_classes_when_the_manifest_does():
    assert evaluate.class_prompts(np.array([7])) == ["a handwritten seven"]  # digits: as before
    assert evaluate.class_prompts(np.array([1, 0]), ["red square", "blue circle"]) == ["a blue circle",
                                                                                       "a red square"]
