"""Ray Serve conventions: ``infra/ray/serve_config.yaml`` in Serve's own schema, the builder that
``serve run``/``serve deploy`` call with its args, an importable application for ``serve build``,
replicas and autoscaling from ``condgen serve`` flags and from that file, unknown config keys refused
in one line naming the valid ones, and Ray's dashboard only on ``CONDGEN_RAY_DASHBOARD=1``.

Nothing here starts Ray except the slow ``serve run`` test: Serve's deployment options are read from
the bound application (``Application._bound_deployment``), and ``condgen serve`` runs with Ray and
Serve's start replaced by recorders.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.deployment import Application
from ray.serve.schema import ServeDeploySchema

from condgen.cli import main
from condgen.serving import app as app_module
from condgen.serving import builder
from condgen.serving.config import Deployment, ModelSpec, ServeConfig
from condgen.serving.serve_file import DEPLOYMENT_NAME, IMPORT_PATH, parse_serve_file, read_serve_file
from condgen.tasks.io import checkpoint as ckpt_io
from condgen.tasks.io import cluster
from tests.conftest import free_port, kill_process_group, wait_http
from tests.tiny import build_tiny

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "infra" / "ray" / "serve_config.yaml"


def _deployment(application: Application):
    bound = application._bound_deployment
    return bound._deployment_config, bound.ray_actor_options, ServeConfig.model_validate(
        bound._replica_config.init_args[0])


# -- the file and the builder -------------------------------------------------------------------------------------
def test_serve_config_parses_with_ray_serves_schema():
    data = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(data)  # what `serve run` / `serve deploy` validate
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH == "condgen.serving.builder:app"
    assert [d.name for d in app.deployments] == [DEPLOYMENT_NAME] == [app_module.CondgenService.name]
    scaling = app.deployments[0].autoscaling_config
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"] and scaling["target_ongoing_requests"] > 2


def test_builder_accepts_the_files_args_as_serve_calls_it():
    (app,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    built = call_user_app_builder_with_args_if_necessary(builder.app, app["args"])  # Serve's own call
    assert isinstance(built, Application)
    _, _, config = _deployment(built)
    assert [m.uri for m in config.models] == app["args"]["models"]
    assert (config.poll_s, config.max_batch, config.request_timeout_s) == (30, 32, 60)
    # `serve run condgen.serving.builder:app models=... max_batch=8`: key=value args arrive as strings
    _, _, config = _deployment(builder.app({"models": "models:/m@champion", "max_batch": "8"}))
    assert [m.uri for m in config.models] == ["models:/m@champion"] and config.max_batch == 8


@pytest.mark.parametrize("args,bad,valid", [
    ({"models": ["models:/m@champion"], "modles": ["x"]}, "'modles'", "max_batch"),
    ({"models": [{"uri": "models:/m@champion", "adpaters": {}}]}, "'adpaters'", "adapters"),
])
def test_an_unknown_builder_key_is_one_line_naming_the_valid_keys(args, bad, valid):
    with pytest.raises(ValueError) as err:
        builder.app(args)
    message = str(err.value)
    assert "\n" not in message and bad in message and "valid keys: " in message and valid in message, message
    with pytest.raises(ValidationError):
        ServeConfig(models=[ModelSpec(uri="models:/m@champion")], max_batchh=3)


def test_serve_build_gets_an_importable_application(tmp_path):
    from ray.serve.scripts import build

    out = tmp_path / "built.yaml"
    result = CliRunner().invoke(build, ["condgen.serving.builder:application", "-o", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    built = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    (app,) = built.applications
    assert app.import_path == "condgen.serving.builder:application"
    assert [d.name for d in app.deployments] == [DEPLOYMENT_NAME]


# -- replicas and autoscaling ----------------------------------------------------------------------------------
def test_deployment_options_from_the_file_and_flags():
    found = read_serve_file(SERVE_CONFIG)
    assert (found.host, found.port, found.name, found.route_prefix) == ("127.0.0.1", 8000, "condgen", "/")
    auto = found.deployment.override(max_replicas=6)  # the file's min and target, the flag's max
    assert auto.options() == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 6,
                                                     "target_ongoing_requests": 32.0}}
    fixed = found.deployment.override(num_replicas=3)  # a fixed count replaces autoscaling
    assert fixed.options() == {"num_replicas": 3} and fixed.actor_options() == {"num_cpus": 0.5}
    config, actor, _ = _deployment(app_module.build_app("models:/m@champion", deployment=auto))
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (1, 6)
    assert config.autoscaling_config.target_ongoing_requests == 32 and actor["num_cpus"] == 0.5
    config, _, _ = _deployment(app_module.build_app("models:/m@champion", deployment=fixed))
    assert config.num_replicas == 3 and config.autoscaling_config is None
    with pytest.raises(ValidationError, match="max_replicas"):
        Deployment(autoscaling_config={"min_replicas": 4, "max_replicas": 2})
    with pytest.raises(ValueError, match="does not apply health_check_period_s"):
        parse_serve_file(SERVE_CONFIG.read_text().replace("ray_actor_options:", "health_check_period_s: 5\n"
                                                                                "        ray_actor_options:"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("serve-config") / "tiny-cvae"
    ckpt_io.save_checkpoint(folder, build_tiny("cvae").eval())
    return folder.as_uri()


@pytest.fixture
def started(monkeypatch) -> list:
    """``condgen serve`` up to Serve: Ray and Serve's start recorded, the serving loop interrupted at once."""
    calls: list = []
    monkeypatch.setattr(app_module, "ensure_ray", lambda **kw: calls.append(("ray", kw)))
    monkeypatch.setattr(app_module.serve, "start", lambda **kw: calls.append(("start", kw)))
    monkeypatch.setattr(app_module.serve, "run", lambda application, **kw: calls.append(("run", application, kw)))
    monkeypatch.setattr(app_module.serve, "shutdown", lambda: calls.append(("shutdown",)))

    def interrupt(_):
        raise KeyboardInterrupt
    monkeypatch.setattr(app_module, "time", SimpleNamespace(sleep=interrupt, perf_counter=time.perf_counter))
    return calls


