"""Evaluate conditional generators with a judge classifier trained on the shard set's own labels.

* the judge (``models.classifier.JudgeClassifier``): trained on the labelled train split with the
  data's channels and number of classes (``tasks.data.splits.dataset_info``), cached per shard set; its
  own test accuracy is reported beside every evaluation, with a warning (logged, in the result and on
  the run) when it is too weak to judge: below ``JUDGE_MIN_ACCURACY`` (0.6) or below twice chance (2/K
  for K classes, capped at halfway from chance to 1 so that two classes can pass: 0.75);
* conditional accuracy: the share of samples generated for label c that the judge
  assigns to c, per class and overall;
* domain FID and KID: the Fréchet distance (Heusel et al. 2017) and the kernel distance (unbiased
  MMD^2, cubic polynomial kernel, mean ± std over subsets; Bińkowski et al. 2018) between the judge's
  penultimate features of samples and of real test images (``tasks.judging.feature_metrics``); a
  split too small for them gives NaN with the reason in ``EvalResult.notes``;
* a per-class sample grid (RGB for colour data);
* k-NN precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et
  al. 2020) in the judge's feature space: fidelity and coverage of the real manifold;
* intra-class diversity: mean pairwise judge-feature distance between samples of one
  class, next to the same figure for real test images of that class;
* CLIP score (optional, when a CLIP handle is given): cosine between each sample and
  its class prompt;
* on ``bundled:shapes`` with a text-conditioned model, the pixel checker's per-attribute and
  joint accuracy for test captions, seen and held-out combinations (``eval/shapes/...``,
  ``tasks.judging.shapes_eval``).

Samples are drawn from a fixed seed set, so two models (a candidate and the
champion) are scored on exactly the same evaluation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from condgen.models.base import config_to_dict
from condgen.models.classifier import ClassifierConfig, JudgeClassifier
from condgen.tasks.data.attributes import label_word
from condgen.tasks.data.splits import dataset_info, load_arrays, load_split
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io import storage, tracking
from condgen.tasks.io.images import from_uint8, grid, to_uint8
from condgen.tasks.io.model_store import apply_adapter, load_model_uri, load_trained
from condgen.tasks.io.progress import progress
from condgen.tasks.judging import shapes_eval
from condgen.tasks.judging.feature_metrics import (
    MIN_SET_SIZE,
    frechet_distance,
    intra_class_diversity,
    kernel_inception_distance,
    kid_subset_size,
    precision_recall,
    too_few,
)
from condgen.tasks.training.data_config import fit_to_data

log = logging.getLogger(__name__)

EVAL_SEED = 1234
JUDGE_MIN_ACCURACY = 0.6


# -- the judge -------------------------------------------------------------------------
def judge_warning(test_accuracy: float, num_classes: int) -> str | None:
    """Why a judge with this test accuracy over ``num_classes`` classes is too weak to judge, or None.

    Weak: below ``JUDGE_MIN_ACCURACY`` or below twice chance (2 / K), the latter capped at (1 + 1 / K) / 2,
    halfway from chance to perfect (it binds only for K = 2, where twice chance would be 1)."""
    k = max(int(num_classes), 1)
    need = max(JUDGE_MIN_ACCURACY, min(2 / k, (1 + 1 / k) / 2))
    if math.isfinite(test_accuracy) and test_accuracy >= need:
        return None
    return (f"the judge's own test accuracy {test_accuracy:.3f} is below {need:.3f} (max of {JUDGE_MIN_ACCURACY} "
            f"and twice chance for {k} classes): its conditional accuracy and features are not trustworthy")


@dataclass
class Judge:
    model: JudgeClassifier
    test_accuracy: float
    fingerprint: str
    checkpoint_uri: str | None = None

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_classes)

    @property
    def warning(self) -> str | None:
        """``judge_warning`` of this judge (None when it is competent)."""
        return judge_warning(self.test_accuracy, self.num_classes)


def _labelled(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows with a label (caption-only samples carry -1)."""
    keep = np.asarray(y) >= 0
    return x[keep], np.asarray(y)[keep].astype(np.int64)


