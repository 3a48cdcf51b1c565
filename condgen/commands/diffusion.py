"""``condgen sample`` and ``condgen edit``: a trained diffusion model from the command line.

    condgen sample --model models:/condgen-diffusion@champion --guidance cfg --scale 2 --out grid.png
    condgen sample --model file:///…/checkpoints/<run> --guidance classifier \
                   --classifier file:///…/checkpoints/<clf run> --scale 2 --sampler ddpm --out grid.png
    condgen edit in.png --model … --method null_text --source 3 --target 8 --scale 2 --out edited.png

Models load from a checkpoint (path, ``file://``, ``s3://``) or the registry (``models:/NAME@ALIAS``
or ``models:/NAME/VERSION``). The work is done by ``tasks.generation.sampling`` (``sample_images``,
``edit_images``): the same functions the serving app and batch generation call, so
``POST /v1/generate`` / ``/v1/edit`` with the same parameters give these images
(tests/test_sampling_parity.py). Grids and edited PNGs are in the model's colour mode: ``L`` for a
1-channel model, ``RGB`` for a 3-channel one.

Imports of torch, MLflow and open_clip are inside the command functions: ``condgen`` builds
every sub-command's parser on each invocation, and those imports take seconds.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "models:/condgen-diffusion@champion"
# The choices and defaults of tasks.generation.sampling, spelt out so that building the parser
# imports no torch (tests/test_generate.py checks they match).
GUIDANCE = ("none", "cfg", "classifier", "clip")
EDIT_METHODS = ("ddim_inversion", "null_text", "sdedit")
NULL_TEXT_INNER_STEPS = 10


def load_model(uri: str) -> tuple[Any, dict[str, Any]]:
    """A model + its meta from ``models:/…`` (MLflow registry) or a checkpoint URI/path."""
    if uri.startswith("models:/"):
        from condgen.tasks.io.model_store import load_registered

        return load_registered(uri)
    from condgen.tasks.io.model_store import load_trained

    return load_trained(uri)


def _labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError as e:
        raise SystemExit(f"labels are comma-separated integers, got {text!r}") from e


def _write_png(out: str, img) -> None:
    from condgen.tasks.io import storage
    from condgen.tasks.io.images import png_bytes

    data = png_bytes(img)
    if "://" in out:
        storage.write_bytes(out, data)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(data)


def _read_png(path: str, channels: int, size: int):
    """An image file as (1, channels, size, size) in [-1, 1]: converted to the model's colour mode and
    resized if needed (``tasks.generation.inputs``, the policy ``POST /v1/edit`` applies to uploads)."""
    from condgen.tasks.generation.inputs import BadImage, decode_for_model
    from condgen.tasks.io import storage

    data = storage.read_bytes(path) if "://" in path else Path(path).read_bytes()
    try:
        return decode_for_model(data, channels, size)
    except BadImage as exc:
        raise SystemExit(f"{path}: {exc}") from None


def _text_conditions(args: argparse.Namespace, prompts: list[str]):
    from condgen.tasks.clip.load import load_clip

    handle = load_clip(args.clip, data_uri=args.clip_data)
    return handle, handle.encode_texts(prompts)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from condgen.tasks.generation.sampling import sample_images
    from condgen.tasks.io.images import grid, to_uint8

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_model(args.model)
    conf = model.config
    kw: dict[str, Any] = {}
    per = args.per_label
    if conf.condition == "text" or args.guidance == "clip":
        if not args.prompt:
            raise SystemExit("a text-conditioned model and CLIP guidance need --prompt (and --clip SPEC)")
        handle, txt = _text_conditions(args, args.prompt)
        if args.guidance == "clip":
            kw.update(clip_encoder=handle.image_tower)
    if conf.condition == "text":
        cond = txt.repeat_interleave(per, 0)
        if args.negative_prompt:
            kw["negative"] = _text_conditions(args, [args.negative_prompt])[1]
    else:
        labels = _labels(args.labels) or list(range(conf.num_classes))
        cond = torch.tensor(labels).repeat_interleave(per)
        if args.negative is not None:
            kw["negative"] = [args.negative]
        if args.guidance == "clip":
            kw["clip_text"] = txt[:1]
    if args.guidance == "classifier":
        if not args.classifier:
            raise SystemExit("--guidance classifier needs --classifier URI (a trained noisy_classifier)")
        kw["classifier"] = load_model(args.classifier)[0]
    x = sample_images(model, cond, sampler=args.sampler, steps=args.steps, eta=args.eta, guidance=args.guidance,
                      scale=args.scale, conditional=not args.unconditional, seed=args.seed,
                      batch_size=args.batch_size, progress=not args.no_progress, **kw)
    _write_png(args.out, grid(to_uint8(x), nrow=args.nrow or per, scale=args.zoom))
    print(f"{len(x)} samples ({args.sampler}, guidance {args.guidance}) from {args.model} -> {args.out}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    import torch

    from condgen.tasks.generation.inputs import model_geometry
    from condgen.tasks.generation.sampling import edit_images
    from condgen.tasks.io.images import to_uint8

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    if model.config.condition != "label":
        raise SystemExit("condgen edit takes class labels (--source/--target); text models: use tasks.generate")
    channels, size = model_geometry(model)
    x = torch.cat([_read_png(p, channels, size) for p in args.inputs])  # (B, C, H, W)
    source, target = _labels(args.source), _labels(args.target)
    out = edit_images(model, x, method=args.method, source_cond=source, target_cond=target, strength=args.strength,
                      steps=args.steps, scale=args.scale, seed=args.seed, inner_steps=args.inner_steps,
                      progress=not args.no_progress)
    images = to_uint8(out)
    if len(args.inputs) == 1 and args.out.lower().endswith(".png"):
        paths = [args.out]
    else:
        paths = [os.path.join(args.out, Path(p).stem + f"_{args.method}.png") for p in args.inputs]
    for path, img in zip(paths, images):
        _write_png(path, img)
    print(f"{len(images)} image(s) edited ({args.method}) -> {', '.join(paths)}")
    return 0


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint path/URI or models:/NAME@ALIAS")
    s.add_argument("--steps", type=int, help="sampler steps (default: the model's sample_steps; ddpm: all T)")
    s.add_argument("--scale", type=float, help="guidance weight (default: the model's guidance_scale for cfg)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample", help="sample a PNG grid from a diffusion model (any sampler and guidance)")
    _common(s)
    s.add_argument("--labels", help="comma-separated class labels, one grid row each (default: every class)")
    s.add_argument("--per-label", type=int, default=8, help="samples per label / prompt")
    s.add_argument("--prompt", action="append", help="text prompt (text models, CLIP guidance); repeatable")
    s.add_argument("--clip", default="embedded", help="CLIP spec for --prompt (see tasks.clip.load_clip)")
    s.add_argument("--clip-data", help="shard set URI the embedded CLIP was fitted on")
    s.add_argument("--sampler", choices=["ddim", "ddpm", "dpmpp_2m"], default="ddim")
    s.add_argument("--eta", type=float,
                   help="DDIM eta (0 = deterministic, 1 = ancestral; default: the model's sample_eta)")
    s.add_argument("--guidance", choices=list(GUIDANCE), default="cfg")
    s.add_argument("--negative", type=int, help="negative label (cfg): steer away from this class")
    s.add_argument("--negative-prompt", help="negative text prompt (cfg, text models)")
    s.add_argument("--classifier", help="noisy_classifier checkpoint URI or models:/… (classifier guidance)")
    s.add_argument("--unconditional", action="store_true",
                   help="run the network with the null token: only the guidance steers")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--nrow", type=int, help="images per grid row (default --per-label)")
    s.add_argument("--zoom", type=int, default=2, help="grid pixel scale")
    s.add_argument("--out", default="samples.png", help="PNG path or storage URI")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("edit", help="edit PNG image(s) with a diffusion model (inversion or SDEdit)")
    s.add_argument("inputs", nargs="+", help="PNG/JPEG image(s), greyscale or colour: converted to the model's "
                   "channels (colour -> luma for a greyscale model; grey -> RGB and transparency onto white for a "
                   "colour one) and resized (bilinear) to its image size")
    _common(s)
    s.add_argument("--method", choices=list(EDIT_METHODS), default="ddim_inversion")
    s.add_argument("--source", help="label(s) of the input image(s): one, or one per input (inversions)")
    s.add_argument("--target", help="label(s) to edit towards (default: --source, a reconstruction)")
    s.add_argument("--strength", type=float, default=0.6, help="SDEdit: noise level t0 / T in [0, 1]")
    s.add_argument("--inner-steps", type=int, default=NULL_TEXT_INNER_STEPS, help="null-text: Adam steps per timestep")
    s.add_argument("--out", default="edited", help="PNG path (one input) or folder")
    s.set_defaults(fn=cmd_edit)
