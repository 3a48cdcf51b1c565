"""One small storage layer over ``file://`` and ``s3://`` URIs (plain paths are local files).

Every pipeline step passes URIs, never tensors (shared/DESIGN.md), so every read and
write in ``tasks/`` goes through here. Writes are atomic: a reader sees either the old
object or the complete new one, never a torn file.

- local: temp file in the same directory + fsync + ``os.replace`` (+ fsync of the dir),
- S3: a single PUT for small objects, otherwise a multipart upload that is completed
  on success and aborted on any exception (S3 never shows an incomplete upload).

S3 goes through boto3 with the endpoint from ``CONDGEN_S3_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL`` (unset = AWS) and credentials from the standard AWS chain; they
are never logged. Connection failures are retried twice over: botocore's "standard"
retry mode inside each call, and our own bounded exponential backoff around whole-object
operations, so an endpoint that is unreachable for ~10 s is survived.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, TypeVar
from urllib.parse import unquote, urlparse

import boto3
import botocore.exceptions as bexc
import webdataset
from botocore.config import Config

log = logging.getLogger(__name__)

T = TypeVar("T")

ENDPOINT_ENV_VARS = ("CONDGEN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
# Our own retry around whole-object operations; delays 0.5, 1, 2, 4, 8 s (+ jitter)
# sum to ~15 s on top of botocore's attempts: enough for a ~10 s endpoint outage.
RETRY_ATTEMPTS = 6
RETRY_BASE_S = 0.5
RETRY_MAX_S = 8.0
# S3 needs parts >= 5 MiB (except the last); 8 MiB keeps memory small and PUTs few.
MULTIPART_CHUNK = 8 * 1024 * 1024
_TMP_MARK = ".condgen-tmp-"  # temp names carry this so listdir() can hide them

# Errors where the request may not have reached S3 or the answer got lost: safe to
# repeat for whole-object operations (all our writes are idempotent PUTs).
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    bexc.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, proxy errors
    bexc.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
)


# --------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


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


# ----------------------------------------------------------------------- S3 client

_clients: dict[tuple[int, str | None], Any] = {}
_clients_lock = threading.Lock()


def endpoint_url() -> str | None:
    for name in ENDPOINT_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def s3_client() -> Any:
    """A cached boto3 S3 client for the configured endpoint.

    Cached per (process, endpoint): boto3 clients are thread-safe but must not cross a
    fork, and tests switch endpoints through the environment.
    """
    endpoint = endpoint_url()
    cache_key = (os.getpid(), endpoint)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=_client_config(endpoint))
            _clients[cache_key] = client
        return client


def reset_clients() -> None:
    """Forget cached clients (after changing credentials or endpoint in-process)."""
    with _clients_lock:
        _clients.clear()


def _client_config(endpoint: str | None) -> Config:
    extra: dict[str, Any] = {}
    if endpoint is not None:
        # S3-compatible servers (moto, MinIO, Ceph) generally want path-style URLs and
        # may reject the newer default request checksums; AWS keeps the defaults.
        extra = dict(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    return Config(
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=60,
        **extra,
    )


def _with_retry(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` again on connection errors, with bounded exponential backoff."""
    for attempt in range(RETRY_ATTEMPTS):
        try:
            return fn()
        except _CONNECTION_ERRORS as exc:
            if attempt == RETRY_ATTEMPTS - 1:
                raise
            delay = min(RETRY_BASE_S * 2**attempt, RETRY_MAX_S) * (0.75 + 0.5 * random.random())
            # Only the operation and the error class: messages may carry the endpoint,
            # never credentials, but keep logs minimal anyway.
            log.warning("S3 %s failed (%s); retry %d/%d in %.1fs", what, type(exc).__name__,
                        attempt + 1, RETRY_ATTEMPTS - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _is_not_found(exc: bexc.ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


# ------------------------------------------------------------------ whole objects


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return local_path(uri).exists()
    bucket, key = _split_s3(uri)

    def head() -> bool:
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except bexc.ClientError as exc:
            if _is_not_found(exc):
                return False
            raise

    return _with_retry(f"head {uri}", head)


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        return local_path(uri).read_bytes()
    bucket, key = _split_s3(uri)
    # The body read is inside the retried function: a connection dropped mid-body
    # restarts the whole GET instead of returning truncated bytes.
    return _with_retry(f"get {uri}", lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())


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
    if not is_s3(uri):
        return open(local_path(uri), "rb")
    bucket, key = _split_s3(uri)
    return _with_retry(f"get {uri}", lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"])


class _LocalAtomicWriter(io.RawIOBase):
    """Writes to a hidden temp file beside the target; ``commit`` renames it into place."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the target, so os.replace is a rename on one filesystem.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_MARK}", dir=path.parent)
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self._path = path
        self._done = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        return self._file.write(b)

    def commit(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.flush()
        os.fsync(self._file.fileno())  # data on disk before the rename makes it visible
        self._file.close()
        os.chmod(self._tmp, 0o644)  # mkstemp creates 0600; shards are shared artefacts
        os.replace(self._tmp, self._path)
        _fsync_dir(self._path.parent)  # make the rename itself durable

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def close(self) -> None:
        # close() = success, like a normal file (webdataset/gopen writers call close()).
        self.commit()
        super().close()

    def __del__(self) -> None:
        # IOBase.__del__ would call close() and publish a half-written file; a writer
        # dropped without close() was abandoned, so throw its data away instead.
        if not getattr(self, "_done", True):
            self.abort()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _S3AtomicWriter(io.RawIOBase):
    """Buffers writes; a single PUT when small, else a multipart upload.

    S3 only makes an object visible on PUT or CompleteMultipartUpload, so an aborted
    writer leaves nothing behind (the abort also frees the uploaded parts).
    """

    def __init__(self, uri: str, chunk: int | None = None) -> None:
        super().__init__()
        self._uri = uri
        self._bucket, self._key = _split_s3(uri)
        self._chunk = chunk or MULTIPART_CHUNK
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        if self._done:
            raise ValueError("write to a closed S3 writer")
        data = memoryview(b).cast("B")
        self._buf += data
        while len(self._buf) >= self._chunk:
            part = bytes(self._buf[: self._chunk])
            del self._buf[: self._chunk]
            self._upload_part(part)
        return len(data)

    def _upload_part(self, data: bytes) -> None:
        client = s3_client()
        if self._upload_id is None:
            self._upload_id = _with_retry(
                f"create multipart {self._uri}",
                lambda: client.create_multipart_upload(Bucket=self._bucket, Key=self._key)["UploadId"],
            )
        number = len(self._parts) + 1
        etag = _with_retry(
            f"upload part {number} {self._uri}",
            lambda: client.upload_part(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                       PartNumber=number, Body=data)["ETag"],
        )
        self._parts.append({"PartNumber": number, "ETag": etag})

    def commit(self) -> None:
        if self._done:
            return
        try:
            client = s3_client()
            if self._upload_id is None:
                body = bytes(self._buf)
                _with_retry(f"put {self._uri}", lambda: client.put_object(Bucket=self._bucket, Key=self._key, Body=body))
            else:
                if self._buf or not self._parts:
                    self._upload_part(bytes(self._buf))
                _with_retry(
                    f"complete multipart {self._uri}",
                    lambda: client.complete_multipart_upload(
                        Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                        MultipartUpload={"Parts": self._parts}),
                )
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._buf = bytearray()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buf = bytearray()
        if self._upload_id is not None:
            upload_id = self._upload_id
            try:
                _with_retry(f"abort multipart {self._uri}",
                            lambda: s3_client().abort_multipart_upload(Bucket=self._bucket, Key=self._key,
                                                                        UploadId=upload_id))
            except Exception:  # the original error matters more; a bucket lifecycle rule cleans up
                log.warning("could not abort multipart upload for %s", self._uri, exc_info=True)

    def close(self) -> None:
        self.commit()
        super().close()

    def __del__(self) -> None:
        # See _LocalAtomicWriter.__del__: never complete an abandoned upload.
        if not getattr(self, "_done", True):
            self.abort()


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[IO[bytes]]:
    """Yield a binary writer; the object appears at ``uri`` only if the block succeeds."""
    writer: _LocalAtomicWriter | _S3AtomicWriter = (
        _S3AtomicWriter(uri) if is_s3(uri) else _LocalAtomicWriter(local_path(uri))
    )
    try:
        yield writer  # type: ignore[misc]
    except BaseException:
        writer.abort()
        raise
    writer.commit()


# ----------------------------------------------------------------------- listings


def listdir(uri: str) -> list[str]:
    """Sorted names one level under a directory/prefix (sub-prefixes without a slash)."""
    if not is_s3(uri):
        path = local_path(uri)
        if not path.is_dir():
            return []
        return sorted(n for n in os.listdir(path) if _TMP_MARK not in n)
    bucket, key = _split_s3(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""

    def list_all() -> list[str]:
        names: set[str] = set()
        for page in s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names.update(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
        names.discard("")
        return sorted(names)

    return _with_retry(f"list {uri}", list_all)


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
    stale = sorted(n for n in os.listdir(path) if _TMP_MARK in n and (path / n).is_file())
    for name in stale:
        (path / name).unlink(missing_ok=True)
    return stale


def list_objects(uri: str) -> list[tuple[str, int, str]]:
    """All (relative key, size, ETag) under an S3 prefix, recursively, sorted by key."""
    bucket, key = _split_s3(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""

    def list_all() -> list[tuple[str, int, str]]:
        out = []
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend((o["Key"][len(prefix):], int(o["Size"]), str(o.get("ETag", ""))) for o in page.get("Contents", []))
        return sorted(out)

    return _with_retry(f"list {uri}", list_all)


def delete(uri: str, *, recursive: bool = False) -> None:
    """Delete a file/object; missing is fine. ``recursive`` also removes a directory/prefix."""
    if not is_s3(uri):
        path = local_path(uri)
        if path.is_dir() and not path.is_symlink():
            if not recursive:
                raise IsADirectoryError(f"{uri} is a directory; pass recursive=True")
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    bucket, key = _split_s3(uri)
    if not recursive:
        if key:  # DeleteObject on a missing key succeeds: deleting is idempotent
            _with_retry(f"delete {uri}", lambda: s3_client().delete_object(Bucket=bucket, Key=key))
        return
    keys = [key] if key else []
    keys += [f"{key.rstrip('/')}/{rel}" if key else rel for rel, _, _ in list_objects(uri)]
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        _with_retry(f"delete {uri}", lambda: s3_client().delete_objects(
            Bucket=bucket, Delete={"Objects": batch, "Quiet": True}))


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


# -------------------------------------------------------------------- webdataset


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    if mode.startswith("r"):
        return open_read(url)
    if mode.startswith("w"):
        return _S3AtomicWriter(url)  # close() completes the upload (webdataset closes it)
    raise ValueError(f"{mode}: unknown mode")


def register_webdataset_s3() -> None:
    """Let ``webdataset.WebDataset("s3://...")`` stream through boto3 (no ``aws`` CLI)."""

    # The same dict object as webdataset.gopen.gopen_schemes (the module name is
    # shadowed by the gopen function in the package namespace).
    webdataset.gopen_schemes["s3"] = _gopen_s3


register_webdataset_s3()