def fit_classifier(x: np.ndarray, y: np.ndarray, *, config: ClassifierConfig | None = None, epochs: int = 4,
                   batch_size: int = 64, seed: int = 0) -> JudgeClassifier:
    """Plain in-process training of the judge (small: seconds on CPU) on uint8 images, (N, H, W) or
    (N, H, W, 3), and their labels (unlabelled rows, -1, are left out). Without ``config``, the channels
    and classes come from the arrays (for digits: ``ClassifierConfig()``)."""
    x, y = _labelled(x, y)
    if config is None:
        config = ClassifierConfig(**fit_to_data("classifier", {}, {"channels": 3 if x.ndim == 4 else 1,
                                                                   "num_classes": int(y.max()) + 1 if len(y) else 0}))
    torch.manual_seed(seed)
    model = JudgeClassifier(config)
    opt = torch.optim.Adam(model.parameters(), lr=model.config.lr)

    def opt_step(_: str, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rng = np.random.default_rng(seed)
    model.train()
    for _ in progress(range(epochs), desc="judge", unit="epoch"):
        perm = rng.permutation(len(y))
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            model.train_step({"x": from_uint8(x[idx]), "y": torch.from_numpy(y[idx]).long()}, opt_step)
    return model.eval()


@torch.no_grad()
def predict(model: JudgeClassifier, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, K), features (N, F)) for images in [-1, 1]."""
    model.eval()
    probs, feats = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f)
        probs.append(F.softmax(model.head(f), -1))
    if not feats:
        return torch.zeros(0, model.config.num_classes), torch.zeros(0, model.config.feature_dim)
    return torch.cat(probs), torch.cat(feats)


def judge_accuracy(model: JudgeClassifier, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy on the labelled rows of uint8 images ``x`` (NaN when there are none)."""
    x, y = _labelled(x, y)
    if not len(y):
        return float("nan")
    probs, _ = predict(model, from_uint8(x))
    return float((probs.argmax(-1).numpy() == y).mean())


