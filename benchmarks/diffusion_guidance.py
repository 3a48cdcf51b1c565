"""Guidance scale vs conditional accuracy and domain FID: classifier-free vs classifier guidance.

    python benchmarks/diffusion_guidance.py                 # trains (or reuses) both models
    python benchmarks/diffusion_guidance.py --checkpoint URI --classifier-checkpoint URI
    python benchmarks/diffusion_guidance.py --quick         # smoke run, ~1 min

For w in {0, 0.5, 1, 2, 4}, the same conditions (n per class) from the same seed, DDIM steps:

* CFG (Ho & Salimans 2022): eps~ = (1 + w) eps(x, y) - w eps(x, null), one forward on 2B;
* classifier guidance (Dhariwal & Nichol 2021, Alg. 2 in its DDIM form) on the same
  conditional model: eps~ = eps(x, y) - w sqrt(1 - a_bar) grad log p_phi(y | x_t), with the
  ``noisy_classifier`` trained on the same noise schedule;
* ``--uncond-classifier``: classifier guidance on the model's unconditional branch (the null
  token), the setting of seed 004's derivation: only the classifier knows the label.

w = 0 is the plain conditional model in both families (computed once). Accuracy is the
pipeline judge's (``tasks.evaluate.get_judge``), FID the Fréchet distance of its features to
the real test split; higher w should trade diversity (FID) for fidelity (accuracy).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import diffusion_common as C  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__)
    p.add_argument("--n-per-class", type=int, help="samples per class per row (default 30; --quick 3)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 25; --quick 5)")
    p.add_argument("--scales", default="0,0.5,1,2,4")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM eta: 0 deterministic (default), 1 = ancestral (DDPM) on the same steps")
    p.add_argument("--uncond-classifier", action="store_true",
                   help="also classifier guidance on the unconditional branch")
    args = p.parse_args(argv)

    from condgen.tasks.generation.sampling import sample_images

    shards = C.setup(args)
    model, ckpt = C.diffusion_model(args, shards)
    clf, clf_ckpt = C.noisy_classifier(args, shards)
    scorer = C.Scorer.for_shards(shards)
    n_pc = args.n_per_class or (3 if args.quick else 30)
    steps = args.steps or (5 if args.quick else 25)
    labels = C.balanced_labels(n_pc, model.config.num_classes)
    cond = torch.from_numpy(labels)
    scales = [float(s) for s in args.scales.split(",")]
    print(f"machine: {C.machine()}")
    print(f"model: {ckpt}  channels {model.config.channels}  T={model.config.timesteps}\n"
          f"classifier: {clf_ckpt}\n{len(labels)} samples per row, DDIM {steps} steps, eta {args.eta:g}, seed {args.seed}", flush=True)

    def run(guidance: str, w: float, **kw) -> dict:
        x, seconds = C.timed(sample_images, model, cond, sampler="ddim", steps=steps, eta=args.eta, guidance=guidance,
                             scale=w, seed=args.seed, batch_size=len(labels), progress=False, **kw)
        s = scorer.score(x, labels)
        print(f"  {guidance:<10} {'' if kw.get('conditional', True) else '(uncond) '}w={w:<4} acc {s['acc']:.3f}  "
              f"FID {s['fid']:.2f}  {seconds:.1f}s", flush=True)
        return {**s, "seconds": seconds}

    families = [("CFG", "cfg", {}), ("classifier", "classifier", {"classifier": clf})]
    if args.uncond_classifier:
        families.append(("classifier, uncond. model", "classifier", {"classifier": clf, "conditional": False}))
    results: dict[str, dict[float, dict]] = {name: {} for name, _, _ in families}
    base = None
    for name, guidance, kw in families:
        for w in scales:
            if w == 0 and kw.get("conditional", True):
                base = base or run("none", 0.0)
                results[name][w] = base
            else:
                results[name][w] = run(guidance, w, **kw)

    floor = scorer.real_fid(len(labels))
    headers = ["w"]
    for name, _, _ in families:
        headers += [f"{name}: acc %", f"{name}: FID", f"{name}: s"]
    rows = []
    for w in scales:
        row = [f"{w:g}"]
        for name, _, _ in families:
            r = results[name][w]
            row += [f"{100 * r['acc']:.1f}", r["fid"], f"{r['seconds']:.0f}"]
        rows.append(row)
    print()
    print(C.table(headers, rows))
    se = max(r["acc_se"] for fam in results.values() for r in fam.values())
    print(f"\n{len(labels)} samples per cell (accuracy s.e. <= {100 * se:.1f} points); FID of {len(labels)} real "
          f"train images vs the test split = {floor:.2f} (the floor at this n); judge test accuracy "
          f"{scorer.judge.test_accuracy:.4f}")
    payload = {"checkpoint": ckpt, "classifier": clf_ckpt, "n": len(labels), "steps": steps, "eta": args.eta, "fid_floor": floor,
               "results": {k: {str(w): v for w, v in d.items()} for k, d in results.items()}}
    C.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
