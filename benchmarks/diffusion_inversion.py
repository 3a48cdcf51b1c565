"""DDIM inversion and null-text inversion: reconstruction error; and what a negative prompt does.

    python benchmarks/diffusion_inversion.py                 # trains (or reuses) the benchmark model
    python benchmarks/diffusion_inversion.py --checkpoint URI
    python benchmarks/diffusion_inversion.py --quick         # smoke run, ~1 min

1. Reconstruction vs steps: test digits x_0 -> x_T by deterministic DDIM inversion under their
   own label, then DDIM back with the same label and no guidance. MSE per pixel on the [0, 1]
   scale, as in Song et al. 2021, Table 2 (CIFAR-10: 0.014 / 0.0065 / 0.0023 / 0.0009 at
   10 / 20 / 50 / 100 steps).
2. Reconstruction under classifier-free guidance w (seed 004, Mokady et al. 2023): "plain" inverts
   without guidance and regenerates with CFG w; "CFG inversion" inverts and regenerates with
   CFG w; "null-text" optimises the null embedding per step (``edit_images(method="null_text")``)
   so the guided path retraces the unguided inversion. Plain should degrade as w grows; null-text
   should restore it.
3. Negative prompts: eps~ = (1 + w) eps(x, y+) - w eps(x, y-). (a) Unconditional samples (y+ =
   the null token) with y- = digit d, against plain unconditional samples: how often the judge sees
   digit d. (b) Conditional samples of y+ with y- = the class the judge most often confuses with
   y+ (found on the baseline samples), against CFG with the null token: how often the judge sees
   y-, and the accuracy on y+.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import diffusion_common as C  # noqa: E402

PAPER_CIFAR10 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004}  # Song et al. 2021, Table 2


def test_subset(test: dict, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n test digits drawn at random (the split is stored sorted by class), as [-1, 1] images + labels."""
    from condgen.tasks.io.images import from_uint8

    idx = np.sort(np.random.default_rng(seed).permutation(len(test["y"]))[:n])
    return from_uint8(test["x"][idx]), torch.from_numpy(test["y"][idx]).long()


