"""One small storage layer over ``file://`` and ``s3://`` URIs (plain paths are local files).

Every pipeline step passes URIs, never tensors (docs/design.md), so every read and
write in ``tasks/`` goes through here; this module picks the backend by URI. Writes are
atomic: a reader sees either the old object or the complete new one, never a torn file
(``tasks/io/atomic_writer.py``: temp file + fsync + ``os.replace`` locally;
``tasks/io/s3.py``: one PUT or a multipart upload that is completed or aborted, plus the
client, its retries and webdataset's ``s3://`` opener). An S3 outage longer than
``CONDGEN_S3_RETRY_SECONDS`` raises :class:`StorageUnavailable` (re-exported here): one line
saying that nothing was lost and to re-run.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

import botocore.exceptions as bexc

from condgen.tasks.io import s3
from condgen.tasks.io.atomic_writer import TMP_MARK, AtomicWriter, LocalAtomicWriter

# Re-exported S3 helpers for callers that need the raw client, a recursive listing or the outage error.
from condgen.tasks.io.s3 import (  # noqa: F401
    StorageUnavailable,
    endpoint_url,
    list_objects,
    reset_clients,
    s3_client,
)

# --------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The filesystem path of a ``file://`` URI or a plain path."""
    uri = os.fspath(uri)
    if is_s3(uri):
        raise ValueError(f"{uri!r} is an S3 URI, not a local file")
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI with a remote host is not supported: {uri!r}")
        return Path(unquote(parsed.path))
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme: {uri!r}")
    return Path(uri)


def join(uri: str, *parts: str) -> str:
    """Append path components; keeps the scheme (``s3://b/p`` + ``x`` -> ``s3://b/p/x``)."""
    uri = os.fspath(uri)
    if is_s3(uri) or uri.startswith("file://"):
        clean = [p.strip("/") for p in parts if p.strip("/")]
        return "/".join([uri.rstrip("/"), *clean]) if clean else uri
    return str(Path(uri, *parts))


# ------------------------------------------------------------------ whole objects


def exists(uri: str) -> bool:
    return s3.exists(uri) if is_s3(uri) else local_path(uri).exists()


def read_bytes(uri: str) -> bytes:
    return s3.read_bytes(uri) if is_s3(uri) else local_path(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically replace the object/file at ``uri`` with ``data``."""
    with open_write(uri) as f:
        f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def dumps_json(obj: Any) -> bytes:
    """The canonical JSON bytes we store: sorted keys, indent 2, trailing newline."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, dumps_json(obj))


# ------------------------------------------------------------------------ streams


def open_read(uri: str) -> IO[bytes]:
    """A streaming binary reader (for S3 the boto3 StreamingBody; only opening is retried)."""
    return s3.open_read(uri) if is_s3(uri) else open(local_path(uri), "rb")


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[IO[bytes]]:
    """Yield a binary writer; the object appears at ``uri`` only if the block succeeds."""
    writer: AtomicWriter = s3.S3AtomicWriter(uri) if is_s3(uri) else LocalAtomicWriter(local_path(uri))
    try:
        yield writer  # type: ignore[misc]
    except BaseException:
        writer.abort()
        raise
    writer.commit()


# ----------------------------------------------------------------------- listings


def listdir(uri: str) -> list[str]:
    """Sorted names one level under a directory/prefix (sub-prefixes without a slash)."""
    if is_s3(uri):
        return s3.listdir(uri)
    path = local_path(uri)
    if not path.is_dir():
        return []
    return sorted(n for n in os.listdir(path) if TMP_MARK not in n)


def remove_stale_temp_files(uri: str) -> list[str]:
    """Delete the temp files that writers killed mid-write (SIGKILL, OOM, power loss) left
    in a local directory; returns their names.

    Only for a directory no other process is writing into at the same moment (a resumed
    job owns its output). S3 needs nothing: an unfinished upload never becomes visible.
    """
    if is_s3(uri):
        return []
    path = local_path(uri)
    if not path.is_dir():
        return []
    stale = sorted(n for n in os.listdir(path) if TMP_MARK in n and (path / n).is_file())
    for name in stale:
        (path / name).unlink(missing_ok=True)
    return stale


def delete(uri: str, *, recursive: bool = False) -> None:
    """Delete a file/object; missing is fine. ``recursive`` also removes a directory/prefix."""
    if is_s3(uri):
        s3.delete(uri, recursive=recursive)
        return
    path = local_path(uri)
    if path.is_dir() and not path.is_symlink():
        if not recursive:
            raise IsADirectoryError(f"{uri} is a directory; pass recursive=True")
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- Prefect retries


def is_transient_io_error(exc: BaseException | None) -> bool:
    """True for errors worth retrying (network, S3 5xx/throttling, disk hiccups)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # repeating will not make a missing or forbidden path appear
    if isinstance(exc, bexc.ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
    return isinstance(exc, (OSError, bexc.BotoCoreError))