def get_judge(shards_uri: str, *, epochs: int = 4, seed: int = 0, config: ClassifierConfig | None = None,
              log_to_mlflow: bool = True) -> Judge:
    """Train (or reuse) the judge for a shard set.

    Its channels and classes come from the shard manifest (``tasks.training.data_config.fit_to_data``);
    a ``config`` that contradicts them is a ValueError. The judge is cached in storage under the shard
    manifest's fingerprint, so every model trained on the same data is scored by the same classifier
    (for digits the config, and so the cache key, is the one of before).
    """
    info = dataset_info(shards_uri)
    cfg = ClassifierConfig(**fit_to_data("classifier", config_to_dict(config) if config else {}, info,
                                         where=shards_uri))
    manifest = storage.read_json(storage.join(shards_uri, "manifest.json"))
    key = hashlib.sha256(json.dumps({"data": manifest.get("source_fingerprint"), "shards": manifest.get("shards"),
                                     "cfg": asdict(cfg), "epochs": epochs, "seed": seed},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    uri = storage.join(shards_uri, "judge", key)
    if storage.exists(storage.join(uri, ckpt_io.CONFIG)):
        model, meta = load_trained(uri)
        return _announce(Judge(model, meta["test_accuracy"], key, uri))
    train, test = load_split(shards_uri, "train"), load_split(shards_uri, "test")
    model = fit_classifier(train["x"], train["y"], config=cfg, epochs=epochs, seed=seed)
    acc = judge_accuracy(model, test["x"], test["y"])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_io.save_checkpoint(tmp, model, extra={"test_accuracy": acc, "shards_uri": shards_uri})
        for name in (ckpt_io.WEIGHTS, ckpt_io.CONFIG):
            storage.write_bytes(storage.join(uri, name), Path(tmp, name).read_bytes())
        if log_to_mlflow:
            tracking.configure("condgen-judge")
            with mlflow.start_run(run_name="judge-classifier"):
                mlflow.log_params({"epochs": epochs, "seed": seed, "shards_uri": shards_uri, "fingerprint": key,
                                   **{f"cfg.{k}": str(v) for k, v in asdict(cfg).items()}})
                mlflow.log_metric("test_accuracy", acc)
                mlflow.log_artifacts(tmp, artifact_path="model")
                mlflow.set_tag("condgen.role", "judge")
                if judge_warning(acc, cfg.num_classes):
                    mlflow.set_tag("condgen.judge_warning", judge_warning(acc, cfg.num_classes))
    return _announce(Judge(model, acc, key, uri))


def _announce(judge: Judge) -> Judge:
    if judge.warning:
        log.warning("judge %s: %s", judge.fingerprint, judge.warning)
    return judge


def class_prompts(labels: np.ndarray, class_names: list[str] | None = None) -> list[str]:
    """The text a label-conditioned sample is scored against by CLIP: "a handwritten seven" for digits
    (no class names), "a red circle" for a set whose manifest names its classes."""
    if class_names:
        return [f"a {class_names[int(c)]}" for c in labels]
    return [f"a handwritten {label_word(int(c))}" for c in labels]


@dataclass
class EvalResult:
    cond_accuracy: float
    per_class_accuracy: list[float]  # NaN for a class that could not be asked for (no test example to condition on)
    fid: float
    mean_confidence: float
    mean_entropy: float
    n_samples: int
    judge_fingerprint: str
    grid: np.ndarray = field(repr=False)
    # Added metrics (None where not computed, NaN where the sets are too small): KID (mean, std over
    # subsets), k-NN precision/recall/density/coverage in judge features, intra-class diversity of
    # samples and of real test images, CLIP score.
    kid: float | None = None
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    density: float | None = None
    coverage: float | None = None
    diversity: float | None = None
    diversity_real: float | None = None
    clip_score: float | None = None
    judge_accuracy: float | None = None  # the judge's own test accuracy
    judge_warning: str | None = None  # why the judge is too weak to judge (``judge_warning``), or None
    notes: list[str] = field(default_factory=list)  # why a metric is NaN
    shapes: dict[str, float] = field(default_factory=dict)  # checker accuracies (shapes_eval.flat_metrics)

    EXTRA = ("kid", "kid_std", "precision", "recall", "density", "coverage", "diversity", "diversity_real",
             "clip_score")

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}cond_accuracy": self.cond_accuracy, f"{prefix}fid": self.fid,
               f"{prefix}mean_confidence": self.mean_confidence, f"{prefix}mean_entropy": self.mean_entropy}
        out.update({f"{prefix}acc_class_{c}": a for c, a in enumerate(self.per_class_accuracy) if not math.isnan(a)})
        out.update({f"{prefix}{name}": getattr(self, name) for name in self.EXTRA if getattr(self, name) is not None})
        out.update({f"{prefix}shapes/{name}": value for name, value in self.shapes.items()})
        return out


def eval_conditions(model: torch.nn.Module, labels: np.ndarray, test: dict[str, Any]) -> torch.Tensor:
    """The condition tensor asking for each label: the label itself; (text models) the
    embedding of a caption of a test image of that class; (image-conditioned models:
    pix2pix, CycleGAN) the condition image made from a test image of that class, so the
    accuracy is the label agreement between input and translation. Choices are fixed."""
    kind = getattr(model.config, "condition", "label")
    if kind == "label":
        return torch.from_numpy(labels).long()
    rng = np.random.default_rng(EVAL_SEED)
    if kind == "image":
        idx = [rng.choice(np.flatnonzero(test["y"] == c)) for c in labels]
        return model.condition_image(from_uint8(test["x"][np.asarray(idx)]))
    rows = []
    for c in labels:
        i = rng.choice(np.flatnonzero(test["y"] == c))
        rows.append(test["txt"][i, rng.integers(test["txt"].shape[1])])
    return torch.from_numpy(np.stack(rows)).float()


