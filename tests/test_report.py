"""The HTML evaluation report (tasks/judging/report.py, report_html.py): self-contained page, rendered in headless
Chromium with every image decoded, logged to MLflow and fetched by ``condgen report``."""
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _study():
    names, measured = ["thickness", "slant", "size"], ["thickness", "slant", "size", "ink"]
    eye = [[1.0 if m == n else 0.1 for m in measured] for n in names]
    return {"names": names, "measured": measured, "r2": dict.fromkeys(names, 0.5),
            "cosine": [[1.0, 0.2, 0.3], [0.2, 1.0, 0.1], [0.3, 0.1, 1.0]], "strengths": [-1.0, 0.0, 1.0],
            "slopes": {"raw": eye, "orthogonal": eye}, "leakage": {"raw": eye, "orthogonal": eye},
            "monotonicity": {"raw": dict.fromkeys(names, 0.9), "orthogonal": dict.fromkeys(names, 0.95)},
            "curves": {v: {n: [[2.0, 0.0, 0.6, 0.1]] * 3 for n in names} for v in ("raw", "orthogonal")},
            "summary": {"raw/mean_abs_leakage": 0.1, "orthogonal/mean_abs_leakage": 0.05}}


def _render(out_dir):
    from condgen.tasks.judging.report_html import ModelSection, render_report

    rng = np.random.default_rng(0)
    img = lambda h, w: rng.integers(0, 255, (h, w), dtype=np.uint8)  # noqa: E731
    models = [ModelSection("cvae", "a" * 32, {"eval/cond_accuracy": 0.9, "eval/fid": 3.2, "eval/precision": 0.8,
                                              "eval/acc_class_0": 0.95}, img(60, 240),
                           {"lerp": img(30, 240), "slerp": img(30, 240)}),
              ModelSection("cgan", "b" * 32, {"eval/cond_accuracy": 0.7, "eval/fid": 9.1}, img(60, 240))]
    curves = {"accuracy vs guidance scale": {"cfg": {0: 0.5, 1: 0.8, 3: 0.9}, "classifier": [[0, 0.5], [2, 0.7]]},
              "FID vs steps": {"ddim": {5: 20.0, 10: 12.0, 50: 9.0}}}
    rows = [{"source": "cvae", "target": "cgan", "mode": "real", "method": m, "support": n, "R": 0.01, "L": 0.5,
             "L_rel": 0.4, "M": 0.03, "M_random": 0.08, "class_kept": 0.95, "class_random": 0.9}
            for m in ("lstsq", "gd") for n in (10, 100, 1000)]
    strips = {"raw/thickness": img(30, 90), "orthogonal/thickness": img(30, 90)}
    path = render_report(out_dir, models=models, curves=curves, map_rows=rows, attribute_study=_study(),
                         edit_strips=strips, errors={"map x <-> y": "ValueError: example"})
    # images: 2 grids + 2 interpolation + 2 curve plots + 3 attribute plots + 2 strips + 2 map plots
    return path, 13


def test_report_is_one_self_contained_page(tmp_path):
    path, n_images = _render(tmp_path)
    page = path.read_text()
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert len(srcs) == n_images
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    for text in ("Metrics per model", "cond_accuracy", "Latent-space maps", "class_kept", "Leakage — raw",
                 "Leakage — orthogonal", "Latent interpolation", "ValueError: example"):
        assert text in page, text


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    script = ROOT / "infra" / "scripts" / "ensure_chromium.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"no headless Chromium: {proc.stderr.strip()[-300:]}")
    browser = proc.stdout.strip().splitlines()[-1]
    path, n_images = _render(tmp_path / "report")
    url = path.resolve().as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", "--no-first-run", "--window-size=1200,2400",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert f'data-images-total="{n_images}"' in dom.stdout, dom.stdout[:500] + dom.stderr[-2000:]
    assert f'data-images-loaded="{n_images}"' in dom.stdout
    assert 'data-report-ready="true"' in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000
    from PIL import Image

    assert np.asarray(Image.open(shot).convert("L")).std() > 10  # not a blank page


@pytest.mark.slow
def test_write_report_logs_to_mlflow_and_cli_prints_the_path(tiny_shards, tmp_path, capsys):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from condgen.cli import main
    from condgen.models.cvae import CVAE, CVAEConfig
    from condgen.models.gan import CGAN, CGANConfig
    from condgen.tasks.io import tracking
    from condgen.tasks.io.checkpoint import save_checkpoint
    from condgen.tasks.judging.latent_maps import load_map
    from condgen.tasks.judging.report import ReportOptions, write_report

    tracking.configure("condgen-report-test")
    torch.manual_seed(0)
    results = []
    for name, model in (("cvae", CVAE(CVAEConfig(channels=(8, 16), latent_dim=4, cond_dim=4))),
                        ("cgan", CGAN(CGANConfig(channels=(8, 16), latent_dim=6, cond_dim=4)))):
        ckpt = save_checkpoint(tmp_path / name, model)
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_image(np.full((20, 20), 128, np.uint8), "eval/class_grid.png")
        results.append({"model": name, "run_id": run.info.run_id, "checkpoint": ckpt.as_uri(),
                        "metrics": {"eval/cond_accuracy": 0.1, "eval/fid": 100.0}})
    options = ReportOptions(map_support=(10, 40), map_test=20, inversion_steps=3, n_edit=8,
                            strengths=(-1.0, 0.0, 1.0), judge_epochs=1)
    rep = write_report(results, tiny_shards, experiment="condgen-report-test", options=options,
                       curves={"accuracy vs guidance scale": {"cfg": {0: 0.1, 1: 0.2}}})
    assert rep["uri"] == f"runs:/{rep['run_id']}/report/report.html"
    assert not rep["errors"], rep["errors"]
    key = "cvae-to-cgan/lstsq-n40"
    assert load_map(rep["map_uris"][key]).W.shape == (4, 6)
    arts = {a.path for a in MlflowClient().list_artifacts(rep["run_id"], "report")}
    assert {"report/report.html", "report/report.json"} <= arts
    page_sections = ("Latent-space maps", "Leakage — orthogonal", "Latent interpolation", "accuracy vs guidance")

    for rid in (rep["run_id"], results[0]["run_id"]):  # the report run, or a model run pointing to it
        assert main(["report", rid]) == 0
        local = Path(capsys.readouterr().out.strip().splitlines()[-1])
        assert local.exists() and local.name == "report.html"
        page = local.read_text()
        for text in page_sections:
            assert text in page, text
