"""Shared set-up of the diffusion benchmarks: data, trained models, the judge, scoring, tables.

Every diffusion benchmark needs the same three things, so they are made once and cached:

* shards: ``bundled:mnist`` ingested to ``<storage>/shards/mnist`` (``--quick``: 1,000 digits);
* a ``diffusion`` model and a ``noisy_classifier`` trained through the pipeline's Ray Train
  loop (``tasks.train.train``: TorchTrainer, MLflow run, safetensors checkpoint). A trained
  checkpoint's URI is remembered under ``<storage>/bench/<key>.json`` (key: shards + model
  config + training budget), so the second benchmark reuses the first one's model; or pass
  ``--checkpoint`` / ``--classifier-checkpoint``;
* the judge of ``tasks.evaluate.get_judge`` (the same one the ``retrain`` flow scores with)
  and the features of the real test split, for conditional accuracy and domain FID.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

# The benchmark model: the default U-Net is ~4x the compute of this one on CPU, and sampling
# 1,000-step DDPM chains with it does not fit a 2-core budget. Three levels (28 -> 14 -> 7)
# keep the middle blocks at 7x7, where they are cheap and see the whole digit. EMA weights:
# without them the sample quality of this short run swings from epoch to epoch.
BENCH_DIFFUSION = {"channels": [16, 32, 32], "timesteps": 1000, "lr": 2e-3, "sample_steps": 25, "ema_decay": 0.999}
BENCH_CLASSIFIER = {"channels": [16, 32], "timesteps": 1000, "lr": 2e-3}
QUICK_DIFFUSION = {"channels": [8, 16], "timesteps": 1000, "lr": 3e-3, "sample_steps": 5}
QUICK_CLASSIFIER = {"channels": [8, 16], "timesteps": 1000, "lr": 3e-3}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1,000 digits, a tiny model, few samples")
    p.add_argument("--shards", help="an ingested shard set URI (default: bundled:mnist under the storage root)")
    p.add_argument("--checkpoint", help="a trained diffusion checkpoint URI (default: train or reuse the cached one)")
    p.add_argument("--epochs", type=int, help="diffusion training epochs (default 20; --quick 1)")
    p.add_argument("--batch-size", type=int, default=32, help="per Ray Train worker (global = x --workers)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    # 1 thread: on a 2-core machine that other jobs also load, 2 intra-op threads were measured
    # 3-10x SLOWER than 1 (spin-waiting threads); raise it on an idle or bigger machine.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for sampling")
    p.add_argument("--classifier-checkpoint", help="a trained noisy_classifier checkpoint URI (classifier guidance)")
    p.add_argument("--classifier-epochs", type=int, help="noisy classifier training epochs (default 4; --quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this file")
    return p


def setup(args: argparse.Namespace) -> str:
    """Threads, quiet logs, shards; returns the shards URI."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    torch.set_num_threads(args.threads)
    if args.shards:
        return args.shards
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.io import settings, storage

    limit = 1000 if args.quick else None
    uri = storage.join(settings.storage_root(), "shards", "mnist" if limit is None else f"mnist-{limit}")
    ingest("bundled:mnist", uri, limit=limit)  # skips when the shards are already complete
    return uri


def _ensure_ray(workers: int) -> None:
    import ray

    if not ray.is_initialized():
        # A fresh local instance, never a cluster some other process left running here.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", num_cpus=max(2, workers),
                 include_dashboard=False, log_to_driver=False)


def trained(name: str, config: dict[str, Any], shards_uri: str, *, epochs: int, batch_size: int, workers: int,
            seed: int, checkpoint: str | None = None) -> tuple[torch.nn.Module, str]:
    """(model, checkpoint URI): loaded from ``checkpoint``, from the benchmark cache, or trained now."""
    from condgen.tasks.io import settings, storage
    from condgen.tasks.io.model_store import load_trained
    from condgen.tasks.training.driver import TrainRequest, train

    if checkpoint:
        model, _ = load_trained(checkpoint)
        print(f"[{name}] loaded {checkpoint}", flush=True)
        return model.eval(), checkpoint
    manifest = storage.read_json(storage.join(shards_uri, "manifest.json"))
    from condgen.models.registry import recipe_config

    key = hashlib.sha256(json.dumps({"name": name, "config": recipe_config(name, config), "epochs": epochs, "batch_size": batch_size,
                                     "workers": workers, "seed": seed, "data": manifest.get("source_fingerprint"),
                                     "shards": manifest.get("shards")}, sort_keys=True).encode()).hexdigest()[:16]
    cache = storage.join(settings.storage_root(), "bench", f"{name}-{key}.json")
    if storage.exists(cache):
        entry = storage.read_json(cache)
        try:
            model, _ = load_trained(entry["checkpoint"])
            print(f"[{name}] reusing {entry['checkpoint']} (trained in {entry['train_seconds']:.0f}s)", flush=True)
            return model.eval(), entry["checkpoint"]
        except (FileNotFoundError, OSError):
            pass  # the checkpoint went away: train again
    _ensure_ray(workers)
    print(f"[{name}] training {config} for {epochs} epochs x {workers} Ray Train workers ...", flush=True)
    t0 = time.perf_counter()
    res = train(TrainRequest(model=name, shards_uri=shards_uri, model_config=config, epochs=epochs,
                             batch_size=batch_size, num_workers=workers, seed=seed, experiment="condgen-bench",
                             run_name=f"bench-{name}", grid_every=epochs))
    seconds = time.perf_counter() - t0
    losses = [round(h.get("loss", float("nan")), 4) for h in res.history]
    print(f"[{name}] trained in {seconds:.0f}s, loss per epoch {losses}\n[{name}] checkpoint {res.checkpoint_uri}",
          flush=True)
    storage.write_json(cache, {"checkpoint": res.checkpoint_uri, "run_id": res.run_id, "train_seconds": seconds,
                               "history": res.history})
    model, _ = load_trained(res.checkpoint_uri)
    return model.eval(), res.checkpoint_uri


