"""Register condgen's Prefect deployments (``prefect.yaml``) with a Prefect server.

``prefect.yaml`` stays the single description of what is deployed (entrypoints,
schedules, parameters, work pool); this module only makes sure each work pool exists
(type ``process``, Prefect's default job template), runs ``prefect deploy --all`` against
the server, and returns the deployment ids, looked up by name rather than parsed from
the CLI's output. It works offline: the deployments pull nothing, a worker runs the
code found in ``$CONDGEN_WORKDIR`` (``/opt/condgen`` in the image, a checkout on a laptop).

    condgen deploy --api-url http://127.0.0.1:4200/api     # or PREFECT_API_URL
    prefect worker start --pool condgen                     # in CONDGEN_WORKDIR's environment
"""
from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.workers.process import ProcessWorker

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "prefect.yaml"
POOL_TYPE = "process"


def read_deployments(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The ``deployments`` entries of ``prefect.yaml``, each with its ``flow_name`` added."""
    spec = yaml.safe_load(Path(prefect_file).read_text())
    out = []
    for d in spec.get("deployments") or []:
        path, func = d["entrypoint"].rsplit(":", 1)
        out.append({**d, "flow_name": flow_name(Path(prefect_file).parent / path, func)})
    return out


def flow_name(path: Path, func: str) -> str:
    """The name a ``@flow`` gives its function, read from the source (nothing is imported)."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            for dec in node.decorator_list:
                call = dec if isinstance(dec, ast.Call) else None
                target = call.func if call else dec
                if "flow" not in (getattr(target, "id", None), getattr(target, "attr", None)):
                    continue
                for kw in call.keywords if call else []:
                    if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                        return str(kw.value.value)
                return func.replace("_", "-")  # Prefect's default flow name
            raise ValueError(f"{path}:{func} is not decorated with @flow")
    raise ValueError(f"no function {func!r} in {path}")


def _api_url(api_url: str | None) -> str:
    url = api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        raise ValueError("no Prefect server: pass api_url or set PREFECT_API_URL (ephemeral Prefect keeps "
                         "no deployments)")
    return url.rstrip("/")


def ensure_work_pools(api_url: str, names: set[str]) -> list[str]:
    """Create the missing work pools as ``process`` pools; returns the names created."""

    created = []
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            for name in sorted(names):
                try:
                    client.read_work_pool(name)
                except ObjectNotFound:
                    client.create_work_pool(WorkPoolCreate(
                        name=name, type=POOL_TYPE,
                        base_job_template=ProcessWorker.get_default_base_job_template()))
                    created.append(name)
    return created


def deploy(api_url: str | None = None, prefect_file: Path | str = PREFECT_FILE, timeout_s: float = 600) -> list[str]:
    """Register every deployment in ``prefect_file`` with the server; return their ids in file order."""

    url = _api_url(api_url)
    prefect_file = Path(prefect_file).resolve()
    deployments = read_deployments(prefect_file)
    ensure_work_pools(url, {d["work_pool"]["name"] for d in deployments if d.get("work_pool")})
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_CLI_PROMPT": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
           "COLUMNS": "200"}
    # The CLI imports each entrypoint (for its parameter schema) relative to the project root.
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                           "--prefect-file", str(prefect_file)],
                          cwd=prefect_file.parent, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        with get_client(sync_client=True) as client:
            return [str(client.read_deployment_by_name(f"{d['flow_name']}/{d['name']}").id) for d in deployments]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="condgen deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("--api-url", help="Prefect API, e.g. http://prefect:4200/api (default: $PREFECT_API_URL)")
    p.add_argument("--prefect-file", default=str(PREFECT_FILE), help="deployments file (default: prefect.yaml)")
    args = p.parse_args(argv)
    deployments = read_deployments(Path(args.prefect_file))
    ids = deploy(args.api_url, args.prefect_file)
    for d, dep_id in zip(deployments, ids):
        print(f"{d['flow_name']}/{d['name']}  {dep_id}  pool={d.get('work_pool', {}).get('name')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
