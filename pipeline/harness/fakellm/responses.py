"""Bodies the fake model sends: OpenAI-shaped completions and errors.

Shapes follow the OpenAI chat-completions API closely (including ``logprobs.content`` with
``bytes`` and ``top_logprobs``) because the point of the fake is that a client which works
against it works against the real thing; fields the pipeline does not read are still present
so that stricter clients and SDKs parse them too. Token counts are a crude estimate: the
pipeline must not depend on exact counts from any provider.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

from pipeline.harness.fakellm.behaviors import (
    BehaviorSpec,
    find_answer,
    find_output_schema,
    message_text,
)
from pipeline.harness.fakellm.schema_instance import minimal_instance

__all__ = [
    "DEFAULT_ANSWER",
    "GARBAGE",
    "INVALID_JSON",
    "REFUSAL",
    "WRONG_SCHEMA",
    "Constraint",
    "completion_body",
    "constraint_of",
    "error_body",
    "estimate_tokens",
    "render_content",
    "rendered_behavior",
    "token_logprobs",
    "tokenize",
    "valid_answer",
]

DEFAULT_ANSWER: dict[str, Any] = {"answer": "ok"}
WRONG_SCHEMA: dict[str, Any] = {"unexpected": True}
REFUSAL = "I'm sorry, but I can't help with that."
# Not JSON, but close enough to tempt a lenient parser into "fixing" it.
INVALID_JSON = "Sure! Here is the answer: {answer: ok, confidence: 'high'"
GARBAGE = (
    "\x00\x07\x1b[31m<script>alert(1)</script>\x1b[0m \u202eesrever\u202c "
    '{"answer": "ok"\x0b\x0c}} ]] \ufeff\u200b DROP TABLE users;-- \U0001f600'
)

_TOKEN = re.compile(r" ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]+|\s+")
_ALTERNATIVES = (" the", " a", ",", ".", " and", '"', "{", " I", " maybe", "\n")
# Confidence bands per behaviour: a model that hedges or babbles is unsure of its tokens.
_LOGPROB_RANGES: dict[str, tuple[float, float]] = {
    "hedge": (-3.0, -1.5),
    "garbage": (-4.0, -2.0),
    "invalid_json": (-1.5, -0.5),
}
_HIGH_CONFIDENCE = (-0.1, -0.01)


def estimate_tokens(text: str) -> int:
    """Roughly four characters a token; zero only for no text at all."""
    return len(text) // 4 + 1 if text else 0


@dataclass(frozen=True)
class Constraint:
    """What ``response_format`` lets a real server emit, as the fake honours it.

    ``json_only``: the text is one JSON value (``json_object``, or any schema-carrying
    form). ``schema``: decoding is constrained to this schema (llama.cpp's
    ``json_object`` + ``schema``, or OpenAI's ``json_schema`` with ``strict: true``; a
    non-strict schema is guidance, which a model may ignore, so it constrains nothing).
    """

    json_only: bool = False
    schema: Mapping[str, Any] | None = None
    guidance: Mapping[str, Any] | None = None


def constraint_of(body: Mapping[str, Any]) -> Constraint:
    fmt = body.get("response_format")
    if not isinstance(fmt, Mapping) or fmt.get("type") == "text":
        return Constraint()
    if fmt.get("type") == "json_object":
        schema = fmt.get("schema")
        return Constraint(True, schema if isinstance(schema, Mapping) else None)
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        return Constraint(True)
    if isinstance(spec, Mapping) and spec.get("strict") is True:
        return Constraint(True, schema)
    return Constraint(True, None, schema)


def _conforms(value: Any, schema: Mapping[str, Any]) -> bool:
    return Draft202012Validator(schema).is_valid(value)


def valid_answer(body: Mapping[str, Any], messages: Sequence[Any]) -> Any:
    """The JSON value a well-behaved model would return (see module :mod:`behaviors` doc).

    Order: an explicit ``[[answer:...]]`` block, then a minimal instance of the
    ``OUTPUT_SCHEMA:`` in the prompt, then of ``response_format``'s JSON schema, else
    ``{"answer": "ok"}``. When ``response_format`` constrains decoding to a schema, an
    explicit answer that does not conform is replaced by a minimal instance of it, as a
    constrained decoder would have to. Malformed blocks raise ValueError (a 400).
    """
    explicit = find_answer(messages)
    constrained = constraint_of(body).schema
    if constrained is not None:
        if explicit is not None and _conforms(explicit.value, constrained):
            return explicit.value
        return minimal_instance(constrained)
    if explicit is not None:
        return explicit.value
    schema = find_output_schema(messages)
    if schema is not None:
        return minimal_instance(schema)
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping):
        json_schema = response_format.get("json_schema")
        if isinstance(json_schema, Mapping) and "schema" in json_schema:
            return minimal_instance(json_schema["schema"])
    return dict(DEFAULT_ANSWER)


# Behaviours a JSON-only decoder cannot produce; under ``response_format`` they answer
# with the bare JSON instead (their logprob band stays: constraining does not make a
# model sure). ``wrong_schema`` is valid JSON, so only a schema constraint removes it.
_NOT_JSON = frozenset({"fenced", "hedge", "invalid_json", "garbage"})


def rendered_behavior(name: str, constraint: Constraint) -> str:
    """The behaviour whose text is sent once ``constraint`` is honoured."""
    if constraint.json_only and name in _NOT_JSON:
        return "valid"
    if constraint.schema is not None and name == "wrong_schema":
        return "valid"
    return name


def render_content(spec: BehaviorSpec, answer: Any, constraint: Constraint | None = None) -> str:
    """Assistant text for the behaviours that produce a 200 response.

    ``ignore_schema`` is the fake ignoring ``response_format`` on purpose: a near miss (one
    required field dropped, one unknown field added) whatever the request asked for, so
    tests can show the pipeline still catches what a constrained endpoint let through.
    """
    name = rendered_behavior(spec.name, constraint or Constraint())
    if name in ("valid", "slow"):
        return json.dumps(answer, ensure_ascii=False)
    if name == "ignore_schema":
        return json.dumps(_near_miss(answer), ensure_ascii=False)
    if name == "fenced":
        pretty = json.dumps(answer, ensure_ascii=False, indent=2)
        return f"Here is the result you asked for:\n\n```json\n{pretty}\n```\n\nHope this helps!"
    if name == "hedge":
        compact = json.dumps(answer, ensure_ascii=False)
        return (
            "I think maybe the answer is something like this, but I'm not sure:\n"
            f"{compact}\n"
            "It could be wrong, perhaps double-check it."
        )
    if name == "invalid_json":
        return INVALID_JSON
    if name == "wrong_schema":
        return json.dumps(WRONG_SCHEMA)
    if name == "refusal":
        return REFUSAL
    if name == "empty":
        return ""
    if name == "garbage":
        return GARBAGE
    raise ValueError(f"behaviour {name!r} has no content")


def _near_miss(answer: Any) -> Any:
    if not isinstance(answer, Mapping) or not answer:
        return dict(WRONG_SCHEMA)
    kept = dict(answer)
    kept.pop(sorted(kept)[0])
    kept["note"] = "ignored the schema"
    return kept


def tokenize(text: str) -> list[str]:
    """Split into word-ish pieces whose concatenation is exactly ``text``."""
    return _TOKEN.findall(text)


def token_logprobs(
    behavior: str, content: str, top_logprobs: int, rng: random.Random
) -> list[dict[str, Any]]:
    """OpenAI ``logprobs.content``; the band depends on the behaviour (see _LOGPROB_RANGES)."""
    low, high = _LOGPROB_RANGES.get(behavior, _HIGH_CONFIDENCE)
    out: list[dict[str, Any]] = []
    for token in tokenize(content):
        logprob = round(rng.uniform(low, high), 4)
        entry: dict[str, Any] = {
            "token": token,
            "logprob": logprob,
            "bytes": list(token.encode("utf-8", "surrogatepass")),
            "top_logprobs": [],
        }
        if top_logprobs > 0:
            entry["top_logprobs"] = _top(token, logprob, top_logprobs)
        out.append(entry)
    return out


def _top(token: str, logprob: float, count: int) -> list[dict[str, Any]]:
    # Alternatives share the remaining probability mass geometrically, so the list sums < 1.
    top: list[dict[str, Any]] = [
        {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "surrogatepass"))}
    ]
    remaining = max(1.0 - math.exp(logprob), 1e-12)
    alternatives = [alt for alt in _ALTERNATIVES if alt != token]
    for index in range(count - 1):
        alt = alternatives[index % len(alternatives)]
        if index >= len(alternatives):
            alt = f"{alt}{index}"
        alt_logprob = round(math.log(remaining * 0.5 ** (index + 1)), 4)
        top.append({"token": alt, "logprob": alt_logprob, "bytes": list(alt.encode("utf-8"))})
    return top


def completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    messages: Sequence[Any],
    behavior: str,
    content: str,
    choices: int,
    logprobs: bool,
    top_logprobs: int,
    max_tokens: int | None,
    rng: random.Random,
) -> dict[str, Any]:
    """A full ``chat.completion`` object; ``max_tokens`` truncates like a real model would."""
    finish_reason = "stop"
    if max_tokens is not None and estimate_tokens(content) > max_tokens:
        content = content[: max(0, max_tokens * 4)]
        finish_reason = "length"
    completion_tokens = estimate_tokens(content)
    prompt_tokens = sum(estimate_tokens(message_text(m)) for m in messages)
    choice_list: list[dict[str, Any]] = []
    for index in range(choices):
        choice: dict[str, Any] = {
            "index": index,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        if logprobs:
            choice["logprobs"] = {
                "content": token_logprobs(behavior, content, top_logprobs, rng),
                "refusal": None,
            }
        choice_list.append(choice)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_fakellm",
        "choices": choice_list,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens * choices,
            "total_tokens": prompt_tokens + completion_tokens * choices,
        },
    }


def error_body(
    message: str, *, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope, so clients that read ``error.code`` behave as in production."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