def mse01(a: torch.Tensor, b: torch.Tensor) -> float:
    """Per-pixel MSE of two [-1, 1] images measured on the [0, 1] scale."""
    return float(((a.clamp(-1, 1) - b) / 2).pow(2).mean())


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__)
    p.add_argument("--n-images", type=int, help="test images for part 1 (default 100; --quick 8)")
    p.add_argument("--steps", default="10,20,50,100", help="inversion steps for part 1")
    p.add_argument("--n-guided", type=int, help="test images for part 2 (default 12; --quick 4)")
    p.add_argument("--guided-steps", type=int, help="steps for part 2 (default 50; --quick 10)")
    p.add_argument("--scales", default="0,1,2,4", help="CFG weights for part 2")
    p.add_argument("--nti-scales", default="1,2,4", help="CFG weights at which to run null-text inversion")
    p.add_argument("--inner-steps", type=int, default=10, help="null-text: Adam steps per timestep")
    p.add_argument("--n-negative", type=int, help="samples per class for part 3 (default 20; --quick 2)")
    p.add_argument("--negative-scale", type=float, default=2.0, help="CFG weight w for part 3")
    p.add_argument("--sample-steps", type=int, help="DDIM steps for part 3 (default 25; --quick 5)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta for part 3 (1 = ancestral)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: 1,2,3")
    args = p.parse_args(argv)

    from condgen.models.diffusion import cfg, ddim_invert, sample_ddim
    from condgen.tasks.generation.sampling import edit_images, sample_images

    shards = C.setup(args)
    model, ckpt = C.diffusion_model(args, shards)
    scorer = C.Scorer.for_shards(shards)
    test = scorer.test
    skip = {s for s in args.skip.split(",") if s}
    print(f"machine: {C.machine()}")
    print(f"model: {ckpt}  channels {model.config.channels}  T={model.config.timesteps}", flush=True)
    payload: dict = {"checkpoint": ckpt}

    # -- 1. reconstruction vs steps --------------------------------------------------------------
    if "1" not in skip:
        n = args.n_images or (8 if args.quick else 100)
        x, y = test_subset(test, n, args.seed)
        rows, part = [], []
        for steps in [int(s) for s in args.steps.split(",") if s]:
            rec, seconds = C.timed(edit_images, model, x, method="ddim_inversion", source_cond=y, target_cond=y,
                                   steps=steps, scale=0.0, progress=False)
            err = mse01(rec, x)
            part.append({"steps": steps, "mse01": err, "seconds": seconds})
            rows.append([steps, f"{err:.5f}", PAPER_CIFAR10.get(steps, "—"), f"{seconds:.1f}"])
            print(f"  inversion {steps} steps: MSE {err:.5f}  {seconds:.1f}s", flush=True)
        print(f"\n1. DDIM inversion -> DDIM reconstruction of {n} random test digits under their own label "
              f"(w = 0; digits per class {np.bincount(y.numpy(), minlength=10).tolist()})\n")
        print(C.table(["steps", "MSE on [0,1] (ours, MNIST)", "DDIM paper, CIFAR-10", "wall s"], rows))
        payload["reconstruction_vs_steps"] = part

    # -- 2. reconstruction under CFG ---------------------------------------------------------------
    if "2" not in skip:
        n = args.n_guided or (4 if args.quick else 12)
        steps = args.guided_steps or (10 if args.quick else 50)
        x, y = test_subset(test, n, args.seed)
        D, sched = model.denoiser(), model.schedule
        nti_scales = {float(s) for s in args.nti_scales.split(",") if s}
        rows, part = [], []
        for w in [float(s) for s in args.scales.split(",") if s]:
            plain = mse01(edit_images(model, x, method="ddim_inversion", source_cond=y, steps=steps, scale=w,
                                      progress=False), x)
            with torch.no_grad():
                e, null = model.embed_condition(y), model.null_embedding(1)
                G = cfg(D, w, null)
                x_T = ddim_invert(G, x, sched, cond=e, steps=steps)
                cfg_inv = mse01(sample_ddim(G, x_T, sched, cond=e, steps=steps), x)
            nti, nti_s = float("nan"), float("nan")
            if w in nti_scales:
                rec, nti_s = C.timed(edit_images, model, x, method="null_text", source_cond=y, steps=steps, scale=w,
                                     inner_steps=args.inner_steps, progress=False)
                nti = mse01(rec, x)
            part.append({"w": w, "plain": plain, "cfg_inversion": cfg_inv, "null_text": nti, "null_text_s": nti_s})
            rows.append([f"{w:g}", f"{plain:.5f}", f"{cfg_inv:.5f}", "—" if np.isnan(nti) else f"{nti:.5f}",
                         "—" if np.isnan(nti_s) else f"{nti_s:.0f}"])
            print(f"  w={w}: plain {plain:.5f}  CFG inversion {cfg_inv:.5f}  null-text {nti:.5f}", flush=True)
        print(f"\n2. Reconstruction MSE on [0,1] under CFG weight w: {n} test digits, {steps} DDIM steps, "
              f"null-text with {args.inner_steps} Adam steps per timestep\n")
        print(C.table(["w", "plain inversion (w = 0), CFG w regeneration", "CFG w inversion + regeneration",
                       "null-text inversion", "null-text wall s"], rows))
        payload["reconstruction_vs_cfg"] = part

    # -- 3. negative prompts ----------------------------------------------------------------------
    if "3" not in skip:
        k = model.config.num_classes
        n_pc = args.n_negative or (2 if args.quick else 20)
        steps = args.sample_steps or (5 if args.quick else 25)
        w = args.negative_scale
        labels = C.balanced_labels(n_pc, k)
        d = torch.from_numpy(labels)
        kw = dict(sampler="ddim", steps=steps, eta=args.eta, seed=args.seed, batch_size=len(labels), progress=False)

        def pred(x):
            return scorer.probs(x)

        # (a) unconditional, negated digit d
        base = pred(sample_images(model, d, guidance="none", conditional=False, **kw))
        neg = pred(sample_images(model, d, guidance="cfg", scale=w, negative=d, conditional=False, **kw))
        rate_base = float((base.argmax(-1).numpy() == labels).mean())
        rate_neg = float((neg.argmax(-1).numpy() == labels).mean())
        idx = torch.arange(len(labels))
        p_base, p_neg = float(base[idx, d].mean()), float(neg[idx, d].mean())
        # (b) conditional y+, negated most-confusable y-
        cond_base = pred(sample_images(model, d, guidance="cfg", scale=w, **kw))
        mean_p = torch.stack([cond_base[d == c].mean(0) for c in range(k)])  # (K, K)
        mean_p.fill_diagonal_(-1)
        confusable = mean_p.argmax(1)  # (K,) y- for each y+
        y_neg = confusable[d]
        cond_neg = pred(sample_images(model, d, guidance="cfg", scale=w, negative=y_neg, **kw))
        yn = y_neg.numpy()
        rb = float((cond_base.argmax(-1).numpy() == yn).mean())
        rn = float((cond_neg.argmax(-1).numpy() == yn).mean())
        acc_b = float((cond_base.argmax(-1).numpy() == labels).mean())
        acc_n = float((cond_neg.argmax(-1).numpy() == labels).mean())
        pb, pn = float(cond_base[idx, y_neg].mean()), float(cond_neg[idx, y_neg].mean())
        print(f"\n3. Negative prompts, CFG w = {w}, DDIM {steps} steps (eta {args.eta:g}), {len(labels)} samples per row\n")
        print(C.table(
            ["setting", "samples judged as the negated digit %", "mean p(negated digit)", "accuracy on y+ %"],
            [["(a) unconditional", f"{100 * rate_base:.1f}", p_base, "—"],
             ["(a) unconditional, negative = d", f"{100 * rate_neg:.1f}", p_neg, "—"],
             ["(b) y+ with CFG (null)", f"{100 * rb:.1f}", pb, f"{100 * acc_b:.1f}"],
             ["(b) y+ with CFG, negative = most-confused y-", f"{100 * rn:.1f}", pn, f"{100 * acc_n:.1f}"]]))
        pairs = ", ".join(f"{c}→{int(confusable[c])}" for c in range(k))
        print(f"\n(b) pairs y+→y-: {pairs}")
        payload["negative"] = {"w": w, "eta": args.eta, "n": len(labels), "uncond_rate": [rate_base, rate_neg],
                               "uncond_p": [p_base, p_neg], "cond_rate": [rb, rn], "cond_p": [pb, pn],
                               "cond_acc": [acc_b, acc_n], "pairs": confusable.tolist()}
    C.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
