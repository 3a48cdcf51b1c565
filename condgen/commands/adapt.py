"""``condgen adapt``: train a LoRA adapter on a frozen base (one base, many adapters).

    condgen adapt --base models:/condgen-cgan@champion --source bundled:uci_digits \\
        --target G.up.convs.0 --target G.up.convs.1 --target G.to_img --rank 1 --epochs 30 \\
        --register condgen-cgan-uci

    condgen adapt --base s3://weights/sd15 --shards s3://data/my-captions --steps 2000 --rank 4 \\
        --validation-prompt "a red apple" --validate-every 200 --bf16 --gpu --register my-style

The base is either a condgen model (a registry URI or a checkpoint folder; ``--target`` names
its layers, ``--epochs`` counts passes) or a user's pretrained pipeline in diffusers' layout (a
folder or ``s3://`` prefix with ``model_index.json``, safetensors only; peft LoRA on the U-Net's
attention projections, ``--steps`` counts optimiser steps on captioned shards,
``condgen.tasks.pretrained``, docs/pretrained.md).

The run is one Ray Train fit and one MLflow run (tag ``condgen.kind=adapter``); the adapter
(safetensors + JSON) goes to ``<storage>/adapters/<run id>``, the run's ``adapter/`` artifacts
and, with ``--register``, the model registry (alias ``@latest-adapter``). The base, the data and
the registry name are checked before Ray starts; the imports of the training code (Ray, torch,
MLflow) are inside :func:`adapt`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote

import typer

from condgen.commands import checks


def is_pipeline(base: str) -> bool:
    """True when ``base`` is a diffusers-layout folder or ``s3://`` prefix (it has ``model_index.json``)."""
    if base.startswith("models:/"):
        return False
    if base.startswith("s3://"):
        from condgen.tasks.io import storage

        return storage.exists(storage.join(base, "model_index.json"))
    path = Path(unquote(base.removeprefix("file://"))) if base.startswith("file://") else Path(base).expanduser()
    return (path / "model_index.json").is_file()


def adapt(
    base: Annotated[str, typer.Option(help="models:/NAME@alias, models:/NAME/3, a checkpoint folder URI, or a "
                                           "diffusers pipeline folder / s3:// prefix (model_index.json)")],
    target: Annotated[list[str] | None, typer.Option(help="layer name (or suffix) to adapt; repeat. nn.Linear / "
                                                     "nn.Conv2d / nn.ConvTranspose2d. A pipeline: U-Net modules "
                                                     "(default to_q, to_k, to_v, to_out.0)")] = None,
    source: Annotated[str, typer.Option(help="data of the new condition (ingested on demand)")] = "bundled:uci_digits",
    shards: Annotated[str | None, typer.Option(help="already ingested shards URI (instead of --source)")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank (default 1; 4 for a pipeline)")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: the rank)")] = None,
    epochs: int = 30,
    batch_size: int = 64,
    workers: int = 1,
    seed: int = 0,
    register: Annotated[str | None, typer.Option(help="register the adapter under this registry name")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="score base + adapter with the new data's judge")
                        ] = False,
    steps: Annotated[int, typer.Option(help="pipeline: optimiser steps")] = 500,
    lr: Annotated[float, typer.Option(help="pipeline: AdamW learning rate")] = 1e-4,
    train_text_encoder: Annotated[bool, typer.Option(help="pipeline: LoRA on the text encoder too")] = False,
    image_size: Annotated[int | None, typer.Option(help="pipeline: training size (default: the shards')")] = None,
    cond_dropout: Annotated[float, typer.Option(help="pipeline: empty-prompt rate (CFG)")] = 0.1,
    bf16: Annotated[bool, typer.Option("--bf16", help="pipeline: bf16 autocast of the U-Net")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing")] = False,
    ema: Annotated[float, typer.Option(help="pipeline: EMA decay of the adapter (0: off)")] = 0.0,
    checkpoint_every: Annotated[int, typer.Option(help="pipeline: steps between checkpoints")] = 100,
    validation_prompt: Annotated[list[str] | None, typer.Option(help="pipeline: prompt of the validation "
                                                                "images; repeat")] = None,
    validate_every: Annotated[int, typer.Option(help="pipeline: steps between validation images (0: off)")] = 0,
    gpu: Annotated[bool, typer.Option("--gpu", help="pipeline: one GPU per worker")] = False,
) -> int:
    """Train a LoRA adapter on a frozen base model or a pretrained diffusers pipeline (Ray Train + MLflow)."""
    if shards:
        checks.shards(shards)
    else:
        checks.source(source)
    if register is not None and not re.fullmatch(r"[\w.-]+", register):
        raise checks.InputError(f"--register: a registry name is letters, digits, '_', '-' and '.', got {register!r}")
    if is_pipeline(base):
        if evaluate:
            raise checks.InputError("--evaluate judges condgen's own models; for a pipeline look at the run's "
                                    "validation images (--validation-prompt, --validate-every)")
        return _adapt_pipeline(base, target, source, shards, rank or 4, alpha, batch_size, workers, seed, register,
                               steps=steps, lr=lr, train_text_encoder=train_text_encoder, image_size=image_size,
                               cond_dropout=cond_dropout, mixed_precision="bf16" if bf16 else "no",
                               gradient_checkpointing=gradient_checkpointing, ema_decay=ema,
                               checkpoint_every=checkpoint_every, validation_prompts=list(validation_prompt or []),
                               validate_every=validate_every, use_gpu=gpu)
    if not target:
        raise checks.InputError("--target: name at least one layer of the base to adapt (e.g. --target G.to_img)")
    checks.model_ref(base)

    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.judging.evaluate import evaluate_run
    from condgen.tasks.training.driver import AdapterSpec, TrainRequest, train

    data = shards or default_shards_uri(source)
    if not shards:
        ingest(source, data)
    spec = AdapterSpec(base=base, targets=target, rank=rank or 1, alpha=alpha, register_as=register)
    res = train(TrainRequest(model="", shards_uri=data, epochs=epochs, batch_size=batch_size, num_workers=workers,
                             seed=seed, adapter=spec, run_name=f"adapter-{register or 'lora'}"))
    out = {"run_id": res.run_id, "adapter": res.checkpoint_uri,
           "registered": f"models:/{register}@latest-adapter" if register else None}
    print(json.dumps(out, indent=2))
    if evaluate:
        print(json.dumps(evaluate_run(res.run_id, res.checkpoint_uri, data, adapter_base=base), indent=2))
    return 0


