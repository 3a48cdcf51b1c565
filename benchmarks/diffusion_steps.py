"""DDIM with few steps vs DDPM ancestral sampling over the full chain: quality and wall time.

    python benchmarks/diffusion_steps.py                    # trains (or reuses) the benchmark model
    python benchmarks/diffusion_steps.py --checkpoint URI   # a trained diffusion checkpoint
    python benchmarks/diffusion_steps.py --quick            # smoke run, ~1 min

One table, every row on the same conditions (n per class) from the same seed, in one process:
DDIM (eta = 0, Song et al. 2021) with 10 / 25 / 50 / 100 steps, DDPM ancestral (Ho et al. 2020,
Algorithm 2) over all T = 1000 steps, and DDPM respaced to few steps for contrast (Nichol &
Dhariwal 2021). Columns: conditional accuracy of the judge (with its binomial standard error),
domain FID against the real test split, network evaluations, wall time and speed-up over
full DDPM. Guidance is off by default (``--scale``): it costs every row the same factor 2.

Target (issue "Conditional diffusion"): 25 DDIM steps >= 30x faster than full ancestral
sampling, with conditional accuracy within 1 point.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import diffusion_common as C  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__)
    p.add_argument("--n-per-class", type=int, help="samples per class for every row (default 10; --quick 2)")
    p.add_argument("--ddim-steps", default="10,25,50,100")
    p.add_argument("--ddpm-respaced", default="25,100", help="DDPM on a respaced chain of these lengths ('' = none)")
    p.add_argument("--scale", type=float, default=0.0, help="CFG weight for every row (0 = the conditional model)")
    args = p.parse_args(argv)

    from condgen.tasks.generation.sampling import sample_images

    shards = C.setup(args)
    model, ckpt = C.diffusion_model(args, shards)
    scorer = C.Scorer.for_shards(shards)
    n_pc = args.n_per_class or (2 if args.quick else 10)
    labels = C.balanced_labels(n_pc, model.config.num_classes)
    cond = torch.from_numpy(labels)
    T = model.config.timesteps
    guidance = "cfg" if args.scale else "none"
    fwd = 2 if args.scale else 1  # CFG: one forward on 2B = two network evaluations per sample per step

    runs = [("DDIM", int(s)) for s in args.ddim_steps.split(",") if s]
    runs += [("DDPM", T)] + [("DDPM", int(s)) for s in args.ddpm_respaced.split(",") if s]
    print(f"machine: {C.machine()}")
    print(f"model: {ckpt}  channels {model.config.channels}  T={T}; {len(labels)} samples per row, "
          f"guidance {guidance} (w={args.scale}), seed {args.seed}", flush=True)
    results = []
    for name, steps in runs:
        kw = dict(sampler=name.lower(), steps=steps, guidance=guidance, scale=args.scale if args.scale else None,
                  seed=args.seed, batch_size=len(labels), progress=False)
        sample_images(model, cond[:2], **{**kw, "steps": 1})  # warm-up: first-call allocations, thread pools
        x, seconds = C.timed(sample_images, model, cond, **kw)
        s = scorer.score(x, labels)
        results.append({"sampler": name, "steps": steps, "nfe": steps * fwd, "seconds": seconds, **s})
        print(f"  {name} {steps:>4} steps: acc {s['acc']:.3f}  FID {s['fid']:.2f}  {seconds:.1f}s", flush=True)

    full = next(r for r in results if r["sampler"] == "DDPM" and r["steps"] == T)
    rows = []
    for r in results:
        label = f"{r['sampler']} {r['steps']}" + (" (full chain)" if r is full else "")
        rows.append([label, r["nfe"], f"{100 * r['acc']:.1f} ± {100 * r['acc_se']:.1f}", r["fid"],
                     f"{r['seconds']:.1f}", f"{full['seconds'] / r['seconds']:.1f}x"])
    floor = scorer.real_fid(len(labels))
    print()
    print(C.table(["sampler, steps", "network evals / sample", "cond. accuracy % (± s.e.)",
                   "domain FID", "wall s", "speed-up vs DDPM full"], rows))
    print(f"\nFID reference: {len(labels)} real train images vs the test split = {floor:.2f} "
          f"(FID is biased upwards at small n; compare rows, not papers)")
    d25 = next((r for r in results if r["sampler"] == "DDIM" and r["steps"] == 25), None)
    if d25 is not None:
        speed = full["seconds"] / d25["seconds"]
        gap = 100 * (d25["acc"] - full["acc"])
        se = 100 * (d25["acc_se"] ** 2 + full["acc_se"] ** 2) ** 0.5
        print(f"target: DDIM 25 is {speed:.1f}x faster than DDPM {T} (target >= 30x: "
              f"{'met' if speed >= 30 else 'NOT met'}); accuracy {gap:+.1f} points (target within 1 point: "
              f"{'met' if abs(gap) <= 1 else 'NOT met'}; the difference's s.e. at this n is {se:.1f} points)")
    payload = {"checkpoint": ckpt, "n": len(labels), "scale": args.scale, "results": results, "fid_floor": floor}
    C.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
