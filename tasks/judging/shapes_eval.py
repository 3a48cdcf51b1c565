"""Does a text-to-image model follow the prompt? ``bundled:shapes`` scored by the pixel checker.

Every function here is pure over callables, so fake samplers test it and any model plugs in:

* a **sampler** ``sampler(prompts, negatives) -> uint8 (N, H, W, 3)``: one image per prompt;
  ``negatives`` is None or one negative prompt (or None) per prompt;
* an **editor** ``editor(images, source_prompts, target_prompts) -> uint8 (N, H, W, 3)``: real
  images (uint8) edited from the prompt that describes them towards a changed prompt.

What is measured (``tasks/judging/shapes_checker.py`` reads colour, shape, size and position):

* ``prompt_accuracy``: per-attribute and joint accuracy of samples for captions of real test
  images; ``seen_unseen`` does it for the ``test`` split (combinations seen in training) and
  ``test_unseen`` (the held-out colour x shape combinations), compositional generalisation;
* ``negative_prompt_rate``: "a {shape}" with negative "{colour}" (the negative replaces the
  null condition of classifier-free guidance, seed 004): the share of samples whose measured
  colour is the negated one, against the same prompts without a negative (~1/6 if colour is
  uniform);
* ``edit_scores``: a real test image, its caption, and the caption with one attribute changed
  (colour, position or size); an edit succeeds when the asked attribute changed to the asked
  value AND every other judged attribute kept its value (DDIM inversion, null-text inversion,
  SDEdit: Song et al. 2021 §5.4, Mokady et al. 2023, Meng et al. 2022).

``render_request`` draws the requested attributes with the data set's own renderer: the oracle
sampler, which scores 100 %. ``diffusion_sampler`` / ``diffusion_editor`` wrap a text-conditioned
``ConditionalDiffusion`` and a prompt encoder (CLIP) as a sampler / an editor. ``evaluate_text_model`` is the pipeline's glue: a text-conditioned
model, the shard set's test / test_unseen captions and their stored CLIP embeddings, and the flat
``eval/shapes/...`` metrics ``tasks/judging/evaluate.py`` logs.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from condgen.tasks.data import shapes
from condgen.tasks.data.sidecars import load_embeddings
from condgen.tasks.data.splits import load_split
from condgen.tasks.generation.sampling import edit_images
from condgen.tasks.io import storage
from condgen.tasks.io.images import from_uint8, to_uint8
from condgen.tasks.judging.shapes_checker import JUDGED, accuracy, measure_batch

Sampler = Callable[[Sequence[str], Sequence[str | None] | None], np.ndarray]
Editor = Callable[[np.ndarray, Sequence[str], Sequence[str]], np.ndarray]
Encoder = Callable[[Sequence[str]], torch.Tensor]  # prompts -> CLIP text embeddings (N, D), e.g. encode_texts

EDITABLE = ("colour", "position", "size")  # the attributes an edit asks to change
VALUES: dict[str, tuple[str, ...]] = {"colour": shapes.COLOUR_NAMES, "shape": shapes.SHAPES,
                                      "size": tuple(shapes.SIZES), "position": tuple(shapes.POSITIONS)}
SOURCE_NAME = "bundled:shapes"
EVAL_PROMPTS = 200  # prompts per split in the pipeline's evaluation (a seeded subset of the split)
EVAL_SEED = 1234


# -- prompts and requests ------------------------------------------------------------------
def caption(attrs: Mapping[str, Any]) -> str:
    """The canonical caption of ``tasks/data/shapes.py``: "a {size} {colour} {shape} in the {position}"."""
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} in the {attrs['position']}"


def judged(attrs: Mapping[str, Any]) -> dict[str, str]:
    return {a: str(attrs[a]) for a in JUDGED}


def is_shapes_set(manifest: Mapping[str, Any]) -> bool:
    """True for a shard set ingested from ``bundled:shapes`` (the manifest's ``bundled.name``)."""
    return (manifest.get("bundled") or {}).get("name") == SOURCE_NAME


def requests_from_split(data: Mapping[str, Any], *, n: int | None = None, seed: int = 0,
                        phrasing: str = "canonical") -> tuple[list[str], list[dict[str, str]], np.ndarray]:
    """(prompts, requested attributes, row indices) for ``n`` rows of a ``load_split`` result
    (all rows when ``n`` is None; else a seeded subset, in split order). ``phrasing``:
    "canonical" (the first caption) or "paraphrase" (a seeded random one of the others)."""
    if phrasing not in ("canonical", "paraphrase"):
        raise ValueError(f"phrasing must be 'canonical' or 'paraphrase', got {phrasing!r}")
    total = len(data["tags"])
    rng = np.random.default_rng(seed)
    rows = np.arange(total) if n is None or n >= total else np.sort(rng.choice(total, size=n, replace=False))
    prompts = []
    for i in rows:
        caps = list(data["captions"][i])
        prompts.append(caps[0] if phrasing == "canonical" or len(caps) < 2 else caps[1 + rng.integers(len(caps) - 1)])
    return prompts, [judged(data["tags"][i]) for i in rows], rows


def render_request(attrs: Mapping[str, Any], image_size: int = 32, rng: np.random.Generator | None = None
                   ) -> np.ndarray:
    """The requested attributes drawn by the data set's renderer (uint8 (H, W, 3)): a side in the
    size's range and a centre within the position's jitter, uniform when ``rng`` is given, else the
    middle of each range. The oracle a perfect model matches."""
    lo, hi = shapes.SIZES[attrs["size"]]
    side = float(rng.uniform(lo, hi)) if rng is not None else (lo + hi) / 2
    ax, ay = shapes.POSITIONS[attrs["position"]]
    margin, half = shapes.EDGE_MARGIN_PX / image_size, side / 2

    def centre(anchor: float) -> float:
        a, b = max(anchor - shapes.JITTER, half + margin), min(anchor + shapes.JITTER, 1 - half - margin)
        return float(rng.uniform(a, b)) if rng is not None else float(np.clip(anchor, a, b))

    spec = shapes.ShapeSpec(attrs["colour"], attrs["shape"], attrs["size"], attrs["position"], centre(ax),
                            centre(ay), side)
    return shapes.render(spec, image_size)


# -- prompt following ---------------------------------------------------------------------
def _sample(sampler: Sampler, prompts: Sequence[str], negatives: Sequence[str | None] | None,
            batch_size: int) -> np.ndarray:
    out = []
    for i in range(0, len(prompts), batch_size):
        neg = None if negatives is None else list(negatives[i:i + batch_size])
        chunk = list(prompts[i:i + batch_size])
        images = np.asarray(sampler(chunk, neg))
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(chunk):
            raise ValueError(f"a sampler returns one uint8 RGB image (N, H, W, 3) per prompt; got {images.dtype} "
                             f"{images.shape} for {len(chunk)} prompts")
        out.append(images)
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def prompt_accuracy(sampler: Sampler, prompts: Sequence[str], requested: Sequence[Mapping[str, Any]], *,
                    samples_per_prompt: int = 1, batch_size: int = 64) -> dict[str, float]:
    """Per-attribute and joint accuracy (``shapes_checker.accuracy``) of ``samples_per_prompt``
    samples per prompt; ``n`` samples in all."""
    if len(prompts) != len(requested):
        raise ValueError(f"{len(prompts)} prompts for {len(requested)} requests")
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    requested = [r for r in requested for _ in range(samples_per_prompt)]
    return accuracy(measure_batch(_sample(sampler, prompts, None, batch_size)), requested)


@dataclass
class PromptSet:
    """Prompts and the attributes they ask for, from one split (``requests_from_split``)."""

    prompts: list[str]
    requested: list[dict[str, str]]


def seen_unseen(sampler: Sampler, seen: PromptSet, unseen: PromptSet | None, *, samples_per_prompt: int = 1,
                batch_size: int = 64) -> dict[str, dict[str, float]]:
    """``prompt_accuracy`` on seen (``test``) and unseen (``test_unseen``) combinations."""
    out = {"seen": prompt_accuracy(sampler, seen.prompts, seen.requested, samples_per_prompt=samples_per_prompt,
                                   batch_size=batch_size)}
    if unseen is not None and unseen.prompts:
        out["unseen"] = prompt_accuracy(sampler, unseen.prompts, unseen.requested,
                                        samples_per_prompt=samples_per_prompt, batch_size=batch_size)
    return out


def flat_metrics(result: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``seen_unseen``'s result as flat names: ``colour_acc`` .. ``joint_acc`` (seen), ``unseen_...``."""
    out = {}
    for split, prefix in (("seen", ""), ("unseen", "unseen_")):
        if split in result:
            out.update({f"{prefix}{a}_acc": float(result[split][a]) for a in (*JUDGED, "joint")})
    return out


def negative_prompt_rate(sampler: Sampler, *, n_per_pair: int = 4, colours: Sequence[str] = shapes.COLOUR_NAMES,
                         shape_names: Sequence[str] = shapes.SHAPES, batch_size: int = 64) -> dict[str, float]:
    """"a {shape}" with and without the negative prompt "{colour}", ``n_per_pair`` samples per
    (shape, colour): ``rate_without`` / ``rate_with`` = share whose measured colour is that colour
    (a working negative prompt pushes ``rate_with`` towards 0); ``shape_acc_*``: the prompt's shape
    kept; ``per_colour_with``: the rate per negated colour."""
    pairs = [(s, c) for s in shape_names for c in colours for _ in range(n_per_pair)]
    prompts, negatives = [f"a {s}" for s, _ in pairs], [c for _, c in pairs]
    out: dict[str, Any] = {"n": len(pairs)}
    negated = np.asarray(negatives)
    for name, neg in (("without", None), ("with", negatives)):
        got = measure_batch(_sample(sampler, prompts, neg, batch_size))
        colour = np.asarray([g["colour"] for g in got])
        out[f"rate_{name}"] = float((colour == negated).mean()) if pairs else float("nan")
        out[f"shape_acc_{name}"] = float(np.mean([g["shape"] == s for g, (s, _) in zip(got, pairs)])) \
            if pairs else float("nan")
        if name == "with":
            out["per_colour_with"] = {c: float((colour[negated == c] == c).mean()) for c in colours}
    return out


# -- edits ----------------------------------------------------------------------------------
def edit_targets(source: Sequence[Mapping[str, Any]], attribute: str, *, seed: int = 0,
                 avoid_held_out: bool = True) -> list[dict[str, str]]:
    """For each source, the same attributes with ``attribute`` changed to another value drawn by a
    generator seeded by ``seed``; ``avoid_held_out`` keeps colour edits off the held-out colour x
    shape combinations (so an edit is not also a test of unseen combinations)."""
    if attribute not in VALUES:
        raise ValueError(f"attribute must be one of {tuple(VALUES)}, got {attribute!r}")
    rng = np.random.default_rng(seed)
    out = []
    for src in source:
        src = judged(src)
        choices = [v for v in VALUES[attribute] if v != src[attribute]]
        if avoid_held_out:
            choices = [v for v in choices if (({**src, attribute: v}["colour"], {**src, attribute: v}["shape"])
                                              not in shapes.HELD_OUT)]
        out.append({**src, attribute: choices[int(rng.integers(len(choices)))]})
    return out


def edit_score(editor: Editor, images: np.ndarray, source: Sequence[Mapping[str, Any]], attribute: str, *,
               seed: int = 0, batch_size: int = 32) -> dict[str, float]:
    """Ask ``editor`` to change ``attribute`` of each image: ``changed`` = share where the measured
    attribute is the asked value, ``kept`` = share where every other judged attribute kept its
    source value, ``score`` = both at once (the issue's edit target), ``n``."""
    source = [judged(s) for s in source]
    target = edit_targets(source, attribute, seed=seed)
    src_prompts, tgt_prompts = [caption(s) for s in source], [caption(t) for t in target]
    out = []
    for i in range(0, len(source), batch_size):
        edited = np.asarray(editor(images[i:i + batch_size], src_prompts[i:i + batch_size],
                                   tgt_prompts[i:i + batch_size]))
        if edited.shape != images[i:i + batch_size].shape or edited.dtype != np.uint8:
            raise ValueError(f"an editor returns uint8 images shaped like its input {images[i:i + batch_size].shape}; "
                             f"got {edited.dtype} {edited.shape}")
        out.append(edited)
    got = measure_batch(np.concatenate(out)) if out else []
    others = [a for a in JUDGED if a != attribute]
    changed = np.asarray([g[attribute] == t[attribute] for g, t in zip(got, target)], dtype=bool)
    kept = np.asarray([all(g[a] == s[a] for a in others) for g, s in zip(got, source)], dtype=bool)
    n = len(got)
    nan = float("nan")
    return {"changed": float(changed.mean()) if n else nan, "kept": float(kept.mean()) if n else nan,
            "score": float((changed & kept).mean()) if n else nan, "n": n}


def edit_scores(editors: Mapping[str, Editor], images: np.ndarray, source: Sequence[Mapping[str, Any]], *,
                attributes: Sequence[str] = EDITABLE, seed: int = 0, batch_size: int = 32
                ) -> dict[str, dict[str, dict[str, float]]]:
    """``edit_score`` for every editor (e.g. "ddim_inversion", "null_text", "sdedit") and attribute,
    on the same images and the same targets: {editor: {attribute: scores}}."""
    return {name: {a: edit_score(ed, images, source, a, seed=seed, batch_size=batch_size) for a in attributes}
            for name, ed in editors.items()}


# -- the pipeline's evaluation --------------------------------------------------------------
def embedding_sampler(model: torch.nn.Module, table: Mapping[str, np.ndarray], *, seed: int = EVAL_SEED
                      ) -> Sampler:
    """A sampler of a text-conditioned model over prompts whose CLIP text embedding is in ``table``
    (the shard set's stored embeddings; no CLIP needed): ``model.sample(embeddings)`` with a
    generator seeded once, so a candidate and the champion draw the same noise."""
    g = torch.Generator().manual_seed(seed)

    def sample(prompts: Sequence[str], negatives: Sequence[str | None] | None = None) -> np.ndarray:
        if negatives is not None and any(n is not None for n in negatives):
            raise ValueError("an embedding-table sampler has no negative prompts; use a CLIP-backed sampler")
        cond = torch.from_numpy(np.stack([table[p] for p in prompts])).float()
        with torch.no_grad():
            return to_uint8(model.sample(cond, generator=g))

    return sample


@dataclass
class ShapesEvalSets:
    """The pipeline's shapes evaluation data: seen / unseen prompt sets and their embeddings."""

    seen: PromptSet
    unseen: PromptSet | None
    table: dict[str, np.ndarray]


def load_eval_sets(shards_uri: str, embeddings: str, *, n: int = EVAL_PROMPTS, seed: int = EVAL_SEED
                   ) -> ShapesEvalSets | None:
    """Canonical captions of ``n`` test and ``n`` test_unseen rows with their stored CLIP text
    embeddings (fingerprint ``embeddings``); None when the shard set is not ``bundled:shapes``."""
    manifest = storage.read_json(storage.join(shards_uri, "manifest.json"))
    if not is_shapes_set(manifest):
        return None
    sets, table = {}, {}
    for split in ("test", "test_unseen"):
        if not manifest.get("split_counts", {}).get(split):
            sets[split] = None
            continue
        data = load_split(shards_uri, split, keys=("tags", "captions", "key"))
        prompts, requested, rows = requests_from_split(data, n=n, seed=seed)
        txt = load_embeddings(shards_uri, embeddings, [str(data["key"][i]) for i in rows])["txt"]
        table.update({p: txt[j, 0] for j, p in enumerate(prompts)})  # row 0: the canonical caption
        sets[split] = PromptSet(prompts, requested)
    if sets["test"] is None:
        return None
    return ShapesEvalSets(sets["test"], sets["test_unseen"], table)


def evaluate_text_model(model: torch.nn.Module, sets: ShapesEvalSets, *, seed: int = EVAL_SEED,
                        batch_size: int = 250) -> dict[str, float]:
    """Flat shapes metrics of a text-conditioned model (``flat_metrics``: ``colour_acc`` ..
    ``joint_acc``, ``unseen_joint_acc`` ...), one sample per prompt, seeded."""
    result = seen_unseen(embedding_sampler(model, sets.table, seed=seed), sets.seen, sets.unseen,
                         batch_size=batch_size)
    return flat_metrics(result)


# -- samplers and editors of a text-conditioned diffusion model -------------------------------
def diffusion_sampler(model: torch.nn.Module, encode: Encoder, *, guidance: float = 0.0, steps: int | None = None,
                      seed: int = 0) -> Sampler:
    """A ``ConditionalDiffusion(condition="text")`` as a sampler: prompts (and negative prompts)
    through ``encode`` (the CLIP's ``encode_texts``), DDIM with CFG weight ``guidance`` (a negative
    prompt replaces the null condition, so it acts only when ``guidance`` > 0), seeded once."""
    g = torch.Generator().manual_seed(seed)

    def sample(prompts: Sequence[str], negatives: Sequence[str | None] | None = None) -> np.ndarray:
        neg = None
        if negatives is not None:
            if any(n is None for n in negatives):
                raise ValueError("give a negative prompt for every prompt of a batch, or none")
            neg = encode(list(negatives)).float()
        with torch.no_grad():
            x = model.sample(encode(list(prompts)).float(), generator=g, guidance_scale=guidance,
                             negative_cond=neg, steps=steps)
        return to_uint8(x)

    return sample


def diffusion_editor(model: torch.nn.Module, encode: Encoder, method: str, *, guidance: float = 0.0,
                     steps: int | None = None, strength: float = 0.6, inner_steps: int = 10, seed: int = 0
                     ) -> Editor:
    """An editor from ``tasks.generation.sampling.edit_images``: ``method`` "ddim_inversion",
    "null_text" or "sdedit", inverting under the source prompt and regenerating (CFG weight
    ``guidance``) under the target prompt."""

    def edit(images: np.ndarray, source: Sequence[str], target: Sequence[str]) -> np.ndarray:
        x = edit_images(model, from_uint8(np.asarray(images)), method=method, source_cond=encode(list(source)).float(),
                        target_cond=encode(list(target)).float(), strength=strength, steps=steps, scale=guidance,
                        seed=seed, inner_steps=inner_steps, progress=False)
        return to_uint8(x)

    return edit
