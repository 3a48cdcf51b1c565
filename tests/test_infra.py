"""infra/: the manifests, the launcher config, the Dockerfile and compose file are checked
without a Kubernetes API server or a Docker engine (neither exists here): every YAML
parses, each kind has the fields KubeRay needs, the Ray launcher config passes Ray's own
JSON schema, and names that must agree across files (image, Ray version, settings, work
pool, entrypoints, parameters) do.
"""
from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_PIN = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _cluster_specs() -> dict[str, dict]:
    m = _manifests()
    return {"RayCluster": m["RayCluster/condgen"]["spec"],
            "RayJob": m["RayJob/condgen-retrain"]["spec"]["rayClusterSpec"],
            "RayService": m["RayService/condgen-serve"]["spec"]["rayClusterConfig"]}


def _all_images() -> dict[str, str]:
    """Every place an image of ours is named -> the image."""
    images = {}
    for kind, spec in _cluster_specs().items():
        for c in _containers(spec["headGroupSpec"]["template"]):
            images[f"{kind}/head/{c['name']}"] = c["image"]
        for g in spec["workerGroupSpecs"]:
            for c in _containers(g["template"]):
                images[f"{kind}/{g['groupName']}/{c['name']}"] = c["image"]
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        if "condgen" in svc["image"]:
            images[f"compose/{name}"] = svc["image"]
    images["ray-launcher"] = yaml.safe_load((INFRA / "ray" / "cluster-aws.yaml").read_text())["docker"]["image"]
    return images


# ------------------------------------------------------------------------- parsing


def test_every_yaml_parses_and_k8s_objects_are_well_formed():
    files = sorted(INFRA.rglob("*.yaml")) + [REPO / "prefect.yaml"]
    assert len(files) >= 6
    for path in files:
        assert _docs(path), path
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            assert doc.get("apiVersion") and doc.get("kind"), path
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]
            assert doc["metadata"].get("namespace") == "condgen", path
    assert set(_manifests()) >= {"ConfigMap/condgen-config", "RayCluster/condgen", "RayJob/condgen-retrain",
                                 "RayService/condgen-serve"}


# ------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_ray_cluster_specs_have_cpu_and_gpu_autoscaling_groups(kind):
    m = _manifests()
    assert all(d["apiVersion"] == "ray.io/v1" for k, d in m.items() if not k.startswith("ConfigMap/"))
    spec = _cluster_specs()[kind]
    assert spec["rayVersion"] == RAY_PIN
    import ray
    assert ray.__version__ == RAY_PIN  # the image installs the same pin as this venv
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and all(isinstance(v, str) for v in head["rayStartParams"].values())
    head_ports = {p["containerPort"] for c in _containers(head["template"]) for p in c.get("ports", [])}
    assert {6379, 8265, 10001} <= head_ports
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1
        assert isinstance(g["rayStartParams"], dict)
        assert _containers(g["template"])
    gpu_limits = [c["resources"]["limits"] for c in _containers(groups["gpu"]["template"])]
    assert all(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in gpu_limits)
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in _containers(groups["cpu"]["template"]))
    templates = [head["template"]] + [g["template"] for g in groups.values()]
    for t in templates:
        sec = t["spec"]["securityContext"]
        assert sec["runAsNonRoot"] is True and sec["runAsUser"] != 0
        for c in _containers(t):
            refs = [e.get("configMapRef", {}).get("name") for e in c["envFrom"]]
            assert "condgen-config" in refs, c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert any(v["mountPath"] == "/dev/shm" for v in c["volumeMounts"])


