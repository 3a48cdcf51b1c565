"""Which class a piece of text names, for a label-conditioned model: one rule for the service
(``serving/conditions.py``, through ``tasks.data.attributes.label_from_prompt``) and the MLflow pyfunc
(``tasks/io/pyfunc_model.py``), kept here because ``tasks/io`` sits below ``tasks/data``."""
from __future__ import annotations

import re
from collections.abc import Sequence

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower())


def label_from_text(text: str, num_classes: int, class_names: Sequence[str] | None = None) -> int | None:
    """The class ``text`` names. With ``class_names`` (a manifest's): the longest name it contains as whole
    words ("a small red circle" -> "red circle"; the first class of equal length). Without (a digit set):
    the first number or digit word below ``num_classes`` ('digit 7', 'a seven', '7'). None when it names none."""
    words = _words(text)
    if class_names:
        padded = f" {' '.join(words)} "
        names = [" ".join(_words(str(n))) for n in class_names[:num_classes]]
        hits = [(len(n), i) for i, n in enumerate(names) if n and f" {n} " in padded]
        return max(hits, key=lambda h: (h[0], -h[1]))[1] if hits else None
    for w in words:
        if w.isdigit() and int(w) < num_classes:
            return int(w)
        if w in DIGIT_WORDS and DIGIT_WORDS.index(w) < num_classes:
            return DIGIT_WORDS.index(w)
    return None
