"""S3 for ``tasks/io/storage.py``: the boto3 client, bounded retries, whole-object
operations, the atomic writer and webdataset's ``s3://`` opener.

The endpoint comes from ``CONDGEN_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` (unset = AWS),
credentials from the standard AWS chain; they are never logged. Connection failures are
retried twice over: botocore's "standard" retry mode inside each call, and our own
exponential backoff around whole-object operations (:func:`with_retry`) for up to
``CONDGEN_S3_RETRY_SECONDS`` (default 15 s, ``tasks/io/settings.py``), so an endpoint that
is unreachable for ~10 s is survived. An outage that outlasts the budget ends in
:class:`StorageUnavailable`, one line that says nothing was lost and to re-run: every
write is atomic, so what was written is complete and a re-run resumes from it.

Writes are atomic (:class:`S3AtomicWriter`): a single PUT for small objects, otherwise a
multipart upload that is completed on success and aborted on any exception (S3 never
shows an incomplete upload). Callers normally go through ``tasks.io.storage``, which picks
this module or the local filesystem by URI.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import boto3
import botocore.exceptions as bexc
import webdataset
from botocore.config import Config

from condgen.tasks.io import settings
from condgen.tasks.io.atomic_writer import AtomicWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

ENDPOINT_ENV_VARS = ("CONDGEN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
# Our own retry around whole-object operations: delays 0.5, 1, 2, 4, 8, 8, ... s (+ jitter)
# until settings.s3_retry_seconds() have passed since the first failure (botocore's own
# attempts inside each call come on top).
RETRY_BASE_S = 0.5
RETRY_MAX_S = 8.0
# S3 needs parts >= 5 MiB (except the last); 8 MiB keeps memory small and PUTs few.
MULTIPART_CHUNK = 8 * 1024 * 1024

# Errors where the request may not have reached S3 or the answer got lost: safe to
# repeat for whole-object operations (all our writes are idempotent PUTs).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    bexc.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, proxy errors
    bexc.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
)


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


# -- the client -----------------------------------------------------------------------------

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
        extra = {
            "s3": {"addressing_style": "path"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
    return Config(
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=60,
        **extra,
    )


class StorageUnavailable(ConnectionError):
    """S3 stayed unreachable for longer than the retry budget. Nothing was lost (writes are
    atomic): the message is one line that says so and to re-run. A ``ConnectionError``, so
    a Prefect I/O step still retries it (``storage.is_transient_io_error``)."""

    def __init__(self, what: str, waited_s: float, budget_s: float) -> None:
        super().__init__(
            f"S3 unreachable for {waited_s:.0f} s ({what[:160]}; CONDGEN_S3_RETRY_SECONDS={budget_s:g}): "
            "nothing was lost, writes are atomic; re-run the same command to resume, or raise "
            "CONDGEN_S3_RETRY_SECONDS for longer outages")
        self.what, self.waited_s, self.budget_s = what, waited_s, budget_s


def with_retry(what: str, fn: Callable[[], T], budget_s: float | None = None) -> T:
    """Run ``fn`` again on connection errors, with exponential backoff, for up to ``budget_s``
    seconds (default ``settings.s3_retry_seconds()``) from the start of the first failed call;
    then raise :class:`StorageUnavailable` from the last error. (A call that has begun runs
    to its end: botocore's own attempts inside it may take up to ~15 s more.)"""
    budget = settings.s3_retry_seconds() if budget_s is None else budget_s
    first_failure: float | None = None
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            return fn()
        except CONNECTION_ERRORS as exc:
            now = time.monotonic()
            first_failure = started if first_failure is None else first_failure
            left = first_failure + budget - now
            if left <= 0:
                raise StorageUnavailable(what, now - first_failure, budget) from exc
            delay = min(RETRY_BASE_S * 2**attempt, RETRY_MAX_S) * (0.75 + 0.5 * random.random())
            delay = min(delay, left)  # the last try comes when the budget ends
            attempt += 1
            # Only the operation and the error class: messages may carry the endpoint,
            # never credentials, but keep logs minimal anyway.
            log.warning("S3 %s failed (%s); retry %d in %.1fs (%.0fs of the %gs budget left)", what,
                        type(exc).__name__, attempt, delay, left, budget)
            time.sleep(delay)


def _is_not_found(exc: bexc.ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


# -- whole objects and listings ---------------------------------------------------------------


def exists(uri: str) -> bool:
    bucket, key = split_s3(uri)

    def head() -> bool:
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except bexc.ClientError as exc:
            if _is_not_found(exc):
                return False
            raise

    return with_retry(f"head {uri}", head)


def read_bytes(uri: str) -> bytes:
    bucket, key = split_s3(uri)
    # The body read is inside the retried function: a connection dropped mid-body
    # restarts the whole GET instead of returning truncated bytes.
    return with_retry(f"get {uri}", lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())


def open_read(uri: str) -> IO[bytes]:
    """The boto3 StreamingBody of an object (only opening is retried)."""
    bucket, key = split_s3(uri)
    return with_retry(f"get {uri}", lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"])


def _prefix(key: str) -> str:
    return key.rstrip("/") + "/" if key.strip("/") else ""


def listdir(uri: str) -> list[str]:
    """Sorted names one level under a prefix (sub-prefixes without a slash)."""
    bucket, key = split_s3(uri)
    prefix = _prefix(key)

    def list_all() -> list[str]:
        names: set[str] = set()
        for page in s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names.update(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
        names.discard("")
        return sorted(names)

    return with_retry(f"list {uri}", list_all)


def list_objects(uri: str) -> list[tuple[str, int, str]]:
    """All (relative key, size, ETag) under an S3 prefix, recursively, sorted by key."""
    bucket, key = split_s3(uri)
    prefix = _prefix(key)

    def list_all() -> list[tuple[str, int, str]]:
        out = []
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend((o["Key"][len(prefix):], int(o["Size"]), str(o.get("ETag", "")))
                       for o in page.get("Contents", []))
        return sorted(out)

    return with_retry(f"list {uri}", list_all)


def delete(uri: str, *, recursive: bool = False) -> None:
    """Delete an object (missing is fine); ``recursive`` also removes everything under the prefix."""
    bucket, key = split_s3(uri)
    if not recursive:
        if key:  # DeleteObject on a missing key succeeds: deleting is idempotent
            with_retry(f"delete {uri}", lambda: s3_client().delete_object(Bucket=bucket, Key=key))
        return
    keys = [key] if key else []
    keys += [f"{key.rstrip('/')}/{rel}" if key else rel for rel, _, _ in list_objects(uri)]
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        with_retry(f"delete {uri}", lambda batch=batch: s3_client().delete_objects(
            Bucket=bucket, Delete={"Objects": batch, "Quiet": True}))


# -- the atomic writer ------------------------------------------------------------------------


class S3AtomicWriter(AtomicWriter):
    """Buffers writes; a single PUT when small, else a multipart upload.

    S3 only makes an object visible on PUT or CompleteMultipartUpload, so an aborted
    writer leaves nothing behind (the abort also frees the uploaded parts).
    """

    def __init__(self, uri: str, chunk: int | None = None) -> None:
        super().__init__()
        self._uri = uri
        self._bucket, self._key = split_s3(uri)
        self._chunk = chunk or MULTIPART_CHUNK
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

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
            self._upload_id = with_retry(
                f"create multipart {self._uri}",
                lambda: client.create_multipart_upload(Bucket=self._bucket, Key=self._key)["UploadId"],
            )
        number = len(self._parts) + 1
        etag = with_retry(
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
                with_retry(f"put {self._uri}", lambda: client.put_object(Bucket=self._bucket, Key=self._key, Body=body))
            else:
                if self._buf or not self._parts:
                    self._upload_part(bytes(self._buf))
                with_retry(
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
                with_retry(f"abort multipart {self._uri}",  # one try: S3 never shows the parts
                           lambda: s3_client().abort_multipart_upload(Bucket=self._bucket, Key=self._key,
                                                                      UploadId=upload_id), budget_s=0)
            except Exception:  # the original error matters more; a bucket lifecycle rule cleans up
                log.warning("could not abort multipart upload for %s", self._uri, exc_info=True)


# -- webdataset ---------------------------------------------------------------------------------


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    if mode.startswith("r"):
        return open_read(url)
    if mode.startswith("w"):
        return S3AtomicWriter(url)  # close() completes the upload (webdataset closes it)
    raise ValueError(f"{mode}: unknown mode")


def register_webdataset_s3() -> None:
    """Let ``webdataset.WebDataset("s3://...")`` stream through boto3 (no ``aws`` CLI)."""

    # The same dict object as webdataset.gopen.gopen_schemes (the module name is
    # shadowed by the gopen function in the package namespace).
    webdataset.gopen_schemes["s3"] = _gopen_s3


register_webdataset_s3()
