"""Classifier-free guidance: one forward on the concatenated batch [x; x] vs two forwards.

    python benchmarks/cfg_batched.py                          # the default and the benchmark U-Net
    python benchmarks/cfg_batched.py --checkpoint URI         # a trained model's architecture
    python benchmarks/cfg_batched.py --quick                  # smoke run, seconds

``models.diffusion.cfg`` evaluates eps(x, c) and eps(x, null) in ONE network call on 2B rows
(Ho & Salimans 2022, Algorithm 2 needs both per step); the alternative calls the network twice
on B rows. Both are timed as whole DDIM sampling runs, alternating, and the median of the
repeats is reported per batch size; the outputs are checked to agree. Weights do not matter
for timing, so no training is needed. The win is per-call overhead (Python, kernel launches,
small-batch inefficiency), so it is largest at small batches; on a CPU whose cores are already
busy at batch B the two layouts converge towards 1x. Target: >= 1.6x.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import diffusion_common as C  # noqa: E402


def two_forward_cfg(denoiser, scale: float, null_cond: torch.Tensor):
    """The unbatched reference: eps(x, c) and eps(x, null) as two separate network calls."""
    w = float(scale)

    def guided(x, t, cond):
        u = null_cond.expand(x.shape[0], *null_cond.shape[1:])
        return (1 + w) * denoiser(x, t, cond) - w * denoiser(x, t, u)

    return guided


def main(argv: list[str] | None = None) -> dict:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="time this trained model's architecture instead of the two configs below")
    p.add_argument("--batch-sizes", default="1,4,16,64,256")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda (timings synchronise the device)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig, cfg, sample_ddim

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if args.checkpoint:
        from condgen.tasks.io.model_store import load_trained

        models = {"checkpoint": load_trained(args.checkpoint)[0]}
    else:
        models = {}
        for name, channels in (("default U-Net (32, 64)", (32, 64)),
                               ("benchmark U-Net (16, 32, 32)", tuple(C.BENCH_DIFFUSION["channels"]))):
            torch.manual_seed(0)
            m = ConditionalDiffusion(DiffusionConfig(channels=channels))
            with torch.no_grad():  # non-zero output layer, so the agreement check means something
                for prm in m.parameters():
                    prm.add_(0.02 * torch.randn_like(prm))
            models[name] = m.eval()
    models = {k: m.to(dev) for k, m in models.items()}
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    steps, repeats = (2, 2) if args.quick else (args.steps, args.repeats)
    if args.quick:
        sizes = sizes[:2]
    print(f"machine: {C.machine()}" + (f", {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""))
    print(f"DDIM {steps} steps per run, CFG w={args.scale}, median of {repeats} alternating repeats", flush=True)

    rows, results = [], []
    for name, model in models.items():
        D, sched = model.denoiser(), model.schedule
        null = model.null_embedding(1)
        batched, two = cfg(D, args.scale, null), two_forward_cfg(D, args.scale, null)
        for b in sizes:
            g = torch.Generator().manual_seed(b)
            x_T = torch.randn(b, 1, 28, 28, generator=g).to(dev)
            e = model.embed_condition(torch.arange(b, device=dev) % model.config.num_classes).detach()
            run = {"batched": lambda: sample_ddim(batched, x_T, sched, cond=e, steps=steps),
                   "two": lambda: sample_ddim(two, x_T, sched, cond=e, steps=steps)}
            with torch.no_grad():
                a, c = run["batched"](), run["two"]()  # warm-up and agreement
                agree = float((a - c).abs().max())
                times = {"batched": [], "two": []}
                for _ in range(repeats):
                    for key in ("two", "batched"):
                        sync()
                        t0 = time.perf_counter()
                        run[key]()
                        sync()
                        times[key].append(time.perf_counter() - t0)
            tb, tt = statistics.median(times["batched"]), statistics.median(times["two"])
            results.append({"model": name, "batch": b, "batched_s": tb, "two_s": tt, "speedup": tt / tb,
                            "max_abs_diff": agree})
            rows.append([name, b, f"{1000 * tt / steps:.1f}", f"{1000 * tb / steps:.1f}", f"{tt / tb:.2f}x",
                         f"{agree:.1e}"])
            print(f"  {name} B={b}: two forwards {tt:.3f}s  one 2B forward {tb:.3f}s  -> {tt / tb:.2f}x", flush=True)
    print()
    print(C.table(["model", "batch B", "two forwards, ms/step", "one 2B forward, ms/step", "speed-up",
                   "max |difference|"], rows))
    C.write_json(args.json, {"steps": steps, "repeats": repeats, "results": results})
    return {"results": results}


if __name__ == "__main__":
    main()