def test_autoscaling_flags_reach_the_deployment_options(checkpoint, started, capsys):
    port = free_port()
    assert main(["serve", "--model", checkpoint, "--port", str(port), "--min-replicas", "2", "--max-replicas", "5",
                 "--target-ongoing-requests", "16"]) == 0
    (_, application, kw), = [c for c in started if c[0] == "run"]
    config, _, served = _deployment(application)
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (2, 5)
    assert config.autoscaling_config.target_ongoing_requests == 16
    assert served.models[0].uri == checkpoint and kw["name"] == "condgen"
    assert {"host": "127.0.0.1", "port": port} in [c[1]["http_options"] for c in started if c[0] == "start"]
    # the proxy guard travels in the controller's runtime_env (a Ray already running gets it too)
    env = [c[1] for c in started if c[0] == "start"][0]["controller_options"]["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "condgen.serving.proxy_guard:middlewares"
    assert "autoscaling 2-5 replicas" in capsys.readouterr().out
    started.clear()
    assert main(["serve", "--model", checkpoint, "--port", str(port), "--replicas", "3"]) == 0
    (_, application, _), = [c for c in started if c[0] == "run"]
    assert _deployment(application)[0].num_replicas == 3


def test_condgen_serve_applies_the_serve_config_file(checkpoint, started, tmp_path):
    data = yaml.safe_load(SERVE_CONFIG.read_text())
    port = free_port()
    data["http_options"]["port"] = port
    data["applications"][0]["args"].update(models=[{"uri": checkpoint, "name": "tiny"}], max_batch=8)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["serve", "--config", str(path), "--max-replicas", "7"]) == 0
    (_, application, kw), = [c for c in started if c[0] == "run"]
    config, actor, served = _deployment(application)
    assert (kw["name"], kw["route_prefix"]) == ("condgen", "/")
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (1, 7)
    assert actor["num_cpus"] == 0.5 and served.max_batch == 8 and served.models[0].name == "tiny"
    assert {"host": "127.0.0.1", "port": port} in [c[1]["http_options"] for c in started if c[0] == "start"]


@pytest.mark.parametrize("argv,expected", [
    (["--replicas", "2", "--max-replicas", "4"], "not both"),
    (["--min-replicas", "2"], "autoscaling needs --max-replicas"),
    (["--min-replicas", "5", "--max-replicas", "2"], "must be >= min_replicas"),
    (["--config", "@json"], "unknown key 'max_bacth'; valid keys: models, "),
    (["--config", "@yaml"], "unknown deployment 'Generator'; condgen's is CondgenService"),
])
def test_bad_serve_options_fail_fast_in_one_line(checkpoint, started, capsys, tmp_path, argv, expected):
    (tmp_path / "c.json").write_text(json.dumps({"max_bacth": 8}))
    (tmp_path / "c.yaml").write_text(SERVE_CONFIG.read_text().replace(DEPLOYMENT_NAME, "Generator"))
    argv = [str(tmp_path / "c.json") if a == "@json" else str(tmp_path / "c.yaml") if a == "@yaml" else a
            for a in argv]
    t0 = time.perf_counter()
    assert main(["serve", "--model", checkpoint, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert time.perf_counter() - t0 < 5 and not started


# -- the dashboard -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [(None, False), ("1", True)])
def test_the_service_starts_ray_with_the_dashboard_only_when_opted_in(monkeypatch, value, expected):
    """``condgen serve`` connects through ``tasks.io.cluster.ensure_ray``, as every step does."""
    inits: list[dict] = []
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kw: inits.append(kw))
    monkeypatch.setattr(app_module.serve, "start", lambda **kw: None)
    monkeypatch.setattr(app_module.serve, "run", lambda application, **kw: None)
    for name in ("RAY_ADDRESS", *getattr(cluster, "LOCAL_RAY_ENV", {})):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    if value is None:
        monkeypatch.delenv("CONDGEN_RAY_DASHBOARD", raising=False)
    else:
        monkeypatch.setenv("CONDGEN_RAY_DASHBOARD", value)
    app_module.run("models:/m@champion", port=free_port(), blocking=False)
    assert [kw["include_dashboard"] for kw in inits] == [expected]


# -- `serve run` itself ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_run_accepts_the_config_file(checkpoint, tmp_path):
    data = yaml.safe_load(SERVE_CONFIG.read_text())
    port = free_port()
    data["http_options"]["port"] = port
    data["applications"][0]["args"].update(models=[{"uri": checkpoint, "name": "tiny"}], poll_s=0)
    data["applications"][0]["deployments"][0]["autoscaling_config"].update(max_replicas=2)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(data))
    serve_cli = Path(sys.executable).with_name("serve")
    env = {**os.environ, "RAY_ADDRESS": "local", "CONDGEN_RAY_DASHBOARD": "0"}
    env.pop("CONDGEN_API_KEY", None)
    proc = subprocess.Popen([str(serve_cli), "run", str(path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=240, proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
            models = json.loads(r.read())["models"]
        assert [m["name"] for m in models] == ["tiny"]
        body = json.dumps({"label": 3, "n": 2, "seed": 1}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=body,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["n"] == 2
    finally:
        kill_process_group(proc, signal.SIGINT, timeout=60)
