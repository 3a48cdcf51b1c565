"""Progress bars for the long steps: ingest, CLIP embedding, evaluation, batch generation.

One helper so every step behaves the same: a tqdm bar on stderr (name, count, rate, ETA)
when stderr is a terminal, and nothing at all otherwise (a log file, a Prefect worker, CI),
so captured output holds log lines, not carriage returns. ``CONDGEN_PROGRESS`` overrides
the terminal test: ``0``/``false``/``off`` never draws a bar, ``1``/``true``/``on`` always
does (e.g. to watch a job through ``tee``); ``auto`` (the default) follows the terminal.
A caller's ``enabled=False`` (``--no-progress``) always wins.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

ENV = "CONDGEN_PROGRESS"
OFF, ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


def enabled(requested: bool | None = None, stream: Any = None) -> bool:
    """Whether to draw a bar: never when the caller says no; else ``CONDGEN_PROGRESS``; else is
    ``stream`` (stderr) a terminal."""
    if requested is False:
        return False
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode in OFF:
        return False
    if mode in ON:
        return True
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", enabled: bool | None = None, leave: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar (also a context manager and an iterator over ``iterable``), disabled per :func:`enabled`;
    a disabled bar is free and prints nothing."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr, disable=not _enabled(enabled), **kwargs)


_enabled = enabled  # ``progress`` takes a parameter of the same name
