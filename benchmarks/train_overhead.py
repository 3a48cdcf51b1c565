"""Ray Train overhead vs a bare PyTorch loop, and data-loader throughput vs the trainer's
consumption, on the same model and data, in one run.

    python -m benchmarks.train_overhead                 # demo CVAE, bundled MNIST, 3 epochs
    python -m benchmarks.train_overhead --quick         # smoke run (1 epoch, 1,000 samples)

Both loops train the demo model (``condgen.cli.DEMO_MODELS[0]``) with one torch thread,
the same ``batches()`` iterator, the same optimisers and ``train_step``:

* **bare**: a plain Python loop in this process, nothing else;
* **Ray Train**: ``tasks.train.train`` with one ``TorchTrainer`` worker: a Ray worker
  process, per-epoch safetensors checkpoint + ``ray.train.report``, MLflow metrics.

Two ratios are printed. *Per epoch*: the worker's own epoch time (``epoch_seconds``, the
training loop only) over the bare loop's median epoch (target <= 1.10x). *End to end*:
the whole ``train()`` call (Ray worker start, data load, checkpoints, MLflow, final copy)
over the bare loop's data load + epochs: the fixed cost a run pays once.

Data loader: samples/s of ``load_arrays`` (read the WebDataset shards, decode the PNGs)
and of ``batches()`` (shuffle, slice, to float tensors), against the samples/s the bare
trainer consumes. Their ratio (target >= 5x) is for the worst case where the loader would
decode the shards again every epoch; training actually decodes once and batches in memory.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def bare_loop(model_name: str, config: dict, arrays: dict, epochs: int, batch_size: int, seed: int = 0
              ) -> list[float]:
    """Epoch times of the same training as the Ray worker runs, without Ray."""
    import torch

    from condgen.models.registry import build_model
    from condgen.tasks.training.worker import batches, make_opt_step, make_optimizers

    torch.manual_seed(seed)
    model = build_model(model_name, config)
    opt_step = make_opt_step(make_optimizers(model))
    times = []
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for batch in batches(arrays, batch_size, 0, 1, epoch, seed):
            model.train_step(batch, opt_step)
        times.append(time.perf_counter() - t0)
    return times


def loader_rates(shards: str, arrays: dict, batch_size: int, repeats: int = 3) -> dict[str, float]:
    from condgen.tasks.data.splits import load_arrays
    from condgen.tasks.training.worker import batches

    n = len(arrays["y"])
    decode = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        load_arrays(shards, "train")
        decode.append(time.perf_counter() - t0)
    batching = []
    for epoch in range(repeats):
        t0 = time.perf_counter()
        seen = sum(len(b["y"]) for b in batches(arrays, batch_size, 0, 1, epoch, 0))
        batching.append(time.perf_counter() - t0)
    return {"n": n, "decode_sps": n / statistics.median(decode), "batch_sps": seen / statistics.median(batching),
            "epoch_sps": n / (statistics.median(decode) + statistics.median(batching) * n / seen)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="ingest at most this many samples (default: all)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.limit = 1, args.limit or 1000

    home = tempfile.mkdtemp(prefix="condgen-bench-")
    os.environ["CONDGEN_HOME"] = home
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("CONDGEN_STORAGE", None)

    import torch

    from condgen.cli import DEMO_MODELS
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.data.splits import load_arrays
    from condgen.tasks.io import settings, storage
    from condgen.tasks.training.driver import TrainRequest, train

    torch.set_num_threads(1)  # the Ray worker's setting (threads_per_worker = 1)
    spec = DEMO_MODELS[0]
    name, config, batch_size = spec["name"], dict(spec.get("config", {})), int(spec.get("batch_size", 64))
    shards = storage.join(settings.storage_root(), "shards", "mnist")
    ingest("bundled:mnist", shards, limit=args.limit)

    t0 = time.perf_counter()
    arrays = load_arrays(shards, "train")
    t_load = time.perf_counter() - t0
    bare = bare_loop(name, config, arrays, args.epochs, batch_size)
    bare_total = t_load + sum(bare)

    t0 = time.perf_counter()
    res = train(TrainRequest(model=name, shards_uri=shards, model_config=config, epochs=args.epochs,
                             batch_size=batch_size, num_workers=1, grid_every=0, run_name="bench-overhead"))
    ray_total = time.perf_counter() - t0
    ray_epochs = [h["epoch_seconds"] for h in res.history if "epoch_seconds" in h]

    rates = loader_rates(shards, arrays, batch_size)
    consume = len(arrays["y"]) / statistics.median(bare)
    per_epoch = statistics.median(ray_epochs) / statistics.median(bare)
    out = {"model": name, "n_train": len(arrays["y"]), "epochs": args.epochs, "batch_size": batch_size,
           "bare_epoch_s": statistics.median(bare), "ray_epoch_s": statistics.median(ray_epochs),
           "per_epoch_ratio": per_epoch, "bare_total_s": bare_total, "ray_total_s": ray_total,
           "end_to_end_ratio": ray_total / bare_total, "trainer_sps": consume, **rates,
           "loader_ratio": rates["epoch_sps"] / consume}
    print(f"\n{name} {config}, {len(arrays['y'])} training samples, batch {batch_size}, {args.epochs} epochs, "
          f"1 worker, 1 torch thread ({os.cpu_count()} CPUs)\n")
    print("| measure | bare loop | Ray Train | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| epoch time (median) | {out['bare_epoch_s']:.2f} s | {out['ray_epoch_s']:.2f} s | "
          f"{per_epoch:.3f}x | <= 1.10x |")
    print(f"| whole run (start, load, {args.epochs} epochs, checkpoints) | {bare_total:.1f} s | {ray_total:.1f} s | "
          f"{out['end_to_end_ratio']:.2f}x | (fixed cost, reported) |")
    print()
    print("| data path | samples/s | vs trainer |")
    print("|---|---|---|")
    print(f"| trainer consumption (bare train_step) | {consume:,.0f} | 1x |")
    print(f"| shard read + PNG decode (load_arrays) | {rates['decode_sps']:,.0f} | {rates['decode_sps'] / consume:.1f}x |")
    print(f"| in-memory batching (batches) | {rates['batch_sps']:,.0f} | {rates['batch_sps'] / consume:.1f}x |")
    print(f"| decode + batch every epoch (worst case) | {rates['epoch_sps']:,.0f} | "
          f"**{out['loader_ratio']:.1f}x** (target >= 5x) |")
    Path(home).joinpath("train_overhead.json").write_text(__import__("json").dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