def _adapt_pipeline(base: str, target: list[str] | None, source: str, shards: str | None, rank: int,
                    alpha: float | None, batch_size: int, workers: int, seed: int, register: str | None,
                    **options) -> int:
    """The pretrained-pipeline path: ingest on demand (RGB, the shards' captions), then one fine-tune."""
    _check_pipeline_options(base, batch_size, workers, options)
    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.pretrained.adapt import PretrainedAdaptRequest, adapt_pretrained, check

    req = PretrainedAdaptRequest(base=base, shards_uri=shards or default_shards_uri(source), rank=rank, alpha=alpha,
                                 batch_size=batch_size, num_workers=workers, seed=seed, register_as=register,
                                 targets=target or None, run_name=f"adapter-{register or 'pretrained-lora'}",
                                 **options)
    try:
        check(req)
    except ValueError as e:
        raise checks.InputError(str(e)) from None
    if not shards:  # at the training size, or the source's own (bundled sets: 32 px)
        ingest(source, req.shards_uri, image_size=req.image_size)
    res = adapt_pretrained(req)
    print(json.dumps({"run_id": res.run_id, "adapter": res.adapter_uri, "loss": res.metrics.get("loss"),
                      "registered": f"models:/{register}@latest-adapter" if register else None}, indent=2))
    return 0


def _check_pipeline_options(base: str, batch_size: int, workers: int, options: dict) -> None:
    """The pipeline path's option and layout errors, before torch or Ray load (a remote base is checked by
    ``tasks.pretrained.base.fetch`` before its download)."""
    import importlib.util

    missing = [m for m in ("diffusers", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise checks.InputError(f"a pipeline base needs {', '.join(missing)}: pip install 'condgen[pretrained]'")
    if options["steps"] < 1 or options["checkpoint_every"] < 1:
        raise checks.InputError("--steps and --checkpoint-every must be >= 1")
    if batch_size < workers:
        raise checks.InputError(f"--batch-size {batch_size} is the global batch: give each of the {workers} "
                                "workers at least one sample")
    for name in ("cond_dropout", "ema_decay"):
        if not 0 <= options[name] < 1:
            raise checks.InputError(f"--{'ema' if name == 'ema_decay' else 'cond-dropout'} must be in [0, 1), "
                                    f"got {options[name]}")
    if base.startswith("s3://"):
        return
    folder = Path(unquote(base.removeprefix("file://"))) if base.startswith("file://") else Path(base).expanduser()
    pickles = sorted(str(f.relative_to(folder)) for f in folder.rglob("*")
                     if f.suffix.lower() in (".bin", ".ckpt", ".pt", ".pth", ".pkl"))
    if pickles:
        raise checks.InputError(f"{base} holds pickled weights ({pickles[0]}); condgen reads safetensors only: "
                                "convert them with diffusers' save_pretrained(..., safe_serialization=True)")


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt)
