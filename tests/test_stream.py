"""Streaming training data (tasks/data/stream.py, tasks/training/loader.py; issue #16, the data side; #17).

Shard sets are written here with ``shards.write_tar`` + a manifest: 8x8 greyscale images whose first two
pixels spell the sample's number, so every batch says which samples it holds. Shards differ in size, some
samples are val and some caption-only (``y == -1``), side-car embeddings (2 or 3 phrasings) and latents are
keyed like the source. What is checked: disjoint rank spans over ``steps x G`` samples, equal steps per rank,
a new order per epoch, a resume's ``skip_steps`` (bitwise, without decoding the skipped images), the side-car
join against ``load_arrays``, memory vs stream over an epoch, the auto choice, ``s3://``, bounded memory.
Issue #17: with ``stream_sharding="global"`` (the default) the ranks' batches of a step, concatenated, are one
worker's batch of that step, bitwise, for 1, 2 and 3 workers (unequal shares), resumed or not, and a rank
decodes only its own samples; ``"span"`` reads only its span and gives the batches it gave before.
"""
from __future__ import annotations

import hashlib
import io
import re
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch

from condgen.tasks.data import stream
from condgen.tasks.data.sidecars import embeddings_uri, latents_uri, write_embeddings, write_latents
from condgen.tasks.data.splits import load_arrays, load_split
from condgen.tasks.io import shards, storage
from condgen.tasks.training import batching, loader
from condgen.tasks.training.loader import memory_batches, open_train_data

SEED, D, EMB_FP, LAT_FP = 7, 5, "e" * 64, "a" * 64
SIZES = (37, 11, 60, 5, 29, 48)  # shards of different sizes


def _image(i: int) -> np.ndarray:
    x = np.full((8, 8), 128, np.uint8)
    x[0, 0], x[0, 1] = i % 256, i // 256
    return x


def ids(batch: dict[str, torch.Tensor]) -> list[int]:
    """The sample numbers of a batch, read back from its images."""
    px = ((batch["x"][:, 0, 0, :2] + 1) * 127.5).round().long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def make_set(root: str, sizes=SIZES, *, per_shard_counts: bool = True, sidecars: bool = False) -> str:
    """A shard set: sample i is val when i % 7 == 3, caption-only when i % 11 == 5, else train with y = i % 10."""
    entries, counts, i, unlabelled = [], Counter(), 0, 0
    for s, size in enumerate(sizes):
        samples, meta = [], []
        for _ in range(size):
            split = "val" if i % 7 == 3 else "train"
            y = -1 if i % 11 == 5 else i % 10
            samples.append((f"k{i:05d}", {"png": shards.encode_png(_image(i)), "cls": str(y).encode(),
                                          "json": f'{{"split": "{split}", "caption": "c", "captions": ["c"]}}'.encode()}))
            meta.append((split, y >= 0))
            counts[split] += 1
            unlabelled += y < 0
            i += 1
        name = f"shard-{s:06d}.tar"
        entry = {"name": name, "n_samples": size, "sha256": shards.write_tar(storage.join(root, name), samples)}
        if per_shard_counts:
            entry["split_counts"] = {sp: sum(m[0] == sp for m in meta) for sp in ("train", "val")}
            entry["labelled_split_counts"] = {sp: sum(m[0] == sp and m[1] for m in meta) for sp in ("train", "val")}
        entries.append(entry)
        if sidecars:
            keys = [k for k, _ in samples]
            nums = [int(k[1:]) for k in keys]
            txt = [np.random.default_rng(n).normal(size=(2 + n % 2, D)).astype(np.float16) for n in nums]
            write_embeddings(storage.join(embeddings_uri(root, EMB_FP), name), keys,
                             np.zeros((len(keys), D), np.float16), txt)
            write_latents(storage.join(latents_uri(root, LAT_FP), name), keys,
                          np.stack([np.full((2, 2, 2), n, np.float32) for n in nums]))
    manifest = {"schema_version": 2, "channels": 1, "image_size": 8, "num_classes": 10, "shards": entries,
                "n_samples": i, "split_counts": dict(counts), "n_unlabelled": unlabelled, "attribute_names": []}
    storage.write_json(storage.join(root, shards.MANIFEST), manifest)
    if sidecars:
        storage.write_json(storage.join(embeddings_uri(root, EMB_FP), shards.MANIFEST),
                           {"fingerprint": EMB_FP, "embed_dim": D, "shards": [{"name": e["name"], "n_captions": 3}
                                                                           for e in entries]})
        storage.write_json(storage.join(latents_uri(root, LAT_FP), shards.MANIFEST),
                           {"fingerprint": LAT_FP, "latent_shape": [2, 2, 2],
                            "shards": [{"name": e["name"]} for e in entries]})
    return root


