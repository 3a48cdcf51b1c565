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
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from benchmarks.diffusion_common import BENCH_DIFFUSION, machine, table, write_json  # noqa: E402
from condgen.flows.retrain import default_shards_uri  # noqa: E402
from condgen.tasks.data.ingest import ingest  # noqa: E402
from condgen.tasks.data.splits import dataset_info  # noqa: E402
from condgen.tasks.io.images import grid, to_uint8  # noqa: E402
from condgen.tasks.io.model_store import load_trained  # noqa: E402
from condgen.tasks.judging.evaluate import evaluate_run, load_test  # noqa: E402
from condgen.tasks.training.driver import TrainRequest, train  # noqa: E402

SOURCE = "bundled:openmoji"
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--per-class", type=int, default=100, help="samples per class for accuracy / FID / KID")
    p.add_argument("--judge-epochs", type=int, default=4)
    p.add_argument("--grid", default="docs/img/openmoji_samples.png", help="sample grid PNG ('' = none)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    print(machine(), flush=True)
    shards = default_shards_uri(SOURCE)
    ingest(SOURCE, shards, image_size=SIZE, mode="RGB")  # skips when the shards are already complete
    info = dataset_info(shards)
    k = info["num_classes"]
    print(f"{SOURCE}: {k} classes {info['class_names']}", flush=True)
    rows, figures, blocks = [], {}, [real_per_class(shards, k, REAL)]
    for family in args.only:
        cfg, epochs, bs = ROWS[family]
        epochs = max(1, round(epochs * args.epochs_scale))
        t0 = time.perf_counter()
        res = train(TrainRequest(model=family, shards_uri=shards, model_config=cfg, epochs=epochs, batch_size=bs,
                                 num_workers=args.workers, run_name=f"openmoji-{family}",
                                 experiment="condgen-openmoji-table"))
        secs = time.perf_counter() - t0
        m = evaluate_run(res.run_id, res.checkpoint_uri, shards, n_per_class=args.per_class,
                         judge_epochs=args.judge_epochs)
        figures[family] = {**m, "train_seconds": secs, "epochs": epochs, "batch_size": bs, "config": cfg,
                           "checkpoint": res.checkpoint_uri}
        rows.append([family, f"`{cfg}`", epochs, f"{m['eval/cond_accuracy']:.3f}",
                     f"{m['eval/judge_test_accuracy']:.3f}", f"{m['eval/fid']:.2f}",
                     f"{m.get('eval/kid', float('nan')):.4f} ± {m.get('eval/kid_std', float('nan')):.4f}",
                     f"{secs:.0f}"])
        print(f"| {' | '.join(map(str, rows[-1]))} |", flush=True)
        if args.grid:
            blocks.append(samples_per_class(res.checkpoint_uri, k, PER_FAMILY))
    print("\n" + table(["family", "config", "epochs", "cond. accuracy", "judge test accuracy", "FID", "KID ± std",
                        "train s"], rows))
    if args.grid:
        img = sample_grid(blocks, [REAL] + [PER_FAMILY] * (len(blocks) - 1), k)
        os.makedirs(os.path.dirname(args.grid) or ".", exist_ok=True)
        save_small_png(img, args.grid)
        print(f"\nsample grid ({img.shape[1]}x{img.shape[0]}, rows = classes {info['class_names']}; columns: "
              f"{REAL} real, then {PER_FAMILY} per family {args.only}) -> {args.grid} "
              f"({os.path.getsize(args.grid) // 1024} KB)")
    write_json(args.json, figures, default=str)


if __name__ == "__main__":
    main()
