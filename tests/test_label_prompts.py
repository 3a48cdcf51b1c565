"""A bare label and a prompt mean what the model's training set says (issue 15): class names from the
manifest, digit sentences only for digit sets, a 422 with the reason otherwise (unit level: the served
model's ``info`` is given; tests/test_shapes_demo.py reads it from a real run)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from condgen.serving.conditions import condition_rows, prompt_for_label
from condgen.serving.errors import ApiError
from condgen.tasks.data.attributes import label_from_prompt
from condgen.tasks.data.shapes import CLASS_NAMES


def served(condition: str, class_names=None, digits=None, num_classes: int = 18):
    info = {"condition": condition, "num_classes": num_classes, "class_names": class_names, "digits": digits}
    return SimpleNamespace(key="m", info=info)


@pytest.mark.parametrize("prompt, want", [
    ("a small red circle in the top left", 0), ("Blue Triangle, large", 8), ("cyan   square!", 16),
    ("a circle", None), ("a red", None), ("7", None), ("a seven", None), ("reddish circle", None),
])
def test_a_prompt_names_a_class_by_its_manifest_name(prompt, want):
    assert label_from_prompt(prompt, len(CLASS_NAMES), CLASS_NAMES) == want


def test_the_longest_name_wins_and_digit_sets_keep_the_digit_rule():
    names = ["cat", "black cat", "dog"]
    assert label_from_prompt("a black cat and a dog", 3, names) == 1
    assert label_from_prompt("a dog and a cat", 3, names) == 0  # equal lengths: the first class
    assert label_from_prompt("a handwritten seven", 10) == 7 and label_from_prompt("digit 3", 10) == 3


def test_a_label_becomes_the_class_name_or_a_digit_sentence_or_a_422():
    assert prompt_for_label(served("text", list(CLASS_NAMES), False), 4) == "a green square"
    assert prompt_for_label(served("text", None, True), 3) == "a handwritten digit 3"
    assert prompt_for_label(served("text"), 3) == "a handwritten digit 3"  # no run to read: a digit model
    with pytest.raises(ApiError) as e:
        prompt_for_label(served("text", None, False), 3)
    assert e.value.status == 422 and "give a prompt" in e.value.detail
    with pytest.raises(ApiError) as e:
        prompt_for_label(served("text", list(CLASS_NAMES), False), 18, "negative")
    assert e.value.status == 422 and "negative must be in [0, 17]" in e.value.detail
    assert "0: red circle" in e.value.detail and "(18 classes)" in e.value.detail


def test_a_label_model_takes_a_prompt_naming_its_class():
    loaded = served("label", list(CLASS_NAMES), False)
    cond, resolved = condition_rows(loaded, None, None, "a large magenta triangle in the centre", 2)
    assert cond.tolist() == [14, 14] and resolved == {"label": 14}
    with pytest.raises(ApiError) as e:
        condition_rows(loaded, None, None, "a seven", 1)
    assert e.value.status == 422 and "names none of its classes" in e.value.detail and "red circle" in e.value.detail