def _config(uri: str, **kw) -> dict:
    return {"shards_uri": uri, "batch_size": 16, "seed": SEED, "data_mode": "stream", "stream_buffer": 40,
            "loader_threads": 2, **kw}


def _epoch(data, epoch: int = 0, skip: int = 0) -> list[dict[str, torch.Tensor]]:
    return list(data.epoch(epoch, skip))


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> str:
    return make_set(str(tmp_path_factory.mktemp("stream-set")), sidecars=True)


def _train_ids(uri: str, labelled_only: bool) -> list[int]:
    y = load_arrays(uri, "train")["y"]
    keys = load_split(uri, "train")["key"]
    return [int(k[1:]) for k, yy in zip(keys, y) if yy >= 0 or not labelled_only]


# -- the index and the epoch ------------------------------------------------------------------------------
@pytest.mark.parametrize("labelled_only", [False, True])
def test_the_index_from_the_manifest_equals_a_scan_of_the_tars(shard_set, tmp_path, labelled_only):
    scanned = make_set(str(tmp_path / "scan"), per_shard_counts=False)
    a = stream.build_index(shard_set, "train", labelled_only=labelled_only)
    b = stream.build_index(scanned, "train", labelled_only=labelled_only)
    assert (a.source, b.source) == ("manifest", "scan")
    assert a.counts == b.counts and a.total == len(_train_ids(shard_set, labelled_only))


