"""Scaling out must not change the model: the same recipe trained with 1, 2 and 4 Ray Train workers.

    python -m benchmarks.scale_out                          # 3 models x (1, 2, 4) workers x 3 seeds
    python -m benchmarks.scale_out --quick                  # 1 seed, 1 epoch each: checks that it runs
    python -m benchmarks.scale_out --models cvae --workers 1 2 --seeds 0 1 2 --json rows.jsonl
    python -m benchmarks.scale_out --table-from rows.jsonl other.jsonl   # one table from saved rows

Every row trains the same global batch (``TrainRequest.batch_size``, see
``condgen.tasks.training.batching``) for the same number of epochs; only the worker count changes.
One and two workers run on a local Ray; four run on a localhost multi-node Ray cluster
(``ray.cluster_utils.Cluster``: a head and three worker nodes of one logical CPU each, one training
worker per node), the way a team adds machines. Each row is scored by the judge of the shard set
(conditional accuracy, FID and KID on judge features) and timed (the wall time of ``train``).

Prints one markdown table: per model and worker count, the mean and spread (min-max) over the seeds,
the accuracy change against the 1-worker row and the speed-up. The issue's targets: every row within 2
points of accuracy of its 1-worker row; 2 workers at <= 0.65x the 1-worker time where compute allows.
On a 2-core machine the workers share the cores with the driver and each other: the speed-up is bounded
by the cores, not by condgen, and the table says what it measured.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# model -> (config overrides, epochs at the default budget, global batch)
MODELS: dict[str, tuple[dict[str, Any], int, int]] = {
    "cvae": ({"latent_dim": 4}, 20, 128),
    "cgan": ({}, 20, 128),
    "diffusion": ({"channels": [16, 32, 32], "ema_decay": 0.999}, 20, 128),
}


def _cluster(nodes: int):
    """A head and ``nodes - 1`` worker nodes on 127.0.0.1, one logical CPU each; connects this driver."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="cgbench-", dir="/tmp")
    ray_constants.ENABLE_RAY_CLUSTER = False  # keep the loopback address (see tests/conftest.py::ray_cluster)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def _local(workers: int) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=max(2, workers), include_dashboard=False, log_to_driver=False)


def run_row(model: str, workers: int, seed: int, shards: str, epochs_scale: float, per_class: int,
            overrides: dict[str, Any] | None = None) -> dict[str, float]:
    from condgen.tasks.judging.evaluate import evaluate_run
    from condgen.tasks.training.driver import TrainRequest, train

    cfg, epochs, batch = MODELS[model]
    cfg = {**cfg, **(overrides or {})}
    epochs = max(1, round(epochs * epochs_scale))
    t0 = time.perf_counter()
    res = train(TrainRequest(model=model, shards_uri=shards, model_config=dict(cfg), epochs=epochs, batch_size=batch,
                             num_workers=workers, seed=seed, run_name=f"scale-{model}-{workers}w-s{seed}",
                             experiment="condgen-scale-out",
                             placement_strategy="SPREAD" if workers > 2 else "PACK"))
    seconds = time.perf_counter() - t0
    m = evaluate_run(res.run_id, res.checkpoint_uri, shards, n_per_class=per_class)
    return {"acc": m["eval/cond_accuracy"], "fid": m["eval/fid"], "kid": m.get("eval/kid", float("nan")),
            "seconds": seconds}


