"""Ingest: turn an image source into deterministic WebDataset shards + a manifest.

Sources (``source`` argument, see ``tasks/data/sources.py``): ``bundled:mnist``,
``bundled:uci_digits``, ``bundled:shapes``, ``bundled:openmoji``, a local folder (class
sub-folders or ``captions.jsonl``), a WebDataset tar set, or ``s3://bucket/prefix``
holding either layout.

Output under ``out_uri``: ``shard-000000.tar`` ... (byte-identical for the same source
and config: fixed member order, mtime 0, uid/gid 0), ``rejects.json``, and
``manifest.json`` written last -- the manifest marks a complete, consistent set.

Sample members: ``png`` (lossless uint8, image_size^2, greyscale ``L`` or ``RGB``),
``cls`` (label as text; "-1" for a caption-only item), ``json`` {caption, captions,
label, split, attributes, source_ref, and ``tags`` when the source gives string
attributes}. The split comes from a seeded hash of the key, so it never depends on sample
order -- unless the source assigns it (``bundled:shapes`` holds out colour x shape
combinations in ``test_unseen``; ``bundled:openmoji`` keeps variants of an emoji together).

Manifest, schema v2: ``schema_version`` 2, ``channels`` (1 or 3), ``image_size``,
``resize`` (``pad`` | ``center_crop`` | ``resize``), ``background`` [r, g, b], ``mode``
(``L`` | ``RGB``), ``num_classes``, ``class_names`` (only when labels are names),
``attribute_names`` (numeric), ``digits`` (whether digit attributes were measured),
``split_counts`` (every split present or declared by the source; each entry of ``shards``
also has its own ``split_counts`` and ``labelled_split_counts``, label >= 0, which sum to it),
``n_unlabelled`` (caption-only items), ``conversions`` (counts of what decoding did:
``exif_rotated``, ``composited``, ``animated_first_frame``, ``converted_to_L``, ...) and
``policy`` (the declared input policy in words); a generated source adds ``tag_names``
(string attributes, in ``json["tags"]``), ``license``, ``attribution`` and ``bundled``
(its options and notes). Schema v1 sets (greyscale digits, no such
fields) still load; ``tasks/data/splits.dataset_info`` reads either.

Digit sets -- greyscale with integer labels, e.g. ``bundled:mnist`` -- keep v1's samples
byte for byte: measured digit attributes (``tasks/data/attributes.py``), digit captions,
the ink check. Other sets store only the numeric attributes the source gives and caption
from the class name when the source has no caption; an image of one flat colour is blank.

Every bad item is recorded in rejects.json with a reason, never raised; the input policy
(decoding, colour, sizes, labels, unsafe names) is ``tasks/data/items.py`` and the
first pass that settles mode, labels and size is ``tasks/data/survey.py``.

Resume: shards are regenerated deterministically; an existing shard whose bytes
already match is kept (not rewritten), so an interrupted run finishes where it
stopped as far as writes go. ``limit`` caps the number of accepted samples; on a bundled
source it takes an equal, seeded share of every class (``items.stratified_indices``; keys
and bytes of the samples kept are those of the full set; a rejected pick is not replaced),
elsewhere the first ones.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from condgen.tasks.data import attributes
from condgen.tasks.data.items import (
    INVERT_POLICIES,
    MAX_CAPTION_CHARS,
    MIN_SIDE,
    MODES,
    RESIZE_POLICIES,
    BadItem,
    RawItem,
    Reject,
    Source,
    array_to_mode,
    decode_image,
    is_blank,
    parse_background,
    stratified_indices,
    to_square,
)
from condgen.tasks.data.sources import open_source
from condgen.tasks.data.survey import Plan, describe, make_plan, numeric_attributes
from condgen.tasks.io import settings, storage
from condgen.tasks.io.progress import progress
from condgen.tasks.io.shards import MANIFEST, encode_png, tar_bytes

SCHEMA_VERSION = 2
# Bump when the bytes written for the same source + config change (processing code),
# so an old manifest no longer counts as "already done".
# 3: per-shard split counts in the manifest, and the stricter input policy of issue #20.
INGEST_VERSION = 3
POLICY = {
    "formats": "PNG, JPEG, WebP, GIF, BMP, PGM/PPM, decided from the header before decoding; others (ICO, TIFF, "
               "...) rejected as unsupported_format",
    "size": "sides 8..8192 px, <= 40 Mpx, aspect <= 2 (checked on the header); others rejected as bad_size",
    "mode": "auto: majority of header modes (tie: RGB); grey files in RGB sets replicated, colour in L sets -> luma",
    "transparency": "composited onto the background colour",
    "animation": "first frame kept (counted in conversions.animated_first_frame)",
    "depth": "16-bit scaled by 255/65535, never clipped",
    "orientation": "EXIF orientation applied",
    "labels": "integers if >= half the distinct labels are; else class names sorted like ImageFolder; exact: "
              "canonical integers ('7', not '+7', '07', ' 7', '-0'), names as written; others bad_label",
    "captions": "the source's own caption <= 2000 characters; longer: rejected as caption_too_long (not truncated)",
    "duplicates": "a file reached twice (symlink, hard link, repeated captions.jsonl line) is ingested once; "
                  "later references rejected as duplicate_file",
    "tar_samples": "<= 16 members and 32 MiB per sample (CONDGEN_INGEST_MAX_SAMPLE_*), checked on the tar "
                   "headers before reading; others rejected as sample_too_large",
    "caption_only": "label -1: for text conditioning; class-conditional training skips it",
    "blank": "digit sets: no stroke pixel; other sets: every pixel one colour (after squaring); rejected",
}
DEFAULT_SAMPLE_LIMITS = (settings.MAX_SAMPLE_MEMBERS, settings.MAX_SAMPLE_BYTES)
MANIFEST_NAME = MANIFEST  # the shard-set manifest of tasks/io/shards
REJECTS_NAME = "rejects.json"
SPLIT_NAMES = ("train", "val", "test")
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # a split a source assigns itself


@dataclass
class IngestResult:
    manifest_uri: str
    counts: dict[str, int]  # samples per split
    n_rejected: int
    rejects_uri: str
    skipped: bool  # True when a matching manifest already existed (nothing done)


# --------------------------------------------------------------------- entry point


def ingest(
    source: str,
    out_uri: str,
    *,
    shard_size: int = 1000,
    image_size: int | None = 28,
    seed: int = 0,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    limit: int | None = None,
    num_classes: int | None = None,
    mode: str = "auto",
    resize: str = "pad",
    background: Any = "white",
    invert: str = "never",
    stratify: bool = True,
) -> IngestResult:
    """Write ``source`` as shards + manifest under ``out_uri``; skip if already done.

    ``image_size`` None infers it (most common longer side, at most 64); ``num_classes``
    None infers it (the number of class names, or 10 for integer labels); ``mode`` is
    ``auto`` | ``L`` | ``RGB``; ``resize`` ``pad`` | ``center_crop`` | ``resize``;
    ``background`` the colour transparency is composited onto (and colour sets are padded
    with); ``invert`` ``never`` | ``auto`` (MNIST polarity for greyscale digit scans).
    ``limit`` on a bundled source takes an equal share of every class, seeded by ``seed``
    (``stratify`` False: the first ``limit`` items, as before). A bundled generator renders at
    its spec's ``size``, else at ``image_size`` (None: 32), and uses ``seed``, ``splits`` and
    ``background`` (``tasks/data/sources.py``).
    """
    config = _config(shard_size, image_size, seed, splits, limit, num_classes,
                     mode=mode, resize=resize, background=background, invert=invert)
    _check_not_nested(source, out_uri)
    manifest_uri = storage.join(out_uri, MANIFEST_NAME)
    rejects_uri = storage.join(out_uri, REJECTS_NAME)
    with open_source(source, image_size=image_size, seed=seed, splits=config["splits"],
                     background=config["background"]) as src:
        if limit is not None and stratify and src.labels is not None:
            config["limit_sampling"] = "stratified"  # absent otherwise: other sets' manifests stay as they were
        if settings.ingest_sample_limits() != DEFAULT_SAMPLE_LIMITS:  # a changed cap redoes the set
            config["sample_limits"] = list(settings.ingest_sample_limits())
        fingerprint = src.fingerprint()
        existing = _read_manifest(manifest_uri)
        if existing is not None and _is_complete(existing, out_uri, source, fingerprint, config):
            return _result(existing, manifest_uri, rejects_uri, skipped=True)
        settled = make_plan(src, config)  # mode, labels, size; a bad option fails before anything is touched
        if existing is not None:
            # The manifest vouches for the shards; it stops being true as soon as we
            # start replacing them, so it goes first and comes back last.
            storage.delete(manifest_uri)
        # A run killed mid-write leaves a hidden temp file beside the shards; this run
        # owns the output now, so clear it before writing.
        storage.remove_stale_temp_files(out_uri)
        shards, counts, rejects, stats = _write_shards(src, out_uri, config, settled)
    storage.write_json(rejects_uri, {
        "n_rejected": len(rejects),
        "by_reason": _count_reasons(rejects),
        "rejects": [asdict(r) for r in rejects],
        "source": source,
    })
    _delete_stale_shards(out_uri, {s["name"] for s in shards})
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "ingest_version": INGEST_VERSION,
        "source": source,
        "source_fingerprint": fingerprint,
        "config": config,
        "shards": shards,
        "n_samples": sum(s["n_samples"] for s in shards),
        "split_counts": counts,
        "n_rejected": len(rejects),
        "rejects": REJECTS_NAME,
        "members": ["cls", "json", "png"],
        **describe(settled, config),
        "n_unlabelled": stats.pop("n_unlabelled", 0),
        "conversions": dict(sorted(stats.items())),
        "policy": POLICY,
    }
    storage.write_json(manifest_uri, manifest)
    return _result(manifest, manifest_uri, rejects_uri, skipped=False)


def _config(shard_size: int, image_size: int | None, seed: int, splits: Sequence[float],
            limit: int | None, num_classes: int | None, **policy: Any) -> dict[str, Any]:
    if (shard_size < 1 or (image_size is not None and image_size < MIN_SIDE)
            or (num_classes is not None and num_classes < 1) or (limit is not None and limit < 0)):
        raise ValueError("shard_size >= 1, image_size >= 8, num_classes >= 1, limit >= 0 required")
    for name, allowed in (("mode", MODES), ("resize", RESIZE_POLICIES), ("invert", INVERT_POLICIES)):
        if policy[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {policy[name]!r}")
    if policy["invert"] != "never" and policy["mode"] == "RGB":
        raise ValueError("invert is for greyscale digit sources; it cannot be combined with mode RGB")
    fractions = [float(s) for s in splits]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"splits must be 3 non-negative fractions summing to 1, got {splits}")
    return {"shard_size": shard_size, "image_size": image_size, "seed": seed,
            "splits": fractions, "limit": limit, "num_classes": num_classes, "mode": policy["mode"],
            "resize": policy["resize"], "background": list(parse_background(policy["background"])),
            "invert": policy["invert"]}


def _check_not_nested(source: str, out_uri: str) -> None:
    """Output inside a local source folder would be read back as source items next time."""
    if storage.is_s3(out_uri) or source.startswith("bundled:") or storage.is_s3(source):
        return
    src = storage.local_path(source)
    if src.is_dir() and storage.local_path(out_uri).resolve().is_relative_to(src.resolve()):
        raise ValueError(f"out_uri {out_uri!r} lies inside the source folder {source!r}")


def _read_manifest(uri: str) -> dict[str, Any] | None:
    if not storage.exists(uri):
        return None
    try:
        return storage.read_json(uri)
    except (ValueError, UnicodeDecodeError):
        return None  # a damaged manifest is treated as absent: the run redoes the set


def _is_complete(manifest: dict[str, Any], out_uri: str, source: str, fingerprint: str,
                 config: dict[str, Any]) -> bool:
    same = (manifest.get("schema_version") == SCHEMA_VERSION
            and manifest.get("ingest_version") == INGEST_VERSION
            and manifest.get("source") == source
            and manifest.get("source_fingerprint") == fingerprint
            and manifest.get("config") == config)
    # Existence only: shards are written atomically, so present means complete.
    return same and storage.exists(storage.join(out_uri, REJECTS_NAME)) and all(
        storage.exists(storage.join(out_uri, s["name"])) for s in manifest.get("shards", []))


def _result(manifest: dict[str, Any], manifest_uri: str, rejects_uri: str, *, skipped: bool) -> IngestResult:
    counts = {name: int(n) for name, n in {**dict.fromkeys(SPLIT_NAMES, 0), **manifest["split_counts"]}.items()}
    return IngestResult(manifest_uri=manifest_uri, counts=counts,
                        n_rejected=int(manifest["n_rejected"]), rejects_uri=rejects_uri, skipped=skipped)


def _count_reasons(rejects: list[Reject]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejects:
        out[r.reason] = out.get(r.reason, 0) + 1
    return dict(sorted(out.items()))


def _delete_stale_shards(out_uri: str, keep: set[str]) -> None:
    """Shards left by an earlier, larger run would look like part of this set."""
    for name in storage.listdir(out_uri):
        if SHARD_RE.match(name) and name not in keep:
            storage.delete(storage.join(out_uri, name))


# -------------------------------------------------------------------------- shards


def _write_shards(src: Source, out_uri: str, config: dict[str, Any], plan: Plan
                  ) -> tuple[list[dict[str, Any]], dict[str, int], list[Reject], dict[str, int]]:
    shards: list[dict[str, Any]] = []
    counts = dict.fromkeys((*SPLIT_NAMES, *(plan.declared.splits if plan.declared else ())), 0)
    rejects: list[Reject] = []
    stats: Counter = Counter()
    batch: list[tuple[str, dict[str, bytes]]] = []
    in_shard: list[tuple[str, bool]] = []  # (split, labelled) of each sample of the batch
    accepted = 0
    for index, item in progress(_numbered_items(src, config), desc=f"ingest {src.tag}", unit="file"):
        if config["limit"] is not None and accepted >= config["limit"]:
            break
        notes: list[str] = []
        sample = _process(index, item, src.tag, config, plan, notes)
        if isinstance(sample, Reject):
            rejects.append(sample)
            continue
        key, split, members = sample
        stats.update(notes)
        counts[split] = counts.get(split, 0) + 1
        accepted += 1
        batch.append((key, members))
        in_shard.append((split, int(members["cls"]) >= 0))
        if len(batch) == config["shard_size"]:
            shards.append({**_write_shard(out_uri, len(shards), batch), "_splits": in_shard})
            batch, in_shard = [], []
    if batch:
        shards.append({**_write_shard(out_uri, len(shards), batch), "_splits": in_shard})
    for entry in shards:
        entry.update(_shard_split_counts(entry.pop("_splits"), counts))
    return shards, counts, rejects, dict(stats)


def _shard_split_counts(samples: list[tuple[str, bool]], splits: dict[str, int]) -> dict[str, dict[str, int]]:
    """A shard entry's ``split_counts`` and ``labelled_split_counts`` (label >= 0), with every
    split of the manifest's ``split_counts`` (zeros too), so a reader that plans by shard (a
    streaming loader) needs neither the shard's bytes nor a default; summed over the shards
    they give the manifest's ``split_counts``."""
    every = Counter(split for split, _ in samples)
    labelled = Counter(split for split, has_label in samples if has_label)
    return {"split_counts": {name: every[name] for name in splits},
            "labelled_split_counts": {name: labelled[name] for name in splits}}


