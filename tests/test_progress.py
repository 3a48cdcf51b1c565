"""Progress bars (tasks/io/progress.py) and how much of Ray's own output a step shows (tasks/io/cluster.py).

A bar is drawn on a terminal and never into a log file, unless ``CONDGEN_PROGRESS`` says otherwise; a
caller's ``enabled=False`` (``--no-progress``) always wins. Ray's driver logger stays at WARNING and worker
output stays on the workers unless asked for, so errors show and INFO chatter does not.
"""
from __future__ import annotations

import io
import logging

import pytest

from condgen.tasks.io import cluster
from condgen.tasks.io.progress import ENV, enabled, progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env,stream,requested,expected", [
    (None, io.StringIO(), None, False),   # a log file: no bar
    (None, Tty(), None, True),            # a terminal: a bar
    ("0", Tty(), None, False),            # switched off
    ("off", Tty(), True, False),
    ("1", io.StringIO(), None, True),     # forced on (watching a job through tee)
    ("1", Tty(), False, False),           # --no-progress wins
    ("auto", Tty(), None, True),
])
def test_enabled_follows_the_terminal_and_the_setting(monkeypatch, env, stream, requested, expected):
    if env is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, env)
    assert enabled(requested, stream) is expected


def test_a_disabled_bar_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "0")
    with progress(total=5, desc="embed", unit="shard") as bar:
        for _ in range(5):
            bar.update(1)
    assert list(progress(range(3), desc="judge")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_forced_bar_shows_its_name_count_and_unit(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")
    with progress(total=4, desc="generate ab12", unit="shard", leave=True) as bar:
        bar.update(4)
    err = capsys.readouterr().err
    assert "generate ab12" in err and "4/4" in err and "shard" in err


def test_ray_init_is_quiet_by_default_and_verbose_on_request(monkeypatch):
    monkeypatch.delenv(cluster.VERBOSE_ENV, raising=False)
    monkeypatch.delenv("CONDGEN_RAY_DASHBOARD", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    kw = cluster.init_kwargs()
    assert kw["address"] == "local" and kw["include_dashboard"] is False
    assert kw["logging_level"] == logging.WARNING and kw["log_to_driver"] is False  # errors still show
    assert cluster.init_kwargs(log_to_driver=True)["log_to_driver"] is True  # the service wants replica logs
    monkeypatch.setenv(cluster.VERBOSE_ENV, "1")
    monkeypatch.setenv("CONDGEN_RAY_DASHBOARD", "1")
    kw = cluster.init_kwargs("ray://head:10001")
    assert kw["logging_level"] == logging.INFO and kw["log_to_driver"] is True and kw["include_dashboard"] is True
    assert kw["address"] == "ray://head:10001"


def test_bars_are_used_by_the_long_steps():
    """embed, evaluate and batch generation draw their bars through tasks/io/progress.py (not tqdm directly)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in ("tasks/clip/embed.py", "tasks/judging/evaluate.py", "tasks/generation/batch.py",
                 "flows/batch_generate.py"):
        src = (root / path).read_text()
        assert "from condgen.tasks.io.progress import progress" in src, path
        assert "from tqdm" not in src, path
