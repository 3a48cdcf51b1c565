"""``condgen deploy``: register prefect.yaml's deployments with a Prefect server (``flows/deploy.py``,
imported inside :func:`deploy`: Prefect takes a second)."""
from __future__ import annotations

from typing import Annotated

import typer

from condgen.commands import checks


def deploy(
    api_url: Annotated[str | None, typer.Option(help="Prefect API URL (default: PREFECT_API_URL)")] = None,
    prefect_file: Annotated[str | None, typer.Option(help="path to prefect.yaml (default: the repository's)")
                            ] = None,
) -> int:
    """Register prefect.yaml's deployments with a Prefect server."""
    from condgen.tasks.io import settings

    if not (api_url or settings.load().prefect_api_url):
        raise checks.InputError("no Prefect server: pass --api-url URL or set PREFECT_API_URL (ephemeral Prefect "
                                "keeps no deployments)")
    if prefect_file:
        checks.local_file(prefect_file, "--prefect-file")
    from condgen.flows.deploy import main

    argv = (["--api-url", api_url] if api_url else []) + (["--prefect-file", prefect_file] if prefect_file else [])
    return main(argv) or 0


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)
