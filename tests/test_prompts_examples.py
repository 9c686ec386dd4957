"""The example prompts' own test cases are coherent with their schemas, rules and fallbacks.

This is a deliberately small reading of the test-case semantics (parse the
recorded answer, validate, run rules and checks; on failure re-ask, which
offline replays the same answer, then fall back; no fallback answer means
review). The pipeline's evaluator is authoritative; this keeps the examples
honest so the demo and the evaluator start from cases that make sense.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.prompts import PromptRegistry, PromptVersion

EXAMPLES = Path(__file__).resolve().parents[1] / "prompts"
REGISTRY = PromptRegistry.load(EXAMPLES)
CASES = [(prompt, case) for prompt in REGISTRY for case in prompt.tests]
_MISSING = object()


def field(output: dict[str, Any], path: str) -> Any:
    node: Any = output
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def parse_answer(answer: str) -> dict[str, Any] | None:
    text = answer.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*\n(.*)\n```", text, re.DOTALL)
    try:
        value = json.loads(fenced[1] if fenced else text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def violations(
    prompt: PromptVersion, output: dict[str, Any], variables: dict[str, Any]
) -> list[str]:
    found = [e.message for e in prompt.output_validator.iter_errors(output)]
    if found:
        return found
    rules = prompt.rules
    for path, pattern in rules.regex.items():
        value = field(output, path)
        if isinstance(value, str) and not re.fullmatch(pattern, value):
            found.append(f"{path} does not match {pattern}")
    for path, limit in rules.max_length.items():
        value = field(output, path)
        if isinstance(value, str | list) and len(value) > limit:
            found.append(f"{path} longer than {limit}")
    for path, limit in rules.min_length.items():
        value = field(output, path)
        if isinstance(value, str | list) and len(value) < limit:
            found.append(f"{path} shorter than {limit}")
    for path, allowed in rules.enum.items():
        value = field(output, path)
        if value is not _MISSING and value not in allowed:
            found.append(f"{path} not in {allowed}")
    serialised = json.dumps(output, ensure_ascii=False).lower()
    found += [f"banned: {p}" for p in rules.banned_phrases if p.lower() in serialised]
    for check in rules.checks:
        found += REGISTRY.resolve_check(prompt, check)(output, variables)
    return found


def offline_route(prompt: PromptVersion, variables: dict[str, Any], answer: str) -> tuple[str, Any]:
    output = parse_answer(answer)
    if output is not None and not violations(prompt, output, variables):
        return "result", output
    fallback = REGISTRY.resolve_fallback(prompt)(variables)
    if fallback is None:
        return "review", None
    assert violations(prompt, fallback, variables) == [], "a fallback answer must itself be valid"
    return "fallback", fallback


@pytest.mark.parametrize(("prompt", "case"), CASES, ids=[f"{p.ref}:{c.name}" for p, c in CASES])
def test_example_case(prompt: PromptVersion, case: Any) -> None:
    route, output = offline_route(prompt, case.variables, case.model_answer)
    expect = case.expect
    assert route == expect.route
    for path, expected in expect.output_equals.items():
        assert field(output, path) == expected, path
    for path, needle in expect.output_contains.items():
        assert needle in field(output, path), path
    for path, pattern in expect.output_matches.items():
        assert re.fullmatch(pattern, field(output, path)), path


def test_examples_cover_every_route_and_answer_style() -> None:
    routes = {case.expect.route for _, case in CASES}
    assert routes == {"result", "fallback", "review"}
    answers = [case.model_answer for _, case in CASES]
    assert any(a.startswith("```json") for a in answers)
    assert any(a.startswith("{") for a in answers)
    assert any(parse_answer(a) is None for a in answers)


def test_clarification_answers_are_representable() -> None:
    prompt = REGISTRY.get("cited_answer", 1)
    clarification = {"needs_clarification": True, "question": "Which plan are you on?"}
    assert list(prompt.output_validator.iter_errors(clarification)) == []
    half = {"needs_clarification": True, "answer": "x", "citations": ["a"]}
    assert list(prompt.output_validator.iter_errors(half)) != []
