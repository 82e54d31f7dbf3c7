"""Strict JSON: what edged writes parses anywhere, NaN and infinities included."""

import json
import math

import pytest

from edged import strict_json


def strict_loads(text: str):
    def refuse(token: str):
        raise AssertionError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_finite_documents_are_plain_compact_json():
    doc = {"a": [1, 2.5, "x"], "b": {"c": None, "d": True}}
    assert strict_json.dumps(doc) == '{"a":[1,2.5,"x"],"b":{"c":null,"d":true}}'
    assert strict_json.dumpb(doc) == strict_json.dumps(doc).encode()
    assert strict_json.dumps(doc, indent=2) == json.dumps(doc, indent=2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_become_null_at_any_depth(bad):
    doc = {"score": bad, "boxes": [[0.5, bad], (bad, 1.0)], "nested": {"p99": bad, "n": 3}}
    text = strict_json.dumps(doc)
    assert strict_loads(text) == {"score": None, "boxes": [[0.5, None], [None, 1.0]],
                                  "nested": {"p99": None, "n": 3}}
    assert strict_loads(strict_json.dumps(doc, indent=2)) == strict_loads(text)


def test_default_turns_other_objects_into_text():
    from pathlib import Path
    text = strict_json.dumps({"p": Path("/x"), "v": math.nan}, default=str)
    assert strict_loads(text) == {"p": "/x", "v": None}