def _stat(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def paired_delta(rows: list[dict[str, float]], base: list[dict[str, float]]) -> list[float]:
    """Accuracy change in points of each seed against the same seed's 1-worker row (same initial weights and
    data order); [] when the rows carry no seeds or share none. A GAN's seeds differ by more than the worker
    count changes anything, so the per-seed change is the sharper comparison."""
    by_seed = {r["seed"]: r["acc"] for r in base if "seed" in r}
    return [100 * (r["acc"] - by_seed[r["seed"]]) for r in rows if r.get("seed") in by_seed]


def table(results: dict[tuple[str, int], list[dict[str, float]]]) -> str:
    lines = [("| model | workers | cond. accuracy | FID | KID | train s | Δ acc vs 1 worker (pts) | "
             "Δ acc per seed (pts) | speed-up |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for (model, workers), rows in sorted(results.items()):
        base = results.get((model, 1))
        acc = [r["acc"] for r in rows]
        secs = [r["seconds"] for r in rows]
        delta = paired = speed = "–"
        if base and workers != 1:
            # against the same seeds' 1-worker rows when the row has fewer seeds (a mean over other seeds would
            # measure the seeds, not the worker count)
            seeds = {r.get("seed") for r in rows}
            same = [r for r in base if r.get("seed") in seeds] or base
            delta = f"{100 * (statistics.fmean(acc) - statistics.fmean(r['acc'] for r in same)):+.1f}"
            base_seeds = {b["seed"] for b in base if "seed" in b}  # the seeds paired_delta pairs, in row order
            paired_seeds = [r["seed"] for r in rows if r.get("seed") in base_seeds]
            paired = " / ".join(f"{d:+.1f} (seed {s})" for d, s in zip(paired_delta(rows, base), paired_seeds)) or "–"
            speed = f"{statistics.fmean(r['seconds'] for r in same) / statistics.fmean(secs):.2f}x"
        lines.append(f"| {model} | {workers} | {_stat(acc, '.3f')} | {_stat([r['fid'] for r in rows], '.1f')} | "
                     f"{_stat([r['kid'] for r in rows], '.4f')} | {_stat(secs, '.0f')} | {delta} | {paired} | {speed} |")
    return "\n".join(lines)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["augment=\"translation\"", "d_lr=0.0002"]`` -> {"augment": "translation", "d_lr": 0.0002}: each value is
    JSON, or the bare string when it is not."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def label(model: str, overrides: dict[str, Any] | None) -> str:
    """The table's model cell: the name, and the --set fields when there are any (their rows are another recipe)."""
    return model + "".join(f" {k}={v}" for k, v in sorted((overrides or {}).items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--workers", nargs="*", type=int, default=[1, 2, 4])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p.add_argument("--per-class", type=int, default=100, help="samples per class for the scores")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, 20 samples per class")
    p.add_argument("--json", help="append each row to this JSON-lines file as it is measured")
    p.add_argument("--table-from", nargs="*", help="print the table of rows saved by --json runs, train nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="a model config field over the default budget's (e.g. augment='\"translation\"'); "
                        "repeatable, recorded in each --json row")
    args = p.parse_args(argv)
    overrides = parse_sets(args.set)
    if args.table_from:
        import json

        saved: dict[tuple[str, int], list[dict[str, float]]] = {}
        for path in args.table_from:
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    rows = saved.setdefault((label(r["model"], r.get("set")), r["workers"]), [])
                    rows[:] = [x for x in rows if x.get("seed") != r.get("seed")] + [r]  # a re-run replaces its seed
        print(table(saved))
        return
    if args.quick:
        args.seeds, args.epochs_scale, args.per_class = args.seeds[:1], 0.0, 20

    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.data.ingest import ingest

    shards = default_shards_uri("bundled:mnist")
    ingest("bundled:mnist", shards)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for workers in args.workers:
        cluster = _cluster(workers) if workers > 2 else None
        if cluster is None:
            _local(workers)
        try:
            for model in args.models:
                for seed in args.seeds:
                    row = run_row(model, workers, seed, shards, args.epochs_scale, args.per_class, overrides)
                    results.setdefault((label(model, overrides), workers), []).append({"seed": seed, **row})
                    if args.json:
                        import json

                        with open(args.json, "a") as f:
                            f.write(json.dumps({"model": model, "workers": workers, "seed": seed,
                                                "load": os.getloadavg()[0], "set": overrides, **row}) + "\n")
                    print(f"[{model} x{workers} seed {seed}] {row}", flush=True)
        finally:
            import ray

            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
    print(f"\nglobal batch per model: { {m: MODELS[m][2] for m in args.models} }; seeds {args.seeds}; "
          f"epochs x{args.epochs_scale}; mean (min–max) over seeds\n")
    print(table(results))


if __name__ == "__main__":
    main()
