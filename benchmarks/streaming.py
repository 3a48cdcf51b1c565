"""Streaming vs in-memory training data at 1x, 10x and 50x the bundled set (issue #16), in one run.

    python -m benchmarks.streaming                                # scales 1,10,50; loader + training, local + S3
    python -m benchmarks.streaming --quick                        # smoke run: 1,000 digits, loader only
    python -m benchmarks.streaming --scales 1,10 --sources local  # a subset

``bundled:mnist`` is ingested once (``tasks.data.ingest``) and replicated to each scale: new keys
(``<key>-r007``), the same samples, shards and a manifest with per-shard split counts, as the ingest writes
them. Then, for ``data_mode`` memory and stream (``tasks/training/loader.py``):

* **loader**: ``open_train_data`` + one epoch of ``TrainData.epoch`` for rank 0 of 2 workers (the global
  batch of the demo), in a fresh process each: time to first batch (opening included: the memory path
  decodes the whole split first), samples/s of this rank, peak RSS of that process;
* **train**: one epoch of the demo CVAE with 2 Ray Train workers through ``tasks.training.driver.train``,
  from local shards and from S3 shards (the test S3 server, ``tests/s3_server.py``): the workers' epoch
  metrics ``samples_per_s`` (global), ``first_batch_seconds`` and ``peak_rss_mb`` of each rank.

The targets of the issue: peak RSS per worker at 50x <= 1.2x the one at 1x (stream); streaming throughput
>= 0.9x the in-memory path at 1x; shard reading >= 5x the trainer's consumption (the loader's samples/s per
rank over the training's samples/s per worker). One markdown table is printed (and ``--out`` saves JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import tempfile
import time
from collections import Counter
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

MODES = ("memory", "stream")


# -- data ------------------------------------------------------------------------------------------------
def replicate(src: str, dst: str, times: int) -> dict[str, Any]:
    """``times`` copies of the shard set ``src`` at ``dst`` under new keys; the manifest says what the ingest
    says (per-shard ``split_counts`` / ``labelled_split_counts`` too). Returns the new manifest."""
    from condgen.tasks.io import shards, storage

    manifest = shards.read_manifest(src)
    entries, width = [], len(str(times * len(manifest["shards"])))
    for r in range(times):
        for entry in manifest["shards"]:
            samples = shards.read_samples(storage.join(src, entry["name"]))
            split = Counter()
            labelled = Counter()
            for s in samples:
                sp = json.loads(s["json"])["split"]
                split[sp] += 1
                labelled[sp] += int(s["cls"]) >= 0
            name = f"shard-{len(entries):0{width}d}.tar"
            copies = [(f"{s['__key__']}-r{r:03d}", {k: v for k, v in s.items() if not k.startswith("__")})
                      for s in samples]
            every = dict.fromkeys(manifest["split_counts"], 0)
            entries.append({"name": name, "n_samples": len(samples),
                            "sha256": shards.write_tar(storage.join(dst, name), copies),
                            "split_counts": {**every, **split}, "labelled_split_counts": {**every, **labelled}})
    out = {**manifest, "shards": entries, "n_samples": manifest["n_samples"] * times,
           "split_counts": {k: v * times for k, v in manifest["split_counts"].items()},
           "n_unlabelled": manifest.get("n_unlabelled", 0) * times}
    storage.write_json(storage.join(dst, shards.MANIFEST), out)
    return out


def upload(local_uri: str, s3_uri: str) -> None:
    from condgen.tasks.io import storage

    root = storage.local_path(local_uri)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(s3_uri, str(path.relative_to(root))), path.read_bytes())


# -- (a) the loader alone --------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident memory: ``VmHWM``, which a new program starts afresh (``ru_maxrss``
    keeps the parent's peak across fork + exec, so a spawned probe would report its parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _probe(config: dict[str, Any], rank: int, world: int, out: Any) -> None:
    """In a fresh process: open the data, run one epoch, report the times and this process's peak RSS.
    samples/s is over the whole epoch, opening included (the memory path decodes the split there)."""
    import torch

    from condgen.tasks.training.loader import open_train_data

    torch.set_num_threads(1)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    data = open_train_data(config, rank, world, labelled_only=True)
    first, n = None, 0
    for batch in data.epoch(0):
        first = time.perf_counter() - t0 if first is None else first
        n += len(batch["y"])
    total = time.perf_counter() - t0
    out.put({"mode": data.mode, "samples": n, "first_batch_s": first, "sps": n / total, "total_s": total,
             "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base, "summary": data.summary()})


def loader_run(config: dict[str, Any], rank: int = 0, world: int = 2) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_probe, args=(config, rank, world, out))
    proc.start()
    result = out.get(timeout=3600)
    proc.join()
    return result


# -- (b) one epoch of training ---------------------------------------------------------------------------
def train_run(shards_uri: str, mode: str, batch_size: int, spec: dict[str, Any]) -> dict[str, Any]:
    from condgen.tasks.training.driver import TrainRequest, train

    t0 = time.perf_counter()
    res = train(TrainRequest(model=spec["name"], shards_uri=shards_uri, model_config=dict(spec.get("config", {})),
                             epochs=1, batch_size=batch_size, num_workers=2, grid_every=0, data_mode=mode,
                             run_name=f"bench-stream-{mode}"))
    h = [m for m in res.history if "epoch_seconds" in m][-1]
    ranks = [v for k, v in sorted(h.items()) if k.startswith("peak_rss_mb.rank")]
    return {"sps": h.get("samples_per_s"), "first_batch_s": h.get("first_batch_seconds"),
            "peak_rss_mb": max(ranks) if ranks else h.get("peak_rss_mb"), "rss_per_rank": ranks,
            "epoch_s": h.get("epoch_seconds"), "wall_s": time.perf_counter() - t0}


def start_s3(scratch: str):
    """The test S3 server (moto with the fix in tests/s3_server.py) and this process's env pointed at it."""
    from pathlib import Path

    from condgen.tasks.io import storage
    from tests.conftest import S3_TEST_BUCKET, free_port, s3_test_env, start_moto_server, wait_until_up

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start_moto_server(port, Path(scratch) / "moto.log")
    wait_until_up(endpoint, proc)
    for k, v in s3_test_env(endpoint, Path(scratch)).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage.reset_clients()
    storage.s3_client().create_bucket(Bucket=S3_TEST_BUCKET)
    return proc, f"s3://{S3_TEST_BUCKET}"


