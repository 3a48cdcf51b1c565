"""Ray Serve application: loads ``models:/<name>@champion`` and serves samples.

``POST /generate`` answers PNG images (base64 in JSON); ``GET /health`` reports
which registry version is loaded. Bad input gets a 4xx with a reason (pydantic
bounds, unknown labels), never a 5xx.
"""

import base64
import os

import torch
from fastapi import FastAPI, HTTPException
from ray import serve

from serving.schema import GenerateRequest, GenerateResponse, Health
from tasks.images import png_bytes, to_uint8

api = FastAPI(title="condgen", version="0.1.0")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Generator:
    def __init__(self, model_uri: str, tracking_uri: str):
        import mlflow

        from tasks.promote import load_registered

        mlflow.set_tracking_uri(tracking_uri)
        torch.set_num_threads(1)
        self.model, self.meta = load_registered(model_uri)
        self.num_classes = int(getattr(self.model.config, "num_classes", 10))
        if getattr(self.model.config, "condition", "label") != "label":
            raise ValueError(f"{model_uri} is text-conditioned; this endpoint serves label models")

    @api.get("/health", response_model=Health)
    def health(self) -> Health:
        return Health(status="ok", model=self.meta["name"], version=str(self.meta["version"]))

    @api.post("/generate", response_model=GenerateResponse)
    def generate(self, req: GenerateRequest) -> GenerateResponse:
        if req.label >= self.num_classes:
            raise HTTPException(status_code=422, detail=f"label must be in [0, {self.num_classes - 1}], got {req.label}")
        g = torch.Generator().manual_seed(req.seed)
        with torch.no_grad():
            x = self.model.sample(torch.full((req.n,), req.label, dtype=torch.long), generator=g)
        images = [base64.b64encode(png_bytes(img)).decode() for img in to_uint8(x)]
        return GenerateResponse(model=self.meta["name"], version=str(self.meta["version"]), label=req.label,
                                n=req.n, seed=req.seed, images=images)


def build_app(model_uri: str, tracking_uri: str | None = None):
    from condgen import settings

    return Generator.bind(model_uri, tracking_uri or settings.tracking_uri())


def run(model_uri: str, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True):
    """Start Ray (local unless RAY_ADDRESS), Serve's proxy on host:port, and the app."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(model_uri), name="condgen", route_prefix="/", blocking=False)
    if blocking:
        import time

        print(f"serving {model_uri} on http://{host}:{port}  (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle
