"""Evaluate conditional generators with a digit classifier as the judge.

* conditional accuracy: the share of samples generated for label c that the judge
  assigns to c, per class and overall;
* domain FID: the Fréchet distance (Heusel et al. 2017) between the judge's
  penultimate features of samples and of real test images;
* a per-class sample grid;
* k-NN precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et
  al. 2020) in the judge's feature space: fidelity and coverage of the real manifold;
* intra-class diversity: mean pairwise judge-feature distance between samples of one
  class, next to the same figure for real test images of that class;
* CLIP score (optional, when a CLIP handle is given): cosine between each sample and
  its class prompt.

Samples are drawn from a fixed seed set, so two models (a candidate and the
champion) are scored on exactly the same evaluation.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from scipy import linalg

from condgen.models.classifier import ClassifierConfig, DigitClassifier
from condgen.tasks.data.attributes import label_word
from condgen.tasks.data.splits import load_arrays, load_split
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io import storage, tracking
from condgen.tasks.io.images import from_uint8, grid, to_uint8
from condgen.tasks.io.model_store import apply_adapter, load_model_uri, load_trained

EVAL_SEED = 1234


# -- the judge -------------------------------------------------------------------------
@dataclass
class Judge:
    model: DigitClassifier
    test_accuracy: float
    fingerprint: str
    checkpoint_uri: str | None = None


def fit_classifier(x: np.ndarray, y: np.ndarray, *, config: ClassifierConfig | None = None, epochs: int = 4,
                   batch_size: int = 64, seed: int = 0) -> DigitClassifier:
    """Plain in-process training of the judge (small: seconds on CPU)."""
    torch.manual_seed(seed)
    model = DigitClassifier(config or ClassifierConfig())
    opt = torch.optim.Adam(model.parameters(), lr=model.config.lr)

    def opt_step(_: str, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        perm = rng.permutation(len(y))
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            model.train_step({"x": from_uint8(x[idx]), "y": torch.from_numpy(y[idx]).long()}, opt_step)
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, K), features (N, F)) for images in [-1, 1]."""
    model.eval()
    probs, feats = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f)
        probs.append(F.softmax(model.head(f), -1))
    return torch.cat(probs), torch.cat(feats)


