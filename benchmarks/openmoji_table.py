"""Colour results table: every label-conditioned family trained through the real pipeline (Ray Train
``TorchTrainer`` + MLflow, as ``benchmarks/model_table.py`` does for MNIST) on ``bundled:openmoji``
at 32 px RGB (9 emoji categories as labels), scored by the set's own judge.

    python -m benchmarks.openmoji_table                      # the demo budget (see ROWS)
    python -m benchmarks.openmoji_table --epochs-scale 0.5 --only cgan cvae
    python -m benchmarks.openmoji_table --grid docs/img/openmoji_samples.png

Prints one markdown table: conditional accuracy (the judge's own test accuracy beside it), FID and
KID (± std over subsets) in judge features, train seconds; writes a sample grid with one row per
class: 4 real test images, then 8 samples of each family (fixed seed).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from benchmarks.diffusion_common import BENCH_DIFFUSION, machine, table, write_json
from condgen.flows.retrain import default_shards_uri
from condgen.tasks.data.ingest import ingest
from condgen.tasks.data.splits import dataset_info
from condgen.tasks.io import tracking
from condgen.tasks.io.images import grid, to_uint8
from condgen.tasks.io.model_store import load_trained
from condgen.tasks.judging.evaluate import evaluate_run, load_test
from condgen.tasks.training.driver import TrainRequest, train

SOURCE = "bundled:openmoji"
EXPERIMENT = "condgen-openmoji-table"
SIZE = 32
# family -> (config overrides, epochs, batch size) at the demo budget (2 shared CPU cores). The
# channels/size/classes come from the manifest (tasks/training/data_config.py). The GANs use half
# their default widths (64, 128): the default is ~4x the compute for little gain at this budget.
ROWS: dict[str, tuple[dict, int, int]] = {
    "cvae": ({"latent_dim": 16}, 12, 64),
    "cgan": ({"channels": [32, 64]}, 12, 64),
    "acgan": ({"channels": [32, 64]}, 12, 64),
    "diffusion": ({**BENCH_DIFFUSION, "sample_steps": 20}, 8, 64),
}
REAL, PER_FAMILY = 4, 8  # grid columns per class row


def samples_per_class(checkpoint_uri: str, num_classes: int, n: int, seed: int = 0) -> np.ndarray:
    """(num_classes * n, H, W, 3) uint8 samples of a trained label model, class-major, fixed seed."""
    model, _ = load_trained(checkpoint_uri)
    model.eval()
    with torch.no_grad():
        x = model.sample(torch.arange(num_classes).repeat_interleave(n), generator=torch.Generator().manual_seed(seed))
    return to_uint8(x)


def real_per_class(shards_uri: str, num_classes: int, n: int) -> np.ndarray:
    test = load_test(shards_uri)
    idx = np.concatenate([np.flatnonzero(test["y"] == c)[:n] for c in range(num_classes)])
    return test["x"][idx]


def sample_grid(blocks: list[np.ndarray], widths: list[int], num_classes: int) -> np.ndarray:
    """One row per class: each block's ``width`` images of that class, a white gap between blocks."""
    blank = np.full(blocks[0].shape[1:], 255, np.uint8)
    cells = []
    for c in range(num_classes):
        for b, (block, w) in enumerate(zip(blocks, widths)):
            cells += list(block[c * w:(c + 1) * w]) + ([blank] if b < len(blocks) - 1 else [])
    ncol = sum(widths) + len(blocks) - 1
    return grid(np.stack(cells), nrow=ncol, pad=1, scale=1)


def save_small_png(img: np.ndarray, path: str, max_bytes: int = 300_000) -> None:
    """Save as a lossless RGB PNG, or with a 256-colour palette when that would exceed ``max_bytes``."""
    Image.fromarray(img, mode="RGB").save(path, optimize=True)
    if os.path.getsize(path) > max_bytes:
        Image.fromarray(img, mode="RGB").quantize(colors=256).save(path, optimize=True)
        print(f"{path}: over {max_bytes // 1000} KB as RGB, saved with a 256-colour palette")


