"""Latent vs pixel diffusion at a small CPU budget, and what a ControlNet adds, measured in one run.

    python -m benchmarks.latent_vs_pixel --quick     # smoke run, ~3-4 min on 2 busy cores
    python -m benchmarks.latent_vs_pixel             # ~10 min on 2 cores (more when the cores are shared)
    python -m benchmarks.latent_vs_pixel --equal-time   # latent gets the pixel model's wall-clock, not its steps

Steps (all in this process, with the pipeline's optimiser set-up, ``tasks.train.make_optimizers``):

1. bundled MNIST shards (``tasks.ingest.ingest("bundled:mnist", ...)``), the judge of
   ``tasks.evaluate.get_judge`` (the classifier the ``retrain`` flow scores with);
2. a KL autoencoder 28x28x1 -> 7x7x4 (``models.autoencoder``; or ``--autoencoder URI``), and
   its latents precomputed once with ``tasks.latents.precompute_latents``;
3. pixel diffusion (``models.diffusion.ConditionalDiffusion``) and latent diffusion
   (``models.latent_diffusion.LatentDiffusion``, trained on the cached latents) for the same
   number of steps and batch size (``--equal-time``: the same wall-clock instead);
4. per model: mean training-step time (the latent one also with on-the-fly encoding),
   sampling time for a batch, and ``tasks.evaluate.evaluate_model``: conditional accuracy
   and domain FID on the same fixed seed set;
5. a ControlNet (``models.controlnet``) on the trained pixel model, trained on edge maps
   (``models.paired.edge_map``), scored by the IoU of the edge map of each sample with the
   control edges it was given, against the unconditioned base (same labels, same seeds),
   and against a reference: the edges of another real test digit of the same class.

Budgets are deliberately small (minutes, not hours): the figures compare the two set-ups at
the same small budget; they are not the quality either reaches when trained to convergence.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from benchmarks import diffusion_common as C
from benchmarks.autoencoder import evaluate_autoencoder, fit, image_batches, train_autoencoder


def latent_batches(x: np.ndarray, y: np.ndarray, z: np.ndarray, batch_size: int):
    from condgen.tasks.io.images import from_uint8

    def sample(rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, len(y), batch_size)
        return {"x": from_uint8(x[idx]), "y": torch.from_numpy(y[idx]).long(), "z": torch.from_numpy(z[idx])}

    return sample


def fit_for(model, sample_batch, seconds: float, seed: int, max_steps: int = 1_000_000) -> dict[str, Any]:
    """Train for a wall-clock budget (``--equal-time``), one step at a time."""
    from condgen.tasks.training.worker import make_opt_step, make_optimizers

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt_step = make_opt_step(make_optimizers(model))
    model.train()
    t_start, in_step, steps, logs = time.perf_counter(), 0.0, 0, {}
    while time.perf_counter() - t_start < seconds and steps < max_steps:
        batch = sample_batch(rng)
        t0 = time.perf_counter()
        logs = model.train_step(batch, opt_step)
        in_step += time.perf_counter() - t0
        steps += 1
    model.eval()
    return {"seconds": time.perf_counter() - t_start, "step_s": in_step / max(steps, 1), "steps": steps, "last": logs}


def edge_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of two {-1, 1} edge maps (+1 = edge), (B, 1, H, W) -> (B,)."""
    a, b = (a > 0).flatten(1), (b > 0).flatten(1)
    inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def timed_sample(model, labels: torch.Tensor, seed: int, **kw) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    x = model.sample(labels, torch.Generator().manual_seed(seed), **kw)
    return x, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="an ingested shard set URI (default: ingest bundled:mnist to a temp dir)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets everywhere")
    p.add_argument("--autoencoder", help="a trained autoencoder checkpoint URI (default: train one now)")
    p.add_argument("--ae-steps", type=int, help="autoencoder training steps (default 200; --quick 30)")
    p.add_argument("--ae-channels", default="16,32")
    p.add_argument("--steps", type=int, help="diffusion training steps, each model (default 300; --quick 30)")
    p.add_argument("--equal-time", action="store_true", help="train latent for the pixel model's wall-clock")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pixel-channels", default="16,32,32", help="pixel U-Net widths: 28 -> 14 -> 7")
    p.add_argument("--latent-channels", default="32,64", help="latent U-Net widths: 7 -> 4")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sample-steps", type=int, help="DDIM steps (default 20; --quick 10)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG weight w (0 = off)")
    p.add_argument("--eval-per-class", type=int, help="samples per class for accuracy/FID (default 20; --quick 5)")
    p.add_argument("--controlnet-steps", type=int, help="ControlNet training steps (default 120; --quick 15)")
    p.add_argument("--iou-images", type=int,
                   help="test digits whose edges control the samples (default 100; --quick 20)")
    p.add_argument("--judge-epochs", type=int, help="judge training epochs (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine, intra-op spin-waits cost more than they give)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    q = args.quick
    ae_steps = args.ae_steps or (30 if q else 200)
    steps = args.steps or (30 if q else 300)
    sample_steps = args.sample_steps or (10 if q else 20)
    per_class = args.eval_per_class or (5 if q else 20)
    cn_steps = args.controlnet_steps or (15 if q else 120)
    n_iou = args.iou_images or (20 if q else 100)
    judge_epochs = args.judge_epochs or (1 if q else 2)

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    torch.set_num_threads(args.threads)
    from condgen.models.controlnet import ControlNet, ControlNetConfig
    from condgen.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
    from condgen.models.paired import edge_map
    from condgen.models.registry import build_model
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.data.latents import load_autoencoder, load_latent_split, precompute_latents
    from condgen.tasks.data.splits import load_split
    from condgen.tasks.io.images import from_uint8
    from condgen.tasks.judging.evaluate import evaluate_model, get_judge, predict

    t_run = time.perf_counter()
    shards = args.shards
    if shards is None:
        import tempfile

        shards = tempfile.mkdtemp(prefix="condgen-lvp-")
        ingest("bundled:mnist", shards, shard_size=1000)
    test = load_split(shards, "test")
    test = {"x": test["x"], "y": test["y"].astype(np.int64)}
    t0 = time.perf_counter()
    judge = get_judge(shards, epochs=judge_epochs, log_to_mlflow=False)
    print(f"data {shards}; judge test accuracy {judge.test_accuracy:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    budget = {"ae_steps": ae_steps, "steps": steps, "sample_steps": sample_steps, "eval_per_class": per_class,
              "controlnet_steps": cn_steps, "iou_images": n_iou}
    out: dict[str, Any] = {"args": vars(args), "budget": budget, "judge_test_accuracy": judge.test_accuracy}

    # -- first stage ------------------------------------------------------------------------------
    if args.autoencoder:
        ae = load_autoencoder(args.autoencoder)
        out["autoencoder"] = {"checkpoint": args.autoencoder}
    else:
        train_x = load_split(shards, "train")["x"]
        ae, run = train_autoencoder(train_x, {"channels": [int(c) for c in args.ae_channels.split(",")],
                                              "regularization": "kl", "lr": args.lr},
                                    steps=ae_steps, batch_size=args.batch_size, seed=args.seed,
                                    log_every=max(ae_steps // 2, 1), name="autoencoder")
        from condgen.tasks.io import checkpoint as ckpt_io
        from condgen.tasks.io import storage

        ae_uri = storage.join(shards, "bench-autoencoder", ckpt_io.state_fingerprint(ae)[:16])
        ckpt_io.save_checkpoint(storage.local_path(ae_uri), ae)  # reuse with --autoencoder (local shards only)
        out["autoencoder"] = {"train": run, "checkpoint": ae_uri}
        print(f"autoencoder checkpoint: {ae_uri}", flush=True)
    out["autoencoder"]["test"] = evaluate_autoencoder(ae, test["x"])
    lat = precompute_latents(shards, ae)
    out["autoencoder"]["precompute_s"] = lat.seconds
    train = load_latent_split(shards, "train", lat.fingerprint)
    print(f"autoencoder: test MSE {out['autoencoder']['test']['mse']:.4f}, latents {lat.latent_shape} for "
          f"{lat.n_samples} digits in {lat.seconds:.1f}s -> {lat.uri}", flush=True)

    # -- pixel and latent diffusion -------------------------------------------------------------------
    common = {"lr": args.lr, "sample_steps": sample_steps, "guidance_scale": args.guidance}
    torch.manual_seed(args.seed)
    pixel = build_model("diffusion", {**common, "channels": [int(c) for c in args.pixel_channels.split(",")]})
    torch.manual_seed(args.seed)
    latent_widths = tuple(int(c) for c in args.latent_channels.split(","))
    latent = LatentDiffusion(LatentDiffusionConfig(**common, channels=latent_widths), autoencoder=ae)
    on_the_fly = copy.deepcopy(latent)  # the same model, fed x (encoded every step) instead of cached z

    pix_batches = image_batches(train["x"], train["y"], args.batch_size)
    runs = {"pixel": fit(pixel, pix_batches, steps, args.seed, max(steps // 2, 1), "pixel")}
    lat_batches = latent_batches(train["x"], train["y"], train["z"], args.batch_size)
    if args.equal_time:
        runs["latent"] = fit_for(latent, lat_batches, runs["pixel"]["seconds"], args.seed)
    else:
        runs["latent"] = fit(latent, lat_batches, steps, args.seed, max(steps // 2, 1), "latent")
    otf = fit(on_the_fly, pix_batches, min(10, steps), args.seed)

    labels = torch.arange(10).repeat_interleave(10)  # 100 samples: the sampling-time batch
    models = {"pixel": pixel, "latent": latent}
    for name, model in models.items():
        trained_params = sum(p.numel() for p in model.optimizer_groups()["main"])
        r = out[name] = {"train": runs[name], "params_trained": trained_params}
        _, r["sample_100_s"] = timed_sample(model, labels, args.seed)
        t0 = time.perf_counter()
        ev = evaluate_model(model, judge, test, n_per_class=per_class, batch_size=250)
        r["eval"] = {"cond_accuracy": ev.cond_accuracy, "fid": ev.fid, "mean_confidence": ev.mean_confidence,
                     "n_samples": ev.n_samples, "seconds": time.perf_counter() - t0}
        print(f"[{name}] {runs[name]['steps']} steps, {runs[name]['step_s'] * 1000:.0f} ms/step; 100 samples in "
              f"{r['sample_100_s']:.1f}s; accuracy {ev.cond_accuracy:.3f}, FID {ev.fid:.2f}", flush=True)
    out["latent"]["on_the_fly_step_s"] = otf["step_s"]

    # references for FID / accuracy at this sample size: real test digits
    _, real_feats = predict(judge.model, from_uint8(test["x"]))
    n_eval = 10 * per_class
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(test["y"]), size=min(n_eval, len(test["y"])), replace=False)
    probs, feats = predict(judge.model, from_uint8(test["x"][idx]))
    from condgen.tasks.judging.evaluate import frechet_distance

    out["real_reference"] = {"accuracy": float((probs.argmax(-1).numpy() == test["y"][idx]).mean()),
                             "fid_same_size": frechet_distance(feats.numpy().astype(np.float64),
                                                               real_feats.numpy().astype(np.float64)), "n": len(idx)}

    # -- ControlNet on the pixel model -------------------------------------------------------------
    torch.manual_seed(args.seed)
    cn = ControlNet(ControlNetConfig(lr=args.lr), base=pixel)
    from condgen.tasks.io import checkpoint as ckpt_io

    base_hash = ckpt_io.state_fingerprint(pixel)
    cn_run = fit(cn, pix_batches, cn_steps, args.seed, max(cn_steps // 2, 1), "controlnet")
    assert ckpt_io.state_fingerprint(pixel) == base_hash, "the ControlNet base changed during training"
    xs, ys = from_uint8(test["x"][:n_iou]), torch.from_numpy(test["y"][:n_iou])
    control = edge_map(xs)
    controlled, cn_s = timed_sample(cn, ys, args.seed + 1, control=control)
    uncontrolled, _ = timed_sample(cn, ys, args.seed + 1)  # control=None: the frozen base itself
    # reference: edges of another real test digit of the same class (a pairing by chance at the class level)
    perm = np.arange(n_iou)
    for c in np.unique(ys.numpy()):
        where = np.flatnonzero(ys.numpy() == c)
        perm[where] = np.roll(where, 1)
    iou = {"controlnet": edge_iou(edge_map(controlled), control), "base": edge_iou(edge_map(uncontrolled), control),
           "real_same_class": edge_iou(control[torch.from_numpy(perm)], control)}
    acc = {k: float((predict(judge.model, s)[0].argmax(-1) == ys).float().mean())
           for k, s in (("controlnet", controlled), ("base", uncontrolled))}
    out["controlnet"] = {"train": cn_run, "sample_s": cn_s, "base_unchanged": True,
                         "params_trained": sum(p.numel() for p in cn.optimizer_groups()["main"]),
                         "iou": {k: float(v.mean()) for k, v in iou.items()},
                         "iou_se": {k: float(v.std() / len(v) ** 0.5) for k, v in iou.items()}, "accuracy": acc}
    out["seconds"] = time.perf_counter() - t_run

    # -- report ------------------------------------------------------------------------------------
    pr, lr_ = out["pixel"], out["latent"]
    equal = " (latent: equal wall-clock)" if args.equal_time else ""
    print(f"\nbudget: {steps} steps x batch {args.batch_size}{equal}; "
          f"DDIM {sample_steps} steps, CFG w={args.guidance}; {10 * per_class} samples for accuracy/FID; "
          f"{args.threads} thread(s); whole run {out['seconds']:.0f}s")
    print(f"{'':22s} {'pixel':>10s} {'latent':>10s} {'pixel/latent':>12s}")
    rows = [("train steps", pr["train"]["steps"], lr_["train"]["steps"]),
            ("ms / train step", pr["train"]["step_s"] * 1e3, lr_["train"]["step_s"] * 1e3),
            ("  (latent, encoding x)", float("nan"), lr_["on_the_fly_step_s"] * 1e3),
            ("s / 100 samples", pr["sample_100_s"], lr_["sample_100_s"]),
            ("trained params", pr["params_trained"], lr_["params_trained"]),
            ("cond. accuracy", pr["eval"]["cond_accuracy"], lr_["eval"]["cond_accuracy"]),
            ("FID (judge features)", pr["eval"]["fid"], lr_["eval"]["fid"])]
    for label, a, b in rows:
        ratio = a / b if b and not (isinstance(a, float) and np.isnan(a)) else float("nan")
        print(f"{label:22s} {a:10.3f} {b:10.3f} {ratio:12.2f}")
    ref = out["real_reference"]
    print(f"reference, {ref['n']} real test digits: judge accuracy {ref['accuracy']:.3f}, "
          f"FID {ref['fid_same_size']:.2f}; "
          f"autoencoder test MSE {out['autoencoder']['test']['mse']:.4f} (latent {lat.latent_shape}, "
          f"{out['autoencoder']['test']['compression_dims']:.0f}x fewer dims)")
    c = out["controlnet"]
    print(f"\nControlNet on the pixel model: {cn_steps} steps ({c['train']['step_s'] * 1e3:.0f} ms/step, "
          f"{c['params_trained']} trained params; base weights unchanged)")
    print(f"edge IoU with the control, {n_iou} test digits:  ControlNet {c['iou']['controlnet']:.3f} "
          f"± {c['iou_se']['controlnet']:.3f}   base (no control) {c['iou']['base']:.3f} ± {c['iou_se']['base']:.3f}   "
          f"another real digit of the class {c['iou']['real_same_class']:.3f}")
    print(f"judge accuracy of those samples: ControlNet {acc['controlnet']:.3f}, base {acc['base']:.3f}")
    C.write_json(args.json, out, default=str)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
