"""The promotion gate as a pure function."""
import pytest

from condgen.tasks.io.model_store import parse_model_uri
from condgen.tasks.judging.promote import Gate, decide


def test_first_model_needs_threshold():
    assert decide(0.95, None, Gate(min_accuracy=0.9))[0]
    ok, reason = decide(0.85, None, Gate(min_accuracy=0.9))
    assert not ok and "threshold" in reason


def test_worse_than_champion_is_refused_within_tolerance_accepted():
    assert not decide(0.91, 0.95, Gate(min_accuracy=0.5))[0]
    assert decide(0.94, 0.95, Gate(min_accuracy=0.5, tolerance=0.02))[0]
    assert decide(0.96, 0.95, Gate(min_accuracy=0.5))[0]


def test_fid_bound():
    assert not decide(0.99, None, Gate(min_accuracy=0.5, max_fid=10.0), fid=12.0)[0]


def test_parse_model_uri():
    assert parse_model_uri("models:/condgen-cvae@champion") == ("condgen-cvae", "champion", None)
    assert parse_model_uri("models:/condgen-cvae/3") == ("condgen-cvae", None, "3")
    with pytest.raises(ValueError):
        parse_model_uri("runs:/abc/model")


def test_the_reason_names_the_score_the_gate_used():
    ok, reason = decide(0.0048, None, Gate(min_accuracy=0.0), metric="score")
    assert ok and reason.startswith("first champion: score 0.0048") and "accuracy" not in reason
    assert "conditional accuracy 0.5000 < threshold" in decide(0.5, None, Gate(min_accuracy=0.9))[1]
