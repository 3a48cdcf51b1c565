"""``condgen deploy``: register prefect.yaml's deployments with a Prefect server."""
from __future__ import annotations


def register(sub) -> None:
    s = sub.add_parser("deploy", help="register prefect.yaml's deployments with a Prefect server")
    s.add_argument("--api-url", help="Prefect API URL (default: PREFECT_API_URL)")
    s.add_argument("--prefect-file", help="path to prefect.yaml (default: the repository's)")
    s.set_defaults(fn=run)


def run(args) -> int:
    from condgen.flows.deploy import main

    argv = (["--api-url", args.api_url] if args.api_url else []) + \
        (["--prefect-file", args.prefect_file] if args.prefect_file else [])
    return main(argv) or 0
