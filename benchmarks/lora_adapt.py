"""LoRA: adapt a model trained on MNIST to the second digit style (upscaled UCI digits) by
training < 1% of its parameters, vs a full fine-tune, vs no adaptation, vs training on
UCI from scratch; scored by a judge trained on UCI digits.

    python -m benchmarks.lora_adapt                     # CVAE: base 15 epochs, adaptation 15 epochs
    python -m benchmarks.lora_adapt --model cgan        # cGAN: base 20 epochs, adaptation 30 epochs
    python -m benchmarks.lora_adapt --epochs 3 --base-epochs 3 --per-class 20   # smoke run

cGAN: the adapters go on the generator (its transposed convolutions, ``LoRAConvTranspose2d``,
the output convolution and, in the larger variant, the z projection; a third variant also
trains the 10 x 32 class-embedding table in full); the share is of the
generator's parameters, the model that is served. The discriminator is a training-time
critic that is never served: every adaptation row (and the full fine-tune) trains all of
it, starting from the MNIST one. The generator's EMA restarts from the adapted generator,
with the same adapters, so eval-mode samples (and a saved adapter) use the averaged weights.

The base is the demo CVAE with the FiLM block (``channels=(32, 64)``, ``latent_dim=4``),
trained on bundled MNIST. The adapters (``models/conditioning/lora.py``, Hu et al. 2021)
wrap three target sets with rank-``--rank`` updates, everything else frozen
(``lora.freeze_base``): the decoder's FiLM projections (condition -> gamma, beta) and its
output convolution (< 1% of the parameters); all FiLM projections and all ``Conv2d``
layers; every ``Linear`` and ``Conv2d`` (the transposed convolutions have no adapter). The full fine-tune trains every parameter for the same epochs,
with the same optimiser and batches. All loops are ``tasks.train``'s batches,
optimisers and ``train_step`` in this process, one torch thread.
Figures: conditional accuracy on UCI style (the UCI judge's verdict on 100 samples per
digit from the fixed evaluation seeds) and FID in the UCI judge's feature space against
the UCI test split, as ``tasks.evaluate.evaluate_model`` computes them.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# (row name, LoRA targets): from under 1% of the parameters up to every supported layer
CVAE_VARIANTS = [
    ("decoder FiLM + output conv", ["decoder.blocks.0.proj", "decoder.blocks.1.proj", "to_out"]),
    ("all FiLM + all convs", ["encoder.blocks.0.proj", "encoder.blocks.1.proj", "decoder.blocks.0.proj",
                              "decoder.blocks.1.proj", "encoder.convs.0", "encoder.convs.1", "to_out"]),
    ("every Linear and Conv2d", ["Linear", "Conv2d"]),
]
GAN_UP = ["G.up.convs.0", "G.up.convs.1", "G.to_img"]
GAN_VARIANTS = [
    ("G up-sampling + output convs", GAN_UP),
    ("G up-sampling + output convs + z projection", GAN_UP + ["G.from_z"]),
    # "+G.cond": the class embedding table (10 x 32) trains in full next to the adapters
    ("G up-sampling + output convs, class embeddings trained", GAN_UP + ["+G.cond"]),
]
SETUPS = {  # model -> (config, base epochs, adaptation epochs, variants)
    "cvae": ({"channels": [32, 64], "latent_dim": 4, "block": "film"}, 15, 15, CVAE_VARIANTS),
    "cgan": ({}, 20, 30, GAN_VARIANTS),
}


def inject(model, targets: list, rank: int) -> int:
    """Adapters on ``targets``, everything else frozen (``tasks.adapters.prepare``); returns the
    trained scalars that are served (a GAN's discriminator trains too, as the critic, but is
    never served, so it is not counted)."""
    import torch

    from condgen.tasks.training.adapters import prepare, trained_adapter_parameters

    extra = [t[1:] for t in targets if t.startswith("+")]  # modules trained in full, not adapted
    targets = [getattr(torch.nn, t) if t in ("Linear", "Conv2d") else t for t in targets if not t.startswith("+")]
    prepare(model, targets, rank, float(rank))
    n = trained_adapter_parameters(model)
    for name in extra:
        params = list(model.get_submodule(name).parameters())
        for q in params:
            q.requires_grad_(True)
        n += sum(q.numel() for q in params)
    return n


def fit(model, arrays, epochs: int, batch_size: int = 64, seed: int = 0) -> float:
    import torch

    from condgen.tasks.training.worker import batches, make_opt_step, make_optimizers

    torch.manual_seed(seed)
    opt_step = make_opt_step(make_optimizers(model))  # only parameters with requires_grad
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for batch in batches(arrays, batch_size, 0, 1, epoch, seed):
            model.train_step(batch, opt_step)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(SETUPS), default="cvae")
    p.add_argument("--base-epochs", type=int, help="MNIST epochs of the base (default 15 CVAE, 20 cGAN)")
    p.add_argument("--epochs", type=int, help="adaptation epochs: LoRA, full, scratch (default 15 CVAE, 30 cGAN)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 2 CVAE, 1 cGAN)")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--lora-only", action="store_true", help="skip the full fine-tune and from-scratch rows")
    args = p.parse_args(argv)

    import torch

    from condgen.flows.retrain import default_shards_uri
    from condgen.models.registry import build_model
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.data.splits import load_arrays
    from condgen.tasks.judging.evaluate import evaluate_model, get_judge, load_test
    from condgen.tasks.training.adapters import served_parameters

    torch.set_num_threads(1)
    mnist, uci = default_shards_uri("bundled:mnist"), default_shards_uri("bundled:uci_digits")
    ingest("bundled:mnist", mnist)
    ingest("bundled:uci_digits", uci)
    a_mnist, a_uci = load_arrays(mnist, "train"), load_arrays(uci, "train")
    judge, test = get_judge(uci, log_to_mlflow=False), load_test(uci)
    cfg, base_epochs, epochs, variants = SETUPS[args.model]
    args.base_epochs, args.epochs = args.base_epochs or base_epochs, args.epochs or epochs
    args.rank = args.rank or (2 if args.model == "cvae" else 1)

    torch.manual_seed(0)
    base = build_model(args.model, cfg)
    t_base = fit(base, a_mnist, args.base_epochs)
    total = served_parameters(base)

    rows = []

    def score(name: str, model, trained: int, seconds: float) -> None:
        r = evaluate_model(model, judge, test, n_per_class=args.per_class)
        rows.append((name, trained, trained / total, r.cond_accuracy, r.fid, seconds))
        print(f"  {name}: accuracy {r.cond_accuracy:.3f}, FID {r.fid:.1f}", flush=True)

    score("MNIST base, no adaptation", base, 0, 0.0)
    for name, targets in variants:
        adapted = copy.deepcopy(base)
        n_lora = inject(adapted, targets, args.rank)
        score(f"LoRA rank {args.rank}: {name}", adapted, n_lora, fit(adapted, a_uci, args.epochs))
    if not args.lora_only:
        full = copy.deepcopy(base)
        score("full fine-tune", full, total, fit(full, a_uci, args.epochs))
        torch.manual_seed(0)
        scratch = build_model(args.model, cfg)
        score("UCI from scratch (same epochs)", scratch, total, fit(scratch, a_uci, args.epochs))

    print(f"\n{args.model} {cfg}: {total:,} served parameters; base {args.base_epochs} epochs on MNIST ({t_base:.0f} s); "
          f"adaptation {args.epochs} epochs on {len(a_uci['y'])} UCI digits; UCI judge test accuracy "
          f"{judge.test_accuracy:.3f}; {10 * args.per_class} samples per row\n")
    print("| model | parameters trained | share | UCI cond. accuracy | UCI FID | train s |")
    print("|---|---|---|---|---|---|")
    for name, n, share, acc, fid, s in rows:
        print(f"| {name} | {n:,} | {share:.2%} | {acc:.3f} | {fid:.1f} | {s:.0f} |")
    return {"rows": rows, "total": total}


if __name__ == "__main__":
    main()
