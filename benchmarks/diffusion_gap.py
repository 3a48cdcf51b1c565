"""The deterministic-sampling gap: why 25-step DDIM (eta = 0) scored far below 25-step ancestral sampling.

Trains a small ``diffusion`` model on ``bundled:mnist`` with a direct loop (the pipeline's loss,
``train_step``-equivalent: Adam at constant LR, EMA update after every step; no Ray, so a few
minutes of 1-2 cores go to optimisation), then scores with the pipeline's judge (conditional
accuracy, domain FID, KID) every combination of

* sampler: 25-step DDIM (eta = 0), 25-step ancestral (DDPM on the same timesteps), 20-step DPM-Solver++(2M);
* x0 clipping on / off (``clip_x0``);
* weights: the trained ones / the EMA copy;
* ``--prediction eps`` (the default model) or ``v`` (the fix: x0_hat's error stays bounded at low SNR);

and records per-step statistics of the (unclipped) x0_hat along the trajectories (``--stats``).
Grids go to ``--out`` (PNG), the figures to ``--json``. ``docs/results.md`` ("Deterministic
sampling gap") has the table and the reading.

    .venv/bin/python -m benchmarks.diffusion_gap --minutes 8 --out /tmp/gap --json /tmp/gap/figures.json
    .venv/bin/python -m benchmarks.diffusion_gap --load /tmp/gap/model.pt --out /tmp/gap   # re-score only
    .venv/bin/python -m benchmarks.diffusion_gap --minutes 8 --prediction v --out /tmp/gap-v   # the fix
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from benchmarks.diffusion_common import Scorer, balanced_labels, machine, parser, setup, table, write_json
from condgen.models.diffusion import SAMPLERS, ConditionalDiffusion, DiffusionConfig, clip_x0
from condgen.models.diffusion.denoiser import Denoiser
from condgen.models.diffusion.samplers.ddim import predicted_x0
from condgen.tasks.data.splits import load_split
from condgen.tasks.io.images import from_uint8, grid, to_uint8
from condgen.tasks.judging.evaluate import predict
from condgen.tasks.judging.feature_metrics import kernel_inception_distance, kid_subset_size

# (label, sampler, steps): the three the issue compares
RUNS = [("DDIM 25 (eta=0)", "ddim", 25), ("ancestral 25", "ddpm", 25), ("DPM-Solver++(2M) 20", "dpmpp_2m", 20)]


def train_direct(config: DiffusionConfig, x: torch.Tensor, y: torch.Tensor, *, seconds: float, batch: int,
                 seed: int) -> tuple[ConditionalDiffusion, list[float]]:
    """Adam on ``model.loss`` for ``seconds`` of wall time, EMA updated after every step (as ``train_step``)."""
    torch.manual_seed(seed)
    model = ConditionalDiffusion(config).train()
    opt = torch.optim.Adam(model.net.parameters(), lr=config.lr)
    losses, t0, step = [], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        idx = torch.randint(0, len(y), (batch,))
        loss, _ = model.loss(x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_ema()
        losses.append(loss.item())
        step += 1
        if step % 500 == 0:
            print(f"[train] step {step}, {time.perf_counter() - t0:.0f}s, loss {np.mean(losses[-500:]):.4f}",
                  flush=True)
    return model.eval(), losses


@contextmanager
def weights(model: ConditionalDiffusion, ema: bool) -> Iterator[None]:
    """Sample with the EMA copy (eval mode) or the trained weights (train mode: no dropout/BN in the U-Net)."""
    was = model.training
    model.train(not ema)
    try:
        yield
    finally:
        model.train(was)


class X0Stats:
    """A denoiser wrapper that records, per call, statistics of the unclipped x0_hat it implies."""

    def __init__(self, denoiser: Denoiser, model: ConditionalDiffusion):
        self.denoiser, self.schedule, self.rows = denoiser, model.schedule, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        eps = self.denoiser(x, t, cond)
        a = self.schedule.alpha_bar(int(t[0]))
        x0 = predicted_x0(x, eps, a)
        self.rows.append({"t": int(t[0]), "x_std": float(x.std()), "eps_std": float(eps.std()),
                          "x0_mean": float(x0.mean()), "x0_std": float(x0.std()),
                          "clipped": float((x0.abs() > 1).float().mean()),
                          "x0_min": float(x0.min()), "x0_max": float(x0.max())})
        return eps


@torch.no_grad()
def x0_errors(model: ConditionalDiffusion, x0: torch.Tensor, y: torch.Tensor, steps: int = 25, seed: int = 0
              ) -> list[list[float]]:
    """Per DDIM timestep, on real digits noised by q(x_t | x0): [t, alpha_bar, eps MSE, x0_hat rms error,
    x0_hat mean] for the trained and the EMA weights (the error of x0_hat is the eps error times
    sqrt((1 - a) / a))."""
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for t in model.schedule.timesteps(steps):
        a = model.schedule.alpha_bar(t)
        x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
        row = [t, a]
        for ema in (False, True):
            with weights(model, ema=ema and model.ema is not None):
                e = model.eps(x_t, t, y)
            x0_hat = predicted_x0(x_t, e, a)
            row += [float(((e - eps) ** 2).mean()), float(((x0_hat - x0) ** 2).mean().sqrt()), float(x0_hat.mean())]
        rows.append(row)
    return rows


def generate(model: ConditionalDiffusion, labels: torch.Tensor, sampler: str, steps: int, *, clip: bool,
             seed: int, stats: X0Stats | None = None, chunk: int = 250) -> torch.Tensor:
    """Unguided samples (B, 1, 28, 28) in [-1, 1], noise seeded per chunk; x0 clipping when ``clip``."""
    out = []
    for i in range(0, len(labels), chunk):
        g = torch.Generator().manual_seed(seed + i)
        c = labels[i:i + chunk]
        x_T = torch.randn((len(c), 1, model.config.image_size, model.config.image_size), generator=g)
        D = model.denoiser()
        if stats is not None and i == 0:
            stats.denoiser = D
            D = stats
        if clip:
            D = clip_x0(D, model.schedule)
        out.append(SAMPLERS[sampler](D, x_T, model.schedule, cond=c, generator=g, steps=steps).clamp(-1, 1))
    return torch.cat(out)


def kid(real: np.ndarray, fake: np.ndarray) -> float:
    return kernel_inception_distance(real, fake, subset_size=kid_subset_size(len(real), len(fake)))[0]


def save_grid(samples: torch.Tensor, per_class: int, path: str) -> None:
    """The first 8 samples of each class, a row per class (``samples`` class-major, ``per_class`` each; grey or RGB)."""
    from PIL import Image

    u8 = to_uint8(samples)
    rows = u8.reshape(len(u8) // per_class, per_class, *u8.shape[1:])[:, :8].reshape(-1, *u8.shape[1:])
    Image.fromarray(grid(rows, nrow=8)).save(path)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--channels", default="16,32,32")
    p.add_argument("--prediction", default="eps", choices=["eps", "v"], help="what the U-Net predicts")
    p.add_argument("--n-per-class", type=int, default=30, help="samples per class for each score")
    p.add_argument("--load", help="a state_dict saved by an earlier run (skips training)")
    p.add_argument("--out", default="/tmp/gap", help="folder for the model, grids and x0_hat statistics")
    p.add_argument("--only", default="", help="comma-separated subset of 'raw,ema' weights to score")
    p.add_argument("--clip", default="on,off", help="x0 clipping settings to score: 'on', 'off' or 'on,off'")
    args = p.parse_args()
    shards = setup(args)
    os.makedirs(args.out, exist_ok=True)
    print(machine(), flush=True)
    config = DiffusionConfig(channels=tuple(int(c) for c in args.channels.split(",")), lr=args.lr,
                             ema_decay=args.ema_decay, sample_steps=25, prediction=args.prediction)
    scorer = Scorer.for_shards(shards)
    train = load_split(shards, "train")
    if args.load:
        model = ConditionalDiffusion(config)
        model.load_state_dict(torch.load(args.load))
        model.eval()
    else:
        x, y = from_uint8(train["x"]), torch.from_numpy(np.asarray(train["y"])).long()
        model, losses = train_direct(config, x, y, seconds=60 * args.minutes, batch=args.batch_size * 2,
                                     seed=args.seed)
        print(f"[train] {len(losses)} steps, final loss {np.mean(losses[-200:]):.4f}", flush=True)
        torch.save(model.state_dict(), os.path.join(args.out, "model.pt"))
    errors = x0_errors(model, from_uint8(train["x"][:256]), torch.from_numpy(np.asarray(train["y"][:256])).long())
    print(table(["t", "alpha_bar", "eps MSE", "x0_hat rms err", "x0_hat mean", "EMA: eps MSE", "x0_hat rms err",
                 "x0_hat mean"], errors), flush=True)
    labels = torch.from_numpy(balanced_labels(args.n_per_class)).long()
    real = scorer.real_features
    rows, figures, traces = [], [], {}
    for which in [w for w in ("raw", "ema") if not args.only or w in args.only.split(",")]:
        if which == "ema" and model.ema is None:
            continue
        with weights(model, ema=which == "ema"):
            for name, sampler, steps in RUNS:
                for clip in [c == "on" for c in args.clip.split(",")]:
                    stats = X0Stats(None, model)
                    t0 = time.perf_counter()
                    s = generate(model, labels, sampler, steps, clip=clip, seed=args.seed, stats=stats)
                    sec = time.perf_counter() - t0
                    sc = scorer.score(s, labels.numpy())
                    feats = predict(scorer.judge.model, s)[1].numpy().astype(np.float64)
                    k = kid(real, feats)
                    tag = f"{which}-{sampler}{steps}-{'clip' if clip else 'noclip'}"
                    save_grid(s, args.n_per_class, os.path.join(args.out, f"{tag}.png"))
                    traces[tag] = stats.rows
                    rows.append([which, name, "on" if clip else "off", sc["acc"], sc["fid"], k, f"{sec:.0f}s"])
                    figures.append({"weights": which, "sampler": sampler, "steps": steps, "clip": clip,
                                    **sc, "kid": k, "seconds": sec})
                    print(table(["weights", "sampler", "x0 clip", "cond. acc", "FID", "KID", "time"], rows[-1:]),
                          flush=True)
    print(table(["weights", "sampler", "x0 clip", "cond. acc", "FID", "KID", "time"], rows))
    for tag, tr in traces.items():
        if tag.endswith("-clip") and ("ddim" in tag or "ddpm" in tag):
            print(f"\nx0_hat per step, {tag} (first chunk, before clipping)")
            print(table(list(tr[0]), [list(r.values()) for r in tr]))
    write_json(args.json, {"figures": figures, "x0_stats": traces, "x0_errors": errors, "config": str(config)})


if __name__ == "__main__":
    main()
