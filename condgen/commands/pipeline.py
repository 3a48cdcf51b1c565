"""``condgen demo`` / ``retrain`` (the whole flow), ``condgen ingest`` and ``condgen train`` (one step each).

``condgen demo`` trains the MNIST demo's CVAE, or a source's own preset (``DEMO_PRESETS``): on
``bundled:shapes``, whose captions combine colour, shape, size and position, text-to-image.

Inputs are checked (``condgen.commands.checks``) before the flow, Ray Train or ingestion is
imported: those imports (Prefect, Ray, torch, MLflow) stay inside the functions and cost ~10 s.
"""
from __future__ import annotations

import copy
import json
from typing import Annotated, Any, Literal

import typer

from condgen.commands import checks

DataMode = Literal["auto", "memory", "stream"]
StreamSharding = Literal["global", "span"]
Precision = Literal["fp32", "bf16"]
LrScaling = Literal["none", "linear", "sqrt"]
SHAPES_ATTRIBUTES = ("colour", "shape", "size", "position", "joint")  # eval/shapes/<a>_acc (tasks/judging/shapes_eval)

# The global batch (split over the workers): 128 = the 64 per worker x 2 workers the demo always used.
DEMO_MODELS = [{"name": "cvae", "epochs": 20, "batch_size": 128, "config": {"channels": [32, 64], "latent_dim": 4}}]

# `condgen demo --source bundled:shapes`: a text-conditioned diffusion model on the embedded CLIP's text embeddings
# (pooled + cross-attention; a new run gets the registry's recipe, models/registry.py RECIPES) with CFG weight 2
# (docs/results.md: joint accuracy 30% unguided, 42% at 2), and a label CVAE over the 18 colour x shape classes;
# ~15 min on 2 cores. Exactly infra/params/shapes.json, which the README points at (tests/test_shapes_demo.py).
SHAPES_DEMO: dict[str, Any] = {
    "source": "bundled:shapes", "image_size": 32, "mode": "RGB", "background": "black", "num_workers": 2,
    "clip": "embedded", "clip_fit_steps": 300, "eval_per_class": 20, "judge_epochs": 2,
    "models": [
        {"name": "diffusion", "config": {"condition": "text", "channels": [16, 32, 32], "lr": 0.002, "sample_steps": 25,
                                         "guidance_scale": 2.0},
         "epochs": 12, "batch_size": 128, "registered_name": "shapes-text-diffusion"},
        {"name": "cvae", "config": {"channels": [32, 64], "latent_dim": 8}, "epochs": 10, "batch_size": 128,
         "registered_name": "shapes-cvae"},
    ],
    "gate": {"min_accuracy": 0.3, "tolerance": 0.0}, "experiment": "condgen-shapes",
    "report": {"exploration": False, "latent_maps": False},
}
DEMO_PRESETS: dict[str, dict[str, Any]] = {"shapes": SHAPES_DEMO}  # bundled generator -> its demo's RetrainParams

Params = Annotated[str | None, typer.Option(help="JSON file with RetrainParams fields (flows/params.py)")]
Source = Annotated[str | None, typer.Option(help="bundled:mnist | bundled:uci_digits | bundled:shapes (text-to-image) | "
                                              "bundled:openmoji | folder | tar glob | s3://…")]
Workers = Annotated[int | None, typer.Option(help="Ray Train workers per model")]
Epochs = Annotated[int | None, typer.Option(help="override every model's epochs")]
Limit = Annotated[int | None, typer.Option(help="ingest at most N samples (smoke runs)")]


def demo(params: Params = None, source: Source = None, workers: Workers = None, epochs: Epochs = None,
         limit: Limit = None) -> int:
    """The whole pipeline at the demo budget: bundled MNIST (a CVAE), or --source bundled:shapes (text-to-image:
    a text-conditioned diffusion model and a CVAE; prompts in the web page)."""
    return run_retrain(params, source, workers, epochs, limit, demo=True)


def retrain(params: Params = None, source: Source = None, workers: Workers = None, epochs: Epochs = None,
            limit: Limit = None) -> int:
    """The retrain flow with parameters from a JSON file."""
    return run_retrain(params, source, workers, epochs, limit, demo=False)


def retrain_inputs(raw: dict[str, Any], where: str) -> Any:
    """``raw`` as ``RetrainParams``, checked before the flow starts, cheapest first: the parameter model itself
    (``condgen.flows.params``, pydantic only: unknown fields, types, ranges), then sources, model names, config
    keys (``condgen.models.configs``: no torch) and a registry CLIP (MLflow)."""
    from condgen.flows.params import RetrainParams

    params = checks.flow_params(RetrainParams, raw, where)
    checks.source(params.source)
    for i, spec in enumerate(params.models):
        try:
            checks.model_name(spec.name)
        except checks.InputError as exc:
            raise checks.InputError(f"{where}: models[{i}].name: {exc}") from None
        checks.config_keys(spec.name, spec.config, f"{where}: models[{i}].config")
        if spec.source_b:
            checks.source(spec.source_b)
    if params.clip and params.clip.startswith("models:/"):
        checks.registered(params.clip)
    return params