def eval_classes(model: torch.nn.Module, judge: Judge, test: dict[str, Any]) -> np.ndarray:
    """The classes to ask for: all of the judge's for a label model (whose classes must be the judge's);
    for models conditioned on test examples (text, image), those the test split has examples of."""
    k, mine = judge.num_classes, getattr(model.config, "num_classes", None)
    if mine is not None and int(mine) != k:
        raise ValueError(f"the model has {mine} classes and the judge of this data {k}: evaluate a model on the "
                         "shard set it was trained on")
    classes = np.arange(k)
    if getattr(model.config, "condition", "label") != "label":
        classes = classes[np.isin(classes, np.asarray(test["y"]))]
    return classes


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, judge: Judge, test: dict[str, Any], *, n_per_class: int = 100,
                   batch_size: int = 250, seed: int = EVAL_SEED, clip: Any = None, knn_k: int = 3,
                   class_names: list[str] | None = None,
                   shapes: shapes_eval.ShapesEvalSets | None = None) -> EvalResult:
    """Score ``model.sample`` on a fixed seed set: accuracy, FID, KID, confidence, grid, k-NN
    precision/recall/density/coverage, intra-class diversity and (``clip``: a
    ``tasks.clip.handle.ClipHandle``) the CLIP score of each sample against its class prompt
    (``class_prompts``, with the manifest's ``class_names`` when it has them).
    A test split too small for the set statistics gives NaN for them, with the reason in ``notes``.
    ``shapes`` (``shapes_eval.load_eval_sets``): a text model is also scored by the shapes checker."""
    model.eval()
    k, classes = judge.num_classes, eval_classes(model, judge, test)
    labels = np.repeat(classes, n_per_class)
    cond = eval_conditions(model, labels, test)
    g = torch.Generator().manual_seed(seed)
    chunks = []
    with progress(total=len(labels), desc="evaluate", unit="sample") as bar:
        for i in range(0, len(labels), batch_size):
            chunks.append(model.sample(cond[i:i + batch_size], generator=g))
            bar.update(len(chunks[-1]))
    samples = torch.cat(chunks)
    probs, feats = predict(judge.model, samples)
    _, real_feats = predict(judge.model, from_uint8(test["x"]))
    pred = probs.argmax(-1).numpy()
    hit = pred == labels
    per_class = [float(hit[labels == c].mean()) if c in classes else float("nan") for c in range(k)]
    p_true = probs[torch.arange(len(labels)), torch.from_numpy(labels)]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    first = np.concatenate([np.flatnonzero(labels == c)[:8] for c in classes])
    notes = [judge.warning] if judge.warning else []
    small = too_few(len(real_feats), len(feats), max(MIN_SET_SIZE, knn_k + 1))
    nan = float("nan")
    if small:
        notes.append(small)
        fid, (kid, kid_std), pr = nan, (nan, nan), dict.fromkeys(("precision", "recall", "density", "coverage"), nan)
    else:
        fid = frechet_distance(feats.numpy().astype(np.float64), real_feats.numpy().astype(np.float64))
        kid, kid_std = kernel_inception_distance(real_feats, feats,
                                                 subset_size=kid_subset_size(len(real_feats), len(feats)))
        pr = precision_recall(real_feats, feats, k=knn_k)
    for note in notes:
        log.warning("evaluation of %s: %s", type(model).__name__, note)
    clip_value = None
    if clip is not None:
        # open_clip takes seconds to import: only evaluations that ask for a CLIP score pay for it
        from condgen.tasks.clip.quality import clip_score

        clip_value = float(clip_score(clip, samples, class_prompts(labels, class_names)).mean())
    real_labelled = np.asarray(test["y"]) >= 0
    checked = {}
    if shapes is not None and getattr(model.config, "condition", "label") == "text":
        checked = shapes_eval.evaluate_text_model(model, shapes, seed=seed, batch_size=batch_size)
    return EvalResult(
        cond_accuracy=float(hit.mean()) if len(hit) else nan, per_class_accuracy=per_class, fid=fid,
        mean_confidence=float(p_true.mean()), mean_entropy=float(entropy.mean()), n_samples=len(labels),
        judge_fingerprint=judge.fingerprint, grid=grid(to_uint8(samples[first]), nrow=8), kid=kid, kid_std=kid_std,
        precision=pr["precision"], recall=pr["recall"], density=pr["density"], coverage=pr["coverage"],
        diversity=intra_class_diversity(feats, labels),
        diversity_real=intra_class_diversity(real_feats[torch.from_numpy(real_labelled)],
                                             np.asarray(test["y"])[real_labelled]),
        clip_score=clip_value, judge_accuracy=judge.test_accuracy, judge_warning=judge.warning, notes=notes,
        shapes=checked,
    )


