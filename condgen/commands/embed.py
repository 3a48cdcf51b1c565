"""``condgen embed``: the CLIP embedding step alone."""
from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.clip.embed import embed

    shards = args.shards or default_shards_uri("bundled:mnist")
    res = embed(shards, args.clip, num_workers=args.workers, batch_size=args.batch_size,
                fit_kwargs={"steps": args.fit_steps})
    print(json.dumps(res.to_dict(), indent=2))
    return 0


def register(sub) -> None:
    s = sub.add_parser("embed", help="CLIP image/text embeddings for a shard set (computed once per model)")
    s.add_argument("--shards", help="shards URI (default: bundled MNIST's)")
    s.add_argument("--clip", default="embedded",
                   help="'embedded' (fit on the data, no download) | checkpoint path/URI | NAME:TAG")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--fit-steps", type=int, default=300, help="training steps of the embedded CLIP")
    s.set_defaults(fn=run)
