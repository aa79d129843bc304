"""Documents whose shape would hurt the reader are refused, and ordinary ones read as
``yaml.safe_load`` and ``json.loads`` read them."""

from __future__ import annotations

import time

import pytest
import yaml

from common.safeload import MAX_DEPTH, DocumentTooComplex, check_depth, load_yaml_text


def test_ordinary_yaml_reads_as_safe_load_does_aliases_included() -> None:
    text = "base: &b {x: 1, y: [1, 2]}\nfirst: *b\nsecond: *b\nlist: [a, b]\n"
    assert load_yaml_text(text) == yaml.safe_load(text)
    nested = "a:" + "".join(f"\n{'  ' * i}k{i}:" for i in range(1, MAX_DEPTH - 1)) + " 1\n"
    assert load_yaml_text(nested) == yaml.safe_load(nested)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("&a [*a]", "refers to the node that holds it"),
        ("a: &a {b: *a}", "refers to the node that holds it"),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"more than {MAX_DEPTH} levels"),
    ],
)
def test_self_reference_and_deep_nesting_are_refused(text: str, words: str) -> None:
    with pytest.raises(DocumentTooComplex, match=words):
        load_yaml_text(text)


def test_a_billion_laughs_is_refused_quickly() -> None:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    started = time.monotonic()
    with pytest.raises(DocumentTooComplex, match="aliases stand for more than"):
        load_yaml_text("\n".join(lines))
    assert time.monotonic() - started < 5


def test_json_nesting_is_bounded() -> None:
    check_depth({"a": [1, {"b": [2]}]})
    deep: object = 1
    for _ in range(MAX_DEPTH):
        deep = [deep]
    check_depth(deep)
    with pytest.raises(DocumentTooComplex, match="nested more than"):
        check_depth([deep])
