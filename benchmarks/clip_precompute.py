"""Precomputed CLIP text embeddings vs encoding captions on the fly, and embedding
throughput with 1 vs 2 Ray workers, in one run.

    python -m benchmarks.clip_precompute            # bundled MNIST (5,000), embedded CLIP (300 fit steps)
    python -m benchmarks.clip_precompute --quick    # 1,000 samples, 30 fit steps, fewer steps timed

Training: a text-conditioned CVAE (the demo architecture with ``condition="text"``) takes
the same batches two ways, one torch thread each, steps timed alternately in blocks:

* **precomputed**: ``batch["txt"]`` is a row of the side-car embeddings ``condgen embed``
  wrote (what ``tasks.train`` does: one random caption phrasing per sample per step);
* **on the fly**: the same phrasing is tokenised and run through the same CLIP's text
  tower every step (``ClipHandle.encode_texts``), as a pipeline without the embed step would.

The embedded CLIP's text tower is tiny (3 layers, 128 wide), so the same comparison is
also run with an open_clip ``ViT-B-32`` text tower (12 layers, 512 wide; random weights,
since only its cost matters), the size a user's pretrained CLIP has.

Embedding: ``tasks.embed.embed`` over the whole shard set into a fresh folder with
``num_workers=1`` then ``2`` (Ray tasks, one shard each, one CPU each): images/s of the
whole call, Ray already started. On a 2-core machine two workers are the ceiling.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--fit-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=60, help="training steps timed per way")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--also-arch", nargs="*", default=["ViT-B-32"],
                   help="open_clip architectures also timed on the fly (random weights: timing only)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.limit, args.fit_steps, args.steps = args.limit or 1000, 30, 20

    os.environ["CONDGEN_HOME"] = tempfile.mkdtemp(prefix="condgen-bench-clip-")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("CONDGEN_STORAGE", None)

    import numpy as np
    import ray
    import torch

    from condgen.cli import DEMO_MODELS
    from condgen.models.registry import build_model
    from condgen.tasks.clip.embed import embed
    from condgen.tasks.clip.handle import new_clip
    from condgen.tasks.clip.load import load_clip
    from condgen.tasks.data.sidecars import load_embeddings
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.data.splits import load_split
    from condgen.tasks.io import settings, storage
    from condgen.tasks.io.images import from_uint8
    from condgen.tasks.training.worker import make_opt_step, make_optimizers

    torch.set_num_threads(1)
    shards = storage.join(settings.storage_root(), "shards", "mnist")
    ingest("bundled:mnist", shards, limit=args.limit, shard_size=args.shard_size)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    handle = load_clip("embedded", data_uri=shards, steps=args.fit_steps)

    # -- embedding throughput, 1 vs 2 workers ------------------------------------------------
    rates = {}
    for workers in (1, 2):
        out = storage.join(settings.storage_root(), f"emb-{workers}w")
        res = embed(shards, handle, out_uri=out, num_workers=workers, progress=False)
        rates[workers] = res.n_samples / res.seconds
    n_shards = len(storage.read_json(storage.join(shards, "manifest.json"))["shards"])

    # -- training steps/s, precomputed vs on the fly ------------------------------------------
    emb = embed(shards, handle, progress=False)
    train = load_split(shards, "train")
    keys = list(train["key"])
    txt = load_embeddings(shards, emb.fingerprint, keys)["txt"].astype(np.float32)
    captions = [list(c) for c in train["captions"]]
    bs = int(DEMO_MODELS[0]["batch_size"])

    def time_ways(clip, table: np.ndarray) -> dict[str, float]:
        """Median steps/s of the text CVAE fed ``table`` rows vs ``clip`` encoding the same captions."""
        cfg = {**DEMO_MODELS[0]["config"], "condition": "text", "text_dim": clip.embed_dim}
        torch.manual_seed(0)
        model = build_model("cvae", cfg)
        opt_step = make_opt_step(make_optimizers(model))
        rng = np.random.default_rng(0)

        def stream(epoch):
            """tasks.train.batches for one worker, with the indices and phrasing picks exposed."""
            n = len(arrays["y"])
            perm = np.random.default_rng(epoch).permutation(n)
            for i in range(0, n - bs + 1, bs):
                idx = perm[i:i + bs]
                pick = rng.integers(0, table.shape[1], len(idx))
                yield ({"x": from_uint8(arrays["x"][idx]), "y": torch.from_numpy(arrays["y"][idx]),
                        "txt": torch.from_numpy(table[idx, pick])}, idx, pick)

        times = {"precomputed": [], "on the fly": []}
        block, epoch, done = 10, 0, 0
        it = stream(epoch)
        while done < args.steps:
            for way in times:
                t0 = time.perf_counter()
                for _ in range(block):
                    try:
                        batch, idx, pick = next(it)
                    except StopIteration:
                        epoch += 1
                        it = stream(epoch)
                        batch, idx, pick = next(it)
                    if way == "on the fly":
                        texts = [captions[i][p % len(captions[i])] for i, p in zip(idx, pick)]
                        with torch.no_grad():
                            batch["txt"] = clip.encode_texts(texts)
                    model.train_step(batch, opt_step)
                times[way].append((time.perf_counter() - t0) / block)
            done += block
        return {k: 1 / float(np.median(v)) for k, v in times.items()}

    arrays = {"x": train["x"], "y": train["y"].astype(np.int64)}
    sps = time_ways(handle, txt)
    arch_rows = []
    for arch in args.also_arch:
        big = new_clip(arch)  # random weights: the cost of its text tower is what is measured
        table = np.random.default_rng(0).standard_normal((len(keys), txt.shape[1], big.embed_dim)).astype(np.float32)
        arch_rows.append((arch, big.embed_dim, time_ways(big, table)))

    out = {"n_samples": emb.n_samples,
           "shards": n_shards, "embed_ips_1": rates[1], "embed_ips_2": rates[2], "embed_speedup": rates[2] / rates[1],
           "steps_s_precomputed": sps["precomputed"], "steps_s_on_the_fly": sps["on the fly"],
           "train_speedup": sps["precomputed"] / sps["on the fly"], "clip": handle.model_name,
           "clip_fit_steps": args.fit_steps}
    print(f"\nCLIP {handle.model_name} ({handle.embed_dim}-d), {emb.n_samples} samples in {n_shards} shards, "
          f"text CVAE {DEMO_MODELS[0]['config']}, batch {bs}, {os.cpu_count()} CPUs\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| training steps/s, precomputed embeddings | {sps['precomputed']:.2f} | |")
    print(f"| training steps/s, captions encoded on the fly | {sps['on the fly']:.2f} | |")
    print(f"| precomputed / on the fly | **{out['train_speedup']:.2f}x** | >= 2x |")
    for arch, dim, r in arch_rows:
        ratio = r["precomputed"] / r["on the fly"]
        out[f"train_speedup_{arch}"] = ratio
        print(f"| same, with a {arch} text tower ({dim}-d): {r['precomputed']:.2f} vs {r['on the fly']:.2f} steps/s "
              f"| **{ratio:.2f}x** | >= 2x |")
    print(f"| embedding images/s, 1 Ray worker | {rates[1]:,.0f} | |")
    print(f"| embedding images/s, 2 Ray workers | {rates[2]:,.0f} | |")
    print(f"| 2 workers / 1 worker | **{out['embed_speedup']:.2f}x** | (2 cores) |")
    ray.shutdown()
    return out


if __name__ == "__main__":
    main()