def demo_defaults(source: str | None) -> dict[str, Any]:
    """The demo's RetrainParams for ``source``: a bundled generator's preset (``DEMO_PRESETS``, whatever its
    ``:k=v`` options), else the MNIST demo's models. A params file's own fields win over these."""
    name = source.removeprefix("bundled:").split(":", 1)[0] if source and source.startswith("bundled:") else None
    return copy.deepcopy(DEMO_PRESETS.get(name or "", {"models": DEMO_MODELS}))


def run_retrain(params_file: str | None, source: str | None, workers: int | None, epochs: int | None,
                limit: int | None, demo: bool = False) -> int:
    raw: dict[str, Any] = checks.json_file(params_file, "--params") if params_file else {}
    if demo:
        for key, value in demo_defaults(source or raw.get("source")).items():
            raw.setdefault(key, value)
    if source:
        raw["source"] = source
    if workers:
        raw["num_workers"] = workers
    if limit:
        raw["limit"] = limit
    if epochs:
        for m in raw.setdefault("models", [{"name": "cvae"}]):
            m["epochs"] = epochs
    params = retrain_inputs(raw, params_file or "parameters")

    from condgen.flows.retrain import retrain as retrain_flow
    from condgen.tasks.io import settings
    from condgen.tasks.io.redact import redact_uri

    out = retrain_flow(params)
    print("\n== condgen retrain finished ==")
    print(f"shards:          {out['shards_uri']}  (manifest {out['manifest']})")
    tracking = redact_uri(settings.tracking_uri())  # never print credentials embedded in a URI
    print(f"MLflow tracking: {tracking}  (artifacts {redact_uri(settings.artifact_root())})")
    print(f"                 browse: mlflow ui --backend-store-uri {tracking}")
    for r in out["results"]:
        m, p = r["metrics"], r["promotion"]
        print(f"model {r['model']}: run {r['run_id']}  checkpoint {r['checkpoint']}")
        print(f"  conditional accuracy {m['eval/cond_accuracy']:.4f}  domain FID {m['eval/fid']:.3f}  "
              f"(judge test accuracy {m['eval/judge_test_accuracy']:.4f})")
        if "eval/shapes/joint_acc" in m:  # a text model on bundled:shapes, scored by the pixel checker
            print("  shapes checker: " + ", ".join(f"{a} {m[f'eval/shapes/{a}_acc']:.2f}" for a in SHAPES_ATTRIBUTES)
                  + f"; unseen combinations joint {m.get('eval/shapes/unseen_joint_acc', float('nan')):.2f}")
        state = "promoted to" if p["promoted"] else "NOT promoted to"
        print(f"  registry: models:/{p['name']}/{p['version']} {state} @champion — {p['reason']}")
    promoted = [r for r in out["results"] if r["promotion"]["promoted"]]
    if promoted:
        models = " ".join(f"--model models:/{r['promotion']['name']}@champion" for r in promoted)
        # a text-conditioned model turns prompts into embeddings with the CLIP its shards were embedded with
        text = {s.registered_name or f"condgen-{s.name}" for s in params.models if s.config.get("condition") == "text"}
        clip = " --clip models:/condgen-clip@champion" if text & {r["promotion"]["name"] for r in promoted} else ""
        print(f"\nserve it:  condgen serve {models}{clip}")
        if clip:
            print("then open http://127.0.0.1:8000/: its prompt box suggests captions of the training data "
                  "(or POST /v1/generate {\"prompt\": \"...\"})")
    return 0


def _image_size(text: str) -> str:
    """``--image-size``: a whole number of pixels or ``auto``."""
    if text != "auto" and not text.isdigit():
        raise typer.BadParameter(f"expected a number of pixels or 'auto', got {text!r}")
    return text