def trained_family(family: str, epochs: int, shards: str, workers: int, per_class: int, judge_epochs: int) -> dict:
    """Train ``family`` for ``epochs`` through Ray Train, evaluate it (metrics logged to the run)."""
    cfg, _, bs = ROWS[family]
    t0 = time.perf_counter()
    res = train(TrainRequest(model=family, shards_uri=shards, model_config=cfg, epochs=epochs, batch_size=bs,
                             num_workers=workers, run_name=f"openmoji-{family}", experiment=EXPERIMENT))
    secs = time.perf_counter() - t0
    m = evaluate_run(res.run_id, res.checkpoint_uri, shards, n_per_class=per_class, judge_epochs=judge_epochs)
    return {**m, "train_seconds": secs, "epochs": epochs, "config": cfg, "checkpoint": res.checkpoint_uri,
            "run_id": res.run_id}


def reused_family(family: str, epochs: int) -> dict | None:
    """The latest finished, evaluated run of ``family`` for ``epochs`` in this benchmark's MLflow experiment
    (``--reuse``): its eval metrics and checkpoint; train seconds = the training run's wall time."""
    tracking.configure(EXPERIMENT)
    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    for run in client.search_runs([exp.experiment_id], f"attributes.run_name = 'openmoji-{family}'",
                                  order_by=["attributes.start_time DESC"]):
        m, ckpt = run.data.metrics, run.data.tags.get("condgen.checkpoint")
        if run.info.status == "FINISHED" and "eval/cond_accuracy" in m and ckpt and \
                int(run.data.params["epochs"]) == epochs:
            return {**m, "train_seconds": (run.info.end_time - run.info.start_time) / 1000,
                    "epochs": epochs, "config": ROWS[family][0], "checkpoint": ckpt,
                    "run_id": run.info.run_id, "reused": True}
    return None


def table_row(family: str, f: dict) -> list:
    return [family, f"`{f['config']}`", f["epochs"], f"{f['eval/cond_accuracy']:.3f}",
            f"{f['eval/judge_test_accuracy']:.3f}", f"{f['eval/fid']:.2f}",
            f"{f.get('eval/kid', float('nan')):.4f} ± {f.get('eval/kid_std', float('nan')):.4f}",
            f"{f['train_seconds']:.0f}"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p.add_argument("--epochs", nargs="*", default=[], metavar="FAMILY=N", help="a family's epochs (beats the scale)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--per-class", type=int, default=100, help="samples per class for accuracy / FID / KID")
    p.add_argument("--judge-epochs", type=int, default=4)
    p.add_argument("--reuse", action="store_true", help="take a family's latest evaluated run of this benchmark "
                   "(MLflow experiment condgen-openmoji-table) instead of training it again")
    p.add_argument("--grid", default="docs/img/openmoji_samples.png", help="sample grid PNG ('' = none)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    print(machine(), flush=True)
    shards = default_shards_uri(SOURCE)
    ingest(SOURCE, shards, image_size=SIZE, mode="RGB")  # skips when the shards are already complete
    info = dataset_info(shards)
    k = info["num_classes"]
    print(f"{SOURCE}: {k} classes {info['class_names']}", flush=True)
    headers = ["family", "config", "epochs", "cond. accuracy", "judge test accuracy", "FID", "KID ± std", "train s"]
    rows, figures, blocks = [], {}, [real_per_class(shards, k, REAL)]
    epochs = {f: max(1, round(ROWS[f][1] * args.epochs_scale)) for f in ROWS}
    epochs.update({f: int(n) for f, n in (kv.split("=") for kv in args.epochs)})
    for family in args.only:
        f = (reused_family(family, epochs[family]) if args.reuse else None) or trained_family(
            family, epochs[family], shards, args.workers, args.per_class, args.judge_epochs)
        figures[family] = f
        rows.append(table_row(family, f))
        print(f"| {' | '.join(map(str, rows[-1]))} |" + (" (reused run)" if f.get("reused") else ""), flush=True)
        write_json(args.json, figures, default=str)  # after every family: a cut-short run keeps what it measured
        if args.grid:
            blocks.append(samples_per_class(f["checkpoint"], k, PER_FAMILY))
            img = sample_grid(blocks, [REAL] + [PER_FAMILY] * (len(blocks) - 1), k)
            os.makedirs(os.path.dirname(args.grid) or ".", exist_ok=True)
            save_small_png(img, args.grid)
    print("\n" + table(headers, rows))
    if args.grid:
        print(f"\nsample grid ({img.shape[1]}x{img.shape[0]}, rows = classes {info['class_names']}; columns: "
              f"{REAL} real, then {PER_FAMILY} per family {args.only}) -> {args.grid} "
              f"({os.path.getsize(args.grid) // 1024} KB)")


if __name__ == "__main__":
    main()
