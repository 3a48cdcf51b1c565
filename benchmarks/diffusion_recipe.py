"""The diffusion training recipe, chosen by measurement: each change alone on the same budget, then all.

Issue "Diffusion models that are as good as our GANs", item 2. Every variant trains the same U-Net
(``--channels``) on ``bundled:mnist`` for the same number of Adam steps of the same batches (the data
order comes from its own seeded generator, so it is identical across variants), with a direct loop over
``ConditionalDiffusion.loss`` and ``update_ema`` (what ``train_step`` does, without Ray: the budget goes
to optimisation). The changes, after the papers that define them:

* ``prediction="v"``: the network predicts v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, §4);
* ``schedule="cosine"`` (Nichol & Dhariwal 2021, Eq. 17);
* ``loss_weighting="min_snr"``: Min-SNR-gamma, gamma = 5 (Hang et al. 2023); ``min_snr_floor`` keeps a weight at
  high noise (x0 weight min(SNR, 5) + floor; ``"min_snr_plus_one"``: a floor of 1, the plain v loss's weight there);
* ``scale_shift=True``: the condition scales and shifts the GroupNorms (AdaGN, Dhariwal & Nichol 2021, §3);
* ``attention=True``: self-attention at the lowest resolution (Ho et al. 2020, App. B);
* ``ema_decay=0.999``: sampling with an exponential moving average of the weights (Ho et al. 2020, §4).

Each trained model is scored unguided by the pipeline's judge (conditional accuracy, domain FID, KID on
the judge's features) with 25-step deterministic DDIM, 20-step DPM-Solver++(2M) and 25-step ancestral
sampling, x0 clipped as ``sample`` does. ``--full`` adds, for the last variant, the 1000-step ancestral
chain (the reference the few-step samplers are held to) and a CFG sweep.

    .venv/bin/python -m benchmarks.diffusion_recipe --steps 600 --out /tmp/recipe            # the ablation
    .venv/bin/python -m benchmarks.diffusion_recipe --only recipe_linear --steps 3000 --threads 2 --full \
        --out /tmp/recipe-final                                                                  # the chosen one
    .venv/bin/python -m benchmarks.diffusion_recipe --checkpoint file:///tmp/recipe-final/recipe_linear --full \
        --out /tmp/recipe-rescored                                         # score a saved model, no training
"""
from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.diffusion_common import Scorer, machine, parser, setup, table, write_json
from benchmarks.diffusion_gap import kid, save_grid
from condgen.models.diffusion import SAMPLERS, ConditionalDiffusion, DiffusionConfig, cfg, clip_x0
from condgen.tasks.data.splits import dataset_info, load_split
from condgen.tasks.io.checkpoint import save_checkpoint
from condgen.tasks.io.images import from_uint8
from condgen.tasks.io.model_store import load_trained
from condgen.tasks.judging.evaluate import predict

RECIPE = {"prediction": "v", "schedule": "cosine", "loss_weighting": "min_snr", "attention": True, "ema_decay": 0.999}
# recipe_floor is models.registry.RECIPES["diffusion"], what a new ``diffusion`` run trains with (since 2026-12-06;
# recipe_linear before it, and recipe_plus_one for part of that day)
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "v": {"prediction": "v"},
    "cosine": {"schedule": "cosine"},
    "min_snr": {"loss_weighting": "min_snr"},
    "attention": {"attention": True},
    "ema": {"ema_decay": 0.999},
    "recipe": RECIPE,
    "recipe_linear": {**RECIPE, "schedule": "linear"},  # the recipe with the linear schedule
    # the deterministic-sampler gap at the full budget: the x0 weight at high noise (Min-SNR: -> 0; plain v: 1)
    "recipe_plain_v": {**RECIPE, "schedule": "linear", "loss_weighting": "none"},
    "recipe_plus_one": {**RECIPE, "schedule": "linear", "loss_weighting": "min_snr_plus_one"},
    # a lower floor under the high-noise weight: x0 weight min(SNR, 5) + 0.25 (a floor of 1 blurs colour shapes)
    "recipe_floor": {**RECIPE, "schedule": "linear", "min_snr_floor": 0.25},
    "recipe_adagn": {**RECIPE, "schedule": "linear", "scale_shift": True},  # the condition scales the norms
    "recipe_plus_one_adagn": {**RECIPE, "schedule": "linear", "loss_weighting": "min_snr_plus_one", "scale_shift": True},
}
SAMPLER_RUNS = [("DDIM 25", "ddim", 25), ("DPM++(2M) 20", "dpmpp_2m", 20), ("ancestral 25", "ddpm", 25)]


