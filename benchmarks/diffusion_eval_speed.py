"""How long the pipeline's evaluation of a diffusion model takes on CPU.

    python benchmarks/diffusion_eval_speed.py                       # trained benchmark model + default U-Net
    python benchmarks/diffusion_eval_speed.py --checkpoint URI      # a trained checkpoint, as it is configured
    python benchmarks/diffusion_eval_speed.py --n-per-class 25      # a quarter of the samples (time scales linearly)

``tasks.evaluate.evaluate_model`` draws 100 samples per class (1,000) with ``model.sample``:
DDIM with the config's ``sample_steps`` (50 by default) and CFG at ``guidance_scale`` (one
forward on 2B per step). The ``retrain`` flow runs it once per candidate and once more for the
champion (the promotion gate re-scores it), so this is the evaluation cost per flow run, twice.
Rows: the trained benchmark model (``diffusion_common.BENCH_DIFFUSION``) at 50 and 25 steps,
and the default ``DiffusionConfig`` U-Net (untrained: its timing is what matters, not its
accuracy). Also the per-epoch sample grid of the training loop (80 samples).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import diffusion_common as C  # noqa: E402


def with_config(model, **changes):
    """The same weights under a changed sampling config (sample_steps, guidance_scale)."""
    from condgen.models.diffusion import ConditionalDiffusion

    m = ConditionalDiffusion(dataclasses.replace(model.config, **changes))
    m.load_state_dict(model.state_dict())
    return m.eval()


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__)
    p.add_argument("--n-per-class", type=int, help="samples per class (the pipeline uses 100; --quick 2)")
    p.add_argument("--steps", default="50,25", help="sample_steps to time the trained model at")
    p.add_argument("--skip-default", action="store_true", help="do not time the default (32, 64) U-Net")
    p.add_argument("--default-n-per-class", type=int,
                   help="samples per class for the default U-Net (default: --n-per-class); time scales linearly")
    args = p.parse_args(argv)

    from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig
    from condgen.tasks.judging.evaluate import evaluate_model

    shards = C.setup(args)
    model, ckpt = C.diffusion_model(args, shards)
    scorer = C.Scorer.for_shards(shards)
    n_pc = args.n_per_class or (2 if args.quick else 100)
    print(f"machine: {C.machine()}")
    cases = [(f"trained {tuple(model.config.channels)}", with_config(model, sample_steps=int(s)))
             for s in args.steps.split(",") if s]
    if not args.skip_default:
        torch.manual_seed(0)
        cases.append(("default (32, 64), untrained", ConditionalDiffusion(DiffusionConfig()).eval()))
    rows, results = [], []
    for name, m in cases:
        conf = m.config
        trained = not name.startswith("default")
        t0 = time.perf_counter()
        r = evaluate_model(m, scorer.judge, scorer.test,
                           n_per_class=n_pc if trained else (args.default_n_per_class or n_pc))
        seconds = time.perf_counter() - t0
        n = r.n_samples
        grid_s = seconds / n * 80
        results.append({"model": name, "sample_steps": conf.sample_steps, "guidance_scale": conf.guidance_scale,
                        "n": n, "seconds": seconds, "acc": r.cond_accuracy if trained else None,
                        "fid": r.fid if trained else None})
        rows.append([name, conf.sample_steps, f"{conf.guidance_scale:g}", n, f"{seconds:.0f}",
                     f"{seconds * 1000 / n:.0f}", f"{grid_s:.0f}",
                     f"{100 * r.cond_accuracy:.1f}" if trained else "—", r.fid if trained else "—"])
        print(f"  {name} steps={conf.sample_steps}: {n} samples in {seconds:.0f}s", flush=True)
    print()
    print(C.table(["model", "sample_steps", "CFG w", "samples", "evaluate_model s",
                   "s per 1,000 samples", "training grid s / epoch (80)", "cond. accuracy %", "domain FID"], rows))
    C.write_json(args.json, {"checkpoint": ckpt, "threads": torch.get_num_threads(), "results": results})
    return {"results": results}


if __name__ == "__main__":
    main()
