"""The shard format's one owner: WebDataset tar members, PNG images, ``.npy`` arrays and
shard-set manifests are written and read here and nowhere else.

A shard is a plain tar (USTAR, members sorted per sample, mtime/uid/gid zero), so the same
samples always give the same bytes and a resumed step can compare digests instead of
rewriting. Arrays are ``np.save`` without pickles; images are lossless PNG.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from condgen.tasks.io import storage

MANIFEST = "manifest.json"


# -- members -------------------------------------------------------------------------------------
def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_png(img: np.ndarray) -> bytes:
    """uint8 (H, W) greyscale or (H, W, 3) RGB -> PNG bytes (no timestamps: deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """A stored PNG as uint8 (H, W) for greyscale or (H, W, 3) for colour."""
    im = Image.open(io.BytesIO(data))
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB" if "A" in im.mode or im.mode in ("P", "RGBA", "CMYK") else "L")
    return np.asarray(im, dtype=np.uint8)


# -- tars ----------------------------------------------------------------------------------------
def tar_bytes(samples: Sequence[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar with reproducible bytes: given sample order, sorted members, no times or owners."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                info.mtime, info.mode, info.uid, info.gid = 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(members[ext]))
    return buf.getvalue()


def write_tar(uri: str, samples: Sequence[tuple[str, dict[str, bytes]]]) -> str:
    """Atomically write one shard; returns the sha256 of its bytes."""
    data = tar_bytes(samples)
    storage.write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


def read_samples(uri: str) -> list[dict[str, Any]]:
    """All samples of one tar: ``__key__`` plus the raw member bytes by extension."""
    return list(iter_samples(uri))


def iter_samples(uri: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar as they are read (``__key__`` plus raw member bytes by extension): the
    object is opened once and its members are streamed, so memory holds one sample, not the shard (a
    streaming loader, ``tasks/data/stream.py``). Closing the generator closes the object."""
    with storage.open_read(uri) as f:
        yield from group_by_keys({**m, "__url__": uri} for m in tar_file_iterator(f))


# -- manifests -----------------------------------------------------------------------------------
def read_manifest(shards_uri: str) -> dict[str, Any]:
    return storage.read_json(storage.join(shards_uri, MANIFEST))


def shard_uris(shards_uri: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """URIs of the shards listed in ``{shards_uri}/manifest.json``, in order."""
    manifest = manifest if manifest is not None else read_manifest(shards_uri)
    return [storage.join(shards_uri, s["name"]) for s in manifest["shards"]]