def train_steps(config: DiffusionConfig, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch: int, seed: int,
                warmup: int = 100, pick: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                lr_decay: str = "none", precision: str = "fp32", averages: dict[float, torch.nn.Module] | None = None
                ) -> tuple[ConditionalDiffusion, list[float], float]:
    """``steps`` Adam steps on ``model.loss`` (linear LR warm-up over ``warmup`` steps, then constant, or with
    ``lr_decay="cosine"`` a half cosine to 0 at the last step, Loshchilov & Hutter 2017), EMA
    updated after each; the batches come from a generator seeded by ``seed`` alone. ``pick(y, idx, generator)``
    gives a batch's conditions (default ``y[idx]``; text: one phrasing per image, ``benchmarks/shapes_text.py``).
    ``precision="bf16"`` runs the forward pass and the loss under CPU bfloat16 autocast (weights, gradients,
    Adam and EMA stay fp32), as ``condgen train --precision bf16`` does: 1.75x the steps per second on this
    machine's AVX-512 BF16 cores (one thread, batch 128, the benchmark U-Net). ``averages``: a dict keyed by gamma; each
    value becomes one more average of the same weights with the power-function profile of Karras et al. 2024
    ("Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3.1): beta = (1 - 1/t)^(gamma + 1)
    at update t, so one run scores several averaging lengths. (The model's own EMA, min(decay, (1 + n) / (10 + n)),
    is this profile with gamma ~ 8 until n ~ 9,000 updates: its ``ema_decay`` of 0.999 never binds sooner.)"""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
    torch.manual_seed(seed)
    model = ConditionalDiffusion(config).train()
    opt = torch.optim.Adam(model.net.parameters(), lr=config.lr)
    order = torch.Generator().manual_seed(seed)
    extra = {d: (copy.deepcopy(model.net).requires_grad_(False), torch.zeros((), dtype=torch.long)) for d in averages or {}}
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = config.lr * lr_factor(step, steps, warmup, lr_decay)
        idx = torch.randint(0, len(y), (batch,), generator=order)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = model.loss(x[idx], y[idx] if pick is None else pick(y, idx, order))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_ema()
        for gamma, (avg, n) in extra.items():
            power_ema_update(avg, model.net, n, gamma)
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(f"  step {step + 1}/{steps}, {time.perf_counter() - t0:.0f}s, loss {np.mean(losses[-250:]):.4f}",
                  flush=True)
    if averages is not None:
        averages.update({d: avg for d, (avg, _) in extra.items()})
    return model.eval(), losses, time.perf_counter() - t0


@torch.no_grad()
def power_ema_update(avg: torch.nn.Module, net: torch.nn.Module, updates: torch.Tensor, gamma: float) -> None:
    """avg <- beta avg + (1 - beta) net, beta = (1 - 1/t)^(gamma + 1), t = 1 + ``updates`` (incremented in place):
    the first update copies ``net``. Its relative standard deviation (the averaged length over the run so far)
    is ``sigma_rel(gamma)``."""
    t = int(updates) + 1
    beta = (1.0 - 1.0 / t) ** (gamma + 1)
    for p_avg, p in zip(avg.parameters(), net.parameters()):
        p_avg.lerp_(p.detach(), 1.0 - beta)
    updates += 1


def sigma_rel(gamma: float) -> float:
    """The power-function profile's width relative to the run's length (Karras et al. 2024, Eq. 3)."""
    return (gamma + 1) ** 0.5 / ((gamma + 2) * (gamma + 3) ** 0.5)


def lr_factor(step: int, steps: int, warmup: int, decay: str) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, then 1 (``"none"``) or a half cosine from 1 to 0
    over the remaining steps (``"cosine"``)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "none":
        return 1.0
    if decay != "cosine":
        raise ValueError(f"lr_decay must be 'none' or 'cosine', not {decay!r}")
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def generate(model: ConditionalDiffusion, labels: torch.Tensor, sampler: str, steps: int, *, seed: int,
             guidance: float = 0.0, chunk: int = 250) -> torch.Tensor:
    """Samples (B, C, H, W) in [-1, 1] with the model's sampling weights (EMA when it has them), x0 clipped
    as ``sample`` clips, CFG weight ``guidance``; the start noise is seeded per chunk."""
    out, conf = [], model.config
    for i in range(0, len(labels), chunk):
        g = torch.Generator().manual_seed(seed + i)
        c = labels[i:i + chunk]
        x_T = torch.randn((len(c), conf.in_channels, conf.image_size, conf.image_size), generator=g)
        D = clip_x0(cfg(model.denoiser(), guidance, model.null_cond(1)), model.schedule)
        out.append(SAMPLERS[sampler](D, x_T, model.schedule, cond=c, generator=g, steps=steps).clamp(-1, 1))
    return torch.cat(out)