# -- the report ------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:,.{digits}f}" if isinstance(v, (int, float)) else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| part | source | scale | train samples | mode | time to first batch (s) | samples/s | peak RSS (MB) "
            "| RSS over imports (MB) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['part']} | {r['source']} | {r['scale']}x | {_fmt(r['n'])} | {r['mode']} | "
                     f"{_fmt(r.get('first_batch_s'), 2)} | {_fmt(r.get('sps'))} | {_fmt(r.get('peak_rss_mb'))} | "
                     f"{_fmt(r['peak_rss_mb'] - r['rss_before_mb'] if r.get('rss_before_mb') else None)} |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], scales: list[int]) -> list[str]:
    """The issue's three targets, where the rows hold what they need."""
    def get(part: str, source: str, scale: int, mode: str) -> dict[str, Any] | None:
        return next((r for r in rows if (r["part"], r["source"], r["scale"], r["mode"]) == (part, source, scale,
                                                                                              mode)), None)
    out, lo, hi = [], min(scales), max(scales)
    for part in ("train", "loader"):
        a, b = get(part, "local", lo, "stream"), get(part, "local", hi, "stream")
        if a and b and a.get("peak_rss_mb") and b.get("peak_rss_mb"):
            out.append(f"{part}: stream peak RSS {hi}x / {lo}x = {b['peak_rss_mb'] / a['peak_rss_mb']:.2f} "
                       f"(target <= 1.2)")
        s, m = get(part, "local", lo, "stream"), get(part, "local", lo, "memory")
        if s and m and s.get("sps") and m.get("sps"):
            out.append(f"{part}: stream / memory samples/s at {lo}x = {s['sps'] / m['sps']:.2f} (target >= 0.9)")
    for scale in scales:
        ld, tr = get("loader", "local", scale, "stream"), get("train", "local", scale, "stream")
        if ld and tr and ld.get("sps") and tr.get("sps"):  # per rank vs per worker (the trainer's sps is global)
            out.append(f"{scale}x: stream reading / training consumption per worker = "
                       f"{ld['sps'] / (tr['sps'] / 2):.1f} (target >= 5)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="1,10,50")
    p.add_argument("--sources", default="local,s3", help="local and/or s3 (the training part)")
    p.add_argument("--parts", default=None, help="loader and/or train (default both; --quick: loader)")
    p.add_argument("--limit", type=int, default=None, help="ingest at most this many digits (default: all)")
    p.add_argument("--buffer", type=int, default=2000, help="stream_buffer (samples)")
    p.add_argument("--quick", action="store_true", help="1,000 digits, the loader part only")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 1000
        args.parts = args.parts or "loader"
    scales = [int(s) for s in args.scales.split(",")]
    parts, sources = (args.parts or "loader,train").split(","), args.sources.split(",")

    home = tempfile.mkdtemp(prefix="condgen-bench-stream-")
    os.environ["CONDGEN_HOME"] = home
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("CONDGEN_STORAGE", None)

    from condgen.cli import DEMO_MODELS
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.io import storage

    spec = DEMO_MODELS[0]
    batch_size = int(spec.get("batch_size", 128))
    base = storage.join(home, "shards", "mnist")
    ingest("bundled:mnist", base, limit=args.limit)
    sets, counts = {}, {}
    for scale in scales:
        sets[scale] = storage.join(home, "shards", f"x{scale}")
        t0 = time.perf_counter()
        manifest = replicate(base, sets[scale], scale)
        counts[scale] = manifest["split_counts"]["train"]
        print(f"replicated {scale}x: {manifest['n_samples']:,} samples in {len(manifest['shards'])} shards "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)

    s3_proc, s3_root = (None, None)
    if "train" in parts and "s3" in sources:
        s3_proc, s3_root = start_s3(home)
    rows: list[dict[str, Any]] = []
    try:
        for scale in scales:
            n = counts[scale]
            if "loader" in parts:
                for mode in MODES:
                    cfg = {"shards_uri": sets[scale], "batch_size": batch_size, "seed": 0, "data_mode": mode,
                           "stream_buffer": args.buffer}
                    r = loader_run(cfg)
                    rows.append({"part": "loader", "source": "local", "scale": scale, "n": n, **r})
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
            if "train" in parts:
                for source in sources:
                    uri = sets[scale]
                    if source == "s3":
                        uri = f"{s3_root}/x{scale}"
                        upload(sets[scale], uri)
                    for mode in MODES:
                        r = train_run(uri, mode, batch_size, spec)
                        rows.append({"part": "train", "source": source, "scale": scale, "n": n, "mode": mode, **r})
                        print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if s3_proc is not None:
            from tests.conftest import stop_server

            stop_server(s3_proc)
    print()
    print(table(rows))
    for line in targets(rows, scales):
        print(f"- {line}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return {"rows": rows}


if __name__ == "__main__":
    main()