def get_judge(shards_uri: str, *, epochs: int = 4, seed: int = 0, config: ClassifierConfig | None = None,
              log_to_mlflow: bool = True) -> Judge:
    """Train (or reuse) the judge for a shard set.

    The judge is cached in storage under the shard manifest's fingerprint, so every
    model trained on the same data is scored by the same classifier.
    """
    cfg = config or ClassifierConfig()
    manifest = storage.read_json(storage.join(shards_uri, "manifest.json"))
    key = hashlib.sha256(json.dumps({"data": manifest.get("source_fingerprint"), "shards": manifest.get("shards"),
                                     "cfg": asdict(cfg), "epochs": epochs, "seed": seed},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    uri = storage.join(shards_uri, "judge", key)
    test = load_split(shards_uri, "test")
    if storage.exists(storage.join(uri, ckpt_io.CONFIG)):
        model, meta = load_trained(uri)
        return Judge(model, meta["test_accuracy"], key, uri)
    train = load_split(shards_uri, "train")
    model = fit_classifier(train["x"], train["y"].astype(np.int64), config=cfg, epochs=epochs, seed=seed)
    probs, _ = predict(model, from_uint8(test["x"]))
    acc = float((probs.argmax(-1).numpy() == test["y"]).mean())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_io.save_checkpoint(tmp, model, extra={"test_accuracy": acc, "shards_uri": shards_uri})
        for name in (ckpt_io.WEIGHTS, ckpt_io.CONFIG):
            storage.write_bytes(storage.join(uri, name), Path(tmp, name).read_bytes())
        if log_to_mlflow:
            tracking.configure("condgen-judge")
            with mlflow.start_run(run_name="digit-classifier"):
                mlflow.log_params({"epochs": epochs, "seed": seed, "shards_uri": shards_uri, "fingerprint": key,
                                   **{f"cfg.{k}": str(v) for k, v in asdict(cfg).items()}})
                mlflow.log_metric("test_accuracy", acc)
                mlflow.log_artifacts(tmp, artifact_path="model")
                mlflow.set_tag("condgen.role", "judge")
    return Judge(model, acc, key, uri)


# -- metrics -----------------------------------------------------------------------------
def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two feature sets."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():  # singular products are handled just below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise (as in the reference code)
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.double(), b.double())  # (Na, Nb) Euclidean


def knn_radii(feats: torch.Tensor | np.ndarray, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point, (N,). Row chunks keep memory
    at chunk x N distances (a 10k-image test split would otherwise need a 10k x 10k matrix)."""
    f = torch.as_tensor(np.asarray(feats)).double()
    kth = min(k + 1, len(f))  # +1: the point itself is at distance 0
    return torch.cat([_pairwise(f[i:i + chunk], f).kthvalue(kth, dim=1).values for i in range(0, len(f), chunk)])


def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray,
                     k: int = 3, chunk: int = 1024) -> dict[str, float]:
    """Improved precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et
    al. 2020) with k-NN hyperspheres in a feature space.

    * precision: share of fake points inside some real point's k-NN ball (fidelity);
    * recall: share of real points inside some fake point's k-NN ball (diversity / coverage
      of the real manifold);
    * density: mean count of real balls containing a fake point, / k (≈1 for matched sets);
    * coverage: share of real points whose ball holds at least one fake point.
    """
    r = torch.as_tensor(np.asarray(real)).double()
    f = torch.as_tensor(np.asarray(fake)).double()
    r_real, r_fake = knn_radii(r, k, chunk), knn_radii(f, k, chunk)
    precise, density = 0, 0.0
    covered = torch.zeros(len(r), dtype=torch.bool)  # real r's ball holds a fake point
    recalled = torch.zeros(len(r), dtype=torch.bool)  # real r lies in some fake point's ball
    for i in range(0, len(f), chunk):
        d = _pairwise(f[i:i + chunk], r)  # (chunk, R)
        inside_real = d <= r_real[None, :]  # fake inside real r's ball
        precise += int(inside_real.any(1).sum())
        density += float(inside_real.double().sum())
        covered |= inside_real.any(0)
        recalled |= (d <= r_fake[i:i + chunk, None]).any(0)
    return {
        "precision": precise / len(f),
        "recall": float(recalled.double().mean()),
        "density": density / (k * len(f)),
        "coverage": float(covered.double().mean()),
    }


def intra_class_diversity(feats: torch.Tensor | np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the mean pairwise feature distance between members of a class."""
    f = torch.as_tensor(np.asarray(feats)).double()
    labels = np.asarray(labels)
    per_class = []
    for c in np.unique(labels):
        idx = torch.from_numpy(np.flatnonzero(labels == c))
        if len(idx) < 2:
            continue
        d = _pairwise(f[idx], f[idx])
        per_class.append(float(d.sum() / (len(idx) * (len(idx) - 1))))
    return float(np.mean(per_class)) if per_class else float("nan")


def class_prompts(labels: np.ndarray) -> list[str]:
    """The text a label-conditioned sample is scored against by CLIP ("a handwritten seven")."""
    return [f"a handwritten {label_word(int(c))}" for c in labels]


@dataclass
class EvalResult:
    cond_accuracy: float
    per_class_accuracy: list[float]
    fid: float
    mean_confidence: float
    mean_entropy: float
    n_samples: int
    judge_fingerprint: str
    grid: np.ndarray = field(repr=False)
    # Added metrics (None where not computed): k-NN precision/recall/density/coverage in judge
    # features, intra-class diversity of samples and of real test images, CLIP score.
    precision: float | None = None
    recall: float | None = None
    density: float | None = None
    coverage: float | None = None
    diversity: float | None = None
    diversity_real: float | None = None
    clip_score: float | None = None

    EXTRA = ("precision", "recall", "density", "coverage", "diversity", "diversity_real", "clip_score")

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}cond_accuracy": self.cond_accuracy, f"{prefix}fid": self.fid,
               f"{prefix}mean_confidence": self.mean_confidence, f"{prefix}mean_entropy": self.mean_entropy}
        out.update({f"{prefix}acc_class_{c}": a for c, a in enumerate(self.per_class_accuracy)})
        out.update({f"{prefix}{name}": getattr(self, name) for name in self.EXTRA if getattr(self, name) is not None})
        return out


