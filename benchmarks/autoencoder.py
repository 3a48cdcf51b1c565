"""First-stage autoencoders for latent diffusion: reconstruction vs compression, KL vs VQ.

    python -m benchmarks.autoencoder                 # 300 steps each on bundled MNIST (~3-5 min on 2 busy cores)
    python -m benchmarks.autoencoder --quick         # 40 steps each: a smoke run
    python -m benchmarks.autoencoder --gan --save /tmp/ae   # + a VQ-GAN run; keep the checkpoints

Trains each regularisation (Rombach et al. 2022 §3.1: KL with a small beta, or VQ with a
K-entry codebook; optionally + the adaptive-weight GAN term of Esser et al. 2021) in
process with the pipeline's optimiser set-up (``tasks.train.make_optimizers``), then
reports on the held-out test split, in one run:

* reconstruction MSE (images in [-1, 1]) and PSNR (peak-to-peak 2);
* compression: image dimensions / latent dimensions, and for VQ image bits (8 per pixel) /
  latent bits (log2 K per position);
* for VQ, codebook perplexity (effective codes in use) and distinct codes used on test;
* the latent std (the diffusion stage's 1 / scale_factor), training time and step time.

A trivial reference is measured in the same run: the test images replaced by the train
split's mean image (MSE of predicting nothing but the average digit).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

from benchmarks import diffusion_common as C


def fit(model: torch.nn.Module, sample_batch: Callable[[np.random.Generator], dict[str, torch.Tensor]], steps: int,
        seed: int = 0, log_every: int = 0, name: str = "") -> dict[str, Any]:
    """``steps`` train_step calls in this process with the pipeline's optimisers (one Adam per group).

    Returns wall seconds, the mean seconds per train_step (batch assembly excluded) and the
    first/last logs. ``sample_batch(rng)`` returns a batch dict.
    """
    from condgen.tasks.training.worker import make_opt_step, make_optimizers

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt_step = make_opt_step(make_optimizers(model))
    model.train()
    t_start, in_step, first, logs = time.perf_counter(), 0.0, None, {}
    for i in range(steps):
        batch = sample_batch(rng)
        t0 = time.perf_counter()
        logs = model.train_step(batch, opt_step)
        in_step += time.perf_counter() - t0
        first = first or logs
        if log_every and (i + 1) % log_every == 0:
            print(f"  [{name}] step {i + 1}/{steps} " + " ".join(f"{k}={v:.4g}" for k, v in logs.items()), flush=True)
    model.eval()
    return {"seconds": time.perf_counter() - t_start, "step_s": in_step / max(steps, 1), "steps": steps,
            "first": first, "last": logs}


def image_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Callable[[np.random.Generator], dict]:
    from condgen.tasks.io.images import from_uint8

    def sample(rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, len(y), batch_size)
        return {"x": from_uint8(x[idx]), "y": torch.from_numpy(y[idx]).long()}

    return sample


def load_data(shards: str | None) -> tuple[str, dict, dict]:
    from condgen.tasks.data.splits import load_split

    if shards is None:
        from condgen.tasks.data.ingest import ingest

        shards = tempfile.mkdtemp(prefix="condgen-ae-bench-")
        ingest("bundled:mnist", shards, shard_size=1000)
    return shards, load_split(shards, "train"), load_split(shards, "test")


@torch.no_grad()
def evaluate_autoencoder(ae: torch.nn.Module, x_test: np.ndarray, batch_size: int = 500) -> dict[str, float]:
    from condgen.tasks.io.images import from_uint8

    ae.eval()
    se, n, codes, z_all = 0.0, 0, [], []
    for i in range(0, len(x_test), batch_size):
        x = from_uint8(x_test[i:i + batch_size])
        z = ae.encode(x)
        z_all.append(z)
        se += (ae.decode(z).clamp(-1, 1) - x).pow(2).sum().item()
        n += x.numel()
        if ae.quantizer is not None:
            codes.append(ae.quantizer.indices(z).flatten())
    mse = se / n
    out = {"mse": mse, "psnr": 10 * math.log10(4.0 / mse), "latent_std_test": torch.cat(z_all).std().item(),
           "latent_std_ema": float(ae.latent_std),
           **{f"compression_{k}": v for k, v in ae.config.compression().items()}}
    if codes:
        counts = torch.bincount(torch.cat(codes), minlength=ae.config.codebook_size).float()
        p = counts / counts.sum()
        out["perplexity"] = float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))
        out["codes_used"] = int((counts > 0).sum())
    return out


def train_autoencoder(train_x: np.ndarray, config: dict[str, Any], *, steps: int, batch_size: int, seed: int = 0,
                      log_every: int = 0, name: str = "ae") -> tuple[torch.nn.Module, dict[str, Any]]:
    from condgen.models.registry import build_model

    torch.manual_seed(seed)
    ae = build_model("autoencoder", config)
    run = fit(ae, image_batches(train_x, np.zeros(len(train_x), np.int64), batch_size), steps, seed,
              log_every, name)
    return ae, run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="an ingested shard set URI (default: ingest bundled:mnist to a temp dir)")
    p.add_argument("--quick", action="store_true", help="40 steps per model: a smoke run")
    p.add_argument("--steps", type=int, help="training steps per model (default 300; --quick 40)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--channels", default="16,32", help="encoder widths, one per halving (2 -> f = 4)")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--beta", type=float, default=1e-5, help="KL weight")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--gan", action="store_true", help="also train VQ + adaptive-weight GAN (Esser et al. 2021)")
    p.add_argument("--save", help="write each trained autoencoder's checkpoint under this folder")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine, intra-op spin-waits cost more than they give)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.quick else 300)
    shards, train, test = load_data(args.shards)
    base = {"channels": [int(c) for c in args.channels.split(",")], "latent_channels": args.latent_channels,
            "beta": args.beta, "codebook_size": args.codebook_size, "lr": args.lr}
    runs = {"kl": {**base, "regularization": "kl"}, "vq": {**base, "regularization": "vq"}}
    if args.gan:
        runs["vq+gan"] = {**base, "regularization": "vq", "gan_weight": 0.1, "gan_start": steps // 2,
                          "betas": [0.5, 0.9]}

    from condgen.tasks.io.images import from_uint8

    mean_img = from_uint8(train["x"]).mean(0, keepdim=True)
    x_test = from_uint8(test["x"])
    ref_mse = (x_test - mean_img).pow(2).mean().item()
    print(f"data: {shards}  train {len(train['y'])}  test {len(test['y'])}; {steps} steps x batch {args.batch_size}, "
          f"{args.threads} thread(s)", flush=True)
    results: dict[str, Any] = {"config": vars(args), "steps": steps, "reference_mean_image_mse": ref_mse}
    for name, config in runs.items():
        ae, run = train_autoencoder(train["x"], config, steps=steps, batch_size=args.batch_size, seed=args.seed,
                                    log_every=max(steps // 4, 1), name=name)
        metrics = evaluate_autoencoder(ae, test["x"])
        results[name] = {"train": run, "test": metrics, "latent_shape": list(ae.config.latent_shape),
                         "params": sum(p.numel() for p in ae.parameters())}
        if args.save:
            from condgen.tasks.io import checkpoint as ckpt_io

            path = os.path.join(args.save, name.replace("+", "_"))
            ckpt_io.save_checkpoint(path, ae)
            results[name]["checkpoint"] = path
        print(f"[{name}] trained {run['seconds']:.0f}s ({run['step_s'] * 1000:.0f} ms/step); "
              f"test MSE {metrics['mse']:.4f}", flush=True)

    print(f"\n{'model':8s} {'latent':>8s} {'dims x':>7s} {'bits x':>7s} {'test MSE':>9s} {'PSNR dB':>8s} "
          f"{'perplex.':>8s} {'codes':>6s} {'z std':>6s} {'ms/step':>8s}")
    for name in runs:
        r, m = results[name], results[name]["test"]
        shape = "x".join(str(s) for s in r["latent_shape"][::-1])
        print(f"{name:8s} {shape:>8s} {m['compression_dims']:7.1f} {m.get('compression_bits', float('nan')):7.1f} "
              f"{m['mse']:9.4f} {m['psnr']:8.2f} {m.get('perplexity', float('nan')):8.1f} "
              f"{m.get('codes_used', 0) or '':>6} {m['latent_std_test']:6.3f} {r['train']['step_s'] * 1000:8.0f}")
    print(f"reference: every test digit replaced by the mean train image: MSE {ref_mse:.4f}")
    C.write_json(args.json, results, default=str)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