@pytest.mark.parametrize("sharding", ["global", "span"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_spans_are_disjoint_cover_steps_x_g_and_every_rank_takes_the_same_steps(shard_set, world, sharding):
    cfg = _config(shard_set, stream_sharding=sharding)
    per_rank = [_epoch(open_train_data(cfg, r, world, labelled_only=True)) for r in range(world)]
    data = open_train_data(cfg, 0, world, labelled_only=True)
    bp = data.plan
    assert data.mode == "stream" and bp.steps_per_epoch == bp.samples // 16 and bp.unused_per_epoch == bp.samples % 16
    assert {len(steps) for steps in per_rank} == {bp.steps_per_epoch}  # equal work, unequal shards
    seen = [i for r, steps in enumerate(per_rank) for b in steps for i in ids(b) if len(b["y"]) == bp.shares[r]]
    assert len(seen) == len(set(seen)) == bp.steps_per_epoch * 16  # disjoint, nothing repeated or padded
    assert set(seen) <= set(_train_ids(shard_set, True))
    for steps in per_rank:  # labels travel with their images; no caption-only sample
        for b in steps:
            assert torch.equal(b["y"], torch.tensor([i % 10 for i in ids(b)]))
    summary = data.summary()
    assert summary["unused_per_epoch"] == bp.unused_per_epoch and summary["index"] == "manifest"
    assert summary["stream_sharding"] == sharding
    assert 1 <= summary["shards_per_rank"] <= len(SIZES)


def test_each_epoch_has_a_new_order_and_the_same_epoch_is_the_same(shard_set):
    data = open_train_data(_config(shard_set), 1, 2, labelled_only=False)
    e0, again, e1 = ([i for b in _epoch(data, e) for i in ids(b)] for e in (0, 0, 1))
    assert e0 == again and e0 != e1 and len(e0) == len(e1)


@pytest.mark.parametrize("sharding", ["global", "span"])
@pytest.mark.parametrize("world, rank, skip", [(1, 0, 3), (2, 1, 5), (3, 0, 1)])
def test_skip_steps_yields_the_tail_of_the_epoch_bitwise_without_decoding_the_skipped_images(
        shard_set, monkeypatch, world, rank, skip, sharding):
    cfg = _config(shard_set, embeddings=EMB_FP, latents=LAT_FP, shards_b_uri=shard_set, stream_sharding=sharding)
    data = open_train_data(cfg, rank, world, labelled_only=False)
    full = _epoch(data, 2)
    decoded = []
    real = stream.decode_sample
    monkeypatch.setattr(stream, "decode_sample", lambda raw: decoded.append(raw["__key__"]) or real(raw))
    tail = _epoch(data, 2, skip)
    assert len(tail) == len(full) - skip and len(decoded) == len(tail) * data.plan.shares[rank]
    for got, want in zip(tail, full[skip:]):
        assert got.keys() == want.keys() == {"x", "y", "txt", "z", "x_b"}
        assert all(torch.equal(got[k], want[k]) for k in got)
    assert _epoch(data, 2, data.plan.steps_per_epoch) == []
    with pytest.raises(ValueError, match="skip_steps"):
        data.epoch(2, data.plan.steps_per_epoch + 1)


def test_side_cars_join_by_key_like_load_arrays(shard_set):
    arrays = load_arrays(shard_set, "train", EMB_FP, LAT_FP)
    keys = [int(k[1:]) for k in load_split(shard_set, "train")["key"]]
    row = {k: i for i, k in enumerate(keys)}
    data = open_train_data(_config(shard_set, embeddings=EMB_FP, latents=LAT_FP), 0, 1, labelled_only=False)
    n = 0
    for b in _epoch(data, 1):
        for j, i in enumerate(ids(b)):
            r = row[i]
            assert torch.equal(b["z"][j], torch.from_numpy(arrays["z"][r])) and b["z"].dtype == torch.float32
            assert b["txt"].dtype == torch.float32
            assert any(torch.equal(b["txt"][j], torch.from_numpy(t)) for t in arrays["txt"][r])  # one phrasing
            n += 1
    assert n == data.plan.steps_per_epoch * 16


def test_a_missing_side_car_row_is_a_one_line_error_with_the_fix(tmp_path):
    root = make_set(str(tmp_path / "set"), sizes=(20, 20), sidecars=True)
    name = "shard-000001.tar"
    folder = embeddings_uri(root, EMB_FP)
    rows = shards.read_samples(storage.join(folder, name))
    shards.write_tar(storage.join(folder, name), [(s["__key__"], {m: s[m] for m in s if m.endswith("npy")})
                                                 for s in rows[:5]])
    data = open_train_data(_config(root, embeddings=EMB_FP, batch_size=4), 0, 1, labelled_only=False)
    with pytest.raises(KeyError, match=r"has no CLIP embeddings in .*shard-000001.tar.*run embed\(\)"):
        _epoch(data)
    with pytest.raises(FileNotFoundError, match="run precompute_latents"):
        open_train_data(_config(root, latents="b" * 64), 0, 1, labelled_only=False)


# -- memory mode, auto, S3, bounded memory -----------------------------------------------------------------
def test_memory_batches_are_the_workers_batches_and_skip_continues_them(shard_set):
    from condgen.tasks.training.worker import batches

    arrays = load_arrays(shard_set, "train", EMB_FP)
    arrays["x_b"] = arrays["x"][::-1].copy()
    for rank, world in ((0, 1), (1, 3)):
        full = list(memory_batches(arrays, 16, rank, world, 1, SEED))
        old = list(batches(arrays, 16, rank, world, 1, SEED))
        tail = list(memory_batches(arrays, 16, rank, world, 1, SEED, skip_steps=4))
        assert len(full) == len(old) == len(tail) + 4
        for a, b in zip(full, old):
            assert all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(tail, full[4:]):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_and_stream_give_the_same_samples_over_an_epoch(tmp_path):
    root = make_set(str(tmp_path / "set"), sizes=(40, 24, 56))  # 120 samples: 94 labelled train ones
    mem = open_train_data(_config(root, data_mode="memory", batch_size=47), 0, 1, labelled_only=True)
    st = open_train_data(_config(root, data_mode="stream", batch_size=47), 0, 1, labelled_only=True)
    assert (mem.mode, st.mode) == ("memory", "stream") and mem.plan == st.plan and mem.plan.unused_per_epoch == 0
    a, b = (sorted(i for batch in _epoch(d) for i in ids(batch)) for d in (mem, st))
    assert a == b == sorted(_train_ids(root, True))
    grid = st.grid_examples(per_class=2)
    assert set(grid["y"].tolist()) == set(range(10)) and max(Counter(grid["y"].tolist()).values()) == 2
    assert grid["x"].dtype == np.uint8 and mem.grid_examples(per_class=2)["x"].shape[1:] == (8, 8)


def test_auto_picks_memory_for_a_small_set_and_stream_above_the_limit(shard_set):
    n, size = loader.estimate_bytes(_config(shard_set, embeddings=EMB_FP, latents=LAT_FP))
    assert size == n * (64 + 4 * 3 * D + 4 * 8)  # images + 3 phrasings x D float32 + latents
    small = open_train_data(_config(shard_set, data_mode="auto"), 0, 1, labelled_only=False)
    big = open_train_data(_config(shard_set, data_mode="auto", memory_limit_mb=n * 64 / 2**20 / 2), 0, 1,
                          labelled_only=False)
    assert (small.mode, big.mode) == ("memory", "stream")
    assert small.summary()["data_mode"] == "memory" and big.summary()["requested_mode"] == "auto"
    with pytest.raises(ValueError, match="data_mode must be one of"):
        open_train_data(_config(shard_set, data_mode="disk"), 0, 1, labelled_only=False)


def test_streaming_from_s3_gives_the_batches_of_the_local_set(shard_set, s3_uri):
    root = storage.local_path(shard_set)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(s3_uri, str(path.relative_to(root))), path.read_bytes())
    cfg = {"embeddings": EMB_FP, "latents": LAT_FP}
    local = _epoch(open_train_data(_config(shard_set, **cfg), 1, 2, labelled_only=False), 3)
    remote = _epoch(open_train_data(_config(s3_uri, **cfg), 1, 2, labelled_only=False), 3)
    assert len(local) == len(remote) > 0
    for a, b in zip(local, remote):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sharding", ["global", "span"])
def test_a_stream_holds_at_most_its_buffer_and_prefetch_whatever_the_set_size(tmp_path, sharding):
    root = make_set(str(tmp_path / "big"), sizes=(250,) * 12)  # 3,000 samples
    data = open_train_data(_config(root, stream_buffer=50, batch_size=8, stream_sharding=sharding), 0, 2,
                           labelled_only=False)
    n = 0
    for b in data.epoch(0):
        n += len(b["y"])
        time.sleep(0.001)  # a consumer that trains: the reader runs ahead until the prefetch queue is full
    assert n == data.plan.steps_per_epoch * 4 and n > 1000
    assert 50 <= data.live.peak <= data.max_live < n / 10, (data.live.peak, data.max_live)
    assert data.live.now == 0  # every sample read was handed over


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_fast_tar_reader_reads_what_tarfile_reads(tmp_path, fmt):
    rng = np.random.default_rng(0)
    files = [(f"{'d/' * 60 if i == 2 else ''}k{i}.{ext}", rng.bytes(int(rng.integers(0, 1500))))
             for i in range(5) for ext in ("png", "cls")] + [("__meta__", b"{}")]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        adir = tarfile.TarInfo("adir")
        adir.type = tarfile.DIRTYPE
        tar.addfile(adir)  # not a regular file: skipped
    with tarfile.open(path) as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg() and m.name != "__meta__"]
    with open(path, "rb") as f:
        got = [(m["fname"], m["data"]) for m in shards.tar_members(f, chunk=700)]
    assert got == want and len(got) == 10 and got[4][0].startswith("d/d/")  # USTAR: prefix + name
    with open(path, "rb") as f, pytest.raises(ValueError, match="truncated"):
        list(shards.tar_members(io.BytesIO(f.read()[:1500])))


