"""``evolve``: the resilience layers' cheap copy of a request or an answer."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.llm.protocol import CallRecord, ChatCompletion, ChatRequest, EndpointOptions, evolve


def test_evolve_is_replace_without_the_init() -> None:
    request = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], seed=3)
    options = EndpointOptions(structured_output="json_schema")
    changed = evolve(request, endpoint=options, timeout_s=2.5)
    assert changed == dataclasses.replace(request, endpoint=options, timeout_s=2.5)
    assert (request.timeout_s, request.endpoint) == (30.0, EndpointOptions())  # untouched
    answer = ChatCompletion("t", "m", "stop", 1, 2)
    calls = (CallRecord("m", 1, "ok", 1.0),)
    assert evolve(answer, attempts=2, calls=calls) == dataclasses.replace(
        answer, attempts=2, calls=calls
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolve(answer).text = "changed"  # type: ignore[misc]


def test_evolve_refuses_a_field_the_class_lacks() -> None:
    with pytest.raises(TypeError, match="no field 'timeout'"):
        evolve(ChatRequest(model="m", messages=[]), timeout=1.0)
