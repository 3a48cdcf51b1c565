"""bf16 autocast and gradient accumulation against fp32: speed and loss at the same budget (issue #16).

    python -m benchmarks.precision                  # CVAE and a small diffusion model, 40 steps of 64
    python -m benchmarks.precision --steps 200 --threads 2

Each setting trains the same model from the same seed on the same batches of bundled MNIST with the
worker loop's own step (``tasks.training.worker.train_batch``: autocast around the forward, backward and
the optimiser outside it; m micro-batches accumulated into one optimiser step), in this process, one
worker, and prints samples/s and the mean loss of the first and last five steps.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SETTINGS = (("fp32", 1), ("bf16", 1), ("fp32", 4), ("bf16", 4))
MODELS = {"cvae": {}, "diffusion": {"channels": [16, 32], "timesteps": 100}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from condgen.flows.retrain import default_shards_uri
    from condgen.models.registry import build_model
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.data.splits import dataset_info, load_arrays
    from condgen.tasks.io.images import from_uint8
    from condgen.tasks.training.data_config import fit_to_data
    from condgen.tasks.training.worker import make_opt_step, make_optimizers, train_batch

    torch.set_num_threads(args.threads)
    shards = default_shards_uri("bundled:mnist")
    ingest("bundled:mnist", shards)
    arrays = load_arrays(shards, "train")
    n = args.steps * args.batch
    x, y = from_uint8(arrays["x"][:n]), torch.from_numpy(arrays["y"][:n])
    rows = ["| model | precision | micro-batches | samples/s | loss, first 5 steps | loss, last 5 steps |",
            "|---|---|---|---|---|---|"]
    for name, cfg in MODELS.items():
        for precision, micro in SETTINGS:
            torch.manual_seed(0)
            model = build_model(name, fit_to_data(name, dict(cfg), dataset_info(shards)))
            opt_step = make_opt_step(make_optimizers(model))
            losses, t0 = [], time.perf_counter()
            for k in range(min(args.steps, len(x) // args.batch)):
                batch = {"x": x[k * args.batch:(k + 1) * args.batch], "y": y[k * args.batch:(k + 1) * args.batch]}
                losses.append(train_batch(model, batch, opt_step, micro, precision)["loss"])
            rate = len(losses) * args.batch / (time.perf_counter() - t0)
            rows.append(f"| {name} | {precision} | {micro} | {rate:,.0f} | {sum(losses[:5]) / 5:.4f} | "
                        f"{sum(losses[-5:]) / 5:.4f} |")
            print(rows[-1], flush=True)
    print(f"\n{args.steps} optimiser steps of {args.batch} samples, {args.threads} thread(s)\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
