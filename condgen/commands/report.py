"""``condgen report RUN_ID``: download a retrain run's HTML report and print its local path.

RUN_ID is the report's own MLflow run or any model run of the same flow run (model runs
carry a ``condgen.report_run`` tag pointing to the report).
"""
from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> int:
    import mlflow

    from condgen.tasks.io import settings
    from condgen.tasks.judging.report import download_report

    mlflow.set_tracking_uri(settings.tracking_uri())
    path = download_report(args.run_id, args.out)
    print(path)
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser("report", help="download a retrain run's HTML report; prints its local path")
    s.add_argument("run_id", help="the report's MLflow run id, or a model run of the same retrain")
    s.add_argument("--out", help="folder to download into (default: $CONDGEN_HOME/reports/<run id>)")
    s.set_defaults(fn=cmd_report)
