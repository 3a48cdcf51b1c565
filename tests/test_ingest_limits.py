"""Ingestion under hostile input (issue #20): caps on tar samples, the format allow-list,
pixel counts read from the header, exact labels, one ingestion per image file, caption
length, the local mirror of an S3 source after a kill; and the per-shard split counts a
streaming reader plans with."""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from condgen.tasks.data.ingest import ingest
from condgen.tasks.data.splits import load_split
from condgen.tasks.io.settings import SettingsError
from tests.test_ingest import _digits, _png


def _rejects(out: Path) -> dict[str, tuple[str, str]]:
    rejects = json.loads((out / "rejects.json").read_text())["rejects"]
    return {r["ref"]: (r["reason"], r["detail"]) for r in rejects}


# ------------------------------------------------------------ per-shard split counts


def test_shard_entries_count_their_splits_and_labelled_samples(tmp_path: Path) -> None:
    x, y = _digits(30)
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    rows = []
    for i in range(30):
        (src / "img" / f"{i}.png").write_bytes(_png(x[i]))
        # every third item is caption-only (label -1): counted in split_counts, not in labelled_split_counts
        rows.append({"file": f"img/{i}.png", "caption": f"digit {i}"} if i % 3 == 0
                    else {"file": f"img/{i}.png", "label": int(y[i])})
    (src / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    ingest(str(src), str(out), shard_size=7)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["shards"]
    assert [s["n_samples"] for s in shards] == [7, 7, 7, 7, 2]
    for s in shards:
        assert set(s) == {"name", "n_samples", "sha256", "split_counts", "labelled_split_counts"}
        assert list(s["split_counts"]) == list(manifest["split_counts"])  # every split, zeros too
        assert sum(s["split_counts"].values()) == s["n_samples"]
        assert all(s["labelled_split_counts"][k] <= n for k, n in s["split_counts"].items())
    totals = {k: sum(s["split_counts"][k] for s in shards) for k in manifest["split_counts"]}
    assert totals == manifest["split_counts"] and sum(totals.values()) == 30
    labelled = {k: sum(s["labelled_split_counts"][k] for s in shards) for k in manifest["split_counts"]}
    assert sum(labelled.values()) == 20 == 30 - manifest["n_unlabelled"]
    # the counts are those of the samples really in each shard
    for s in shards:
        seen = {k: 0 for k in manifest["split_counts"]}
        for sample in wds.WebDataset(str(out / s["name"]), shardshuffle=False):
            seen[json.loads(sample["json"])["split"]] += 1
        assert seen == s["split_counts"]



# ------------------------------------------------------------------ tar sample caps


def _tar_gz(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_tar_sample_of_80_members_is_rejected_without_holding_them(tmp_path: Path) -> None:
    """Issue #20: a small gzipped tar whose one key has 80 members of 1 MiB (80 MiB unpacked)
    took ingestion from 1.1 to 2.3 GB and was accepted. Now the members are counted on the tar
    headers: the 17th is never read, the sample is rejected, and Python's peak allocation stays
    far below what holding the members would take."""
    x, y = _digits(3)
    filler = bytes(1024 * 1024)
    members = [("good.png", _png(x[0])), ("good.cls", str(y[0]).encode())]
    members += [("bomb.png", _png(x[1])), ("bomb.cls", str(y[1]).encode())]
    members += [(f"bomb.extra{i:02d}.bin", filler) for i in range(78)]  # 80 members under key "bomb"
    members += [("after.png", _png(x[2])), ("after.cls", str(y[2]).encode())]
    src = tmp_path / "wds"
    src.mkdir()
    _tar_gz(src / "part-000.tar", members)
    assert (src / "part-000.tar").stat().st_size < 1_000_000

    tracemalloc.start()
    try:
        result = ingest(str(src / "part-000.tar"), str(tmp_path / "out"), shard_size=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _rejects(tmp_path / "out") == {"part-000.tar:bomb": ("sample_too_large", "more than 16 members")}
    assert sum(result.counts.values()) == 2  # the samples around it are kept
    assert peak < 48 * 2**20, f"peak {peak / 2**20:.0f} MiB: the members were held"  # 80 MiB and more before


def test_sample_byte_cap_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _digits(2)
    src = tmp_path / "one.tar"
    _tar_gz(src, [("a.png", _png(x[0])), ("a.cls", str(y[0]).encode()), ("a.txt", b"x" * 5000),
                  ("b.png", _png(x[1])), ("b.cls", str(y[1]).encode())])
    monkeypatch.setenv("CONDGEN_INGEST_MAX_SAMPLE_BYTES", "4000")
    ingest(str(src), str(tmp_path / "out"), shard_size=10)
    assert _rejects(tmp_path / "out") == {"one.tar:a": ("sample_too_large", "more than 4000 bytes")}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["n_samples"] == 1 and manifest["config"]["sample_limits"] == [16, 4000]
    monkeypatch.setenv("CONDGEN_INGEST_MAX_SAMPLE_BYTES", "-5")
    with pytest.raises(SettingsError, match="CONDGEN_INGEST_MAX_SAMPLE_BYTES"):
        ingest(str(src), str(tmp_path / "bad"), shard_size=10)


# ------------------------------------------------------------ formats, pixel counts


def _png_1bit(side: int) -> bytes:
    """A white side x side 1-bit greyscale PNG, written by hand: 9000 px compresses to ~10 KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\xff" * ((side + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _ico_holding(png: bytes, claimed: int = 16) -> bytes:
    """An ICO whose directory says ``claimed`` x ``claimed`` but whose one entry is ``png``."""
    return (struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(png), 22)
            + png)


def test_an_ico_bomb_is_refused_from_its_header_without_decoding(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #20: an ICO saying 16x16 that holds a 9000x9000 PNG was fully decoded before being
    judged. Only the allowed formats are parsed now; no image of a refused format is loaded."""
    from PIL import ImageFile

    bomb = _ico_holding(_png_1bit(9000))
    assert len(bomb) < 100_000 and bomb[6:8] == bytes([16, 16])  # (PIL's ICO plugin decodes it at open)
    loaded: list[tuple[str | None, tuple[int, int]]] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda im: (loaded.append((im.format, im.size)), real_load(im))[1])
    x, y = _digits(2)
    src = tmp_path / "src"
    for rel, data in {"3/bomb.png": bomb, "3/icon.ico": _ico_holding(_png(x[0]), 28),
                      "3/scan.tif": _encode(Image.fromarray(x[0]), "TIFF"),
                      "3/ok.png": _png(x[0]), "4/ok.bmp": _encode(Image.fromarray(x[1]), "BMP")}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    with tarfile.open(tmp_path / "wds.tar", "w") as tar:
        for name, data in (("a.png", bomb), ("a.cls", b"3"), ("b.png", _png(x[1])), ("b.cls", str(y[1]).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    t0 = time.monotonic()
    folder = ingest(str(src), str(tmp_path / "out"), shard_size=10)
    from_tar = ingest(str(tmp_path / "wds.tar"), str(tmp_path / "out-tar"), shard_size=10)
    took = time.monotonic() - t0
    reasons = {ref: reason for ref, (reason, _) in _rejects(tmp_path / "out").items()}
    assert reasons == {"3/bomb.png": "unsupported_format", "3/icon.ico": "not_an_image",  # by its name
                       "3/scan.tif": "unsupported_format"}
    assert _rejects(tmp_path / "out")["3/bomb.png"][1].startswith("ICO;")
    assert _rejects(tmp_path / "out-tar") == {"wds.tar:a.png": (
        "unsupported_format", "ICO; allowed: PNG, JPEG, WEBP, GIF, BMP, PPM")}
    assert sum(folder.counts.values()) == 2 and sum(from_tar.counts.values()) == 1
    assert loaded and {fmt for fmt, _ in loaded} <= {"PNG", "BMP"}, loaded  # no ICO, TIFF or inner PNG
    assert max(max(size) for _, size in loaded) <= 28, loaded
    assert took < 20, took


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_pixel_count_is_checked_on_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 9000 x 9000 PNG (10 KB) is refused as bad_size on its header: never decoded."""
    from PIL import ImageFile

    loaded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: (loaded.append(im.size), real_load(im))[1])
    x, _ = _digits(1)
    (tmp_path / "src" / "1").mkdir(parents=True)
    (tmp_path / "src" / "1" / "huge.png").write_bytes(_png_1bit(9000))
    (tmp_path / "src" / "1" / "ok.png").write_bytes(_png(x[0]))
    ingest(str(tmp_path / "src"), str(tmp_path / "out"), shard_size=10)
    assert _rejects(tmp_path / "out") == {"1/huge.png": ("bad_size", "9000x9000")}
    assert (9000, 9000) not in loaded and loaded


# ------------------------------------------------------------------ labels, captions


def test_folder_labels_must_be_exact(tmp_path: Path) -> None:
    """Issue #20: folders ``٧``, ``+7``, ``-0`` and `` 7`` were read as 7, 7, 0 and 7."""
    x, y = _digits(20)
    src = tmp_path / "src"
    for i in range(10):  # one real image per digit folder
        (src / str(y[2 * i])).mkdir(parents=True, exist_ok=True)
        (src / str(y[2 * i]) / f"d{i}.png").write_bytes(_png(x[2 * i]))
    hostile = ["٧", "+7", "-0", " 7", "7 ", "07", "7\n", "seven"]
    for j, name in enumerate(hostile):
        (src / name).mkdir()
        (src / name / "x.png").write_bytes(_png(x[2 * j + 1]))
    ingest(str(src), str(tmp_path / "out"), shard_size=50)
    rejects = _rejects(tmp_path / "out")
    assert {ref.rsplit("/", 1)[0]: reason for ref, (reason, _) in rejects.items()} == dict.fromkeys(hostile, "bad_label")
    data = load_split(str(tmp_path / "out"), "all")
    assert sorted(data["y"].tolist()) == sorted(int(v) for v in y[::2])


def test_class_names_are_matched_exactly(tmp_path: Path) -> None:
    x, _ = _digits(6)
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    labels = ["cat", "dog", "cat ", " dog", "ca\u0000t", "dog"]
    for i in range(6):
        (src / "img" / f"{i}.png").write_bytes(_png(x[i]))
    (src / "captions.jsonl").write_text("".join(
        json.dumps({"file": f"img/{i}.png", "label": label}) + "\n" for i, label in enumerate(labels)))
    ingest(str(src), str(tmp_path / "out"), shard_size=50)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["class_names"] == ["cat", "dog"]
    assert {ref: reason for ref, (reason, _) in _rejects(tmp_path / "out").items()} == {
        "img/2.png": "bad_label", "img/3.png": "bad_label", "img/4.png": "bad_label"}


def test_tar_labels_are_exact_but_a_trailing_newline_is_a_line_ending(tmp_path: Path) -> None:
    x, _ = _digits(5)
    members = []
    for i, cls in enumerate([b"3\n", b"1", b"2", b"+3", b"\xd9\xa7"]):  # "٧" in UTF-8
        members += [(f"s{i}.png", _png(x[i])), (f"s{i}.cls", cls)]
    _tar_gz(tmp_path / "t.tar", members)
    ingest(str(tmp_path / "t.tar"), str(tmp_path / "out"), shard_size=50)
    assert {ref: reason for ref, (reason, _) in _rejects(tmp_path / "out").items()} == {
        "t.tar:s3.png": "bad_label", "t.tar:s4.png": "bad_label"}
    assert load_split(str(tmp_path / "out"), "all")["y"].tolist() == [3, 1, 2]


def test_one_file_is_ingested_once(tmp_path: Path) -> None:
    """Issue #20: symlinks and repeated captions.jsonl lines ingested one image twice."""
    x, y = _digits(3)
    src = tmp_path / "folders"
    for i in range(3):
        (src / str(y[i])).mkdir(parents=True, exist_ok=True)
        (src / str(y[i]) / f"{i}.png").write_bytes(_png(x[i]))
    first = f"{y[0]}/0.png"
    (src / str(y[1]) / "alias.png").symlink_to(src / first)
    os.link(src / first, src / str(y[2]) / "hard.png")
    ingest(str(src), str(tmp_path / "out"), shard_size=50)
    reasons = _rejects(tmp_path / "out")
    assert reasons == {f"{y[1]}/alias.png": ("duplicate_file", f"same file as {first}"),
                       f"{y[2]}/hard.png": ("duplicate_file", f"same file as {first}")}
    assert len(load_split(str(tmp_path / "out"), "all")["y"]) == 3

    cap = tmp_path / "cap"
    (cap / "img").mkdir(parents=True)
    for i in range(2):
        (cap / "img" / f"{i}.png").write_bytes(_png(x[i]))
    (cap / "img" / "link.png").symlink_to(cap / "img" / "0.png")
    rows = [{"file": "img/0.png", "label": 1}, {"file": "img/1.png", "label": 2},
            {"file": "img/0.png", "label": 1}, {"file": "./img/0.png", "label": 3}, {"file": "img/link.png", "label": 4}]
    (cap / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(str(cap), str(tmp_path / "out-cap"), shard_size=50)
    assert _rejects(tmp_path / "out-cap") == {
        name: ("duplicate_file", "same file as captions.jsonl:1") for name in ("img/0.png", "./img/0.png", "img/link.png")}
    assert load_split(str(tmp_path / "out-cap"), "all")["y"].tolist() == [1, 2]


def test_captions_are_capped_and_long_lines_never_held(tmp_path: Path) -> None:
    """Issue #20: a 2 MB caption was accepted. Over 2,000 characters: rejected (not truncated)."""
    x, _ = _digits(4)
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    for i in range(4):
        (src / "img" / f"{i}.png").write_bytes(_png(x[i]))
    rows = [{"file": "img/0.png", "label": 1, "caption": "é" * 2000},
            {"file": "img/1.png", "label": 1, "caption": "a" * 2001},
            {"file": "img/2.png", "caption": "b" * 60_000},
            {"file": "img/3.png", "label": 2, "caption": "c" * 2_000_000}]
    (src / "captions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    ingest(str(src), str(tmp_path / "out"), shard_size=50)
    assert _rejects(tmp_path / "out") == {
        "img/1.png": ("caption_too_long", "2001 characters > 2000"),
        "img/2.png": ("caption_too_long", "60000 characters > 2000"),
        "captions.jsonl:4": ("record_too_long", "over 65536 bytes")}
    assert load_split(str(tmp_path / "out"), "all")["caption"].tolist() == ["é" * 2000]

    members = [("a.png", _png(x[0])), ("a.cls", b"1"), ("a.txt", b"d" * 2001)]
    _tar_gz(tmp_path / "t.tar", members + [("b.png", _png(x[1])), ("b.cls", b"2"), ("b.txt", b"fine\n")])
    ingest(str(tmp_path / "t.tar"), str(tmp_path / "out-tar"), shard_size=50)
    assert _rejects(tmp_path / "out-tar") == {"t.tar:a.png": ("caption_too_long", "2001 characters > 2000")}
    assert load_split(str(tmp_path / "out-tar"), "all")["caption"].tolist() == ["fine"]


# ------------------------------------------------------- an S3 source's local mirror

KILL_MID_DOWNLOAD = """
import os, signal, sys
from condgen.tasks.io import storage
real, opened = storage.open_read, []
def open_then_die(uri):
    opened.append(uri)
    if len(opened) == 4:  # three objects are down: SIGKILL, no cleanup runs
        os.kill(os.getpid(), signal.SIGKILL)
    return real(uri)
storage.open_read = open_then_die
from condgen.tasks.data.ingest import ingest
ingest(sys.argv[1], sys.argv[2], shard_size=4)
"""


@pytest.mark.slow
def test_a_killed_s3_ingestion_leaves_a_mirror_the_rerun_reuses_and_removes(
        s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #20: a killed S3-source ingestion left its download in /tmp/condgen-ingest-*
    for ever. The re-run now finds it, downloads only what is missing, and removes it."""
    from condgen.tasks.io import storage

    x, y = _digits(6)
    raw = storage.join(s3_uri, "raw")
    for i in range(6):
        storage.write_bytes(storage.join(raw, str(y[i]), f"{i}.png"), _png(x[i]))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILL_MID_DOWNLOAD, raw, str(tmp_path / "out")],
                            env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    left = sorted(tmp.glob("condgen-ingest-*"))
    assert len(left) == 1 and len(list((left[0] / "data").rglob("*.png"))) == 3

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    fetched: list[str] = []
    real_open = storage.open_read
    monkeypatch.setattr(storage, "open_read", lambda uri: (fetched.append(uri), real_open(uri))[1])
    result = ingest(raw, str(tmp_path / "out"), shard_size=4)
    assert sum(result.counts.values()) == 6 and result.n_rejected == 0
    assert len(fetched) == 3  # the other three came from the killed run's mirror
    assert list(tmp.iterdir()) == []  # and the mirror is gone

    # A mirror of an older listing of the same prefix (the source changed since) is removed too.
    storage.write_bytes(storage.join(raw, str(y[0]), "new.png"), _png(x[5]))
    again = subprocess.run([sys.executable, "-c", KILL_MID_DOWNLOAD, raw, str(tmp_path / "out2")],
                           env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, timeout=300, check=False)
    assert again.returncode == -signal.SIGKILL
    stale = sorted(tmp.glob("condgen-ingest-*"))
    storage.write_bytes(storage.join(raw, str(y[0]), "newer.png"), _png(x[4]))
    assert len(stale) == 1 and ingest(raw, str(tmp_path / "out3"), shard_size=4).n_rejected == 0
    assert list(tmp.iterdir()) == []
