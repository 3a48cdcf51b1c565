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

The model is checked before its weights load: it must exist and be a ``diffusion`` model (its
checkpoint's ``config.json``), else one line says how to get one. Imports of torch, MLflow and
open_clip are inside the command functions: ``condgen`` builds every sub-command on each
invocation, and those imports take seconds.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from condgen.commands import checks

DEFAULT_MODEL = "models:/condgen-diffusion@champion"
# The choices and defaults of tasks.generation.sampling, spelt out so that building the command
# imports no torch (tests/test_generate.py checks they match).
GUIDANCE = ("none", "cfg", "classifier", "clip")
EDIT_METHODS = ("ddim_inversion", "null_text", "sdedit")
SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
NULL_TEXT_INNER_STEPS = 10

Model = Annotated[str, typer.Option(help="checkpoint path/URI or models:/NAME@ALIAS")]
Steps = Annotated[int | None, typer.Option(help="sampler steps (default: the model's sample_steps; ddpm: all T)")]
Scale = Annotated[float | None, typer.Option(help="guidance weight (default: the model's guidance_scale for cfg)")]
Threads = Annotated[int | None, typer.Option(help="torch CPU threads")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="no progress bar")]


def load_model(uri: str) -> tuple[Any, dict[str, Any]]:
    """A model + its meta from ``models:/…`` (MLflow registry) or a checkpoint URI/path."""
    if uri.startswith("models:/"):
        from condgen.tasks.io.model_store import load_registered

        return load_registered(uri)
    from condgen.tasks.io.model_store import load_trained

    return load_trained(uri)


def load_diffusion(command: str, uri: str, threads: int | None) -> tuple[Any, dict[str, Any]]:
    """The diffusion model ``uri`` names; InputError (one line: how to get one) when it is missing or another family."""
    need = f"condgen {command} needs a diffusion model: {checks.DIFFUSION_FIX}"
    family = checks.model_ref(uri, need)
    if family is not None and family != "diffusion":
        raise checks.needs_diffusion(command, uri, family)
    import torch

    from condgen.models.diffusion import ConditionalDiffusion

    if threads:
        torch.set_num_threads(threads)
    model, meta = load_model(uri)
    if not isinstance(model, ConditionalDiffusion):
        raise checks.needs_diffusion(command, uri, meta.get("model"))
    return model, meta


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
        raise checks.InputError(f"{path}: {exc}") from None


def _text_conditions(clip: str, clip_data: str | None, prompts: list[str]):
    from condgen.tasks.clip.load import load_clip

    handle = load_clip(clip, data_uri=clip_data)
    return handle, handle.encode_texts(prompts)


def sample(
    model: Model = DEFAULT_MODEL,
    steps: Steps = None,
    scale: Scale = None,
    seed: int = 0,
    threads: Threads = None,
    no_progress: NoProgress = False,
    labels: Annotated[str | None, typer.Option(
        help="comma-separated class labels, one grid row each (default: every class)")] = None,
    per_label: Annotated[int, typer.Option(help="samples per label / prompt")] = 8,
    prompt: Annotated[list[str] | None, typer.Option(
        help="text prompt (text models, CLIP guidance); repeatable")] = None,
    clip: Annotated[str, typer.Option(help="CLIP spec for --prompt (see tasks.clip.load_clip)")] = "embedded",
    clip_data: Annotated[str | None, typer.Option(help="shard set URI the embedded CLIP was fitted on")] = None,
    sampler: Literal[SAMPLERS] = "ddim",
    eta: Annotated[float | None, typer.Option(
        help="DDIM eta (0 = deterministic, 1 = ancestral; default: the model's sample_eta)")] = None,
    guidance: Literal[GUIDANCE] = "cfg",
    negative: Annotated[int | None, typer.Option(help="negative label (cfg): steer away from this class")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="negative text prompt (cfg, text models)")] = None,
    classifier: Annotated[str | None, typer.Option(
        help="noisy_classifier checkpoint URI or models:/… (classifier guidance)")] = None,
    unconditional: Annotated[bool, typer.Option(
        "--unconditional", help="run the network with the null token: only the guidance steers")] = False,
    batch_size: int = 256,
    nrow: Annotated[int | None, typer.Option(help="images per grid row (default --per-label)")] = None,
    zoom: Annotated[int, typer.Option(help="grid pixel scale")] = 2,
    out: Annotated[str, typer.Option(help="PNG path or storage URI")] = "samples.png",
) -> int:
    """Sample a PNG grid from a diffusion model (any sampler and guidance)."""
    wanted = checks.labels(labels)
    if guidance == "classifier" and not classifier:
        raise checks.InputError("--guidance classifier needs --classifier URI (a trained noisy_classifier)")
    if guidance == "clip" and not prompt:
        raise checks.InputError("CLIP guidance needs --prompt (and --clip SPEC)")
    if classifier and checks.model_ref(classifier) not in (None, "noisy_classifier"):
        raise checks.InputError(f"--classifier {classifier} is not a noisy_classifier; train one with "
                                f"`condgen train --model noisy_classifier`")
    net, _ = load_diffusion("sample", model, threads)
    import torch

    from condgen.tasks.generation.sampling import sample_images
    from condgen.tasks.io.images import grid, to_uint8

    conf = net.config
    kw: dict[str, Any] = {}
    if conf.condition == "text" or guidance == "clip":
        if not prompt:
            raise checks.InputError(f"{model} is text-conditioned: pass --prompt (and --clip SPEC)")
        handle, txt = _text_conditions(clip, clip_data, prompt)
        if guidance == "clip":
            kw.update(clip_encoder=handle.image_tower)
    if conf.condition == "text":
        cond = txt.repeat_interleave(per_label, 0)
        if negative_prompt:
            kw["negative"] = _text_conditions(clip, clip_data, [negative_prompt])[1]
    else:
        cond = torch.tensor(wanted or list(range(conf.num_classes))).repeat_interleave(per_label)
        if negative is not None:
            kw["negative"] = [negative]
        if guidance == "clip":
            kw["clip_text"] = txt[:1]
    if guidance == "classifier":
        kw["classifier"] = load_model(classifier)[0]
    x = sample_images(net, cond, sampler=sampler, steps=steps, eta=eta, guidance=guidance, scale=scale,
                      conditional=not unconditional, seed=seed, batch_size=batch_size, progress=not no_progress, **kw)
    _write_png(out, grid(to_uint8(x), nrow=nrow or per_label, scale=zoom))
    print(f"{len(x)} samples ({sampler}, guidance {guidance}) from {model} -> {out}")
    return 0