def test_a_member_size_over_the_cap_is_refused_on_its_header_before_reading():
    info = tarfile.TarInfo("k0.png")
    info.size = shards.MAX_MEMBER_BYTES + 1
    header = info.tobuf(tarfile.USTAR_FORMAT)  # a header that promises 256 MiB + 1, and no body

    class Reads(io.BytesIO):
        asked = 0

        def read(self, n=-1):
            Reads.asked = max(Reads.asked, n)
            return super().read(n)

    with pytest.raises(ValueError, match="cap"):
        list(shards.tar_members(Reads(header), chunk=4096))
    assert Reads.asked <= 4096  # never asked the stream for the promised bytes


def test_a_rank_opens_only_the_shards_its_span_overlaps(shard_set, monkeypatch):
    opened: list[str] = []
    real = shards.iter_samples
    monkeypatch.setattr(shards, "iter_samples", lambda uri: opened.append(uri.rsplit("/", 1)[-1]) or real(uri))
    data = open_train_data(_config(shard_set, batch_size=12, stream_sharding="span"), 2, 3, labelled_only=True)
    for epoch in (0, 1):
        opened.clear()
        _epoch(data, epoch)
        order = stream.shard_order(len(SIZES), SEED, epoch)
        want = [data.index.names[i] for i in stream.shards_overlapping(data.index, order,
                                                                      *batching.rank_span(data.plan, 2))]
        assert opened == want and len(want) < len(SIZES)  # in the epoch's order, each once


