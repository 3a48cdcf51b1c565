"""``condgen report RUN_ID``: download a retrain run's HTML report and print its local path.

RUN_ID is the report's own MLflow run or any model run of the same flow run (model runs
carry a ``condgen.report_run`` tag pointing to the report). The run is looked up before the
report module (torch, MLflow) is imported inside :func:`report`.
"""
from __future__ import annotations

from typing import Annotated

import typer

from condgen.commands import checks


def report(
    run_id: Annotated[str, typer.Argument(help="the report's MLflow run id, or a model run of the same retrain")],
    out: Annotated[str | None, typer.Option(help="folder to download into (default: $CONDGEN_HOME/reports/<run id>)")
                   ] = None,
) -> int:
    """Download a retrain run's HTML report; prints its local path."""
    checks.run_id(run_id)
    import mlflow

    from condgen.tasks.io import settings
    from condgen.tasks.judging.report import download_report

    mlflow.set_tracking_uri(settings.tracking_uri())
    print(download_report(run_id, out))
    return 0


def register(app: typer.Typer) -> None:
    app.command("report")(report)