def eval_conditions(model: torch.nn.Module, labels: np.ndarray, test: dict[str, Any]) -> torch.Tensor:
    """The condition tensor asking for each label: the label itself; (text models) the
    embedding of a caption of a test image of that class; (image-conditioned models:
    pix2pix, CycleGAN) the condition image made from a test digit of that class, so the
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


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, judge: Judge, test: dict[str, Any], *, n_per_class: int = 100,
                   batch_size: int = 250, seed: int = EVAL_SEED, clip: Any = None, knn_k: int = 3) -> EvalResult:
    """Score ``model.sample`` on a fixed seed set: accuracy, FID, confidence, grid, k-NN
    precision/recall/density/coverage, intra-class diversity and (``clip``: a
    ``tasks.clip.handle.ClipHandle``) the CLIP score of each sample against its class prompt."""
    model.eval()
    k = judge.model.config.num_classes
    labels = np.repeat(np.arange(k), n_per_class)
    cond = eval_conditions(model, labels, test)
    g = torch.Generator().manual_seed(seed)
    samples = torch.cat([model.sample(cond[i:i + batch_size], generator=g) for i in range(0, len(labels), batch_size)])
    probs, feats = predict(judge.model, samples)
    _, real_feats = predict(judge.model, from_uint8(test["x"]))
    pred = probs.argmax(-1).numpy()
    hit = pred == labels
    per_class = [float(hit[labels == c].mean()) for c in range(k)]
    p_true = probs[torch.arange(len(labels)), torch.from_numpy(labels)]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    first = np.concatenate([np.flatnonzero(labels == c)[:8] for c in range(k)])
    pr = precision_recall(real_feats, feats, k=knn_k)
    clip_value = None
    if clip is not None:
        # open_clip takes seconds to import: only evaluations that ask for a CLIP score pay for it
        from condgen.tasks.clip.quality import clip_score

        clip_value = float(clip_score(clip, samples, class_prompts(labels)).mean())
    return EvalResult(
        cond_accuracy=float(hit.mean()), per_class_accuracy=per_class,
        fid=frechet_distance(feats.numpy().astype(np.float64), real_feats.numpy().astype(np.float64)),
        mean_confidence=float(p_true.mean()), mean_entropy=float(entropy.mean()), n_samples=len(labels),
        judge_fingerprint=judge.fingerprint, grid=grid(to_uint8(samples[first]), nrow=8),
        precision=pr["precision"], recall=pr["recall"], density=pr["density"], coverage=pr["coverage"],
        diversity=intra_class_diversity(feats, labels),
        diversity_real=intra_class_diversity(real_feats, np.asarray(test["y"])),
        clip_score=clip_value,
    )


def log_eval(run_id: str, result: EvalResult, judge: Judge) -> None:
    """Attach an evaluation to a training run: metrics, per-class table, grid PNG."""
    client = MlflowClient()
    for name, value in result.metrics().items():
        client.log_metric(run_id, name, value)
    client.log_metric(run_id, "eval/judge_test_accuracy", judge.test_accuracy)
    client.set_tag(run_id, "condgen.judge", judge.fingerprint)
    client.log_dict(run_id, {"per_class_accuracy": result.per_class_accuracy, "cond_accuracy": result.cond_accuracy,
                             "fid": result.fid, "judge_test_accuracy": judge.test_accuracy,
                             "n_samples": result.n_samples,
                             **{name: getattr(result, name) for name in EvalResult.EXTRA}}, "eval/summary.json")
    client.log_image(run_id, result.grid, "eval/class_grid.png")


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
    result = evaluate_model(model, judge, load_test(shards_uri, embeddings), n_per_class=n_per_class, clip=clip)
    log_eval(run_id, result, judge)
    return {**result.metrics(), "eval/judge_test_accuracy": judge.test_accuracy}


def scorer(shards_uri: str, *, embeddings: str | None = None, n_per_class: int = 100, judge_epochs: int = 4):
    """A function model -> conditional accuracy on exactly the evaluation ``evaluate_run`` uses."""
    judge = get_judge(shards_uri, epochs=judge_epochs)
    test = load_test(shards_uri, embeddings)
    return lambda model: evaluate_model(model, judge, test, n_per_class=n_per_class).cond_accuracy
