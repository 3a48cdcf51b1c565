"""``condgen adapt``: train a LoRA adapter on a frozen, trained base (one base, many adapters).

    condgen adapt --base models:/condgen-cgan@champion --source bundled:uci_digits \\
        --target G.up.convs.0 --target G.up.convs.1 --target G.to_img --rank 1 --epochs 30 \\
        --register condgen-cgan-uci

The run is one Ray Train fit and one MLflow run (tag ``condgen.kind=adapter``); the adapter
(a few kB of safetensors + JSON) goes to ``<storage>/adapters/<run id>``, the run's
``adapter/`` artifacts and, with ``--register``, the model registry (alias
``@latest-adapter``). Serve it next to its base with ``serving.engine.ModelSpec.adapters``.
The base, the data and the registry name are checked before Ray starts; the imports of the
training driver (Ray, torch, MLflow) are inside :func:`adapt`.
"""
from __future__ import annotations

import json
import re
from typing import Annotated

import typer

from condgen.commands import checks


def adapt(
    base: Annotated[str, typer.Option(help="models:/NAME@alias, models:/NAME/3 or a checkpoint folder URI")],
    target: Annotated[list[str], typer.Option(help="layer name (or suffix) to adapt; repeat. nn.Linear / nn.Conv2d "
                                              "/ nn.ConvTranspose2d")],
    source: Annotated[str, typer.Option(help="data of the new condition (ingested on demand)")] = "bundled:uci_digits",
    shards: Annotated[str | None, typer.Option(help="already ingested shards URI (instead of --source)")] = None,
    rank: int = 1,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: the rank)")] = None,
    epochs: int = 30,
    batch_size: int = 64,
    workers: int = 1,
    seed: int = 0,
    register: Annotated[str | None, typer.Option(help="register the adapter under this registry name")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="score base + adapter with the new data's judge")
                        ] = False,
) -> int:
    """Train a LoRA adapter on a frozen base model (Ray Train + MLflow)."""
    if shards:
        checks.shards(shards)
    else:
        checks.source(source)
    if register is not None and not re.fullmatch(r"[\w.-]+", register):
        raise checks.InputError(f"--register: a registry name is letters, digits, '_', '-' and '.', got {register!r}")
    checks.model_ref(base)

    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.judging.evaluate import evaluate_run
    from condgen.tasks.training.driver import AdapterSpec, TrainRequest, train

    data = shards or default_shards_uri(source)
    if not shards:
        ingest(source, data)
    spec = AdapterSpec(base=base, targets=target, rank=rank, alpha=alpha, register_as=register)
    res = train(TrainRequest(model="", shards_uri=data, epochs=epochs, batch_size=batch_size, num_workers=workers,
                             seed=seed, adapter=spec, run_name=f"adapter-{register or 'lora'}"))
    out = {"run_id": res.run_id, "adapter": res.checkpoint_uri,
           "registered": f"models:/{register}@latest-adapter" if register else None}
    print(json.dumps(out, indent=2))
    if evaluate:
        print(json.dumps(evaluate_run(res.run_id, res.checkpoint_uri, data, adapter_base=base), indent=2))
    return 0


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt)
