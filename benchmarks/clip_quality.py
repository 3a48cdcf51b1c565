"""How good is the embedded CLIP? Fit it on bundled MNIST's train split, score the test split.

    python benchmarks/clip_quality.py                  # 500 steps x 128 pairs: ~2-3 min on one CPU core
    python benchmarks/clip_quality.py --steps 5000 --max-seconds 60   # a 60 s wall-clock budget

Prints, for the untrained model (same architecture, the chance reference measured in the
same run) and for the fitted one:

* zero-shot digit accuracy: prompts per class averaged over templates
  (``tasks.clip.quality.ZERO_SHOT_TEMPLATES``), and over templates whose wording the captions
  never use (``UNSEEN_TEMPLATES``);
* recall@1 image->text and text->image over the whole test split, each image paired with
  its first caption phrasing (identical caption strings count as the same answer), and
  the label-level recall@1 (the top-1 item is the same digit);
* the fit's wall time, steps and throughput.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/clip_quality.py` from the root



def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="an ingested shard set URI (default: ingest bundled:mnist to a temp dir)")
    p.add_argument("--config", default="condgen-clip-tiny")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--max-shift", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=None, help="stop fitting after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 by default: on 2 shared cores a second thread gains ~20%% when idle "
                        "but thrashes (several times slower) when other jobs run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from benchmarks.diffusion_common import write_json
    from condgen.tasks.clip.fit import fit_clip
    from condgen.tasks.clip.handle import new_clip
    from condgen.tasks.clip.quality import evaluate_clip
    from condgen.tasks.data.splits import load_split

    shards = args.shards
    if shards is None:
        from condgen.tasks.data.ingest import ingest

        shards = tempfile.mkdtemp(prefix="condgen-clip-bench-")
        ingest("bundled:mnist", shards, shard_size=1000)
    train, test = load_split(shards, "train"), load_split(shards, "test")

    def scores(handle) -> dict:
        return evaluate_clip(handle, test["x"], test["y"], test["captions"])

    untrained = scores(new_clip(args.config, seed=args.seed, device=args.device))
    t0 = time.perf_counter()
    handle, fit = fit_clip(train["x"], train["captions"], train["y"], config=args.config, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, max_shift=args.max_shift,
                           seed=args.seed, max_seconds=args.max_seconds, device=args.device)
    fit_wall = time.perf_counter() - t0
    fitted = scores(handle)

    n_params = sum(p.numel() for p in handle.model.parameters())
    print(f"data: {shards}  train {len(train['y'])}  test {len(test['y'])}  "
          f"({len(train['captions'][0])} phrasings per image)")
    print(f"model: {args.config}  {n_params / 1e6:.2f}M params  embed_dim {handle.embed_dim}  "
          f"fingerprint {handle.fingerprint[:16]}")
    print(f"fit: {fit['steps']} steps x batch {fit['batch_size']} in {fit_wall:.1f}s on {args.device} "
          f"({args.threads} threads, {fit['samples_per_s']:.0f} pairs/s); ClipLoss on a fixed train batch "
          f"{fit['loss_initial']:.3f} -> {fit['loss_final']:.3f}")
    rows = [("zero-shot accuracy", "zero_shot_acc", 0.1),
            ("zero-shot accuracy, unseen prompt wording", "zero_shot_acc_unseen", 0.1),
            ("recall@1 image->text (caption)", "i2t_r1", untrained["r1_chance"]),
            ("recall@1 text->image (caption)", "t2i_r1", untrained["r1_chance"]),
            ("recall@1 image->text (same digit)", "i2t_r1_label", 0.1),
            ("recall@1 text->image (same digit)", "t2i_r1_label", 0.1)]
    print(f"{'metric (test split)':44s} {'untrained':>9s} {'fitted':>7s} {'chance':>7s} {'fitted/chance':>13s}")
    for label, key, chance in rows:
        print(f"{label:44s} {untrained[key]:9.3f} {fitted[key]:7.3f} {chance:7.3f} {fitted[key] / chance:13.1f}")
    out = {"config": vars(args), "fit": fit, "fit_wall_s": fit_wall, "untrained": untrained, "fitted": fitted,
           "n_params": n_params, "fingerprint": handle.fingerprint}
    write_json(args.json, out, default=str)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
