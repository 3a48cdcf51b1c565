"""Serving benchmark: samples/s and p50/p99 latency at 1, 8 and 32 concurrent clients for

  (a) the raw model: ``tasks.generation.batching.sample_batch`` called directly with a batch of
      ``clients`` one-image requests (the best a server could do with perfect batching);
  (b) the Ray Serve app with request batching;
  (c) the same app with batching off (one request per forward pass).

Everything runs in this one process tree on 127.0.0.1: a private CONDGEN_HOME, MLflow on
SQLite, local Ray, Serve's proxy on a free port. Clients are asyncio tasks (httpx) in this
process, each sending one-image ``/v1/generate`` requests back to back for ``--seconds``;
requests carry different labels, seeds and CFG scales (so they are merely *compatible*,
not identical). Ratios printed at the end: (b)/(a) and (b)/(c) at the highest concurrency.

    python -m benchmarks.serve                       # the table (about 3 minutes on 2 cores)
    python -m benchmarks.serve --load-test 60        # + 32 clients for 60 s, must see zero errors
    python -m benchmarks.serve --json out.json       # also write the figures as JSON
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def body(i: int, steps: int, scale: float) -> dict:
    return {"label": i % 10, "seed": i, "n": 1, "guidance": "cfg", "scale": scale * (1 + (i % 3) / 2),
            "steps": steps}


def bench_raw(model, clients: int, seconds: float, steps: int, scale: float) -> dict:
    import torch

    from condgen.tasks.generation import batching as bs

    lat, done, i = [], 0, 0
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        reqs = []
        for _ in range(clients):
            b = body(i, steps, scale)
            reqs.append(bs.SampleRequest(cond=torch.tensor([b["label"]]), segments=[(b["seed"], 1)], guidance="cfg",
                                         scale=b["scale"], steps=steps))
            i += 1
        s = time.perf_counter()
        bs.sample_batch(model, reqs)
        lat += [time.perf_counter() - s] * clients
        done += clients
    wall = time.perf_counter() - t0
    return {"samples_s": done / wall, "p50_ms": 1000 * pct(lat, .5), "p99_ms": 1000 * pct(lat, .99), "errors": 0,
            "requests": done}


async def _clients(url: str, clients: int, seconds: float, steps: int, scale: float) -> dict:
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as http:
        t_end = time.perf_counter() + seconds

        async def one() -> None:
            while time.perf_counter() < t_end:
                b = body(next(counter), steps, scale)
                s = time.perf_counter()
                try:
                    r = await http.post("/v1/generate", json=b)
                    ok = r.status_code == 200
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    ok, key = False, type(exc).__name__
                if ok:
                    lat.append(time.perf_counter() - s)
                else:
                    errors[key] = errors.get(key, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(clients)])
        wall = time.perf_counter() - t0
    return {"samples_s": len(lat) / wall, "p50_ms": 1000 * pct(lat, .5), "p99_ms": 1000 * pct(lat, .99),
            "errors": sum(errors.values()), "error_kinds": errors, "requests": len(lat)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--channels", default="8,16", help="U-Net widths of the benchmark diffusion model")
    p.add_argument("--timesteps", type=int, default=100)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per request")
    p.add_argument("--scale", type=float, default=1.5, help="CFG weight (varied per request around this)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (raw model and replica alike)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--load-test", type=float, default=0, help="then N seconds of 32 clients; report errors")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    home = Path(tempfile.mkdtemp(prefix="condgen-bench-serve-"))
    os.environ["CONDGEN_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("CONDGEN_API_KEY", None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    import ray
    import torch
    from ray import serve

    from condgen.serving.app import make_config, run
    from tests.registry_helpers import register_tiny

    torch.set_num_threads(args.threads)
    cfg = {"channels": tuple(int(c) for c in args.channels.split(",")), "timesteps": args.timesteps}
    register_tiny("bench-diffusion", "diffusion", cfg, seed=0)
    from condgen.tasks.io import settings
    from condgen.tasks.io.model_store import load_registered

    __import__("mlflow").set_tracking_uri(settings.tracking_uri())
    model, _ = load_registered("models:/bench-diffusion@champion")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: diffusion {cfg}, {n_params:,} parameters; {args.steps} DDIM steps, CFG; "
          f"torch threads {args.threads}; {os.cpu_count()} CPUs", flush=True)

    results: dict[str, dict] = {"raw": {}, "batched": {}, "unbatched": {}}
    for c in clients:
        results["raw"][c] = bench_raw(model, c, args.seconds, args.steps, args.scale)
        print(f"  raw        clients={c:3d} {results['raw'][c]}", flush=True)

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for mode, batching in (("batched", True), ("unbatched", False)):
        config = make_config(["models:/bench-diffusion@champion"], batching=batching, max_batch=args.max_batch,
                             torch_threads=args.threads, poll_s=0, request_timeout_s=120, batch_wait_ms=2.0)
        run(port=port, blocking=False, config=config, name="bench")
        asyncio.run(_clients(url, 2, 2.0, args.steps, args.scale))  # warm-up
        for c in clients:
            results[mode][c] = asyncio.run(_clients(url, c, args.seconds, args.steps, args.scale))
            print(f"  {mode:10s} clients={c:3d} {results[mode][c]}", flush=True)
        if mode == "batched" and args.load_test:
            lt = asyncio.run(_clients(url, 32, args.load_test, args.steps, args.scale))
            results["load_test"] = {"clients": 32, "seconds": args.load_test, **lt}
            print(f"  load test  32 clients x {args.load_test:g}s: {lt}", flush=True)
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()

    print("\n| mode | clients | samples/s | p50 ms | p99 ms | errors |\n|---|---:|---:|---:|---:|---:|")
    for mode in ("raw", "batched", "unbatched"):
        for c in clients:
            r = results[mode][c]
            print(f"| {mode} | {c} | {r['samples_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |")
    top = max(clients)
    b, a, u = (results[m][top]["samples_s"] for m in ("batched", "raw", "unbatched"))
    ratios = {"batched_over_raw": b / a, "batched_over_unbatched": b / u}
    print(f"\nat {top} clients: batched / raw = {ratios['batched_over_raw']:.2f} (target >= 0.8), "
          f"batched / unbatched = {ratios['batched_over_unbatched']:.2f} (target >= 4)")
    if "load_test" in results:
        lt = results["load_test"]
        print(f"load test: {lt['requests']} requests in {lt['seconds']:g}s from 32 clients, {lt['errors']} errors")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "ratios": ratios},
                                              indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