# -- issue #17: the worker count changes only how a global batch is split --------------------------------
def _ranks(uri: str, world: int, epoch: int, skip: int = 0, **kw) -> list[list[dict[str, torch.Tensor]]]:
    cfg = _config(uri, embeddings=EMB_FP, latents=LAT_FP, shards_b_uri=uri, **kw)
    return [_epoch(open_train_data(cfg, r, world, labelled_only=False), epoch, skip) for r in range(world)]


@pytest.mark.parametrize("skip", [0, 3])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_sharding_splits_the_one_worker_batch_of_every_step_bitwise(shard_set, world, skip):
    """16 = 16, 8 + 8, 6 + 5 + 5: each step's per-rank batches, concatenated in rank order, are the 1-rank
    batch of that step in every key (images, labels, the drawn caption phrasing, latents, CycleGAN's x_b),
    and a resumed epoch's too; one worker's batches are those ``"span"`` (the pre-#17 reader) gives it."""
    (one,) = _ranks(shard_set, 1, 1)
    assert [ids(b) for b in one] == [ids(b) for b in _ranks(shard_set, 1, 1, stream_sharding="span")[0]]
    per_rank = _ranks(shard_set, world, 1, skip)
    assert {len(steps) for steps in per_rank} == {len(one) - skip} and len(one) == 10
    for k, whole in enumerate(one[skip:]):
        assert [len(per_rank[r][k]["y"]) for r in range(world)] == list(batching.split(16, world))
        for key, value in whole.items():
            assert torch.equal(torch.cat([per_rank[r][k][key] for r in range(world)]), value), (world, k, key)