def edit(
    inputs: Annotated[list[str], typer.Argument(help="PNG/JPEG image(s), greyscale or colour: converted to the "
                                                "model's channels (colour -> luma for a greyscale model; grey -> RGB "
                                                "and transparency onto white for a colour one) and resized "
                                                "(bilinear) to its image size")],
    model: Model = DEFAULT_MODEL,
    steps: Steps = None,
    scale: Scale = None,
    seed: int = 0,
    threads: Threads = None,
    no_progress: NoProgress = False,
    method: Literal[EDIT_METHODS] = "ddim_inversion",
    source: Annotated[str | None, typer.Option(
        help="label(s) of the input image(s): one, or one per input (inversions)")] = None,
    target: Annotated[str | None, typer.Option(
        help="label(s) to edit towards (default: --source, a reconstruction)")] = None,
    strength: Annotated[float, typer.Option(help="SDEdit: noise level t0 / T in [0, 1]")] = 0.6,
    inner_steps: Annotated[int, typer.Option(help="null-text: Adam steps per timestep")] = NULL_TEXT_INNER_STEPS,
    out: Annotated[str, typer.Option(help="PNG path (one input) or folder")] = "edited",
) -> int:
    """Edit PNG image(s) with a diffusion model (inversion or SDEdit)."""
    source_labels, target_labels = checks.labels(source), checks.labels(target)
    for path in inputs:
        if "://" not in path:
            checks.local_file(path, "input image")
    net, _ = load_diffusion("edit", model, threads)
    if net.config.condition != "label":
        raise checks.InputError("condgen edit takes class labels (--source/--target); text models: use "
                                "tasks.generation.sampling.edit_images")
    import torch

    from condgen.tasks.generation.inputs import model_geometry
    from condgen.tasks.generation.sampling import edit_images
    from condgen.tasks.io.images import to_uint8

    channels, size = model_geometry(net)
    x = torch.cat([_read_png(p, channels, size) for p in inputs])  # (B, C, H, W)
    edited = edit_images(net, x, method=method, source_cond=source_labels, target_cond=target_labels,
                         strength=strength, steps=steps, scale=scale, seed=seed, inner_steps=inner_steps,
                         progress=not no_progress)
    images = to_uint8(edited)
    if len(inputs) == 1 and out.lower().endswith(".png"):
        paths = [out]
    else:
        paths = [os.path.join(out, Path(p).stem + f"_{method}.png") for p in inputs]
    for path, img in zip(paths, images):
        _write_png(path, img)
    print(f"{len(images)} image(s) edited ({method}) -> {', '.join(paths)}")
    return 0


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)
    app.command("edit")(edit)
