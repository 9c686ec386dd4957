"""The client reads an answer into a ChatCompletion whose fields have their declared types,
whatever the server put in them: the envelopes are built from these fields, so a wrong type
must stop here (dropped or clamped), not fail the request's envelope further on."""

from __future__ import annotations

import pytest

from pipeline.llm.openai import _parse
from pipeline.llm.protocol import ModelError


def test_the_answer_has_its_declared_types_whatever_the_server_sent() -> None:
    answer = _parse(
        b'{"model": 7, "choices": [{"message": {"content": "x"}, "finish_reason": 3,'
        b' "logprobs": {"content": [{"logprob": 1, "token": 5}]}}],'
        b' "usage": {"prompt_tokens": "12", "completion_tokens": 1e30}}',
        "m",
        1.5,
    )
    assert (answer.text, answer.model, answer.finish_reason) == ("x", "7", None)
    assert (answer.prompt_tokens, answer.completion_tokens) == (12, 2**31 - 1)
    assert answer.token_logprobs == [1.0] and isinstance(answer.token_logprobs[0], float)
    assert answer.tokens == []  # a token that is not text: none kept rather than a wrong one


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": []}',
        b'{"choices": [{"message": {"content": 5}}]}',
        b'{"choices": [{"message": "hi"}]}',
        b'{"choices":[{"message": {"content": "x"}, "logprobs": {"content": [{"logprob": ""}]}}]}',
        b"[1, 2]",
        b"not json",
    ],
)
def test_an_answer_of_another_shape_is_a_bad_response(body: bytes) -> None:
    with pytest.raises(ModelError) as caught:
        _parse(body, "m", 1.0)
    assert caught.value.kind == "bad_response"
