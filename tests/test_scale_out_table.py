"""benchmarks/scale_out.py's table: mean (min–max) over seeds, the change against the 1-worker rows of the same
seeds, per seed (same seed = same initial weights and data order), and the speed-up."""
from __future__ import annotations

from benchmarks.scale_out import paired_delta, table


def row(seed, acc, seconds):
    return {"seed": seed, "acc": acc, "fid": 10.0, "kid": 1.0, "seconds": seconds}


def test_per_seed_change_pairs_the_same_seed_and_the_table_shows_it():
    one = [row(0, 0.918, 415), row(1, 0.755, 398), row(2, 0.923, 406)]
    two = [row(1, 0.782, 230), row(0, 0.937, 213)]  # any order, a seed missing
    assert [round(d, 1) for d in paired_delta(two, one)] == [2.7, 1.9]
    assert paired_delta([{"acc": 0.9}], one) == []  # rows without seeds: no pairing
    text = table({("cgan", 1): one, ("cgan", 2): two})
    line = next(ln for ln in text.splitlines() if ln.startswith("| cgan | 2 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "0.860 (0.782–0.937)"
    # against the same seeds' 1-worker rows (seed 2 has no 2-worker row)
    assert cells[6] == f"{100 * ((0.937 + 0.782) / 2 - (0.918 + 0.755) / 2):+.1f}"
    assert cells[7] == "+2.7 (seed 1) / +1.9 (seed 0)" and cells[8] == f"{(415 + 398) / 2 / ((230 + 213) / 2):.2f}x"
    base = next(ln for ln in text.splitlines() if ln.startswith("| cgan | 1 |"))
    assert base.count("–") >= 3  # no change against itself


def test_set_overrides_are_json_values_or_bare_strings():
    import pytest

    from benchmarks.scale_out import label, parse_sets

    assert parse_sets(['augment="translation"', "d_lr=0.0002", "channels=[32,64]", "block=film"]) == {
        "augment": "translation", "d_lr": 0.0002, "channels": [32, 64], "block": "film"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_sets(["augment"])
    assert label("cgan", {}) == "cgan" and label("cgan", {"augment": "translation"}) == "cgan augment=translation"
