"""Ingestion under hostile input (issue #20): caps on tar samples, the format allow-list,
pixel counts read from the header, exact labels, one ingestion per image file, caption
length; and the per-shard split counts a streaming reader plans with."""
from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from condgen.tasks.data.ingest import ingest
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

