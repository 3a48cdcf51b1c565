"""condgen's flows behave the way Prefect users expect, and their inputs fail fast.

* the parameter models (flows/params.py) import no Prefect, Ray or torch, so the CLI rejects a bad params
  file in well under 5 s with one line that lists the valid fields (exit code 2);
* runs are named from their parameters (``retrain-mnist-cvae``, ``train-cvae``, ``shard-0``), log at INFO
  through ``get_run_logger``, and leave artifacts: the metrics table, the promotion decision with its
  reason and a link to the HTML report (retrain); the shard table and the manifest link (batch_generate);
* batch generation fans its shards out on prefect-ray's ``RayTaskRunner`` and takes ``dpmpp_2m``.

The flow runs are real, against a Prefect server on 127.0.0.1 (tests/conftest.py), and everything is
read back with the Prefect client.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import assert_fails_fast, condgen

REPO = Path(__file__).resolve().parents[1]


# -- fail fast ----------------------------------------------------------------------------------------------------
def test_params_module_imports_only_pydantic():
    code = ("import sys, time; t = time.perf_counter(); import condgen.flows.params as p; "
            "print(time.perf_counter() - t, sorted(m for m in ('torch', 'ray', 'prefect', 'mlflow', 'condgen.models') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=120).stdout.split(maxsplit=1)
    assert out[1].strip() == "[]", out
    assert float(out[0]) < 2.0, out


def test_flow_modules_re_export_the_params_models():
    from condgen.flows import batch_generate, params, retrain

    assert retrain.RetrainParams is params.RetrainParams and retrain.TrainSpec is params.TrainSpec
    assert batch_generate.BatchGenerateParams is params.BatchGenerateParams


def test_samplers_match_the_sampling_library():
    from typing import get_args

    from condgen.flows.params import BatchGenerateParams, Sampler
    from condgen.tasks.generation.sampling import SAMPLERS

    assert set(get_args(Sampler)) == set(SAMPLERS)
    assert BatchGenerateParams(sampler="dpmpp_2m").sampler == "dpmpp_2m"


def test_nested_typo_lists_the_fields_of_its_model(tmp_path):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"models": [{"name": "cvae", "epoch": 3}]}))
    line = assert_fails_fast(condgen("retrain", "--params", str(params), home=tmp_path),
                             "unknown field 'epoch' of TrainSpec at models[0].epoch", "epochs", "batch_size")
    assert "modles" not in line


def test_gate_typo_lists_the_gate_fields(tmp_path):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"gate": {"min_acc": 0.5}}))
    assert_fails_fast(condgen("retrain", "--params", str(params), home=tmp_path),
                      "unknown field 'min_acc' of GateParams at gate.min_acc", "min_accuracy", "tolerance")


def test_unknown_model_in_params_names_its_place(tmp_path):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"models": [{"name": "cvae"}, {"name": "difusion"}]}))
    assert_fails_fast(condgen("retrain", "--params", str(params), home=tmp_path), "models[1].name",
                      "unknown model 'difusion'", "diffusion")


def test_bad_sampler_in_a_generate_params_file(tmp_path):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"sampler": "dpmpp_3m"}))
    assert_fails_fast(condgen("generate", "--params", str(params), home=tmp_path), "sampler", "dpmpp_2m")


def test_generate_params_file_values_are_kept_unless_a_flag_is_typed(tmp_path):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"model_uri": "models:/from-file@champion", "sampler": "dpmpp_2m"}))
    assert_fails_fast(condgen("generate", "--params", str(params), home=tmp_path), "'from-file'")
    assert_fails_fast(condgen("generate", "--params", str(params), "--model", "models:/from-flag@champion",
                              home=tmp_path), "'from-flag'")


def test_generate_offers_dpmpp_2m(tmp_path):
    res = condgen("generate", "--help", home=tmp_path)
    assert res.rc == 0 and "dpmpp_2m" in res.out
    assert_fails_fast(condgen("generate", "--sampler", "dpmpp", home=tmp_path), "--sampler", "dpmpp_2m")


# -- what a retrain run leaves in Prefect (pure parts) ------------------------------------------------------------
RESULT = {"model": "cvae", "run_id": "r1", "metrics": {"eval/cond_accuracy": 0.91234, "eval/fid": 12.3456},
          "promotion": {"name": "condgen-cvae", "version": "3", "promoted": False, "candidate_accuracy": 0.91234,
                        "reason": "0.9123 < champion 0.95 - tolerance 0.0", "champion_version": "2",
                        "champion_accuracy": 0.95}}


def test_metrics_rows_and_promotion_markdown():
    from condgen.flows.params import GateParams
    from condgen.flows.retrain import metrics_rows, promotion_markdown

    rows = metrics_rows([RESULT], [{"model": "autoencoder", "run_id": "r0"}])
    assert rows[0] == {"model": "cvae", "registered": "condgen-cvae/3", "run_id": "r1", "cond_accuracy": 0.9123,
                       "fid": 12.3456, "promoted": False}
    assert rows[1]["registered"] == "(component)"
    md = promotion_markdown([RESULT], GateParams(min_accuracy=0.9))
    assert "models:/condgen-cvae/3" in md and "**not promoted**" in md
    assert "reason: 0.9123 < champion 0.95" in md and "v2 (0.95)" in md and "accuracy >= 0.9" in md


# -- real flow runs on a Prefect server ----------------------------------------------------------------------------
def _run_record(api: str, flow_run_id):
    """(flow run, {task run name}, {artifact key: artifact}, [log messages]) of a finished flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    APILogHandler().flush()  # run logs are sent in the background
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        fr = client.read_flow_run(flow_run_id)
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        tasks = {t.name for t in client.read_task_runs(flow_run_filter=runs)}
        arts = {a.key: a for a in client.read_artifacts(flow_run_filter=runs)}
        logs = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
    return fr, tasks, arts, logs


