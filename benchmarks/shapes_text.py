"""Text-to-image on ``bundled:shapes`` you can measure: prompt following, CFG, negative prompts, edits.

Issue #15. The data set's captions combine colour, shape, size and position, and its ground truth is
exact, so the pixel checker (``tasks/judging/shapes_checker.py``) turns "the model follows the prompt"
into numbers (``tasks/judging/shapes_eval.py``). The steps:

1. ingest ``bundled:shapes:size=S,n=N`` (held-out colour x shape combinations in ``test_unseen``);
2. the embedded CLIP fitted on the train captions (``tasks/clip/fit.py``, cached beside the shards; not
   registered), every train caption embedded with it, and its zero-shot accuracy per attribute on real
   test images (each image against its own caption with that one attribute varied);
3. the ``--models`` (default ``diffusion``): a text-conditioned pixel diffusion model (pooled CLIP embedding
   + cross-attention at the lowest resolution; ``--prediction``, ``--schedule``, ``--loss-weighting``,
   ``--attention``, ``--ema-decay``, or ``--recipe`` for the registry's diffusion recipe, chosen by
   benchmarks/diffusion_recipe.py) trained by a direct loop of ``--steps`` Adam steps over
   ``ConditionalDiffusion.loss``, one random phrasing of each image's captions per step; and on the same
   embeddings a text-conditioned ``cvae``, ``cgan`` and latent diffusion ``ldm``, each trained by a direct loop
   over its own ``train_step`` (``benchmarks/shapes_text_models.py``; a cGAN step is a D and a G step);
4. tables: per-attribute and joint accuracy (seen = ``test`` captions, unseen = ``test_unseen``) and KID
   (on the judge's penultimate features, as the pipeline's evaluation computes it for RGB sets) for each
   CFG weight in ``--cfg`` (the CVAE and the cGAN have no CFG: one unguided row each); the checker on real
   test images (its ceiling); the negative-prompt rate ("a {shape}" with negative "{colour}": share of
   samples of that colour, with vs without; CFG models only); edit scores (DDIM inversion, null-text
   inversion, SDEdit: asked attribute changed and the others kept; pixel diffusion only).

    .venv/bin/python -m benchmarks.shapes_text --quick                    # smoke run, ~3 min on one core
    .venv/bin/python -m benchmarks.shapes_text --recipe --steps 6000 --out /tmp/shapes-text --json /tmp/st.json
    .venv/bin/python -m benchmarks.shapes_text --quick --models diffusion cvae cgan ldm    # every model, smoke run
    .venv/bin/python -m benchmarks.shapes_text --models cvae cgan --steps cvae=3000,cgan=6000
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from benchmarks.diffusion_common import machine, table, write_json
from benchmarks.diffusion_recipe import train_steps
from benchmarks.shapes_text_models import (
    AE_STEPS,
    EDITABLE,
    GUIDED,
    MODELS,
    STEPS,
    parse_steps,
    plain_sampler,
    train_model,
)
from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig
from condgen.models.registry import RECIPES
from condgen.tasks.data.splits import load_split
from condgen.tasks.io.images import from_uint8, grid
from condgen.tasks.judging import shapes_eval
from condgen.tasks.judging.feature_metrics import kernel_inception_distance, kid_subset_size, too_few
from condgen.tasks.judging.shapes_checker import JUDGED, check

RECIPE = RECIPES["diffusion"]  # what a new ``diffusion`` run trains with (models/registry.py)
QUICK = {"n": 600, "clip_steps": 30, "batch": 32, "channels": "8,16", "sample_steps": 5, "cfg": "0,2",
         "n_eval": 18, "n_negative": 1, "n_edit": 4, "edit_steps": 4, "inner_steps": 2, "judge_epochs": 1}
EDIT_METHODS = ("ddim_inversion", "null_text", "sdedit")
FULL = {"n": 20_000, "clip_steps": 300, "batch": 128, "channels": "32,64,64", "sample_steps": 25,
        "cfg": "0,1,2,3,5", "n_eval": 300, "n_negative": 4, "n_edit": 60, "edit_steps": 25, "inner_steps": 10,
        "judge_epochs": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 600 shapes, a tiny model, few steps and samples")
    add_shard_args(p, QUICK, FULL)
    p.add_argument("--clip-config", default="condgen-clip-tiny", help="embedded CLIP architecture")
    p.add_argument("--clip-steps", type=int, help="CLIP fitting steps (default 300; --quick 30)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=["diffusion"], help="text-conditioned models to train")
    p.add_argument("--steps", help="Adam steps, N for every model or per model as cvae=2000,cgan=4000 (default "
                   f"{STEPS['full']}; --quick {STEPS['quick']})")
    p.add_argument("--ae-steps", type=int, help=f"ldm autoencoder steps (default {AE_STEPS['full']}; --quick "
                   f"{AE_STEPS['quick']})")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--channels", help="U-Net widths per level (default 32,64,64; --quick 8,16)")
    p.add_argument("--context-tokens", type=int, default=4, help="cross-attention tokens from the text embedding")
    p.add_argument("--p-uncond", type=float, default=0.1, help="condition dropout (CFG training)")
    p.add_argument("--prediction", choices=["eps", "v"], default="eps")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--loss-weighting", choices=["none", "min_snr", "min_snr_plus_one"], default="none")
    p.add_argument("--attention", action="store_true", help="self-attention at the lowest resolution")
    p.add_argument("--ema-decay", type=float, default=0.0)
    p.add_argument("--coords", action="store_true", help="pixel coordinates in the U-Net (CoordConv; with or without --recipe)")
    p.add_argument("--recipe", action="store_true", help="all of: " + ", ".join(f"{k}={v}" for k, v in RECIPE.items()))
    p.add_argument("--sample-steps", type=int, help="DDIM steps per sample (default 25; --quick 5)")
    p.add_argument("--cfg", help="CFG weights of the sweep (default 0,1,2,3,5; --quick 0,2)")
    p.add_argument("--n-eval", type=int, help="prompts per split, seen and unseen (default 300; --quick 18)")
    p.add_argument("--negative-guidance", type=float, default=3.0, help="CFG weight of the negative-prompt test")
    p.add_argument("--n-negative", type=int, help="samples per (shape, negated colour) (default 4; --quick 1)")
    p.add_argument("--n-edit", type=int, help="real test images per edit (default 60; --quick 4)")
    p.add_argument("--edit-guidance", type=float, default=2.0, help="CFG weight of the edits' regeneration")
    p.add_argument("--edit-steps", type=int, help="DDIM steps of the edits (default 25; --quick 4)")
    p.add_argument("--strength", default="0.6", help="SDEdit strength, or a comma list for a sweep (one editor each)")
    p.add_argument("--edit-methods", default=",".join(EDIT_METHODS),
                   help=f"comma list of edit methods to score (default all: {','.join(EDIT_METHODS)})")
    p.add_argument("--inner-steps", type=int, help="null-text Adam steps per timestep (default 10; --quick 2)")
    p.add_argument("--judge-epochs", type=int, help="judge training epochs for KID features (default 4; --quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the model (safetensors) and sample grids")
    p.add_argument("--checkpoint", help="score this pixel diffusion model.safetensors (an earlier --out) instead of "
                                        "training one; give the options it was trained with (--channels, --coords, ...)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    budget, args.models = "quick" if args.quick else "full", list(dict.fromkeys(args.models))
    try:
        args.steps = parse_steps(args.steps, args.models, STEPS[budget])
    except ValueError as e:
        p.error(str(e))
    args.ae_steps = args.ae_steps or AE_STEPS[budget]
    try:
        args.strengths = [float(v) for v in str(args.strength).split(",")]
        args.edit_methods = [m for m in args.edit_methods.split(",") if m]
    except ValueError as e:
        p.error(f"--strength: {e}")
    if any(not 0 < v <= 1 for v in args.strengths) or not set(args.edit_methods) <= set(EDIT_METHODS):
        p.error(f"--strength takes values in (0, 1]; --edit-methods takes {', '.join(EDIT_METHODS)}")
    return fill_budget(args, QUICK, FULL)


def add_shard_args(p: argparse.ArgumentParser, quick: dict, full: dict) -> None:
    """The options ``ingest_shapes`` reads (with ``--seed``): the set's size, image side, or a set already ingested."""
    p.add_argument("--n", type=int, help=f"shapes to generate (default {full['n']}; --quick {quick['n']})")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--shards", help="an ingested bundled:shapes set (default: ingest under the storage root)")