def ingest(
    source: Annotated[str, typer.Argument(help="bundled:NAME, a folder, a tar file or glob, or s3://bucket/prefix")],
    out: Annotated[str | None, typer.Option(help="shards URI (file://… or s3://…)")] = None,
    shard_size: int = 1000,
    limit: int | None = None,
    image_size: Annotated[str, typer.Option(callback=_image_size, help="side of the stored square images, or "
                                            "'auto' (most common longer side, at most 64)")] = "28",
    mode: Annotated[Literal["auto", "L", "RGB"], typer.Option(
        help="colour mode: auto (the majority of the files), L (greyscale) or RGB")] = "auto",
    resize: Annotated[Literal["pad", "center_crop", "resize"], typer.Option(
        help="how non-square images become square")] = "pad",
    background: Annotated[str, typer.Option(
        help="colour transparency is composited onto: white, black, #rrggbb or r,g,b")] = "white",
    num_classes: Annotated[int | None, typer.Option(
        help="default: the number of class names, or 10 for integer labels")] = None,
    invert: Annotated[Literal["never", "auto"], typer.Option(
        help="auto: MNIST polarity for greyscale digit scans (dark ink on paper is inverted)")] = "never",
) -> int:
    """Source -> WebDataset shards + manifest."""
    checks.source(source)
    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.data.ingest import ingest as ingest_source

    res = ingest_source(source, out or default_shards_uri(source), shard_size=shard_size, limit=limit,
                        image_size=None if image_size == "auto" else int(image_size), mode=mode, resize=resize,
                        background=background, num_classes=num_classes, invert=invert)
    print(json.dumps(dict(res.__dict__), indent=2, default=str))
    return 0


def train(
    model: Annotated[str, typer.Option(help="a model family (models/registry.py), e.g. cvae, cgan, diffusion")] = "cvae",
    shards: Annotated[str | None, typer.Option(help="ingested shards URI (default: bundled MNIST's)")] = None,
    epochs: int = 10,
    batch_size: int = 128,
    workers: int = 2,
    seed: int = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                   help="model config override (repeatable)")] = None,
    source_b: Annotated[str | None, typer.Option(
        help="second, unpaired domain for cyclegan (e.g. bundled:uci_digits)")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="score the result with the judge")] = False,
    data_mode: Annotated[DataMode, typer.Option(help="memory: decode the split into each worker; stream: read "
                                                "shards through a shuffle buffer; auto: stream large sets")] = "auto",
    stream_sharding: Annotated[StreamSharding, typer.Option(help="global: a streamed step takes the same samples "
                                                            "for any --workers; span: each worker reads only its "
                                                            "shards (less IO; the model changes)")] = "global",
    precision: Annotated[Precision, typer.Option(help="bf16: autocast (weights stay fp32)")] = "fp32",
    grad_accumulation: Annotated[int, typer.Option(min=1, help="micro-batches per worker per optimiser step")] = 1,
    checkpoint_every_steps: Annotated[int, typer.Option(min=0, help="also checkpoint every N steps (exact "
                                                        "mid-epoch resume); 0: each epoch")] = 0,
    lr_scaling: Annotated[LrScaling, typer.Option(help="none: the config's lr is for --batch-size; linear/sqrt: "
                                                  "scale it by batch / --lr-reference-batch")] = "none",
    lr_reference_batch: Annotated[int | None, typer.Option(min=1, help="the global batch the lr was tuned "
                                                           "for")] = None,
    lr_warmup_steps: Annotated[int, typer.Option(min=0, help="steps to ramp up to the scaled lr")] = 0,
) -> int:
    """Train one model with Ray Train (one MLflow run). --batch-size is the GLOBAL batch: --workers only
    splits it."""
    if shards:
        checks.shards(shards)
    if source_b:
        checks.source(source_b)
    config = checks.config_keys(checks.model_name(model), checks.key_values(set_ or []))
    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.data.ingest import ingest as ingest_source
    from condgen.tasks.judging.evaluate import evaluate_run
    from condgen.tasks.training.driver import TrainRequest
    from condgen.tasks.training.driver import train as train_model

    if not shards:  # the bundled default, ingested on first use (a no-op once its manifest exists)
        shards = default_shards_uri("bundled:mnist")
        ingest_source("bundled:mnist", shards)
    shards_b = None
    if source_b:  # CycleGAN's second domain, ingested on demand
        shards_b = default_shards_uri(source_b)
        ingest_source(source_b, shards_b)
    res = train_model(TrainRequest(model=model, shards_uri=shards, model_config=config, epochs=epochs,
                                   batch_size=batch_size, num_workers=workers, seed=seed, shards_b_uri=shards_b,
                                   data_mode=data_mode, stream_sharding=stream_sharding, precision=precision, grad_accumulation=grad_accumulation,
                                   checkpoint_every_steps=checkpoint_every_steps, lr_scaling=lr_scaling,
                                   lr_reference_batch=lr_reference_batch, lr_warmup_steps=lr_warmup_steps))
    print(json.dumps({"run_id": res.run_id, "checkpoint": res.checkpoint_uri}, indent=2))
    if evaluate:
        print(json.dumps(evaluate_run(res.run_id, res.checkpoint_uri, shards), indent=2))
    return 0


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.command("retrain")(retrain)
    app.command("ingest")(ingest)
    app.command("train")(train)
