"""tasks.storage against the local filesystem and a real S3-compatible server (moto)."""
from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import botocore.exceptions as bexc
import numpy as np
import pytest
import webdataset as wds

from condgen.flows.steps import retry_on_io
from condgen.tasks.io import s3, storage
from tests.conftest import S3_TEST_BUCKET, free_port, start_moto_server, stop_server


@pytest.fixture(params=["local", "file_uri", pytest.param("s3", marks=pytest.mark.slow)])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests run on a plain path, a file:// URI and an s3:// prefix."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "file_uri":
        return (tmp_path / "store").as_uri()
    return request.getfixturevalue("s3_uri")


# ----------------------------------------------------------------------- URIs


def test_join_and_paths(tmp_path: Path) -> None:
    assert storage.join("s3://b/p", "x", "y.tar") == "s3://b/p/x/y.tar"
    assert storage.join("s3://b/p/", "/x/") == "s3://b/p/x"
    assert storage.join("file:///tmp/a", "b") == "file:///tmp/a/b"
    assert storage.join(str(tmp_path), "b") == str(tmp_path / "b")
    assert storage.local_path("file:///tmp/a%20b/c") == Path("/tmp/a b/c")
    assert storage.local_path(str(tmp_path)) == tmp_path
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x")
    with pytest.raises(ValueError):
        storage.local_path("s3://b/k")
    with pytest.raises(ValueError):
        storage.local_path("http://host/x")


# ----------------------------------------------------------------- round trips


def test_bytes_json_listdir_delete_round_trip(base: str) -> None:
    data = bytes(range(256)) * 10
    storage.write_bytes(storage.join(base, "a.bin"), data)
    storage.write_json(storage.join(base, "sub", "m.json"), {"b": 1, "a": [1, 2]})
    storage.write_bytes(storage.join(base, "sub", "deeper", "z.bin"), b"z")

    assert storage.exists(storage.join(base, "a.bin"))
    assert not storage.exists(storage.join(base, "missing.bin"))
    assert storage.read_bytes(storage.join(base, "a.bin")) == data
    assert storage.read_json(storage.join(base, "sub", "m.json")) == {"a": [1, 2], "b": 1}
    # sorted keys, indent 2: the stored text is canonical (manifests diff cleanly)
    text = storage.read_bytes(storage.join(base, "sub", "m.json")).decode()
    assert text == json.dumps({"a": [1, 2], "b": 1}, sort_keys=True, indent=2) + "\n"
    with storage.open_read(storage.join(base, "a.bin")) as f:
        assert f.read(10) == data[:10] and f.read() == data[10:]

    assert storage.listdir(base) == ["a.bin", "sub"]
    assert storage.listdir(storage.join(base, "sub")) == ["deeper", "m.json"]
    assert storage.listdir(storage.join(base, "nothing-here")) == []

    storage.write_bytes(storage.join(base, "a.bin"), b"new")  # overwrite
    assert storage.read_bytes(storage.join(base, "a.bin")) == b"new"
    storage.delete(storage.join(base, "a.bin"))
    storage.delete(storage.join(base, "a.bin"))  # missing is fine
    assert not storage.exists(storage.join(base, "a.bin"))
    storage.delete(storage.join(base, "sub"), recursive=True)
    assert storage.listdir(base) == []


def test_open_write_streams_many_chunks(base: str) -> None:
    uri = storage.join(base, "stream.bin")
    chunks = [bytes([i]) * 1000 for i in range(50)]
    with storage.open_write(uri) as f:
        for c in chunks:
            f.write(c)
    assert storage.read_bytes(uri) == b"".join(chunks)


def test_failed_open_write_leaves_nothing(base: str) -> None:
    uri = storage.join(base, "x.bin")
    with pytest.raises(RuntimeError), storage.open_write(uri) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert not storage.exists(uri)

    storage.write_bytes(uri, b"old")
    with pytest.raises(RuntimeError), storage.open_write(uri) as f:
        f.write(b"half of the new")
        raise RuntimeError("boom")
    assert storage.read_bytes(uri) == b"old"  # the old version survives intact
    assert storage.listdir(base) == ["x.bin"]


def test_local_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.bin"
    with pytest.raises(KeyboardInterrupt), storage.open_write(str(target)) as f:  # BaseException too: ^C
        f.write(b"x" * 100)
        raise KeyboardInterrupt
    assert list((tmp_path / "d").iterdir()) == []
    storage.write_bytes(str(target), b"ok")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["f.bin"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


# -------------------------------------------------------------------------- S3


def _in_progress_uploads(uri: str) -> list[dict]:
    bucket, key = s3.split_s3(uri)
    return storage.s3_client().list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])


@pytest.mark.slow
def test_s3_multipart_upload_completes(s3_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "MULTIPART_CHUNK", 5 * 1024 * 1024)  # S3's minimum part
    data = np.random.default_rng(0).integers(0, 256, 11 * 1024 * 1024, dtype=np.uint8).tobytes()
    uri = storage.join(s3_uri, "big.bin")
    with storage.open_write(uri) as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i:i + (1 << 20)])
    assert storage.read_bytes(uri) == data
    bucket, key = s3.split_s3(uri)
    etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
    assert etag.strip('"').endswith("-3")  # really a 3-part multipart upload
    assert _in_progress_uploads(s3_uri) == []