def log_eval(run_id: str, result: EvalResult, judge: Judge, class_names: list[str] | None = None) -> None:
    """Attach an evaluation to a training run: metrics (eval/fid, eval/kid, eval/kid_std, ...), the per-class
    accuracies as one table (``tracking.log_per_class_table``) and notes, the class grid PNG (RGB for colour
    data); a weak judge's warning as a run tag."""
    client = MlflowClient()
    for name, value in result.metrics().items():
        client.log_metric(run_id, name, value)
    client.log_metric(run_id, "eval/judge_test_accuracy", judge.test_accuracy)
    client.set_tag(run_id, "condgen.judge", judge.fingerprint)
    if judge.warning:
        client.set_tag(run_id, "condgen.judge_warning", judge.warning)
    client.log_dict(run_id, {"per_class_accuracy": result.per_class_accuracy, "cond_accuracy": result.cond_accuracy,
                             "fid": result.fid, "judge_test_accuracy": judge.test_accuracy,
                             "judge_warning": judge.warning, "notes": result.notes,
                             "n_samples": result.n_samples, "shapes": result.shapes,
                             **{name: getattr(result, name) for name in EvalResult.EXTRA}}, "eval/summary.json")
    client.log_image(run_id, result.grid, "eval/class_grid.png")
    tracking.log_per_class_table(run_id, list(result.per_class_accuracy), class_names)


def load_test(shards_uri: str, embeddings: str | None = None) -> dict[str, Any]:
    return load_arrays(shards_uri, "test", embeddings)


def evaluate_run(run_id: str, checkpoint_uri: str, shards_uri: str, *, embeddings: str | None = None,
                 n_per_class: int = 100, judge_epochs: int = 4, clip: Any = None,
                 adapter_base: str | None = None) -> dict[str, float]:
    """Score a trained run's checkpoint with the shard set's judge and log it to the run.
    ``clip``: an optional ``ClipHandle`` (or a ``tasks.clip.load.load_clip`` spec) for the CLIP score.
    ``adapter_base``: ``checkpoint_uri`` is a LoRA adapter folder for this base (``tasks.io.model_store``)."""
    judge = get_judge(shards_uri, epochs=judge_epochs)
    if adapter_base:
        model = apply_adapter(load_model_uri(adapter_base)[0], checkpoint_uri)
    else:
        model, _ = load_trained(checkpoint_uri)
    if isinstance(clip, str):
        from condgen.tasks.clip.load import load_clip  # heavy (open_clip), see evaluate_model

        clip = load_clip(clip, data_uri=shards_uri)
    text = bool(embeddings) and getattr(model.config, "condition", "label") == "text"
    result = evaluate_model(model, judge, load_test(shards_uri, embeddings), n_per_class=n_per_class, clip=clip,
                            class_names=dataset_info(shards_uri)["class_names"] if clip is not None else None,
                            shapes=shapes_eval.load_eval_sets(shards_uri, embeddings) if text else None)
    log_eval(run_id, result, judge, dataset_info(shards_uri)["class_names"])
    return {**result.metrics(), "eval/judge_test_accuracy": judge.test_accuracy}


def scorer(shards_uri: str, *, embeddings: str | None = None, n_per_class: int = 100, judge_epochs: int = 4):
    """A function model -> conditional accuracy on exactly the evaluation ``evaluate_run`` uses."""
    judge = get_judge(shards_uri, epochs=judge_epochs)
    test = load_test(shards_uri, embeddings)
    return lambda model: evaluate_model(model, judge, test, n_per_class=n_per_class).cond_accuracy
