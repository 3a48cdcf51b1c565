"""``condgen generate``: batch generation of a grid of conditions x seeds into WebDataset shards."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    s = subparsers.add_parser("generate", help="batch-generate a grid of conditions x seeds into shards")
    s.add_argument("--model", default="models:/condgen-cvae@champion", help="models:/NAME@ALIAS or models:/NAME/N")
    s.add_argument("--out", help="shards URI (file://… or s3://…); default under CONDGEN_STORAGE")
    s.add_argument("--labels", default="0-9", help="e.g. 0-9 or 1,3,7")
    s.add_argument("--prompt", action="append", default=[], help="a prompt naming a digit (repeatable)")
    s.add_argument("--seeds", type=int, default=8, help="seeds per condition")
    s.add_argument("--seed-base", type=int, default=0)
    s.add_argument("--guidance", choices=["none", "cfg"], default="none")
    s.add_argument("--scale", type=float, default=0.0)
    s.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--steps", type=int)
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--shard-size", type=int, default=256)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--judge", help="classifier URI for the output safety check")
    s.add_argument("--no-watermark", action="store_true")
    s.add_argument("--no-ray", action="store_true", help="generate in this process")
    s.add_argument("--no-prefect", action="store_true", help="run the plain functions without a Prefect flow run")
    s.add_argument("--params", help="JSON file with BatchGenerateParams fields (flags override)")
    s.set_defaults(fn=run)


def _labels(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def run(args: argparse.Namespace) -> int:
    from condgen.flows.batch_generate import BatchGenerateParams, batch_generate
    from condgen.tasks.generation import batch as bg

    raw = json.loads(open(args.params).read()) if args.params else {}
    raw.update(model_uri=args.model, labels=_labels(args.labels), prompts=args.prompt, seeds_per_condition=args.seeds,
               seed_base=args.seed_base, guidance=args.guidance, scale=args.scale, sampler=args.sampler,
               steps=args.steps, eta=args.eta, shard_size=args.shard_size, batch_size=args.batch_size,
               judge_uri=args.judge, watermark=not args.no_watermark, use_ray=not args.no_ray)
    if args.out:
        raw["out_uri"] = args.out
    params = BatchGenerateParams.model_validate(raw)
    if args.no_prefect:
        out = bg.run_job(params.spec(), use_ray=params.use_ray)
    else:
        out = batch_generate(params)
    print(json.dumps(out, indent=2, default=str))
    return 0
