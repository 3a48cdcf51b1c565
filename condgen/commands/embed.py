"""``condgen embed``: the CLIP embedding step alone (imports of the step are inside :func:`embed`)."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from condgen.commands import checks


def clip_spec(spec: str) -> str:
    """A CLIP spec whose registry entry or checkpoint exists ('embedded' and NAME:TAG are checked when loaded)."""
    if spec.startswith("models:/"):
        checks.registered(spec)
    elif "://" in spec or spec.startswith(("/", "./", "../", "~")):
        checks.checkpoint(spec)
    return spec


def embed(
    shards: Annotated[str | None, typer.Option(help="shards URI (default: bundled MNIST's)")] = None,
    clip: Annotated[str, typer.Option(help="'embedded' (fit on the data, no download) | checkpoint path/URI | "
                                      "models:/condgen-clip@champion | NAME:TAG")] = "embedded",
    workers: int = 2,
    batch_size: int = 256,
    fit_steps: Annotated[int, typer.Option(help="training steps of the embedded CLIP")] = 300,
) -> int:
    """CLIP image/text embeddings for a shard set (computed once per model)."""
    if shards:
        checks.shards(shards)
    clip_spec(clip)
    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.clip.embed import embed as embed_shards

    res = embed_shards(shards or default_shards_uri("bundled:mnist"), clip, num_workers=workers,
                       batch_size=batch_size, fit_kwargs={"steps": fit_steps})
    print(json.dumps(res.to_dict(), indent=2))
    return 0


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
