"""Ingest: shards + manifest, determinism, idempotence, resume, hostile input, S3."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from condgen.tasks.data import sources
from condgen.tasks.data.ingest import ingest
from condgen.tasks.data.items import stratified_indices
from condgen.tasks.data.splits import load_split
from condgen.tasks.io import storage
from condgen.tasks.io.shards import tar_bytes

SMALL = {"limit": 300, "shard_size": 100}  # 3 shards: fast, still exercises sharding


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = sources.load_mnist()
    idx = np.linspace(0, len(x) - 1, n).astype(int)  # spread over the (class-sorted) set
    return x[idx], y[idx]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(root: Path, exclude: Path) -> dict[str, int | None]:
    """Every path under root outside ``exclude``, with file mtimes: proves nothing else changed.

    Directory mtimes are left out: creating ``exclude`` itself touches its parent.
    """
    out: dict[str, int | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if exclude not in p.parents and p != exclude:
                out[str(p)] = None if p.is_dir() else p.lstat().st_mtime_ns
    return out


# --------------------------------------------------------------- shards + manifest


def test_shards_and_manifest_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = ingest("bundled:mnist", str(out), **SMALL)
    assert not result.skipped and result.n_rejected == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 2
    assert manifest["source"] == "bundled:mnist"
    assert manifest["source_fingerprint"].startswith("sha256:")
    assert manifest["config"]["shard_size"] == 100 and manifest["config"]["limit"] == 300
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert [s["n_samples"] for s in manifest["shards"]] == [100, 100, 100]
    for s in manifest["shards"]:
        assert s["sha256"] == _sha(out / s["name"])  # the manifest vouches for the exact bytes
    assert manifest["split_counts"] == result.counts and sum(result.counts.values()) == 300
    assert result.counts["train"] > result.counts["val"] > 0 and result.counts["test"] > 0
    assert json.loads((out / "rejects.json").read_text())["rejects"] == []

    samples = list(wds.WebDataset(str(out / "shard-{000000..000002}.tar"), shardshuffle=False))
    assert len(samples) == 300 and len({s["__key__"] for s in samples}) == 300
    split_counts: dict[str, int] = {}
    for s in samples[:50] + samples[-50:]:
        img = np.asarray(Image.open(io.BytesIO(s["png"])))
        meta = json.loads(s["json"])
        assert img.shape == (28, 28) and img.dtype == np.uint8
        assert int(s["cls"]) == meta["label"]
        assert s["__key__"].startswith("mnist-")
        assert len(set(meta["captions"])) >= 3 and meta["caption"] in meta["captions"]
        assert set(meta["attributes"]) == {"thickness", "slant", "size", "ink"}
        assert 0 < meta["attributes"]["ink"] < 1 and 0 < meta["attributes"]["size"] <= 1
    for s in samples:
        split = json.loads(s["json"])["split"]
        split_counts[split] = split_counts.get(split, 0) + 1
    assert split_counts == result.counts

    parts = {split: load_split(str(out), split) for split in ("train", "val", "test")}
    assert {k: len(v["y"]) for k, v in parts.items()} == result.counts
    everything = load_split(out.as_uri(), "all", keys=("x", "y", "attributes", "captions"))
    assert everything["x"].shape == (300, 28, 28) and everything["x"].dtype == np.uint8
    assert everything["y"].dtype == np.int64 and set(everything["y"]) <= set(range(10))
    assert everything["attributes"].shape == (300, 4) and everything["attributes"].dtype == np.float32
    assert len(everything["captions"][0]) >= 3
    with pytest.raises(KeyError):
        load_split(str(out), "train", keys=("x", "txt"))  # no CLIP members before embed


def test_same_source_gives_identical_bytes(tmp_path: Path) -> None:
    a = ingest("bundled:mnist", str(tmp_path / "a"), **SMALL)
    b = ingest("bundled:mnist", str(tmp_path / "b"), **SMALL)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    for name in ("shard-000000.tar", "shard-000002.tar", "rejects.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.counts == b.counts


def test_rerun_is_skipped_and_config_change_redoes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ingest("bundled:mnist", str(out), **SMALL)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = ingest("bundled:mnist", str(out), **SMALL)
    assert again.skipped and sum(again.counts.values()) == 300
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched

    changed = ingest("bundled:mnist", str(out), limit=300, shard_size=150)
    assert not changed.skipped
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["n_samples"] for s in manifest["shards"]] == [150, 150]
    assert not (out / "shard-000002.tar").exists()  # stale shard from the old layout removed


def test_resume_after_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ingest("bundled:mnist", str(tmp_path / "reference"), **SMALL)
    out = tmp_path / "out"
    real_write = storage.write_bytes
    shard_writes: list[str] = []

    def crash_on_third_shard(uri: str, data: bytes) -> None:
        if uri.endswith(".tar"):
            shard_writes.append(uri)
            if len(shard_writes) == 3:
                raise ConnectionError("killed between shards")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_third_shard)
    with pytest.raises(ConnectionError):
        ingest("bundled:mnist", str(out), **SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    kept = {n: (out / n).stat().st_mtime_ns for n in ("shard-000000.tar", "shard-000001.tar")}

    shard_writes.clear()
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (shard_writes.append(uri), real_write(uri, data)))
    result = ingest("bundled:mnist", str(out), **SMALL)
    assert not result.skipped
    assert [Path(u).name for u in shard_writes if u.endswith(".tar")] == ["shard-000002.tar"]
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # complete shards kept as they were
    assert (out / "manifest.json").read_bytes() == (tmp_path / "reference" / "manifest.json").read_bytes()


def test_uci_digits_are_framed_like_mnist(tmp_path: Path) -> None:
    result = ingest("bundled:uci_digits", str(tmp_path / "uci"), limit=40, shard_size=100)
    data = load_split(str(tmp_path / "uci"), "all")
    assert sum(result.counts.values()) == 40 and data["x"].shape == (40, 28, 28)
    # a limit takes an even, seeded share of every class; keys keep the items' place in the set
    picked = stratified_indices(sources.load_uci_digits()[1], 40, seed=0)
    assert list(data["key"]) == [f"uci-{i:06d}" for i in picked] and set(data["y"]) == set(range(10))
    assert data["x"][:, :2].max() == 0 and data["x"][:, -2:].max() == 0  # 2-px margin
    assert data["x"].max() > 200  # 0..16 levels scaled to 0..255


def test_image_size_resizes(tmp_path: Path) -> None:
    ingest("bundled:mnist", str(tmp_path / "o"), limit=20, shard_size=100, image_size=32)
    assert load_split(str(tmp_path / "o"), "all")["x"].shape == (20, 32, 32)


def test_load_split_reads_clip_members(tmp_path: Path) -> None:
    ingest("bundled:mnist", str(tmp_path), limit=10, shard_size=10)
    shard = tmp_path / "shard-000000.tar"
    samples = []
    for s in wds.WebDataset(str(shard), shardshuffle=False):
        members = {k: v for k, v in s.items() if not k.startswith("__")}
        for name, arr in (("clip_txt.npy", np.ones((4, 8), np.float16)), ("clip_img.npy", np.ones(8, np.float16))):
            buf = io.BytesIO()
            np.save(buf, arr)
            members[name] = buf.getvalue()
        samples.append((s["__key__"], members))
    shard.write_bytes(tar_bytes(samples))
    out = load_split(str(tmp_path), "all", keys=("x", "txt", "img"))
    assert out["txt"].shape == (10, 4, 8) and out["img"].shape == (10, 8) and out["img"].dtype == np.float32


# ----------------------------------------------------------------- hostile input


def _reasons(out: Path) -> dict[str, str]:
    rejects = json.loads((out / "rejects.json").read_text())
    assert rejects["n_rejected"] == len(rejects["rejects"])
    return {r["ref"]: r["reason"] for r in rejects["rejects"]}


def test_bad_folder_items_are_rejected_not_fatal(tmp_path: Path) -> None:
    x, y = _digits(12)
    src = tmp_path / "src"
    for i in range(10):
        (src / str(y[i])).mkdir(parents=True, exist_ok=True)
        (src / str(y[i]) / f"d{i}.png").write_bytes(_png(x[i]))
    big = np.asarray(Image.fromarray(x[10]).resize((56, 56)))
    (src / "3" / "big.png").write_bytes(_png(big))  # other size in policy: resized
    (src / "3" / "paper.png").write_bytes(_png(255 - x[11]))  # dark ink on white: inverted
    (src / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (src / "3" / "notes.txt").write_text("not an image")
    (src / "3" / "tiny.png").write_bytes(_png(np.full((4, 4), 255)))
    (src / "3" / "strip.png").write_bytes(_png(np.full((10, 200), 255)))
    (src / "3" / "blank.png").write_bytes(_png(np.zeros((28, 28))))
    (src / "12").mkdir()
    (src / "12" / "x.png").write_bytes(_png(x[0]))
    (src / "cat").mkdir()
    (src / "cat" / "x.png").write_bytes(_png(x[0]))
    (src / "loose.png").write_bytes(_png(x[0]))  # no class folder: no label
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(x[0]))
    (src / "4").mkdir(exist_ok=True)
    (src / "4" / "escape.png").symlink_to(outside / "secret.png")
    (src / "linked_dir").symlink_to(outside, target_is_directory=True)
    (src / "4" / "inside.png").symlink_to(src / "3" / "big.png")  # stays inside, but big.png is read already

    out = tmp_path / "out"
    before = _snapshot(tmp_path, out)
    result = ingest(str(src), str(out), shard_size=4, invert="auto")  # MNIST polarity: asked for
    assert _snapshot(tmp_path, out) == before  # nothing created or changed outside out/

    reasons = _reasons(out)
    assert reasons == {
        "3/corrupt.png": "corrupt_image",
        "3/notes.txt": "not_an_image",
        "3/tiny.png": "bad_size",
        "3/strip.png": "bad_size",
        "3/blank.png": "blank_image",
        "12/x.png": "label_out_of_range",
        "cat/x.png": "bad_label",
        "loose.png": "missing_label",
        "4/escape.png": "symlink_escape",
        "linked_dir": "symlink_escape",
        "4/inside.png": "duplicate_file",
    }
    assert result.n_rejected == 11
    assert sum(result.counts.values()) == 12  # 10 digits + big + paper
    data = load_split(str(out), "all")
    refs = [json.loads(s["json"])["source_ref"] for s in wds.WebDataset(
        [str(p) for p in sorted(out.glob("shard-*.tar"))], shardshuffle=False)]
    paper = data["x"][refs.index("3/paper.png")]
    assert paper[0].max() < 128 and paper.max() > 200  # inverted to MNIST polarity
    assert data["key"][0].startswith("src-")


def _add(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_bad_tar_members_are_rejected_and_never_extracted(tmp_path: Path) -> None:
    x, y = _digits(8)
    src = tmp_path / "wds"
    src.mkdir()
    with tarfile.open(src / "part-000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(4):
            _add(tar, f"good{i}.png", _png(x[i]))
            _add(tar, f"good{i}.cls", str(y[i]).encode())
        _add(tar, "../evil.png", _png(x[4]))
        _add(tar, "../evil.cls", b"1")
        _add(tar, "/etc/passwd", b"root:x:0:0")
        _add(tar, "/abs.png", _png(x[4]))
        _add(tar, "link.png", b"", tarfile.SYMTYPE, "/etc/passwd")
        _add(tar, "corrupt.png", b"not a png at all")
        _add(tar, "corrupt.cls", b"2")
        _add(tar, "readme.txt", b"hello")
        _add(tar, "nolabel.png", _png(x[5]))
        _add(tar, "range.png", _png(x[6]))
        _add(tar, "range.cls", b"42")
        _add(tar, "small.png", _png(np.full((3, 3), 255)))
        _add(tar, "small.cls", b"3")
    with tarfile.open(src / "part-001.tar", "w") as tar:
        _add(tar, "more.png", _png(x[7]))
        _add(tar, "more.json", json.dumps({"label": int(y[7]), "caption": "my own words"}).encode())

    out = tmp_path / "out"
    before = _snapshot(tmp_path.parent, out)
    result = ingest(str(src / "part-{000..001}.tar"), str(out), shard_size=100)
    assert _snapshot(tmp_path.parent, out) == before  # no evil.png / abs.png anywhere

    reasons = _reasons(out)
    assert reasons == {
        "part-000.tar:../evil.png": "unsafe_member_name",
        "part-000.tar:../evil.cls": "unsafe_member_name",
        "part-000.tar:/etc/passwd": "unsafe_member_name",
        "part-000.tar:/abs.png": "unsafe_member_name",
        "part-000.tar:link.png": "link_member",
        "part-000.tar:corrupt.png": "corrupt_image",
        "part-000.tar:readme": "not_an_image",
        "part-000.tar:nolabel.png": "missing_label",
        "part-000.tar:range.png": "label_out_of_range",
        "part-000.tar:small.png": "bad_size",
    }
    assert result.n_rejected == len(reasons) and sum(result.counts.values()) == 5
    data = load_split(str(out), "all")
    assert list(data["y"]) == [int(v) for v in y[:4]] + [int(y[7])]
    assert data["caption"][-1] == "my own words" and data["captions"][-1][0] == "my own words"


def test_captions_jsonl_folder(tmp_path: Path) -> None:
    x, y = _digits(5)
    src = tmp_path / "cap"
    (src / "img").mkdir(parents=True)
    for i in range(5):
        (src / "img" / f"{i}.png").write_bytes(_png(x[i]))
    (tmp_path / "outside.png").write_bytes(_png(x[0]))
    lines = [json.dumps({"file": f"img/{i}.png", "label": int(y[i]), "caption": f"caption {i}"}) for i in range(3)]
    # (each line names another file: a file named twice is a duplicate_file, tests/test_ingest_limits.py)
    lines += ['{"file": "../outside.png", "label": 1}', "{not json", json.dumps({"file": "img/3.png"}),
              json.dumps({"file": "img/4.png", "label": -1})]
    (src / "captions.jsonl").write_text("\n".join(lines) + "\n")

    result = ingest(str(src), str(tmp_path / "out"), shard_size=10)
    assert sum(result.counts.values()) == 3
    assert sorted(_reasons(tmp_path / "out").values()) == sorted(
        ["unsafe_path", "bad_record", "missing_label", "label_out_of_range"])
    assert list(load_split(str(tmp_path / "out"), "all")["caption"]) == ["caption 0", "caption 1", "caption 2"]


# ---------------------------------------------------------------------------- S3


@pytest.mark.slow
def test_ingest_to_and_from_s3(s3_uri: str, tmp_path: Path) -> None:
    out = storage.join(s3_uri, "shards")
    result = ingest("bundled:mnist", out, limit=200, shard_size=100)
    assert not result.skipped and result.manifest_uri == f"{out}/manifest.json"
    assert storage.listdir(out) == ["manifest.json", "rejects.json", "shard-000000.tar", "shard-000001.tar"]
    manifest = storage.read_json(result.manifest_uri)
    for s in manifest["shards"]:
        assert hashlib.sha256(storage.read_bytes(storage.join(out, s["name"]))).hexdigest() == s["sha256"]
    local = ingest("bundled:mnist", str(tmp_path / "local"), limit=200, shard_size=100)
    assert manifest == json.loads((tmp_path / "local" / "manifest.json").read_text())  # same bytes anywhere
    assert ingest("bundled:mnist", out, limit=200, shard_size=100).skipped
    data = load_split(out, "all")
    assert data["x"].shape == (200, 28, 28) and sum(local.counts.values()) == 200

    # An s3:// prefix as the *source*: a class-folder layout with one hostile key ...
    x, y = _digits(6)
    folder = storage.join(s3_uri, "raw")
    for i in range(6):
        storage.write_bytes(storage.join(folder, str(y[i]), f"{i}.png"), _png(x[i]))
    storage.write_bytes(storage.join(folder, "notes.txt"), b"hi")
    from_folder = ingest(folder, storage.join(s3_uri, "from-folder"), shard_size=4)
    assert sum(from_folder.counts.values()) == 6 and from_folder.n_rejected == 1
    # ... and a tar layout (the shards written above are a valid WebDataset source).
    from_tars = ingest(out, storage.join(s3_uri, "from-tars"), shard_size=100)
    assert from_tars.n_rejected == 0 and sum(from_tars.counts.values()) == 200


def test_prefect_steps_wrap_the_plain_functions_and_retry_on_io_only() -> None:
    from condgen.flows import steps

    assert steps.ingest_task.fn is ingest and steps.ingest_task.retries == 2
    for step in (steps.ingest_task, steps.latents_task, steps.embed_task, steps.plan_task, steps.manifest_task):
        assert step.retry_condition_fn is steps.retry_on_io, step.name
    for step in (steps.train_task, steps.evaluate_task, steps.shards_task):
        assert not step.retries, step.name