def score(scorer: Scorer, model: ConditionalDiffusion, labels: torch.Tensor, sampler: str, steps: int, *,
          seed: int, guidance: float = 0.0) -> tuple[dict[str, float], torch.Tensor]:
    t0 = time.perf_counter()
    s = generate(model, labels, sampler, steps, seed=seed, guidance=guidance)
    sec = time.perf_counter() - t0
    sc = scorer.score(s, labels.numpy())
    feats = predict(scorer.judge.model, s)[1].numpy().astype(np.float64)
    return {**sc, "kid": kid(scorer.real_features, feats), "seconds": sec}, s


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=600, help="Adam steps per variant (the budget)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-decay", default="none", choices=["none", "cosine"], help="after the warm-up")
    p.add_argument("--channels", default="16,32,32")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="training autocast (sampling is fp32)")
    p.add_argument("--ema-gammas", default="", help="comma-separated gammas of extra power-function EMAs (Karras "
                   "et al. 2024), each scored with DDIM 25 and ancestral 25 after the variant's own (e.g. 3,5,16; "
                   "the model's own EMA is ~8 for runs under ~9,000 steps)")
    p.add_argument("--only", default="", help="comma-separated variants (default: all): " + ",".join(VARIANTS))
    p.add_argument("--n-per-class", type=int, default=30, help="samples per class for each score")
    p.add_argument("--full", action="store_true", help="also the 1000-step ancestral chain and a CFG sweep")
    p.add_argument("--full-per-class", type=int, default=30, help="samples per class for the 1000-step chain")
    p.add_argument("--cfg", default="0.5,1,2,3", help="CFG weights of the sweep (--full)")
    p.add_argument("--out", default="/tmp/recipe", help="folder for models (safetensors) and grids")
    args = p.parse_args()
    shards = setup(args)
    os.makedirs(args.out, exist_ok=True)
    print(machine(), flush=True)
    scorer = Scorer.for_shards(shards)
    train = load_split(shards, "train")
    keep = np.asarray(train["y"]) >= 0  # caption-only images (label -1) are for text conditioning
    x, y = from_uint8(train["x"][keep]), torch.from_numpy(np.asarray(train["y"])[keep]).long()
    # the classes the model trains on, scored n per class (a set's held-out classes, e.g. bundled:shapes'
    # unseen colour x shape pairs, have no training images and are not scored)
    classes = np.unique(y.numpy())
    labels = torch.from_numpy(np.repeat(classes, args.n_per_class)).long()
    base = {"channels": tuple(int(c) for c in args.channels.split(",")), "lr": args.lr,
            "in_channels": int(x.shape[1]), "image_size": int(x.shape[-1]),
            "num_classes": int(dataset_info(shards)["num_classes"])}
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    if args.checkpoint:  # score a model trained before (by this benchmark or the pipeline) instead of training
        names = [args.checkpoint.rstrip("/").rsplit("/", 1)[-1]]
    rows, figures = [], []
    for name in names:
        averages: dict[float, torch.nn.Module] = {}  # a loaded checkpoint has no power EMAs to score
        if args.checkpoint:
            model, losses, train_s = load_trained(args.checkpoint)[0].eval(), [float("nan")], float("nan")
            print(f"[{name}] loaded {args.checkpoint}: {model.config}", flush=True)
        else:
            config = DiffusionConfig(**base, **VARIANTS[name])
            print(f"[{name}] {VARIANTS[name] or 'eps, linear, uniform weights, no attention, no EMA'}", flush=True)
            averages = {float(g): None for g in args.ema_gammas.split(",") if g}
            model, losses, train_s = train_steps(config, x, y, steps=args.steps, batch=args.batch, seed=args.seed,
                                                 lr_decay=args.lr_decay, precision=args.precision, averages=averages)
            # a checkpoint folder the pipeline reads (``--checkpoint file://...`` of diffusion_guidance/steps/...)
            save_checkpoint(os.path.join(args.out, name), model, {"train_seconds": train_s, "adam_steps": args.steps,
                                                                   "batch": args.batch, "lr_decay": args.lr_decay,
                                                                   "precision": args.precision})
        for label, sampler, steps in SAMPLER_RUNS:
            sc, s = score(scorer, model, labels, sampler, steps, seed=args.seed)
            save_grid(s, args.n_per_class, os.path.join(args.out, f"{name}-{sampler}{steps}.png"))
            rows.append([name, label, sc["acc"], sc["fid"], sc["kid"], "" if args.checkpoint else f"{train_s:.0f}s"])
            figures.append({"variant": name, "sampler": sampler, "steps": steps, "guidance": 0.0, **sc,
                            "train_seconds": train_s, "final_loss": float(np.mean(losses[-100:]))})
            print(table(["variant", "sampler", "cond. acc", "FID", "KID", "train"], rows[-1:]), flush=True)
        own = model.ema
        for gamma, avg in averages.items():  # the same run sampled with a longer (or shorter) average of its weights
            model.ema, d = avg, f"gamma{gamma:g}"
            save_checkpoint(os.path.join(args.out, f"{name}-ema-{d}"), model,
                            {"train_seconds": train_s, "adam_steps": args.steps, "ema_gamma": gamma})
            for label, sampler, steps in [r for r in SAMPLER_RUNS if r[1] != "dpmpp_2m"]:
                sc, s = score(scorer, model, labels, sampler, steps, seed=args.seed)
                save_grid(s, args.n_per_class, os.path.join(args.out, f"{name}-ema-{d}-{sampler}{steps}.png"))
                rows.append([f"{name}, power EMA gamma {gamma:g} (sigma_rel {sigma_rel(gamma):.3f})", label,
                             sc["acc"], sc["fid"], sc["kid"], f"{train_s:.0f}s"])
                figures.append({"variant": name, "ema_gamma": gamma, "sampler": sampler, "steps": steps,
                                "guidance": 0.0, **sc, "train_seconds": train_s})
                print(table(["variant", "sampler", "cond. acc", "FID", "KID", "train"], rows[-1:]), flush=True)
        model.ema = own
        if args.full and name == names[-1]:
            full_labels = torch.from_numpy(np.repeat(classes, args.full_per_class)).long()
            for label, sampler, steps in [("ancestral 1000", "ddpm", 1000), ("DDIM 25", "ddim", 25),
                                          ("DPM++(2M) 20", "dpmpp_2m", 20)]:
                sc, s = score(scorer, model, full_labels, sampler, steps, seed=args.seed + 1)
                save_grid(s, args.full_per_class, os.path.join(args.out, f"{name}-full-{sampler}{steps}.png"))
                rows.append([name, f"{label} (n={len(full_labels)})", sc["acc"], sc["fid"], sc["kid"], ""])
                figures.append({"variant": name, "sampler": sampler, "steps": steps, "guidance": 0.0, "full": True,
                                **sc})
                print(table(["variant", "sampler", "cond. acc", "FID", "KID", "train"], rows[-1:]), flush=True)
            for w in (float(v) for v in args.cfg.split(",")):
                sc, s = score(scorer, model, labels, "ddim", 25, seed=args.seed, guidance=w)
                save_grid(s, args.n_per_class, os.path.join(args.out, f"{name}-cfg{w:g}.png"))
                rows.append([name, f"DDIM 25, CFG w={w:g}", sc["acc"], sc["fid"], sc["kid"], ""])
                figures.append({"variant": name, "sampler": "ddim", "steps": 25, "guidance": w, **sc})
                print(table(["variant", "sampler", "cond. acc", "FID", "KID", "train"], rows[-1:]), flush=True)
    trained_how = (f"checkpoint {args.checkpoint}" if args.checkpoint else
                   f"{args.steps} Adam steps x batch {args.batch}, lr {args.lr} (warm-up 100, decay {args.lr_decay}), "
                   f"{args.precision} training, channels {base['channels']}")
    print(f"\n{machine()}; {trained_how}; {len(labels)} samples per score\n")
    print(table(["variant", "sampler", "cond. acc", "FID", "KID", "train"], rows))
    write_json(args.json, {"figures": figures, "base": {k: str(v) for k, v in base.items()}, "steps": args.steps,
                           "batch": args.batch, "precision": args.precision})


if __name__ == "__main__":
    main()
