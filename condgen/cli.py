"""``condgen`` command line: each pipeline step alone, the whole flow, and serving."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# Quiet, offline-friendly defaults; every one can be overridden from the environment.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

DEMO_MODELS = [{"name": "cvae", "epochs": 20, "batch_size": 64, "config": {"channels": [32, 64], "latent_dim": 4}}]


def _kv(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` overrides; values parsed as JSON when they look like it."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _size_arg(text: str) -> str:
    """``--image-size``: a whole number of pixels or ``auto``."""
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of pixels or 'auto', got {text!r}")
    return text


def cmd_retrain(args: argparse.Namespace, demo: bool = False) -> int:
    from condgen.flows.retrain import RetrainParams, retrain
    from condgen.tasks.io import settings

    raw: dict[str, Any] = json.loads(open(args.params).read()) if getattr(args, "params", None) else {}
    if demo:
        raw.setdefault("models", DEMO_MODELS)
    if args.source:
        raw["source"] = args.source
    if args.workers:
        raw["num_workers"] = args.workers
    if getattr(args, "limit", None):
        raw["limit"] = args.limit
    if getattr(args, "epochs", None):
        for m in raw.setdefault("models", [{"name": "cvae"}]):
            m["epochs"] = args.epochs
    params = RetrainParams.model_validate(raw)
    out = retrain(params)
    print("\n== condgen retrain finished ==")
    print(f"shards:          {out['shards_uri']}  (manifest {out['manifest']})")
    print(f"MLflow tracking: {settings.tracking_uri()}  (artifacts {settings.artifact_root()})")
    print(f"                 browse: mlflow ui --backend-store-uri {settings.tracking_uri()}")
    for r in out["results"]:
        m, p = r["metrics"], r["promotion"]
        print(f"model {r['model']}: run {r['run_id']}  checkpoint {r['checkpoint']}")
        print(f"  conditional accuracy {m['eval/cond_accuracy']:.4f}  domain FID {m['eval/fid']:.3f}  "
              f"(judge test accuracy {m['eval/judge_test_accuracy']:.4f})")
        state = "promoted to" if p["promoted"] else "NOT promoted to"
        print(f"  registry: models:/{p['name']}/{p['version']} {state} @champion — {p['reason']}")
    if out["results"]:
        print(f"\nserve it:  condgen serve --model models:/{out['results'][0]['promotion']['name']}@champion")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.data.ingest import ingest

    res = ingest(args.source, args.out or default_shards_uri(args.source), shard_size=args.shard_size,
                 limit=args.limit, image_size=None if args.image_size == "auto" else int(args.image_size),
                 mode=args.mode, resize=args.resize, background=args.background, num_classes=args.num_classes,
                 invert=args.invert)
    print(json.dumps({k: v for k, v in res.__dict__.items()}, indent=2, default=str))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.judging.evaluate import evaluate_run
    from condgen.tasks.training.driver import TrainRequest, train

    shards = args.shards
    if not shards:  # the bundled default, ingested on first use (a no-op once its manifest exists)
        shards = default_shards_uri("bundled:mnist")
        ingest("bundled:mnist", shards)
    shards_b = None
    if args.source_b:  # CycleGAN's second domain, ingested on demand
        shards_b = default_shards_uri(args.source_b)
        ingest(args.source_b, shards_b)
    res = train(TrainRequest(model=args.model, shards_uri=shards, model_config=_kv(args.set), epochs=args.epochs,
                             batch_size=args.batch_size, num_workers=args.workers, seed=args.seed,
                             shards_b_uri=shards_b))
    print(json.dumps({"run_id": res.run_id, "checkpoint": res.checkpoint_uri}, indent=2))
    if args.evaluate:
        print(json.dumps(evaluate_run(res.run_id, res.checkpoint_uri, shards), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from condgen.serving.app import make_config, run

    raw: dict[str, Any] = json.loads(open(args.config).read()) if args.config else {}
    models = args.model or raw.pop("models", None) or ["models:/condgen-cvae@champion"]
    raw.pop("models", None)
    for flag, key in (("clip", "clip"), ("judge", "judge"), ("max_batch", "max_batch"), ("poll_s", "poll_s"),
                      ("timeout_s", "request_timeout_s"), ("threads", "torch_threads")):
        if getattr(args, flag) is not None:
            raw[key] = getattr(args, flag)
    if args.no_batching:
        raw["batching"] = False
    if args.map:
        raw["maps"] = [*raw.get("maps", []), *args.map]
    run(host=args.host, port=args.port, blocking=True, config=make_config(models, **raw))
    return 0


def _command_modules() -> list:
    """Sub-command modules under condgen/commands/, each with ``register(subparsers)``."""
    import importlib
    import pkgutil

    import condgen.commands as pkg

    return [importlib.import_module(f"condgen.commands.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="condgen", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    for name, help_ in (("demo", "the whole pipeline on bundled MNIST at the demo budget"),
                        ("retrain", "the retrain flow with parameters from a JSON file")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--params", help="JSON file with RetrainParams fields")
        s.add_argument("--source", help="bundled:mnist | bundled:uci_digits | folder | tar glob | s3://…")
        s.add_argument("--workers", type=int, help="Ray Train workers per model")
        s.add_argument("--epochs", type=int, help="override every model's epochs")
        s.add_argument("--limit", type=int, help="ingest at most N samples (smoke runs)")
        s.set_defaults(fn=lambda a, demo=(name == "demo"): cmd_retrain(a, demo=demo))

    s = sub.add_parser("ingest", help="source -> WebDataset shards + manifest")
    s.add_argument("source")
    s.add_argument("--out", help="shards URI (file://… or s3://…)")
    s.add_argument("--shard-size", type=int, default=1000)
    s.add_argument("--limit", type=int)
    s.add_argument("--image-size", default="28", type=_size_arg,
                   help="side of the stored square images, or 'auto' (most common longer side, at most 64)")
    s.add_argument("--mode", choices=("auto", "L", "RGB"), default="auto",
                   help="colour mode: auto (the majority of the files), L (greyscale) or RGB")
    s.add_argument("--resize", choices=("pad", "center_crop", "resize"), default="pad",
                   help="how non-square images become square")
    s.add_argument("--background", default="white",
                   help="colour transparency is composited onto: white, black, #rrggbb or r,g,b")
    s.add_argument("--num-classes", type=int, help="default: the number of class names, or 10 for integer labels")
    s.add_argument("--invert", choices=("never", "auto"), default="never",
                   help="auto: MNIST polarity for greyscale digit scans (dark ink on paper is inverted)")
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("train", help="train one model with Ray Train")
    s.add_argument("--model", default="cvae")
    s.add_argument("--shards")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    s.add_argument("--source-b", help="second, unpaired domain for cyclegan (e.g. bundled:uci_digits)")
    s.add_argument("--evaluate", action="store_true", help="score the result with the judge")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("serve", help="Ray Serve app for registered models (/v1 API, web page at /)")
    s.add_argument("--model", action="append", default=[],
                   help="models:/NAME@ALIAS or models:/NAME/N (repeatable; default models:/condgen-cvae@champion)")
    s.add_argument("--config", help="JSON file with ServeConfig fields (models with adapters/classifiers, ...)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--clip", help="CLIP spec for text prompts / CLIP guidance")
    s.add_argument("--judge", help="classifier URI for the output safety check")
    s.add_argument("--max-batch", type=int, help="samples per forward pass (default 32)")
    s.add_argument("--no-batching", action="store_true")
    s.add_argument("--map", action="append", default=[],
                   help="a fitted latent map for /v1/map (runs:/RUN/maps/A__B, s3://..., a folder; repeatable)")
    s.add_argument("--poll-s", type=float, help="registry alias poll period (default 30; 0 = off)")
    s.add_argument("--timeout-s", type=float, help="per-request timeout (default 60)")
    s.add_argument("--threads", type=int, help="torch threads per replica (default 1)")
    s.set_defaults(fn=cmd_serve)

    for module in _command_modules():
        module.register(sub)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
