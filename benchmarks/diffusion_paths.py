"""Deterministic against ancestral sampling from the same start noise: which digits does each get wrong?

Issue "Diffusion models as good as our GANs": on the recipe model, 25-step DDIM (eta = 0) scores a few points
below 25-step ancestral sampling, and more DDIM steps do not help (the probability-flow ODE itself ends there).
This benchmark starts both samplers (and any others named) from the *same* x_T for every label, scores each with
the judge, and shows where they part: how many of the deterministic sampler's misses the ancestral one also
misses, the classes confused, per-class accuracy, and a grid of the deterministic misses (top rows) above the
ancestral samples of the same x_T and label (bottom rows). Unguided, x0 clipped as ``sample`` clips.

    .venv/bin/python -m benchmarks.diffusion_paths --checkpoint file:///tmp/r18/bf16/recipe_linear --out /tmp/paths
"""
from __future__ import annotations

import os
from collections import Counter

import torch
from PIL import Image

from benchmarks.diffusion_common import (
    Scorer,
    balanced_labels,
    diffusion_model,
    machine,
    parser,
    setup,
    table,
    write_json,
)
from condgen.models.diffusion import SAMPLERS, cfg, clip_x0
from condgen.models.diffusion.samplers.ddim import ddim_sigma, ddim_step
from condgen.tasks.io.images import grid, to_uint8


@torch.no_grad()
def from_noise(model: torch.nn.Module, x_T: torch.Tensor, labels: torch.Tensor, sampler: str, steps: int,
               seed: int) -> torch.Tensor:
    """Unguided samples of ``labels`` from the given x_T (stochastic samplers draw their step noise from ``seed``).
    ``sampler="hybrid<cut>"``: ancestral steps (eta = 1) while t >= cut, deterministic DDIM (eta = 0) below."""
    D = clip_x0(cfg(model.denoiser(), 0.0, model.null_cond(1)), model.schedule)
    g = torch.Generator().manual_seed(seed)
    if sampler.startswith("hybrid"):
        return hybrid(D, x_T.clone(), model.schedule, labels, steps, int(sampler[len("hybrid"):]), g).clamp(-1, 1)
    return SAMPLERS[sampler](D, x_T.clone(), model.schedule, cond=labels, generator=g, steps=steps).clamp(-1, 1)


def hybrid(D, x: torch.Tensor, schedule, cond: torch.Tensor, steps: int, cut: int, g: torch.Generator) -> torch.Tensor:
    """``sample_ddim``'s loop (Song et al. 2021, Eq. 12 and 16) with eta = 1 on the steps from t >= ``cut`` and
    eta = 0 below: which noise levels' stochasticity corrects the deterministic path's misses. (``sample_ddim``
    takes one eta for the whole chain; a per-step eta is this diagnostic's alone.)"""
    tau = schedule.timesteps(steps)
    for i, t in enumerate(tau):
        t_prev = tau[i + 1] if i + 1 < len(tau) else -1
        a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
        eps = D(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), cond)
        sigma = ddim_sigma(a_t, a_prev, 1.0 if t >= cut else 0.0)
        z = torch.randn(x.shape, generator=g).to(x.device) if sigma > 0 else None
        x = ddim_step(x, eps, a_t, a_prev, sigma, z)
    return x


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--runs", default="ddim:25,ddpm:25,ddim:100,dpmpp_2m:20",
                   help="sampler:steps, the first two compared; hybrid<cut>:steps = eta 1 on t >= cut, 0 below")
    p.add_argument("--out", default="/tmp/paths", help="folder for the grid")
    args = p.parse_args()
    shards = setup(args)
    os.makedirs(args.out, exist_ok=True)
    model, ckpt = diffusion_model(args, shards)
    model.eval()
    scorer = Scorer.for_shards(shards)
    labels = torch.from_numpy(balanced_labels(args.n_per_class)).long()
    conf = model.config
    x_T = torch.randn((len(labels), conf.in_channels, conf.image_size, conf.image_size),
                      generator=torch.Generator().manual_seed(args.seed))
    rows, preds, samples, figures = [], {}, {}, []
    for run in args.runs.split(","):
        sampler, steps = run.split(":")
        s = from_noise(model, x_T, labels, sampler, int(steps), args.seed + 1)
        pred = scorer.probs(s).argmax(-1)
        preds[run], samples[run] = pred, s
        acc = float((pred == labels).float().mean())
        per_class = [float(((pred == labels) & (labels == c)).sum()) / args.n_per_class for c in range(10)]
        rows.append([run, acc, " ".join(f"{v:.2f}" for v in per_class)])
        figures.append({"run": run, "acc": acc, "per_class": per_class})
        print(table(["sampler:steps", "cond. acc", "per class 0-9"], rows[-1:]), flush=True)
    det, anc = list(preds)[:2]
    missed = (preds[det] != labels).nonzero().flatten()
    both = int((preds[anc][missed] != labels[missed]).sum())
    confusions = Counter((int(labels[i]), int(preds[det][i])) for i in missed).most_common(8)
    print(f"\n{machine()}; checkpoint {ckpt}; {len(labels)} samples, one x_T per sample shared by every sampler\n")
    print(table(["sampler:steps", "cond. acc", "per class 0-9"], rows))
    print(f"\n{det} misses {len(missed)}; from the same x_T, {anc} misses {both} of them. "
          f"{det}'s confusions (true -> read as): {', '.join(f'{a}->{b} x{n}' for (a, b), n in confusions)}")
    pick = missed[:20]
    if len(pick):
        img = grid(to_uint8(torch.cat([samples[det][pick], samples[anc][pick]])), nrow=len(pick))
        Image.fromarray(img).save(os.path.join(args.out, "misses.png"))
        print(f"grid: {os.path.join(args.out, 'misses.png')} ({det} misses above, {anc} from the same x_T below)")
    write_json(args.json, {"checkpoint": ckpt, "n": len(labels), "figures": figures, "compared": [det, anc],
                           "misses": len(missed), "missed_by_both": both,
                           "confusions": [[a, b, n] for (a, b), n in confusions]})


if __name__ == "__main__":
    main()