def test_rayjob_runs_the_nightly_retrain_with_the_deployments_parameters():
    from condgen.flows.retrain import RetrainParams

    job = _manifests()["RayJob/condgen-retrain"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"
    argv = job["entrypoint"].split()
    assert argv[:2] == ["condgen", "retrain"] and "--params" in argv
    in_image = Path(argv[argv.index("--params") + 1])
    assert in_image.is_relative_to("/opt/condgen")  # the image's WORKDIR holds the repository
    params = json.loads((REPO / in_image.relative_to("/opt/condgen")).read_text())
    RetrainParams.model_validate(params)
    nightly = next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly")
    assert params == nightly["parameters"]["params"]  # one nightly run, however it is scheduled


def test_rayservice_serves_the_serving_app_through_its_builder():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    svc = _manifests()["RayService/condgen-serve"]["spec"]
    config = yaml.safe_load(svc["serveConfigV2"])
    assert config["http_options"]["port"] in {p["containerPort"] for c in _containers(
        svc["rayClusterConfig"]["headGroupSpec"]["template"]) for p in c.get("ports", [])}
    (app,) = config["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    built = call_user_app_builder_with_args_if_necessary(builder, app["args"])  # Serve's own check
    assert isinstance(built, Application)
    import condgen.serving.app as serving_app

    assert {d["name"] for d in app["deployments"]} == {serving_app.CondgenService.name}
    scaling = app["deployments"][0]["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    for uri in app["args"]["models"]:
        assert re.fullmatch(r"models:/[\w.-]+(@[\w-]+|/\d+)", uri)


def test_configmap_holds_settings_that_condgen_reads():
    cm = _manifests()["ConfigMap/condgen-config"]["data"]
    settings_src = (REPO / "tasks" / "io" / "settings.py").read_text() + (REPO / "tasks" / "io" / "storage.py").read_text()
    third_party = {"PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "RAY_TRAIN_V2_ENABLED",
                   "MLFLOW_TRACKING_URI"}
    for key in cm:
        assert key in third_party or key in settings_src, key
    assert not any("SECRET" in k or "PASSWORD" in k or "KEY_ID" in k for k in cm)  # credentials: a Secret
    assert all(v.startswith("s3://") for k, v in cm.items() if k in ("CONDGEN_STORAGE", "CONDGEN_RAY_STORAGE"))
    cluster_env = dict(line.split("=", 1) for line in (INFRA / "profiles" / "cluster.env").read_text().splitlines()
                       if line and not line.startswith("#"))
    assert set(cm) <= set(cluster_env), set(cm) - set(cluster_env)


# ---------------------------------------------------------- images, Docker, compose


def test_one_image_everywhere_tagged_with_the_project_version():
    images = _all_images()
    assert len(images) >= 10
    assert len(set(images.values())) == 1, images
    assert next(iter(images.values())).rsplit(":", 1)[1] == VERSION


def test_dockerfile_runtime_image():
    text = (INFRA / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert [ln for ln in lines if ln.startswith("FROM ")] == ["FROM python:3.11-slim"]
    assert "WORKDIR /opt/condgen" in lines
    assert re.search(r"pip install -c requirements\.lock -e \.(\s|$)", text)
    assert "COPY --chown=condgen:condgen pyproject.toml requirements.lock" in text
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "CONDGEN_WORKDIR=/opt/condgen" in text  # prefect.yaml's pull step cds there
    assert "{{ $CONDGEN_WORKDIR }}" in (REPO / "prefect.yaml").read_text()
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".condgen"} <= set(ignore)


def test_compose_services_mlflow_on_postgres_and_s3_prefect_on_postgres():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect", "prefect-worker"} <= set(services)
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "postgresql+psycopg2://" in mlflow_cmd and "--artifacts-destination s3://" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    assert "postgresql+asyncpg://" in " ".join(services["prefect"]["command"])
    worker = services["prefect-worker"]["command"]
    pools = {d["work_pool"]["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert worker[worker.index("--pool") + 1] in pools and worker[worker.index("--type") + 1] == "process"
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    for mount in services["postgres"]["volumes"]:
        src = mount.split(":")[0]
        if src.startswith("./"):
            assert (INFRA / src).exists(), src


# ------------------------------------------------------------------ Ray launcher


def test_ray_cluster_launcher_config_passes_rays_schema():
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((INFRA / "ray" / "cluster-aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray's JSON schema + its own checks
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and {"cpu", "gpu"} <= set(types)
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0
    assert sum(t.get("max_workers", 0) for k, t in types.items() if k != cfg["head_node_type"]) >= cfg["max_workers"]
    for remote, local in cfg["file_mounts"].items():
        assert (REPO / local).exists(), local
    env_file = next(o.split("=", 1)[1] for o in cfg["docker"]["run_options"] if o.startswith("--env-file="))
    mount = next(r for r in cfg["file_mounts"] if env_file.startswith(r))
    assert (REPO / cfg["file_mounts"][mount] / Path(env_file).relative_to(mount)).exists()


# ---------------------------------------------------------------- deployments


def test_prefect_yaml_deployments_point_at_flows():
    from condgen.flows.deploy import read_deployments

    deps = {f"{d['flow_name']}/{d['name']}": d for d in read_deployments()}
    assert set(deps) == {"retrain/nightly", "batch_generate/on-demand", "healthcheck/probe"}
    assert [s["cron"] for s in deps["retrain/nightly"]["schedules"]] == ["0 3 * * *"]
    assert not deps["batch_generate/on-demand"].get("schedules")
    assert {d["work_pool"]["name"] for d in deps.values()} == {"condgen"}


def test_deploy_needs_a_server(monkeypatch):
    from condgen.flows.deploy import deploy

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ValueError, match="no Prefect server"):
        deploy()
