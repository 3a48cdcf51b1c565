"""The serving engine's batching gain without HTTP: N concurrent one-image requests run as
one ``tasks.generation.batching.sample_batch`` call vs one call per request.

    python benchmarks/engine_batching.py                   # CPU, one torch thread
    python3 benchmarks/engine_batching.py --device cuda    # a GPU (needs only torch)

This is the ceiling for ``benchmarks/serve.py``'s batched/unbatched ratio (the service
adds HTTP, JSON and PNG work per request that batching cannot share). Requests differ in
seed, label and CFG weight, as concurrent users' would; the diffusion model is the
serving benchmark's (U-Net ``channels=(8, 16)``, 10 DDIM steps, CFG), weights random
(timing only). Each N is timed as the median of alternating repeats.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", default="1,8,32,128")
    p.add_argument("--channels", default="8,16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig
    from condgen.tasks.generation.batching import SampleRequest, sample_batch

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = ConditionalDiffusion(DiffusionConfig(channels=tuple(int(c) for c in args.channels.split(",")),
                                                 timesteps=100)).eval().to(dev)

    def requests(n: int) -> list[SampleRequest]:
        return [SampleRequest(cond=torch.tensor([i % 10]), segments=[(i, 1)], guidance="cfg",
                              scale=1.0 + 0.1 * (i % 5), steps=args.steps) for i in range(n)]

    rows = []
    with torch.no_grad():
        sample_batch(model, requests(2))  # warm-up
        for n in [int(c) for c in args.clients.split(",")]:
            reqs = requests(n)
            times = {"batched": [], "one by one": []}
            for _ in range(args.repeats):
                for way in times:
                    sync()
                    t0 = time.perf_counter()
                    if way == "batched":
                        sample_batch(model, reqs)
                    else:
                        for r in reqs:
                            sample_batch(model, [r])
                    sync()
                    times[way].append(time.perf_counter() - t0)
            tb, t1 = statistics.median(times["batched"]), statistics.median(times["one by one"])
            rows.append((n, n / t1, n / tb, t1 / tb))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"\n{name}; U-Net channels=({args.channels}), {args.steps} DDIM steps, CFG\n")
    print("| concurrent requests | one by one (samples/s) | batched (samples/s) | batched / one by one |")
    print("|---:|---:|---:|---:|")
    for n, a, b, r in rows:
        print(f"| {n} | {a:,.1f} | {b:,.1f} | **{r:.1f}×** |")
    return {"rows": rows}


if __name__ == "__main__":
    main()
