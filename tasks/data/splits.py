"""Load one split of an ingested shard set into numpy arrays.

Reads exactly the shards the manifest lists (so a half-written set is never read), each
streamed through ``tasks.io.shards.iter_samples`` (``file://`` or ``s3://``). A split too
large to hold is streamed instead (``tasks/data/stream.py``, ``tasks/training/loader.py``).
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from condgen.tasks.data.attributes import ATTRIBUTE_NAMES
from condgen.tasks.data.sidecars import load_embeddings, load_latents
from condgen.tasks.io.shards import iter_samples, read_manifest, shard_uris

SPLITS = ("train", "val", "test", "all")  # plus any split the manifest counts (e.g. "test_unseen")
# Optional members added by later steps (embed), and the array names they load into.
OPTIONAL_ARRAYS = {"clip_txt.npy": "txt", "clip_img.npy": "img"}


def load_split(shards_uri: str, split: str = "train", *, keys: Sequence[str] = ("x", "y")) -> dict[str, Any]:
    """Arrays for ``split`` ("train", "val", "test", "all" or another split the manifest counts,
    e.g. ``bundled:shapes``' "test_unseen").

    Returns ``x`` uint8 (N, H, W) for a greyscale set or (N, H, W, 3) for an RGB one
    (``dataset_info(...)["channels"]``), ``y`` int64 (N,) (-1 for a caption-only item),
    ``key`` str (N,), ``attributes`` float32 (N, A) in the manifest's ``attribute_names``
    order (v1 sets: ``ATTRIBUTE_NAMES``; NaN where a sample lacks one or it is not a
    number; A may be 0), ``caption`` str (N,), ``captions`` object (N,) of lists, ``tags``
    object (N,) of dicts: the string attributes of each sample (``{"colour": "red", ...}``;
    the manifest's ``tag_names``; empty dicts for sets without them), and
    ``txt`` / ``img`` float32 (N, ...) when the shards carry ``clip_txt.npy`` /
    ``clip_img.npy``. ``keys`` names the arrays the caller needs: a missing one raises
    KeyError instead of failing later.
    """
    manifest = read_manifest(shards_uri)
    known = (*SPLITS, *manifest.get("split_counts", {}))
    if split not in known:
        raise ValueError(f"split must be one of {tuple(dict.fromkeys(known))}, got {split!r}")
    info = _info(manifest)
    pil_mode = "L" if info["channels"] == 1 else "RGB"
    attribute_names = info["attribute_names"]
    xs: list[np.ndarray] = []
    ys: list[int] = []
    names: list[str] = []
    attrs: list[list[float]] = []
    caption: list[str] = []
    captions: list[list[str]] = []
    tags: list[dict[str, str]] = []
    extra: dict[str, list[np.ndarray]] = {name: [] for name in OPTIONAL_ARRAYS.values()}
    # The whole split in manifest order (a streamed split is tasks/data/stream.py's), each shard streamed
    # member by member (``shards.iter_samples``: file:// or s3://).
    for sample in (s for uri in shard_uris(shards_uri, manifest) for s in iter_samples(uri)):
        meta = json.loads(sample["json"])
        if split != "all" and meta["split"] != split:
            continue  # skip before decoding the image: the cheap test first
        im = Image.open(io.BytesIO(sample["png"]))
        xs.append(np.asarray(im if im.mode == pil_mode else im.convert(pil_mode)))
        ys.append(int(sample["cls"]))
        names.append(sample["__key__"])
        attrs.append([_number(meta.get("attributes", {}).get(a)) for a in attribute_names])
        caption.append(meta["caption"])
        captions.append(list(meta["captions"]))
        tags.append(dict(meta.get("tags") or {}))
        for member, name in OPTIONAL_ARRAYS.items():
            if member in sample:
                extra[name].append(np.load(io.BytesIO(sample[member]), allow_pickle=False))

    n = len(names)
    size = info["image_size"]
    out: dict[str, Any] = {
        "x": np.stack(xs) if xs else np.zeros((0, size, size, 3) if info["channels"] == 3 else (0, size, size), np.uint8),
        "y": np.asarray(ys, dtype=np.int64),
        "key": np.asarray(names, dtype=str),
        "attributes": np.asarray(attrs, dtype=np.float32).reshape(n, len(attribute_names)),
        "caption": np.asarray(caption, dtype=str),
        "captions": _object_array(captions),
        "tags": _object_array(tags),
    }
    for name, rows in extra.items():
        if rows and len(rows) != n:
            raise ValueError(f"{name}: only {len(rows)} of {n} samples carry it; re-run embed")
        if rows:
            # (N, D), or (N, n_captions, D) when a text embedding is stored per phrasing.
            out[name] = np.stack(rows).astype(np.float32)
    missing = [k for k in keys if k not in out]
    if missing:
        raise KeyError(f"{shards_uri} has no {missing} (available: {sorted(out)})")
    return out


def dataset_info(shards_uri: str) -> dict[str, Any]:
    """What a model needs to know about an ingested shard set, from its manifest alone.

    Returns ``{"channels": int, "image_size": int, "num_classes": int, "class_names":
    list[str] | None, "attribute_names": list[str], "schema_version": int}``:

    - ``channels``: 1 (greyscale, ``x`` is (N, H, W)) or 3 (RGB, ``x`` is (N, H, W, 3));
    - ``image_size``: the side of the square images;
    - ``num_classes``: labels lie in ``[0, num_classes)`` (caption-only samples carry -1);
    - ``class_names``: the name of each class index, or None when labels are plain
      integers (the digit sources);
    - ``attribute_names``: the columns of ``load_split``'s ``attributes`` (may be empty).

    Schema v1 sets (greyscale digits) answer channels 1 and the digit attributes.
    """
    return _info(read_manifest(shards_uri))


def _info(manifest: dict[str, Any]) -> dict[str, Any]:
    version = int(manifest.get("schema_version", 1))
    if version > 2:
        raise ValueError(f"shard schema v{version} is newer than this condgen reads (v1, v2); upgrade condgen "
                         "or re-ingest with `condgen ingest SOURCE --out URI`")
    config = manifest.get("config", {})
    names = manifest.get("class_names")
    return {
        "channels": int(manifest.get("channels", 1)),
        "image_size": int(manifest.get("image_size", config.get("image_size", 0))),
        "num_classes": int(manifest.get("num_classes", config.get("num_classes", 0))),
        "class_names": list(names) if names else None,
        "attribute_names": list(manifest.get("attribute_names", ATTRIBUTE_NAMES)),
        "schema_version": version,
    }


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float("nan")


def load_arrays(shards_uri: str, split: str, embeddings: str | None = None,
                latents: str | None = None) -> dict[str, np.ndarray]:
    """The training arrays of a split: ``x`` uint8 (N, H, W) or (N, H, W, 3) for RGB sets, ``y`` int64
    (N,) (-1: caption-only, no class), ``txt`` float32
    (N, n_captions, D) when ``embeddings`` names a CLIP fingerprint, ``z`` float32 (N, c, h, w)
    when ``latents`` names precomputed autoencoder latents (side-cars joined by key)."""
    data = load_split(shards_uri, split)
    out = {"x": data["x"], "y": data["y"].astype(np.int64)}
    if embeddings:
        out["txt"] = load_embeddings(shards_uri, embeddings, list(data["key"]))["txt"].astype(np.float32)
    if latents:
        out["z"] = load_latents(shards_uri, latents, list(data["key"]))
    return out


def _object_array(rows: Sequence[Any]) -> np.ndarray:
    # Filled element by element: np.array(rows, dtype=object) would build a 2-D
    # array when all lists have the same length (and take dicts apart).
    arr = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        arr[i] = row
    return arr
