"""The shard format's one owner: WebDataset tar members, PNG images, ``.npy`` arrays and
shard-set manifests are written and read here and nowhere else.

A shard is a plain tar (USTAR, members sorted per sample, mtime/uid/gid zero), so the same
samples always give the same bytes and a resumed step can compare digests instead of
rewriting. Arrays are ``np.save`` without pickles; images are lossless PNG.
"""
from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np
from PIL import Image
from webdataset.tariterators import group_by_keys

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
    streaming loader, ``tasks/data/stream.py``). Closing the generator closes the object.

    The members come from ``tar_members``, a header parser several times faster than ``tarfile``'s (which
    parsed ~3 headers per sample at ~100 us each, the streaming loader's largest cost); samples are grouped
    by webdataset's ``group_by_keys``, as ``read_samples`` always did."""
    with storage.open_read(uri) as f:
        yield from group_by_keys({**m, "__url__": uri} for m in tar_members(f))


_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these names too
_REGULAR = (b"0", b"\0", b"7")


MAX_MEMBER_BYTES = 256 << 20  # no shard member is this large: a corrupt or hostile size field is refused


def tar_members(f: IO[bytes], chunk: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """``{"fname", "data"}`` of each regular file of a tar stream (USTAR, GNU long names, pax ``path``
    records), read in ``chunk``-sized blocks: the part of ``tarfile`` a shard reader needs."""
    buf, pos, long_name = b"", 0, None

    def take(n: int) -> bytes:
        nonlocal buf, pos
        while len(buf) - pos < n:
            more = f.read(max(chunk, n))
            if not more:
                break
            buf, pos = buf[pos:] + more, 0
        out, pos = buf[pos:pos + n], min(pos + n, len(buf))
        return out

    while True:
        header = take(512)
        if len(header) < 512 or header.count(0) == 512:
            return
        if header[124] & 0x80:
            raise ValueError("a tar member over 8 GiB (base-256 size) is not a shard member")
        size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
        if size > MAX_MEMBER_BYTES:  # checked on the header, before the bytes are read
            raise ValueError(f"a tar member of {size} bytes is over the shard reader's {MAX_MEMBER_BYTES}-byte cap "
                             "(ingestion writes members of at most 32 MiB): not a condgen shard")
        data = take(size)
        if len(data) < size:
            raise ValueError(f"truncated tar: a member of {size} bytes ends after {len(data)}")
        take(-size % 512)
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind == b"x":  # pax extended header: "<len> path=<name>\n" records
            for rec in data.decode("utf-8").splitlines():
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        if kind not in _REGULAR:
            long_name = None
            continue
        name = header[:100].split(b"\0")[0].decode("utf-8")
        prefix = header[345:500].split(b"\0")[0].decode("utf-8") if header[257:262] == b"ustar" else ""
        name, long_name = long_name or (f"{prefix}/{name}" if prefix else name), None
        if not _SKIP_META.match(name):
            yield {"fname": name, "data": data}


# -- manifests -----------------------------------------------------------------------------------
def read_manifest(shards_uri: str) -> dict[str, Any]:
    return storage.read_json(storage.join(shards_uri, MANIFEST))


def shard_uris(shards_uri: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """URIs of the shards listed in ``{shards_uri}/manifest.json``, in order."""
    manifest = manifest if manifest is not None else read_manifest(shards_uri)
    return [storage.join(shards_uri, s["name"]) for s in manifest["shards"]]
