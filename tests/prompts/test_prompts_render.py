"""Rendering: the schema contract reaches the model, and templates cannot escape the sandbox."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jinja2.exceptions import SecurityError

from pipeline.config import REPO_ROOT
from pipeline.prompts import (
    SCHEMA_INSTRUCTION,
    SCHEMA_LINE_PREFIX,
    PromptRegistry,
    PromptSpec,
    TemplateRenderError,
    input_errors,
    render_messages,
)

EXAMPLES = REPO_ROOT / "prompts"


def spec(*messages: tuple[str, str], properties: dict[str, Any] | None = None) -> PromptSpec:
    """An in-memory prompt; input properties default to none declared, so any name is allowed."""
    input_schema: dict[str, Any] = {"type": "object"}
    if properties is not None:
        input_schema["properties"] = properties
    return PromptSpec.model_validate(
        {
            "name": "t",
            "version": 1,
            "description": "d",
            "model": {"model": "m"},
            "messages": [{"role": role, "content": content} for role, content in messages],
            "input_schema": input_schema,
            "output_schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        }
    )


def schema_line(content: str) -> dict[str, Any]:
    lines = [line for line in content.splitlines() if line.startswith(SCHEMA_LINE_PREFIX)]
    assert len(lines) == 1
    parsed: dict[str, Any] = json.loads(lines[0].removeprefix(SCHEMA_LINE_PREFIX))
    return parsed


def test_schema_is_appended_to_the_system_message() -> None:
    prompt = PromptRegistry.load(EXAMPLES).get("ticket_triage", 2)
    case = prompt.tests[0]
    messages = render_messages(prompt, case.variables)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith("You triage support tickets")
    assert f"{SCHEMA_INSTRUCTION}\n{SCHEMA_LINE_PREFIX}" in system
    assert schema_line(system) == prompt.output_schema
    assert "Customer tier: enterprise" in messages[-1]["content"]
    assert case.variables["subject"] in messages[-1]["content"]
    assert all(SCHEMA_LINE_PREFIX not in m["content"] for m in messages[1:])


def test_schema_becomes_the_first_message_without_a_system_message() -> None:
    messages = render_messages(spec(("user", "Hi {{ who }}")), {"who": "Ann"})
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith(SCHEMA_INSTRUCTION)
    assert schema_line(messages[0]["content"]) == {
        "type": "object",
        "properties": {"a": {"type": "string"}},
    }
    assert messages[1] == {"role": "user", "content": "Hi Ann"}


def test_only_the_first_system_message_gets_the_schema() -> None:
    messages = render_messages(spec(("system", "one"), ("system", "two")), {})
    assert SCHEMA_LINE_PREFIX in messages[0]["content"]
    assert messages[1]["content"] == "two"


def test_rendering_is_plain_text_not_html() -> None:
    messages = render_messages(spec(("user", "{{ x }}")), {"x": "<b>Tom & Jerry</b>"})
    assert messages[-1]["content"] == "<b>Tom & Jerry</b>"


def test_variables_are_values_not_templates() -> None:
    messages = render_messages(spec(("user", "{{ x }}")), {"x": "{{ 7 * 7 }}"})
    assert messages[-1]["content"] == "{{ 7 * 7 }}"


def test_optional_variable_with_default_filter() -> None:
    prompt = PromptRegistry.load(EXAMPLES).get("ticket_triage", 2)
    messages = render_messages(prompt, {"subject": "s", "body": "b"})
    assert "Customer tier: free" in messages[-1]["content"]


def test_all_example_cases_have_valid_inputs_and_render() -> None:
    for prompt in PromptRegistry.load(EXAMPLES):
        for case in prompt.tests:
            assert input_errors(prompt, case.variables) == [], (prompt.ref, case.name)
            assert render_messages(prompt, case.variables)[0]["role"] == "system"


def test_undefined_variable_is_a_typed_error() -> None:
    prompt = PromptRegistry.load(EXAMPLES).get("ticket_triage", 1)
    with pytest.raises(TemplateRenderError, match=r"ticket_triage@1: .*'body' is undefined"):
        render_messages(prompt, {"subject": "only a subject"})


def test_undefined_variable_in_condition_is_an_error() -> None:
    with pytest.raises(TemplateRenderError, match="'flag' is undefined"):
        render_messages(spec(("user", "{% if flag %}x{% endif %}")), {})


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{{ x.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__['os'] }}",
        "{{ lipsum.__globals__ }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ f.__globals__ }}",
        "{{ f.__code__.co_consts }}",
        "{{ f.__closure__ }}",
        "{{ '{0.__class__}'.format(x) }}",
        "{{ x.append(1) }}",
        "{{ x.pop() }}",
    ],
)
def test_sandbox_escapes_are_blocked(template: str) -> None:
    variables = {"x": [1, 2], "f": test_sandbox_escapes_are_blocked}
    with pytest.raises(TemplateRenderError, match="blocked by the sandbox") as caught:
        render_messages(spec(("user", template)), variables)
    assert isinstance(caught.value.__cause__, SecurityError)
    assert variables["x"] == [1, 2]


@pytest.mark.parametrize(
    "template",
    ["{{ 1 / n }}", "{{ range(n).missing.deeper }}", "{{ f.func_globals.x }}"],
)
def test_other_template_failures_are_typed_errors(template: str) -> None:
    with pytest.raises(TemplateRenderError):
        render_messages(spec(("user", template)), {"n": 0, "f": len})


def test_input_errors_lists_every_problem_with_a_path() -> None:
    prompt = PromptRegistry.load(EXAMPLES).get("cited_answer", 1)
    errors = input_errors(
        prompt, {"question": "x", "sources": [{"id": "bad id!", "text": ""}], "extra": 1}
    )
    assert errors == [
        "variables: Additional properties are not allowed ('extra' was unexpected)",
        "variables.question: 'x' is too short",
        "variables.sources[0].id: 'bad id!' does not match '^[A-Za-z0-9_-]{1,40}$'",
        "variables.sources[0].text: '' should be non-empty",
    ]


def test_input_errors_reports_missing_fields_and_wrong_types() -> None:
    prompt = PromptRegistry.load(EXAMPLES).get("invoice_extract", 1)
    assert input_errors(prompt, {}) == ["variables: 'text' is a required property"]
    assert input_errors(prompt, {"text": 5}) == ["variables.text: 5 is not of type 'string'"]
    assert input_errors(prompt, {"text": "Invoice No. 1 for services, total 5 USD"}) == []
