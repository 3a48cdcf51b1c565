"""Issue 15 item 5: `condgen demo --source bundled:shapes` and the service, a prompt in and an image out.

Fast: the demo's preset for ``bundled:shapes`` is exactly ``infra/params/shapes.json`` (what the README
points at), a valid ``RetrainParams`` with a text-conditioned diffusion model that a new run trains with the
registry's recipe; ``condgen demo --source bundled:shapes`` hands the flow that preset (the flow itself
replaced by a recorder).

Slow (one flow run per module, tiny): the real ``retrain`` flow on 300 generated shapes (ingest, the
embedded CLIP, its embeddings, one epoch of a tiny text diffusion model on Ray Train, evaluation with the
shapes checker's ``eval/shapes/*``, promotion), then the registered champion served in-process
(``Service`` + ``bind_service`` + TestClient: the FastAPI app and handlers of ``condgen serve``, without
Ray Serve's proxy): a prompt gives 32 x 32 RGB PNGs, an empty, blank or over-long prompt a 422 with the
reason, ``GET /v1/models`` offers the training captions as example prompts, and the web page, in headless
Chromium, shows one of them in its prompt box with the label input hidden.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.tiny import TINY, decode_png

ROOT = Path(__file__).resolve().parents[1]
NAME = "shapes-demo-test"
PROMPT = "a small red circle in the top left"
CAPTION = re.compile(r"^a (small|large) (red|green|blue|yellow|magenta|cyan) (circle|square|triangle) in the "
                     r"(top left|top right|bottom left|bottom right|centre)$")


# -- the demo's parameters (fast) -------------------------------------------------------------------------------
def test_shapes_preset_is_the_params_file_and_a_text_model():
    from condgen.commands.pipeline import DEMO_MODELS, demo_defaults
    from condgen.flows.params import RetrainParams
    from condgen.models.registry import RECIPES, recipe_config

    preset = demo_defaults("bundled:shapes")
    assert preset == json.loads((ROOT / "infra" / "params" / "shapes.json").read_text())
    assert demo_defaults("bundled:shapes:n=500,seed=3") == preset  # generator options keep the preset
    for other in ("bundled:mnist", None, "/data/folder", "bundled:shapesx"):
        assert demo_defaults(other) == {"models": DEMO_MODELS}, other
    params = RetrainParams.model_validate(preset)
    text = [s for s in params.models if s.config.get("condition") == "text"]
    assert [s.name for s in text] == ["diffusion"] and params.clip == "embedded"
    assert params.image_size == 32 and params.mode == "RGB"
    fresh = recipe_config("diffusion", text[0].config)  # what the driver builds a new run from
    assert all(fresh[k] == v for k, v in RECIPES["diffusion"].items())
    labels = [s for s in params.models if s.config.get("condition", "label") == "label"]
    assert [s.name for s in labels] == ["cvae"]


def test_demo_command_hands_the_flow_the_shapes_preset(monkeypatch):
    # no capsys: Prefect's log handler, set up on first import, would keep its (then closed) stream
    import condgen.flows.retrain as flow_module
    from condgen.commands.pipeline import run_retrain

    seen = []

    def recorder(params):
        seen.append(params)
        return {"shards_uri": "file:///x", "manifest": "file:///x/manifest.json", "results": []}

    monkeypatch.setattr(flow_module, "retrain", recorder)
    assert run_retrain(None, "bundled:shapes:n=400", None, 2, 100, demo=True) == 0
    p = seen[-1]
    assert p.source == "bundled:shapes:n=400" and p.limit == 100 and p.image_size == 32
    assert [(s.name, s.config.get("condition"), s.epochs) for s in p.models] == [("diffusion", "text", 2),
                                                                                 ("cvae", None, 2)]
    assert run_retrain(None, None, None, None, None, demo=True) == 0  # MNIST: the CVAE demo, as before
    assert seen[-1].source == "bundled:mnist" and [s.name for s in seen[-1].models] == ["cvae"]


# -- the flow and the service (slow) --------------------------------------------------------------------------------
def _params():
    from condgen.flows.params import RetrainParams

    diffusion = {k: v for k, v in TINY["diffusion"].items() if k != "text_dim"}  # text_dim: the CLIP's
    return RetrainParams.model_validate({
        "source": "bundled:shapes:n=300", "image_size": 32, "mode": "RGB", "background": "black", "num_workers": 1,
        "clip_fit_steps": 10, "eval_per_class": 2, "judge_epochs": 1, "experiment": "shapes-demo-test",
        "models": [{"name": "diffusion", "config": {**diffusion, "condition": "text"}, "epochs": 1, "batch_size": 32,
                    "registered_name": NAME, "grid_every": 0}],
        "gate": {"min_accuracy": 0.0, "tolerance": 0.0}, "report": {"exploration": False, "latent_maps": False}})


@pytest.fixture(scope="module")
def flow_run(local_ray):
    from condgen.flows.retrain import retrain

    return retrain(_params())


@pytest.fixture(scope="module")
def service(flow_run):
    from condgen.serving.config import ModelSpec, ServeConfig
    from condgen.serving.service import Service
    from condgen.tasks.io import settings

    svc = Service(ServeConfig(models=[ModelSpec(uri=f"models:/{NAME}@champion")], clip="models:/condgen-clip@champion",
                              tracking_uri=settings.tracking_uri(), poll_s=0, deny_list=[]))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient

    from condgen.serving.app import bind_service

    with TestClient(bind_service(service)) as c:
        yield c


@pytest.mark.slow
def test_flow_evaluates_with_the_shapes_checker_and_promotes(flow_run):
    (r,) = flow_run["results"]
    assert r["promotion"]["promoted"] is True and r["promotion"]["name"] == NAME
    for a in ("colour", "shape", "size", "position", "joint", "unseen_joint"):
        assert 0.0 <= r["metrics"][f"eval/shapes/{a}_acc"] <= 1.0, a


@pytest.mark.slow
def test_a_prompt_gives_rgb_pngs_of_the_models_size(client):
    body = {"prompt": PROMPT, "n": 2, "seed": 5, "guidance": "cfg", "scale": 2.0}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["parameters"]["prompt"] == PROMPT and len(out["images"]) == 2
    for b64 in out["images"]:
        im = decode_png(b64)
        assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
    assert client.post("/v1/generate", json=body).json()["images"] == out["images"]  # seeded
    other = client.post("/v1/generate", json={**body, "prompt": "a large cyan square in the centre"}).json()
    assert other["images"] != out["images"]  # the prompt conditions the sample


@pytest.mark.slow
@pytest.mark.parametrize("prompt, reason", [("", "at least 1 character"), ("   ", "blank"),
                                            ("a red circle " * 20, "at most 200 characters")])
def test_an_empty_blank_or_long_prompt_is_a_422_with_the_reason(client, prompt, reason):
    r = client.post("/v1/generate", json={"prompt": prompt})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(reason in d["msg"] and d["loc"][-1] == "prompt" for d in detail), detail


@pytest.mark.slow
def test_models_offer_training_captions_as_example_prompts(client):
    (m,) = client.get("/v1/models").json()["models"]
    assert m["info"]["condition"] == "text" and m["channels"] == 3 and m["image_size"] == 32
    examples = m["info"]["example_prompts"]
    assert len(examples) == 4 and len(set(examples)) == 4
    assert all(CAPTION.match(e) for e in examples), examples  # the shapes' captions, not a digit sentence
    assert len(m["info"]["class_names"]) == 18 and m["info"]["digits"] is False


@pytest.mark.slow
def test_a_label_asks_the_text_model_for_that_class_by_its_manifest_name(client):
    r = client.post("/v1/generate", json={"label": 4, "n": 1})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["prompt"] == "a green square"  # cls = colour x 3 + shape: not a digit sentence
    r = client.post("/v1/generate", json={"label": 18})
    assert r.status_code == 422 and "[0, 17]" in r.text and "0: red circle" in r.text, r.text


@pytest.mark.slow
def test_web_page_offers_a_caption_in_its_prompt_box(service, client, tmp_path):

    from condgen.serving.app import bind_service
    from tests.conftest import served_in_thread

    proc = subprocess.run(["bash", str(ROOT / "infra" / "scripts" / "ensure_chromium.sh")], capture_output=True,
                          text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.skip(f"no headless Chromium: {proc.stderr.strip()[-300:]}")
    example = client.get("/v1/models").json()["models"][0]["info"]["example_prompts"][0]
    with served_in_thread(bind_service(service)) as port:
        flags = [proc.stdout.strip().splitlines()[-1], "--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", "--no-first-run", "--window-size=900,700",
                 f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom",
                 f"http://127.0.0.1:{port}/?autorun=1&n=4&seed=1"]
        dom = subprocess.run(flags, capture_output=True, text=True, timeout=120, check=False).stdout
    prompt_box = re.search(r'<input id="prompt"[^>]*>', dom)
    assert prompt_box and f'placeholder="{example}"' in prompt_box.group(0), dom[-2000:]
    assert re.search(r'<input id="label"[^>]*hidden', dom), dom[-2000:]  # a text model takes no label
    assert 'data-loaded="4"' in dom  # the empty box generated the placeholder's prompt
    assert re.search(r'"prompt": "' + re.escape(example) + '"', dom), dom[-2000:]
