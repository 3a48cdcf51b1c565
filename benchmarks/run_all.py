"""Run the speed benchmarks one after another (``make bench``), each in its own process so
one's Ray instance or thread settings cannot affect the next.

    python -m benchmarks.run_all            # the speed ratios the README reports, full size
    python -m benchmarks.run_all --quick    # every benchmark's smoke size (minutes)

The quality benchmarks (``model_table``, ``diffusion_guidance``, ``diffusion_steps``,
``diffusion_inversion``, ``latent_map``, ``clip_quality``) train real models for tens of
minutes each on a CPU and are run on their own; the README gives each one's command.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

SPEED = [
    ("train_overhead", []),  # Ray Train vs bare loop; data loader vs trainer
    ("clip_precompute", []),  # precomputed vs on-the-fly text embeddings; embedding with 1 vs 2 workers
    ("cfg_batched", []),  # CFG in one forward vs two
    ("serve", []),  # batched vs unbatched serving
]
QUICK = {"train_overhead": ["--quick"], "clip_precompute": ["--quick"], "cfg_batched": ["--quick"],
         "serve": ["--seconds", "2", "--clients", "1,8"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", choices=[name for name, _ in SPEED])
    args = p.parse_args(argv)
    failed = []
    for name, extra in SPEED:
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *extra]
        if args.quick:
            cmd += QUICK.get(name, [])
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"=== {name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
