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
