"""Latent directions for size, position and hue on ``bundled:shapes`` (issue #15 item 4), CVAE and cGAN.

InterFaceGAN (Shen et al. 2020, seed 000) with the shapes checker as the attribute reader
(``tasks/judging/shapes_directions.py``): a label-conditioned CVAE and cGAN are trained in-process
(the Ray worker's loop pieces, as ``benchmarks/latent_map.py`` does), then

* CVAE: side, cx, cy and hue offset are measured on the decodes of the posterior means of real
  train images and regressed on those means;
* cGAN: z ~ N(0, I) under seen labels, generate, measure, regress (no inversion);

both: raw and orthogonalised directions, calibrated to +1 std per unit strength, edits at
``--strengths``, the leakage table (change of every measured attribute per unit strength, std
units) and the share of edits that keep the checker's discrete classes (shape and colour must
not change). One edit-strip PNG per model, variant and direction goes to ``--out`` (rows:
latents; columns: strengths).

    .venv/bin/python -m benchmarks.shapes_directions --quick          # smoke run, < 3 min on one core
    .venv/bin/python -m benchmarks.shapes_directions --out /tmp/shapes-directions --json /tmp/sdir.json

Budget of the default run (10,000 shapes, 6,500 train images): one epoch cost 3.8 ms per image for the
(32, 64) CVAE and 15 ms for the (64, 128) cGAN on the shared 2-core machine (load average ~10, one
thread), so ~12 min for 30 CVAE epochs + ~25 min for 15 cGAN epochs + a few minutes of study:
~40 min wall (extrapolated from one-epoch probes, not a measured full run). ``--quick`` measured 136 s
wall, 53 s CPU. The quick models are too weak for the figures to mean much (the checker reads the
label's colour on 57 % of the CVAE's and 35 % of the cGAN's decodes): it is a smoke run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.latent_map import train_in_process
from benchmarks.shapes_text import add_shard_args, fill_budget, ingest_shapes  # one cached set per (n, size, seed)
from condgen.tasks.data.splits import load_arrays, load_split
from condgen.tasks.io.images import from_uint8, png_bytes, to_uint8
from condgen.tasks.judging import shapes_checker as sc
from condgen.tasks.judging import shapes_directions as sd
from condgen.tasks.judging.latent_maps import latent_space

QUICK = {"n": 1200, "cvae_epochs": 30, "gan_epochs": 10, "cvae_channels": "16,32", "gan_channels": "32,64",
         "n_regress": 400, "n_edit": 40}
FULL = {"n": 10_000, "cvae_epochs": 30, "gan_epochs": 15, "cvae_channels": "32,64", "gan_channels": "64,128",
        "n_regress": 3000, "n_edit": 200}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1200 shapes, small models, few epochs and edits")
    add_shard_args(p, QUICK, FULL)
    p.add_argument("--models", default="cvae,cgan", help="which of cvae, cgan to study")
    p.add_argument("--cvae-epochs", type=int)
    p.add_argument("--gan-epochs", type=int)
    p.add_argument("--cvae-channels", help="CVAE widths per level (default 32,64; --quick 16,32)")
    p.add_argument("--gan-channels", help="cGAN widths per level (default 64,128; --quick 32,64)")
    p.add_argument("--cvae-latent", type=int, default=8)
    p.add_argument("--gan-latent", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-regress", type=int, help="latents the directions are regressed on (default 3000)")
    p.add_argument("--n-edit", type=int, help="latents edited per direction (default 200; --quick 40)")
    p.add_argument("--strengths", default="-2,-1,0,1,2", help="edit strengths, std of the asked attribute (write --strengths=-3,0,3: a leading minus)")
    p.add_argument("--method", default="projection", choices=["projection", "gram_schmidt"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/shapes-directions", help="folder for the edit strips (PNG)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    return fill_budget(args, QUICK, FULL)


def widths(text: str) -> list[int]:
    return [int(w) for w in text.split(",")]


def label_agreement(space, z: torch.Tensor, c: torch.Tensor) -> dict[str, float]:
    """How often the checker reads the label's colour and shape on the unedited decodes (model sanity)."""
    from condgen.tasks.data.shapes import CLASS_NAMES

    readings = sc.measure_batch(to_uint8(space.decode_all(z.float(), c)))
    asked = [dict(zip(("colour", "shape"), CLASS_NAMES[int(k)].split())) for k in c]
    return {k: v for k, v in sc.accuracy(readings, asked, ("colour", "shape")).items()}


def save_strips(study: sd.ShapesDirectionStudy, out: Path, tag: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, img in study.strips.items():
        path = out / f"{tag}-{key.replace('/', '-')}.png"
        path.write_bytes(png_bytes(img))
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start, timings = time.perf_counter(), {}
    shards = ingest_shapes(args)
    arrays = load_arrays(shards, "train")
    train = load_split(shards, "train")
    timings["ingest"] = time.perf_counter() - t_start
    seen = sorted({int(k) for k in train["y"]})
    print(f"shards {shards}: {len(train['y'])} train images, {len(seen)} seen classes", flush=True)
    base = {"image_size": args.size, "in_channels": 3, "num_classes": 18}
    configs = {"cvae": {**base, "channels": widths(args.cvae_channels), "latent_dim": args.cvae_latent, "cond_dim": 16},
               "cgan": {**base, "channels": widths(args.gan_channels), "latent_dim": args.gan_latent, "cond_dim": 32}}
    epochs = {"cvae": args.cvae_epochs, "cgan": args.gan_epochs}
    strengths = [float(s) for s in args.strengths.split(",")]
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(train["y"]))[:args.n_regress]
    x, y = from_uint8(train["x"][pick]), torch.from_numpy(train["y"][pick].astype(np.int64))
    results, strips = {}, {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        print(f"\n== {name}: {configs[name]}, {epochs[name]} epochs ==", flush=True)
        model = train_in_process(name, configs[name], arrays, epochs=epochs[name], batch_size=args.batch_size,
                                 seed=args.seed)
        timings[f"train_{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        space = latent_space(model, name=name)
        z, c = sd.study_latents(space, x=x, y=y, n=args.n_regress, classes=seen, seed=args.seed)
        agree = label_agreement(space, z, c)
        study = sd.direction_study(space, z, c, strengths=strengths, n_edit=args.n_edit, seed=args.seed,
                                   method=args.method)
        timings[f"study_{name}"] = time.perf_counter() - t0
        strips[name] = save_strips(study, Path(args.out), name)
        print(f"checker reads the label on the unedited decodes: colour {agree['colour']:.3f}, "
              f"shape {agree['shape']:.3f}")
        print(study.markdown())
        print("summary:", {k: round(v, 4) for k, v in study.summary().items()})
        results[name] = {"config": configs[name], "epochs": epochs[name], "label_agreement": agree,
                         "study": study.to_json()}
    print(f"\nedit strips: {args.out}/<model>-<variant>-<attribute>.png (rows: latents; columns: strengths "
          f"{strengths})")
    timings["total"] = time.perf_counter() - t_start
    timings["total_cpu"] = time.process_time()
    print("timings (s, wall unless named cpu):", {k: round(v, 1) for k, v in timings.items()})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "strips": strips,
                                               "timings": timings}, indent=2, default=float))


if __name__ == "__main__":
    main()