def _write_shard(out_uri: str, number: int, samples: list[tuple[str, dict[str, bytes]]]) -> dict[str, Any]:
    name = f"shard-{number:06d}.tar"
    uri = storage.join(out_uri, name)
    data = tar_bytes(samples)
    digest = hashlib.sha256(data).hexdigest()
    # Resume: a shard from an interrupted run is complete (atomic write) and, with
    # deterministic bytes, identical when it matches; rewriting it would be wasted I/O.
    if not (storage.exists(uri) and hashlib.sha256(storage.read_bytes(uri)).hexdigest() == digest):
        storage.write_bytes(uri, data)
    return {"name": name, "n_samples": len(samples), "sha256": digest}


def _numbered_items(src: Source, config: dict[str, Any]) -> Iterator[tuple[int, RawItem | Reject]]:
    """(position in the source, item): every item in order, or under a stratified limit the
    chosen ones (still in source order, so their keys and bytes are those of the full set)."""
    if config.get("limit_sampling") != "stratified" or src.labels is None or src.pick is None:
        return enumerate(src.items())
    chosen = stratified_indices(src.labels(), config["limit"], config["seed"]).tolist()
    return zip(chosen, src.pick(chosen))


def split_of(key: str, seed: int, splits: Sequence[float]) -> str:
    """Fixed split from a seeded hash of the key: stable under reordering and limits."""
    u = int.from_bytes(hashlib.sha256(f"split:{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64
    train, val = splits[0], splits[0] + splits[1]
    return "train" if u < train else "val" if u < val else "test"


# ---------------------------------------------------------------------- processing


def _process(index: int, item: RawItem | Reject, tag: str, config: dict[str, Any], plan: Plan,
             notes: list[str]) -> tuple[str, str, dict[str, bytes]] | Reject:
    if isinstance(item, Reject):
        return item
    own = (item.caption or "").strip()
    try:
        if len(own) > MAX_CAPTION_CHARS:
            raise BadItem("caption_too_long", f"{len(own)} characters > {MAX_CAPTION_CHARS}")
        label = plan.labels.parse(item.label, bool(own))
        if item.array is not None:
            img = array_to_mode(item.array, plan.mode, notes)
        else:
            img = decode_image(item.data or b"", plan.mode, plan.background, config["invert"], notes)
        fill = 0 if plan.digits else plan.background if plan.mode == "RGB" else _luma(plan.background)
        img = to_square(img, plan.image_size, config["resize"], fill)
        if plan.digits and not attributes.has_ink(img):
            raise BadItem("blank_image", "no stroke pixels")
        if not plan.digits and is_blank(img):
            raise BadItem("blank_image", "one flat colour")
    except BadItem as exc:
        return Reject(item.ref, exc.reason, exc.detail)
    key = item.key or f"{tag}-{index:06d}"
    split = item.split if item.split is not None else split_of(key, config["seed"], config["splits"])
    if not SPLIT_RE.match(split):
        return Reject(item.ref, "bad_split", split[:80])
    if label < 0:
        notes.append("n_unlabelled")  # counted beside the conversions, reported on its own
    if plan.digits:
        attrs = {k: round(v, 4) for k, v in attributes.measure(img).items()}
        phrasings = attributes.captions(label, attrs, plan.image_size) if label >= 0 else []
    else:
        attrs = numeric_attributes(item.attributes)
        name = plan.labels.class_names[label] if plan.labels.class_names else f"class {label}"
        phrasings = list(item.captions) if item.captions else _class_phrasings(name) if label >= 0 else []
    if own:
        phrasings = list(dict.fromkeys([own, *phrasings]))
        caption = own  # the source's own words win
    else:
        caption = attributes.pick_caption(key, phrasings, config["seed"])
    meta = {"attributes": attrs, "caption": caption, "captions": phrasings, "label": label,
            "source_ref": item.ref, "split": split}
    if item.tags is not None:
        meta["tags"] = dict(item.tags)
    members = {
        "cls": str(label).encode(),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        "png": encode_png(img),
    }
    return key, split, members


def _class_phrasings(name: str) -> list[str]:
    """Captions for a labelled image without its own caption (no article: names may be plural)."""
    return [name, f"an image of {name}", f"a picture showing {name}"]


def _luma(rgb: tuple[int, int, int]) -> int:
    return int(Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0)))
