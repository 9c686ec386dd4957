"""JSON text read as ``json.loads`` reads it, for messages and model responses alike."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.contract import jsontext
from pipeline.llm import openai

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@given(values)
@example(2**64)
@example(-(2**63) - 1)
@example(12345678901234567890123)
@example([float("nan"), float("-inf")])
def test_values_and_their_types_are_json_loads_own(value: Any) -> None:
    text = json.dumps(value)
    assert repr(jsontext.loads(text)) == repr(json.loads(text))
    assert repr(jsontext.loads(text.encode())) == repr(json.loads(text))


_COMPACT = {"separators": (",", ":"), "ensure_ascii": False}
keys = st.text(max_size=4) | st.integers() | st.booleans() | st.none() | st.floats()
written = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(keys, inner, max_size=3)
    ),
    max_leaves=6,
)


@given(written)
@example(2**64)
@example({"n": float("nan"), "i": [float("inf"), float("-inf")]})
@example("\ud800 lone surrogate")
@example({1: "int key", None: "null key"})
@example([1e16, 1e-7, 1.7976931348623157e308, -0.0])
def test_dumps_writes_the_values_json_dumps_writes(value: Any) -> None:
    """Read back by the standard library, the text holds the very values ``json.dumps``
    writes, types included (NaN and infinities kept, not turned into null)."""
    ours, theirs = jsontext.dumps(value), json.dumps(value, **_COMPACT)
    assert repr(json.loads(ours)) == repr(json.loads(theirs))
    assert ours == theirs or "e" in theirs  # only an exponent may be spelled otherwise


@pytest.mark.parametrize("value", [object(), {"a": {1, 2}}, b"bytes"])
def test_dumps_refuses_what_json_dumps_refuses(value: Any) -> None:
    with pytest.raises(TypeError):
        json.dumps(value)
    with pytest.raises(TypeError):
        jsontext.dumps(value)


@pytest.mark.parametrize("bad", [b"", b"{", b"\xff\xfe", b'{"a": 1} x'])
def test_what_neither_reads_is_a_value_error(bad: bytes) -> None:
    with pytest.raises(ValueError):
        jsontext.loads(bad)


def test_a_model_response_keeps_an_integer_past_64_bits_exact() -> None:
    """The model client reads responses through it: orjson alone read this ``model`` as
    1.2345678901234568e+22, and the completion recorded that as the model's name."""
    body = {
        "model": 12345678901234567890123,
        "choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}],
    }
    completion = openai._parse(json.dumps(body).encode(), "requested", 1.0)
    assert completion.model == "12345678901234567890123"