@pytest.mark.slow
def test_s3_multipart_aborted_on_exception(s3_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    uri = storage.join(s3_uri, "big.bin")
    with pytest.raises(RuntimeError), storage.open_write(uri) as f:
        f.write(b"\1" * (6 * 1024 * 1024))  # one part already uploaded
        assert _in_progress_uploads(s3_uri) != []
        raise RuntimeError("boom")
    assert not storage.exists(uri)
    assert _in_progress_uploads(s3_uri) == []  # parts freed, not left to linger


@pytest.mark.slow
def test_webdataset_reads_and_writes_s3(s3_uri: str) -> None:
    for shard in range(4):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as w:
            for i in range(5):
                w.write({"__key__": f"s{shard}-{i:03d}", "cls": str(i).encode(), "txt": b"hi"})
        storage.write_bytes(storage.join(s3_uri, f"shard-{shard:06d}.tar"), buf.getvalue())

    ds = wds.WebDataset(f"{s3_uri}/shard-{{000000..000003}}.tar", shardshuffle=False, empty_check=False)
    keys = [s["__key__"] for s in ds]
    assert len(keys) == 20 and keys[0] == "s0-000" and keys[-1] == "s3-004"

    # Writing through gopen: close() completes the upload.
    with wds.TarWriter(f"{s3_uri}/written.tar") as w:
        w.write({"__key__": "k", "cls": b"1"})
    assert [s["cls"] for s in wds.WebDataset(f"{s3_uri}/written.tar", shardshuffle=False)] == [b"1"]


@pytest.mark.slow
def test_s3_survives_endpoint_outage(tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint refuses connections for ~4 s, then comes up: the call still succeeds."""
    port = free_port()
    monkeypatch.setenv("CONDGEN_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    storage.reset_clients()
    procs = []

    def start_later() -> None:
        time.sleep(4.0)
        procs.append(start_moto_server(port, tmp_path / "late.log"))

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        t0 = time.monotonic()
        # head on a missing bucket/key answers 404 -> False once the server is up.
        assert storage.exists(f"s3://{S3_TEST_BUCKET}/nothing") is False
        assert time.monotonic() - t0 >= 4.0
    finally:
        thread.join()
        for p in procs:
            stop_server(p)
        storage.reset_clients()


def test_own_retry_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "RETRY_BASE_S", 0.001)
    monkeypatch.setenv("CONDGEN_S3_RETRY_SECONDS", "0.3")
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise bexc.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    assert s3.with_retry("test", flaky) == "ok" and len(calls) == 3

    def down() -> None:
        calls.append(1)
        raise bexc.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1")

    calls.clear()
    t0 = time.monotonic()
    with pytest.raises(s3.StorageUnavailable) as info:
        s3.with_retry("get s3://b/k", down)
    took = time.monotonic() - t0
    assert 0.3 <= took < 2.0 and len(calls) >= 3, (took, len(calls))  # retried until the budget, not after
    assert isinstance(info.value.__cause__, bexc.ConnectTimeoutError)
    message = str(info.value)
    assert "\n" not in message and "nothing was lost" in message and "re-run" in message
    assert "CONDGEN_S3_RETRY_SECONDS=0.3" in message and "get s3://b/k" in message
    assert storage.is_transient_io_error(info.value)  # a Prefect I/O step still retries it

    def not_found() -> None:  # not a connection problem: no retry
        calls.append(1)
        raise bexc.ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")

    calls.clear()
    with pytest.raises(bexc.ClientError):
        s3.with_retry("test", not_found)
    assert len(calls) == 1


def test_retry_budget_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from condgen.tasks.io import settings

    for bad in ("soon", "-1", "nan", "1e9"):
        monkeypatch.setenv("CONDGEN_S3_RETRY_SECONDS", bad)
        with pytest.raises(settings.SettingsError, match="CONDGEN_S3_RETRY_SECONDS: must be a number of seconds"):
            s3.with_retry("test", lambda: "never called")
    monkeypatch.setenv("CONDGEN_S3_RETRY_SECONDS", "120")
    assert settings.s3_retry_seconds() == 120.0
    monkeypatch.delenv("CONDGEN_S3_RETRY_SECONDS")
    assert settings.s3_retry_seconds() == 15.0


def test_transient_io_classification() -> None:
    assert storage.is_transient_io_error(bexc.EndpointConnectionError(endpoint_url="x"))
    assert storage.is_transient_io_error(OSError("disk hiccup"))
    assert not storage.is_transient_io_error(FileNotFoundError("gone"))
    assert not storage.is_transient_io_error(ValueError("bad config"))
    server_error = bexc.ClientError({"Error": {"Code": "InternalError"},
                                     "ResponseMetadata": {"HTTPStatusCode": 500}}, "PutObject")
    denied = bexc.ClientError({"Error": {"Code": "AccessDenied"},
                               "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
    assert storage.is_transient_io_error(server_error) and not storage.is_transient_io_error(denied)


def test_prefect_retry_condition_only_for_io() -> None:
    from prefect.states import Failed

    assert retry_on_io(None, None, Failed(data=bexc.EndpointConnectionError(endpoint_url="x")))
    assert not retry_on_io(None, None, Failed(data=ValueError("bad config")))
