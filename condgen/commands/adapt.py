"""``condgen adapt``: train a LoRA adapter on a frozen, trained base (one base, many adapters).

    condgen adapt --base models:/condgen-cgan@champion --source bundled:uci_digits \\
        --target G.up.convs.0 --target G.up.convs.1 --target G.to_img --rank 1 --epochs 30 \\
        --register condgen-cgan-uci

The run is one Ray Train fit and one MLflow run (tag ``condgen.kind=adapter``); the adapter
(a few kB of safetensors + JSON) goes to ``<storage>/adapters/<run id>``, the run's
``adapter/`` artifacts and, with ``--register``, the model registry (alias
``@latest-adapter``). Serve it next to its base with ``serving.engine.ModelSpec.adapters``.
"""
from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.judging.evaluate import evaluate_run
    from condgen.tasks.training.driver import AdapterSpec, TrainRequest, train

    shards = args.shards or default_shards_uri(args.source)
    if not args.shards:
        ingest(args.source, shards)
    spec = AdapterSpec(base=args.base, targets=args.target, rank=args.rank, alpha=args.alpha,
                       register_as=args.register)
    res = train(TrainRequest(model="", shards_uri=shards, epochs=args.epochs, batch_size=args.batch_size,
                             num_workers=args.workers, seed=args.seed, adapter=spec,
                             run_name=f"adapter-{args.register or 'lora'}"))
    out = {"run_id": res.run_id, "adapter": res.checkpoint_uri,
           "registered": f"models:/{args.register}@latest-adapter" if args.register else None}
    print(json.dumps(out, indent=2))
    if args.evaluate:
        print(json.dumps(evaluate_run(res.run_id, res.checkpoint_uri, shards, adapter_base=args.base), indent=2))
    return 0


def register(sub) -> None:
    s = sub.add_parser("adapt", help="train a LoRA adapter on a frozen base model (Ray Train + MLflow)")
    s.add_argument("--base", required=True, help="models:/NAME@alias, models:/NAME/3 or a checkpoint folder URI")
    s.add_argument("--source", default="bundled:uci_digits", help="data of the new condition (ingested on demand)")
    s.add_argument("--shards", help="already ingested shards URI (instead of --source)")
    s.add_argument("--target", action="append", required=True,
                   help="layer name (or suffix) to adapt; repeat. nn.Linear / nn.Conv2d / nn.ConvTranspose2d")
    s.add_argument("--rank", type=int, default=1)
    s.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--register", help="register the adapter under this registry name")
    s.add_argument("--evaluate", action="store_true", help="score base + adapter with the new data's judge")
    s.set_defaults(fn=run)