@pytest.mark.slow
def test_retrain_run_names_logs_and_artifacts(prefect_server, local_ray, condgen_home):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from condgen.flows.retrain import RetrainParams, retrain

    params = RetrainParams.model_validate({
        "limit": 300, "shard_size": 300, "num_workers": 1, "eval_per_class": 3, "judge_epochs": 1, "clip": None,
        "experiment": "prefect-conventions", "gate": {"min_accuracy": 0.0},
        "report": {"exploration": False, "latent_maps": False},
        "models": [{"name": "cvae", "epochs": 1, "batch_size": 64, "config": {"channels": [4, 8]}, "grid_every": 0,
                    "registered_name": "conventions-cvae"}]})
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        state = retrain(params, return_state=True)
    assert state.is_completed(), state
    out = state.result()
    fr, tasks, arts, logs = _run_record(prefect_server, state.state_details.flow_run_id)
    assert fr.name == "retrain-mnist-cvae"
    assert {"ingest-bundled:mnist", "train-cvae", "evaluate-conventions-cvae", "promote-conventions-cvae",
            "report-prefect-conventions"} <= tasks, tasks
    assert {"retrain-metrics", "retrain-promotion", "retrain-report"} <= set(arts), set(arts)
    assert arts["retrain-metrics"].type == "table" and arts["retrain-promotion"].type == "markdown"
    table = json.loads(arts["retrain-metrics"].data) if isinstance(arts["retrain-metrics"].data, str) \
        else arts["retrain-metrics"].data
    (row,) = table
    assert row["model"] == "cvae" and row["registered"].startswith("conventions-cvae/") and row["promoted"] is True
    assert abs(row["cond_accuracy"] - out["results"][0]["metrics"]["eval/cond_accuracy"]) < 1e-4
    promotion = out["results"][0]["promotion"]
    assert promotion["reason"] in arts["retrain-promotion"].data and "**promoted**" in arts["retrain-promotion"].data
    # a link artifact (stored as markdown) to the HTML file in the report run's artifact store
    run_id = out["report_run_id"]
    link = arts["retrain-report"].data
    assert "evaluation report (HTML)" in link and f"/{run_id}/artifacts/report/report.html" in link, link
    html = Path(link[link.index("(file://") + len("(file://"):-1])
    assert html.is_file() and "<html" in html.read_text().lower()
    # the flow's own INFO lines reach the API (the UI's log tab)
    assert any(m.startswith("retrain bundled:mnist: 1 model(s)") for m in logs), logs[:20]
    assert any("conventions-cvae: cond_accuracy=" in m for m in logs), logs[:20]


@pytest.mark.slow
def test_batch_generate_fans_out_on_ray_with_dpmpp_2m(prefect_server, local_ray, condgen_home):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from condgen.flows.batch_generate import BatchGenerateParams, batch_generate
    from condgen.tasks.generation import batch as bg
    from tests.registry_helpers import TINY_DIFFUSION, register_tiny

    register_tiny("conventions-diffusion", "diffusion", TINY_DIFFUSION, seed=0)
    out_uri = (condgen_home / "generated" / "conventions").as_uri()
    params = BatchGenerateParams(model_uri="models:/conventions-diffusion@champion", out_uri=out_uri, labels=[1, 7],
                                 seeds_per_condition=3, shard_size=2, sampler="dpmpp_2m", steps=4)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        state = batch_generate(params, return_state=True)
    assert state.is_completed(), state
    res = state.result()
    assert res["n_samples"] == 6 and res["made"] == 3
    fr, tasks, arts, _ = _run_record(prefect_server, state.state_details.flow_run_id)
    assert fr.name == "generate-conventions-diffusion-champion-dpmpp_2m"
    assert "plan-models:/conventions-diffusion@champion" in tasks, tasks
    assert any(t.startswith("manifest-") for t in tasks) and "load-model-" + res["model"]["uri"] in tasks, tasks
    assert {"batch-shards", "batch-manifest"} <= set(arts), set(arts)
    assert res["manifest"] in arts["batch-manifest"].data
    # every sample was made by DPM-Solver++(2M) in 4 steps, as its provenance record says
    samples = bg.read_samples(out_uri)
    assert {s["meta"]["provenance"]["sampler"] for s in samples} == {"dpmpp_2m"}
    assert {s["meta"]["provenance"]["steps"] for s in samples} == {4}
    # one task run per shard, on Ray, in the generate-shards sub-flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        shard_runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="shard-")))
    names = {t.name for t in shard_runs if t.flow_run_id != fr.id}
    assert {"shard-0", "shard-1", "shard-2"} <= names, names