def test_span_sharding_changes_a_step_with_the_worker_count_and_gives_the_batches_it_gave_before(shard_set):
    """Pinned: rank 1 of 2, epoch 0, as the reader before issue #17 gave them (its first step, a digest of all)."""
    (one,) = _ranks(shard_set, 1, 0, stream_sharding="span")
    two = _ranks(shard_set, 2, 0, stream_sharding="span")
    assert [ids(b) for b in one] != [ids(a) + ids(b) for a, b in zip(*two)]  # the optimisation changes
    got = [i for b in two[1] for i in ids(b)]
    assert got[:8] == [103, 86, 98, 5, 100, 77, 99, 4]
    assert hashlib.sha256(",".join(map(str, got)).encode()).hexdigest()[:16] == "c188012af37f5c17"


@pytest.mark.parametrize("skip", [0, 4])
def test_global_sharding_decodes_only_the_ranks_own_samples_and_reads_the_epochs_shards_in_order(
        shard_set, monkeypatch, skip):
    decoded: list[str] = []
    opened: list[str] = []
    real_decode, real_iter = stream.decode_sample, shards.iter_samples
    monkeypatch.setattr(stream, "decode_sample", lambda raw: decoded.append(raw["__key__"]) or real_decode(raw))
    monkeypatch.setattr(shards, "iter_samples", lambda uri: opened.append(uri.rsplit("/", 1)[-1]) or real_iter(uri))
    for rank, share in enumerate((6, 5, 5)):
        data = open_train_data(_config(shard_set), rank, 3, labelled_only=True)
        decoded.clear()
        opened.clear()
        got = [i for b in _epoch(data, 2, skip) for i in ids(b)]
        assert sorted(int(k[1:]) for k in decoded) == sorted(got)  # decoded = handed over, nothing else
        assert len(got) == (data.plan.steps_per_epoch - skip) * share
        order = stream.shard_order(len(SIZES), SEED, 2)
        epoch_shards = [data.index.names[i] for i in stream.shards_overlapping(
            data.index, order, 0, data.plan.steps_per_epoch * 16)]
        assert opened == [n for n in epoch_shards if n in opened] and len(opened) >= len(SIZES) - 2  # in order, once
        assert skip or opened[0] == epoch_shards[0]  # every rank reads the stream from its start
    assert data.summary()["shards_per_rank"] == len(epoch_shards) >= len(SIZES) - 1


def test_a_bad_stream_sharding_is_a_one_line_error(shard_set):
    with pytest.raises(ValueError, match=r"^stream_sharding must be one of \('global', 'span'\), not 'ranks'$"):
        open_train_data(_config(shard_set, stream_sharding="ranks"), 0, 1, labelled_only=False)


def test_stream_sharding_travels_from_the_cli_and_a_retrain_spec_to_the_mlflow_params(shard_set, monkeypatch):
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from condgen.cli import app
    from condgen.flows.params import TrainSpec
    from condgen.tasks.training import driver
    from condgen.tasks.training.driver import TrainRequest, batch_params

    assert TrainSpec().stream_sharding == TrainRequest(model="cvae", shards_uri="x").stream_sharding == "global"
    assert batch_params(TrainRequest(model="cvae", shards_uri="x", stream_sharding="span"))["stream_sharding"] == "span"
    with pytest.raises(ValueError, match="stream_sharding must be one of"):
        batch_params(TrainRequest(model="cvae", shards_uri="x", stream_sharding="ranks"))
    with pytest.raises(ValidationError, match="stream_sharding"):
        TrainSpec(stream_sharding="ranks")
    bad = CliRunner().invoke(app, ["train", "--stream-sharding", "ranks"])
    assert bad.exit_code == 2 and "'ranks' is not one of 'global', 'span'" in re.sub(r"[\s│]+", " ", bad.output)
    seen: list[TrainRequest] = []

    def train(req: TrainRequest):  # the request the command built; stop before Ray
        seen.append(req)
        raise RuntimeError("stop")

    monkeypatch.setattr(driver, "train", train)
    for args, want in (([], "global"), (["--stream-sharding", "span"], "span")):
        res = CliRunner().invoke(app, ["train", "--shards", shard_set, *args])
        assert isinstance(res.exception, RuntimeError) and seen.pop().stream_sharding == want