def diffusion_model(args: argparse.Namespace, shards_uri: str) -> tuple[torch.nn.Module, str]:
    config = QUICK_DIFFUSION if args.quick else BENCH_DIFFUSION
    epochs = args.epochs or (1 if args.quick else 20)
    return trained("diffusion", config, shards_uri, epochs=epochs, batch_size=args.batch_size,
                   workers=args.workers, seed=args.seed, checkpoint=args.checkpoint)


def noisy_classifier(args: argparse.Namespace, shards_uri: str) -> tuple[torch.nn.Module, str]:
    config = QUICK_CLASSIFIER if args.quick else BENCH_CLASSIFIER
    epochs = args.classifier_epochs or (1 if args.quick else 4)
    return trained("noisy_classifier", config, shards_uri, epochs=epochs, batch_size=args.batch_size,
                   workers=args.workers, seed=args.seed, checkpoint=args.classifier_checkpoint)


# -- scoring -------------------------------------------------------------------------------------
@dataclass
class Scorer:
    """Conditional accuracy and domain FID with the pipeline's judge (tasks.evaluate)."""

    judge: Any
    real_features: np.ndarray
    test: dict[str, Any]
    shards_uri: str

    @classmethod
    def for_shards(cls, shards_uri: str) -> "Scorer":
        from condgen.tasks.io.images import from_uint8
        from condgen.tasks.judging.evaluate import get_judge, load_test, predict

        judge = get_judge(shards_uri, log_to_mlflow=False)
        test = load_test(shards_uri)
        _, feats = predict(judge.model, from_uint8(test["x"]))
        print(f"[judge] test accuracy {judge.test_accuracy:.4f} ({judge.fingerprint}); "
              f"{len(test['y'])} real test images for FID", flush=True)
        return cls(judge, feats.numpy().astype(np.float64), test, shards_uri)

    def probs(self, samples: torch.Tensor) -> torch.Tensor:
        from condgen.tasks.judging.evaluate import predict

        return predict(self.judge.model, samples)[0]

    def score(self, samples: torch.Tensor, labels: np.ndarray | torch.Tensor) -> dict[str, float]:
        from condgen.tasks.judging.evaluate import frechet_distance, predict

        labels = np.asarray(labels)
        probs, feats = predict(self.judge.model, samples)
        hit = probs.argmax(-1).numpy() == labels
        acc = float(hit.mean())
        return {"acc": acc, "acc_se": math.sqrt(max(acc * (1 - acc), 1e-12) / len(labels)),
                "fid": frechet_distance(feats.numpy().astype(np.float64), self.real_features),
                "conf": float(probs[torch.arange(len(labels)), torch.from_numpy(labels)].mean()),
                "n": len(labels)}

    def real_fid(self, n: int, seed: int = 0) -> float:
        """FID of n real *train* images against the test features: the floor at this sample size."""
        from condgen.tasks.data.splits import load_split
        from condgen.tasks.io.images import from_uint8
        from condgen.tasks.judging.evaluate import frechet_distance, predict

        train = load_split(self.shards_uri, "train")
        idx = np.random.default_rng(seed).choice(len(train["y"]), size=min(n, len(train["y"])), replace=False)
        _, feats = predict(self.judge.model, from_uint8(train["x"][idx]))
        return frechet_distance(feats.numpy().astype(np.float64), self.real_features)


def balanced_labels(n_per_class: int, num_classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(num_classes), n_per_class)


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# -- output --------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pastes into the README as it is)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}")
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any], default: Any = float) -> None:
    """Write a benchmark's figures to ``path`` (``--json``) when one is given; ``default``
    converts what json cannot (numpy scalars by default)."""
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=default)
        print(f"figures written to {path}")


def machine() -> str:
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load:.1f} at start")