def fill_budget(args: argparse.Namespace, quick: dict, full: dict) -> argparse.Namespace:
    """Every option left unset takes its value from the ``--quick`` or the full budget table."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def ingest_shapes(args: argparse.Namespace) -> str:
    if args.shards:
        return args.shards
    from condgen.tasks.data.ingest import ingest
    from condgen.tasks.io import settings, storage

    uri = storage.join(settings.storage_root(), "shards", f"shapes-n{args.n}-s{args.size}-seed{args.seed}")
    ingest(f"bundled:shapes:size={args.size},n={args.n},seed={args.seed}", uri, shard_size=1000)
    return uri


class Encoder:
    """Prompts -> CLIP text embeddings, each distinct prompt encoded once."""

    def __init__(self, handle):
        self.handle, self.cache = handle, {}

    def __call__(self, prompts) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if new:
            self.cache.update(zip(new, self.handle.encode_texts(new)))
        return torch.stack([self.cache[p] for p in prompts])


def caption_embeddings(encode: Encoder, captions) -> torch.Tensor:
    """(N, n_captions, D): every phrasing of every train image (shorter lists repeat cyclically)."""
    k = max(len(c) for c in captions)
    rows = [[c[j % len(c)] for j in range(k)] for c in captions]
    flat = encode([p for r in rows for p in r])
    return flat.view(len(rows), k, -1)


@torch.no_grad()
def zero_shot(encode: Encoder, handle, images: np.ndarray, tags) -> dict[str, float]:
    """Per attribute: the share of real images whose own caption, among the captions that differ from it in
    that attribute only, is the one CLIP ranks first."""
    img = handle.encode_images(images)  # (N, D), unit norm
    out = {}
    for a in JUDGED:
        values = shapes_eval.VALUES[a]
        prompts = [shapes_eval.caption({**t, a: v}) for t in tags for v in values]
        txt = encode(prompts).view(len(tags), len(values), -1)  # (N, V, D)
        best = (txt @ img[:, :, None]).squeeze(-1).argmax(1).numpy()
        out[a] = float(np.mean([values[b] == t[a] for b, t in zip(best, tags)]))
    return out


def train(config: DiffusionConfig, x: torch.Tensor, txt: torch.Tensor, *, steps: int, batch: int, seed: int,
          warmup: int = 100) -> tuple[ConditionalDiffusion, list[float], float]:
    """benchmarks/diffusion_recipe.py's ``train_steps`` with text: one random phrasing per image per step."""
    def phrasing(t: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return t[idx, torch.randint(0, t.shape[1], (len(idx),), generator=g)]

    return train_steps(config, x, txt, steps=steps, batch=batch, seed=seed, warmup=warmup, pick=phrasing)


def sample_all(sampler, prompts, batch: int = 100) -> np.ndarray:
    return np.concatenate([sampler(prompts[i:i + batch], None) for i in range(0, len(prompts), batch)])


def kid(judge, real_feats: np.ndarray, images: np.ndarray) -> float:
    from condgen.tasks.judging.evaluate import predict

    if too_few(len(real_feats), len(images)):
        return float("nan")
    feats = predict(judge.model, from_uint8(images))[1].numpy().astype(np.float64)
    return kernel_inception_distance(real_feats, feats, subset_size=kid_subset_size(len(real_feats), len(feats)))[0]


def save_grid(images: np.ndarray, path: str | None) -> None:
    if path:
        from PIL import Image

        Image.fromarray(grid(images[:64], nrow=8)).save(path)


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def acc_row(model: str, label: str, seen: dict, unseen: dict | None, *extra) -> list:
    """model, label, seen accuracies and unseen joint accuracy in %, then ``extra`` as they are."""
    row = [model, label, *(pct(seen[a]) for a in (*JUDGED, "joint"))]
    return row + [pct(unseen["joint"]) if unseen else "—", *extra]


def score(sampler, sets: dict, judge, real_feats: dict) -> tuple[dict, dict, dict]:
    """Checker accuracies, KID and the samples of one prompt per row of each split's prompt set."""
    result, kids, images = {}, {}, {}
    for split, (prompts, requested) in sets.items():
        images[split] = sample_all(sampler, prompts)
        result[split] = check(images[split], requested)[1]
        kids[split] = kid(judge, real_feats[split], images[split])
    return result, kids, images


def train_diffusion(args: argparse.Namespace, text_dim: int, x: torch.Tensor, txt: torch.Tensor):
    """The pixel diffusion model of step 3 and its record (config, seconds, final loss)."""
    recipe = RECIPE if args.recipe else {"prediction": args.prediction, "schedule": args.schedule,
                                         "loss_weighting": args.loss_weighting, "attention": args.attention,
                                         "ema_decay": args.ema_decay}
    config = DiffusionConfig(image_size=args.size, in_channels=3, channels=tuple(int(c) for c in args.channels.split(",")),
                             num_classes=18, condition="text", text_dim=text_dim,
                             context_tokens=args.context_tokens, p_uncond=args.p_uncond, lr=args.lr,
                             sample_steps=args.sample_steps, coords=args.coords, **recipe)
    print(f"[train] {config}", flush=True)
    if args.checkpoint:
        from safetensors.torch import load_file

        model = ConditionalDiffusion(config)
        model.load_state_dict(load_file(args.checkpoint))
        print(f"[train] diffusion: loaded {args.checkpoint}, no training", flush=True)
        return model.eval(), {"seconds": 0.0, "final_loss": float("nan"), "checkpoint": args.checkpoint,
                              "recipe": {**recipe, "coords": args.coords},
                              "config": {k: str(v) for k, v in vars(config).items()}}
    steps = args.steps["diffusion"]
    model, losses, train_s = train(config, x, txt, steps=steps, batch=args.batch, seed=args.seed)
    loss = float(np.mean(losses[-50:]))
    print(f"[train] diffusion: {steps} steps in {train_s:.0f}s, final loss {loss:.4f}", flush=True)
    return model, {"seconds": train_s, "final_loss": loss, "recipe": {**recipe, "coords": args.coords},
                   "config": {k: str(v) for k, v in vars(config).items()}}


def edit_editors(model, encode: Encoder, args: argparse.Namespace) -> dict:
    """The ``--edit-methods`` as editors; SDEdit once per ``--strength`` ("sdedit s=0.8" when there are several)."""
    def editor(method: str, strength: float):
        return shapes_eval.diffusion_editor(model, encode, method, guidance=args.edit_guidance, steps=args.edit_steps,
                                            strength=strength, inner_steps=args.inner_steps, seed=args.seed)

    editors = {}
    for m in args.edit_methods:
        if m != "sdedit":
            editors[m] = editor(m, args.strengths[0])
        for s in args.strengths if m == "sdedit" else ():
            editors["sdedit" if len(args.strengths) == 1 else f"sdedit s={s:g}"] = editor(m, s)
    return editors


def budget_line(name: str, args: argparse.Namespace, record: dict) -> str:
    steps = f"{args.steps[name]} steps x batch {args.batch} in {record['seconds']:.0f}s"
    if "checkpoint" in record:
        steps = f"loaded from {record['checkpoint']} (its training budget is in that run's log)"
    if name == "diffusion":
        return f"diffusion: U-Net {args.channels}, {record['recipe']}, {steps}, final loss {record['final_loss']:.4f}"
    last = ", ".join(f"{k} {v:.4g}" for k, v in record["last"].items())
    ae = f"; autoencoder {args.ae_steps} steps in {record['autoencoder']['seconds']:.0f}s" if "autoencoder" in record else ""
    return f"{name}: channels {record['config']['channels']}, {steps} (last: {last}){ae}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    torch.set_num_threads(args.threads)
    from condgen.tasks.clip.fit import embedded_clip
    from condgen.tasks.judging.evaluate import get_judge, predict

    print(machine(), flush=True)
    t_all = time.perf_counter()
    shards = ingest_shapes(args)
    train_split = load_split(shards, "train", keys=("x", "captions"))
    splits = {s: load_split(shards, s, keys=("x", "tags", "captions")) for s in ("test", "test_unseen")}
    print(f"[data] {shards}: train {len(train_split['x'])}, test {len(splits['test']['x'])}, "
          f"test_unseen {len(splits['test_unseen']['x'])}", flush=True)

    t0 = time.perf_counter()
    handle = embedded_clip(shards, config=args.clip_config, steps=args.clip_steps, seed=args.seed, register_as=None)
    encode = Encoder(handle)
    txt = caption_embeddings(encode, train_split["captions"])
    zs = zero_shot(encode, handle, splits["test"]["x"][:500], list(splits["test"]["tags"][:500]))
    print(f"[clip] {args.clip_config}, {args.clip_steps} steps, {txt.shape} train caption embeddings, "
          f"{time.perf_counter() - t0:.0f}s; zero-shot on real test images {zs}", flush=True)

    judge = get_judge(shards, epochs=args.judge_epochs, log_to_mlflow=False)
    sets, real_feats = {}, {}
    for split, data in splits.items():
        prompts, requested, _ = shapes_eval.requests_from_split(data, n=args.n_eval, seed=args.seed)
        sets[split] = (prompts, requested)
        real_feats[split] = predict(judge.model, from_uint8(data["x"]))[1].numpy().astype(np.float64)
    print(f"[judge] test accuracy {judge.test_accuracy:.3f} (KID features)", flush=True)

    headers = ["model", "sampling", *(f"{a} %" for a in JUDGED), "joint %", "unseen joint %", "KID seen",
               "KID unseen", "unseen colour / shape / size / position %"]
    real = {s: check(d["x"], list(d["tags"]))[1] for s, d in splits.items()}
    rows = [acc_row("—", "real test images (checker ceiling)", real["test"], real["test_unseen"], "—", "—", "")]
    x = from_uint8(train_split["x"])
    n_edit = min(args.n_edit, len(splits["test"]["x"]))
    results: dict[str, dict] = {}
    for name in args.models:
        if name == "diffusion":
            model, record = train_diffusion(args, handle.embed_dim, x, txt)
        else:
            model, record = train_model(name, train_split["x"], x, txt, args=args, quick=args.quick,
                                        steps=args.steps[name], ae_steps=args.ae_steps)
        print(f"[train] {budget_line(name, args, record)}", flush=True)
        if args.out:
            from safetensors.torch import save_file

            os.makedirs(args.out, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      os.path.join(args.out, "model.safetensors" if name == "diffusion" else f"{name}.safetensors"))
        guided = name in GUIDED
        res = results[name] = {"train": record, "sweep": [], "negative": None, "edits": None}
        for w in (float(v) for v in args.cfg.split(",")) if guided else [0.0]:
            t0 = time.perf_counter()
            sampler = (shapes_eval.diffusion_sampler(model, encode, guidance=w, seed=args.seed) if guided
                       else plain_sampler(model, encode, seed=args.seed))
            result, kids, images = score(sampler, sets, judge, real_feats)
            prefix = "" if name == "diffusion" else f"{name}-"
            save_grid(images["test"], args.out and os.path.join(args.out, f"{prefix}cfg{w:g}.png"))
            u = result["test_unseen"]
            label = ("unguided" if w == 0 else f"CFG w={w:g}") if guided else "unguided (no CFG: no sweep)"
            rows.append(acc_row(name, label, result["test"], u, kids["test"], kids["test_unseen"],
                                " / ".join(f"{100 * u[a]:.0f}" for a in JUDGED)))
            res["sweep"].append({"guidance": w if guided else None, "seen": result["test"], "unseen": u,
                                 "kid_seen": kids["test"], "kid_unseen": kids["test_unseen"],
                                 "seconds": time.perf_counter() - t0})
            print(table(headers, rows[-1:]), flush=True)
        if guided:
            res["negative"] = shapes_eval.negative_prompt_rate(
                shapes_eval.diffusion_sampler(model, encode, guidance=args.negative_guidance, seed=args.seed),
                n_per_pair=args.n_negative)
        if name in EDITABLE:
            editors = edit_editors(model, encode, args)
            t0 = time.perf_counter()
            res["edits"] = shapes_eval.edit_scores(editors, splits["test"]["x"][:n_edit],
                                                   list(splits["test"]["tags"][:n_edit]), seed=args.seed)
            res["edit_seconds"] = time.perf_counter() - t0
        del model

    print(f"\n{machine()}; {time.perf_counter() - t_all:.0f}s in all\n"
          f"data: {shards} ({len(x)} train images, {args.size}px); CLIP {args.clip_config} ({args.clip_steps} steps), "
          f"zero-shot on real test images: " + ", ".join(f"{a} {pct(v)} %" for a, v in zs.items()))
    print(f"DDIM {args.sample_steps} steps (diffusion, ldm); {args.n_eval} prompts per split; judge test accuracy "
          f"{judge.test_accuracy:.3f}; models:")
    for name, res in results.items():
        print(f"  {budget_line(name, args, res['train'])}")
    print()
    print(table(headers, rows))
    print(f"\nnegative prompts (CFG w={args.negative_guidance:g}): \"a {{shape}}\" has the negated colour in")
    for name, res in results.items():
        neg = res["negative"]
        print(f"  {name}: " + (f"{pct(neg['rate_without'])} % without the negative, {pct(neg['rate_with'])} % with it "
                               f"({neg['n']} samples); shape kept {pct(neg['shape_acc_without'])} % / "
                               f"{pct(neg['shape_acc_with'])} %" if neg else
                               "not applicable (no classifier-free guidance, so no negative prompt)"))
    edited = {f"{name} {m}": s for name, res in results.items() if res["edits"] for m, s in res["edits"].items()}
    if edited:
        print()
        print(table(["edit method", *(f"{a}: changed / kept / both %" for a in shapes_eval.EDITABLE)],
                    [[m, *(f"{pct(s[a]['changed'])} / {pct(s[a]['kept'])} / **{pct(s[a]['score'])}**"
                           for a in shapes_eval.EDITABLE)] for m, s in edited.items()]))
        print(f"\n{n_edit} real test images per attribute, CFG w={args.edit_guidance:g}, {args.edit_steps} DDIM steps, "
              f"SDEdit strength {args.strength}, null-text {args.inner_steps} Adam steps/step; "
              + ", ".join(f"{n} {r['edit_seconds']:.0f}s" for n, r in results.items() if r["edits"]))
    others = [n for n in results if n not in EDITABLE]
    if others:
        print(f"edits (DDIM / null-text inversion, SDEdit): not applicable to {', '.join(others)} "
              "(edit_images inverts a pixel diffusion model)")
    payload = {"shards": shards, "args": vars(args), "zero_shot": zs, "judge_accuracy": judge.test_accuracy,
               "real": real, "models": results}
    if "diffusion" in results:  # the single-model layout of earlier runs (docs/results.md)
        d = results["diffusion"]
        payload.update(config=d["train"]["config"], train_seconds=d["train"]["seconds"],
                       final_loss=d["train"]["final_loss"], sweep=d["sweep"], negative=d["negative"],
                       edits=d["edits"])
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
