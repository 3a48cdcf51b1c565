"""A text-conditioned CVAE asked for digits in phrasings it never saw, next to the same
CVAE conditioned on labels: conditional accuracy by the judge.

    python -m benchmarks.text_conditioning              # demo budget (20 epochs, 2 workers)
    python -m benchmarks.text_conditioning --epochs 3   # shorter

Both models are the demo CVAE (``channels=(32, 64)``, ``latent_dim=4``) trained through
the real pipeline (Ray Train + MLflow) on bundled MNIST; the text model reads the
precomputed embeddings of the embedded CLIP (``condgen embed``), one random phrasing of
each training caption per step. The training captions (``tasks/attributes.captions``)
are four templates such as "a thick, slanted seven" and "the number seven written with a
heavy pen". At test time each digit is requested with

* **seen** prompts: the first template without style words ("a seven"),
* **unseen** prompts: ``tasks.clip.UNSEEN_TEMPLATES`` ("an image of the numeral seven.",
  "seven drawn on paper.", ...), none of which is a training template,

and ``--per-class`` samples per prompt are scored by the judge (the classifier trained on
the real train split; its own test accuracy is printed).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--fit-steps", type=int, default=300)
    p.add_argument("--clip-config", default="condgen-clip-tiny",
                   help="embedded CLIP architecture, e.g. condgen-clip-minilm (pretrained MiniLM text tower)")
    p.add_argument("--skip-label", action="store_true", help="train only the text model")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from condgen.cli import DEMO_MODELS
    from condgen.flows.retrain import default_shards_uri
    from condgen.tasks.clip.embed import embed
    from condgen.tasks.clip.load import load_clip
    from condgen.tasks.clip.quality import CLASS_NAMES, UNSEEN_TEMPLATES
    from condgen.tasks.data.attributes import label_word
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.io.model_store import load_trained
    from condgen.tasks.judging.evaluate import get_judge, predict
    from condgen.tasks.training.driver import TrainRequest, train

    shards = default_shards_uri("bundled:mnist")
    ingest("bundled:mnist", shards)
    handle = load_clip(f"embedded:{args.clip_config}", data_uri=shards, steps=args.fit_steps)
    emb = embed(shards, handle, num_workers=args.workers, progress=False)
    judge = get_judge(shards)
    base = dict(DEMO_MODELS[0]["config"])
    bs = int(DEMO_MODELS[0]["batch_size"])

    runs = {}
    kinds = [("label", base, None), ("text", {**base, "condition": "text", "text_dim": handle.embed_dim},
                                             emb.fingerprint)]
    for kind, cfg, embeddings in kinds[1:] if args.skip_label else kinds:
        t0 = time.perf_counter()
        res = train(TrainRequest(model="cvae", shards_uri=shards, model_config=cfg, epochs=args.epochs,
                                 batch_size=bs, num_workers=args.workers, embeddings=embeddings,
                                 run_name=f"bench-text-{kind}"))
        runs[kind] = (load_trained(res.checkpoint_uri)[0].eval(), time.perf_counter() - t0)

    def accuracy(model, conds: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            x = model.sample(conds, generator=torch.Generator().manual_seed(0))
        probs, _ = predict(judge.model, x)
        return float((probs.argmax(-1) == labels).float().mean())

    n = args.per_class
    classes = torch.arange(10).repeat_interleave(n)
    rows = [] if args.skip_label else [("label", "the label itself", accuracy(runs["label"][0], classes, classes))]
    seen = [f"a {label_word(c)}" for c in range(10)]
    prompt_sets = {"seen template (\"a seven\")": [seen]}
    prompt_sets["unseen phrasings (mean of 4 templates)"] = [[t.format(CLASS_NAMES[c]) for c in range(10)]
                                                             for t in UNSEEN_TEMPLATES]
    per_template = {}
    for name, sets in prompt_sets.items():
        accs = []
        for prompts in sets:
            e = handle.encode_texts(prompts)  # (10, D)
            acc = accuracy(runs["text"][0], e.repeat_interleave(n, 0), classes)
            accs.append(acc)
            per_template[prompts[7]] = acc
        rows.append(("text", name, float(np.mean(accs))))

    print(f"\nCLIP {args.clip_config}; demo CVAE {base}, {args.epochs} epochs, {args.workers} workers; {n} samples per prompt and digit; "
          f"judge test accuracy {judge.test_accuracy:.3f}\n")
    print("| conditioning | requested with | conditional accuracy |")
    print("|---|---|---|")
    for kind, how, acc in rows:
        print(f"| {kind} | {how} | **{acc:.3f}** |")
    print("\nper unseen template (the prompt for 7 shown):")
    for prompt, acc in per_template.items():
        print(f"  {prompt!r}: {acc:.3f}")
    return {"rows": rows, "per_template": per_template, "judge": judge.test_accuracy,
            "train_s": {k: v[1] for k, v in runs.items()}}


if __name__ == "__main__":
    main()
