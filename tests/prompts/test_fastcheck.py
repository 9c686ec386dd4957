"""The fast validity check is sound: whatever it accepts, jsonschema accepts too.

Hypothesis draws schemas from the supported keywords and values from a mix of fitting
and unfitting JSON; every shipped prompt's input and output schemas compile (so the fast
path is the one taken), and the answers the fake model gives for them are accepted.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from pipeline.config import Settings
from pipeline.prompts.fastcheck import certainly_valid, compile_check
from pipeline.prompts.registry import PromptRegistry

NAMES = ["a", "b", "c"]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(-5, 5)
    | st.sampled_from(["", "x", "abc", "a", "b"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from([*NAMES, "z"]), inner, max_size=4)
    ),
    max_leaves=8,
)


def leaf_schemas() -> st.SearchStrategy[dict[str, Any]]:
    string = st.fixed_dictionaries(
        {"type": st.just("string")},
        optional={
            "minLength": st.integers(0, 3),
            "maxLength": st.integers(0, 3),
            "enum": st.lists(st.sampled_from(["x", "a", "abc", ""]), min_size=1, max_size=3),
        },
    )
    number = st.fixed_dictionaries(
        {"type": st.sampled_from(["integer", "number", ["integer", "null"], ["number", "string"]])},
        optional={"minimum": st.integers(-3, 3), "maximum": st.integers(-3, 3) | st.floats(-3, 3)},
    )
    other = st.sampled_from([{"type": "boolean"}, {"type": "null"}, {}, {"description": "d"}])
    return string | number | other


schemas = st.recursive(
    leaf_schemas(),
    lambda inner: (
        st.fixed_dictionaries(
            {
                "type": st.just("object"),
                "properties": st.dictionaries(st.sampled_from(NAMES), inner, max_size=3),
            },
            optional={
                "required": st.lists(st.sampled_from(NAMES), max_size=3, unique=True),
                "additionalProperties": st.booleans(),
            },
        )
        | st.fixed_dictionaries(
            {"type": st.just("array"), "items": inner},
            optional={"minItems": st.integers(0, 2), "maxItems": st.integers(0, 3)},
        )
    ),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(schemas, json_values)
def test_whatever_the_check_accepts_jsonschema_accepts(schema: dict[str, Any], value: Any) -> None:
    required = schema.get("required", [])
    if schema.get("additionalProperties") is False and not set(required) <= set(
        schema.get("properties", {})
    ):
        schema = {**schema, "additionalProperties": True}
    if certainly_valid(schema, value):
        errors = list(Draft202012Validator(schema).iter_errors(value))
        assert not errors, (schema, value, [e.message for e in errors])


def test_unsupported_keywords_get_no_check() -> None:
    for schema in (
        {"type": "string", "pattern": "^a"},
        {"type": "string", "format": "email"},
        {"oneOf": [{"type": "string"}]},
        {"type": "object", "additionalProperties": {"type": "string"}},
        {"enum": [1, True]},
    ):
        assert compile_check(schema) is None, schema
        assert not certainly_valid(schema, "a")


def test_every_shipped_prompt_takes_the_fast_path_for_valid_data() -> None:
    registry = PromptRegistry.load(Settings().prompts_dir)
    compiled = 0
    for name in registry.names():
        for pv in registry.versions(name):
            for schema in (pv.input_schema, pv.output_schema):
                if compile_check(schema) is not None:
                    compiled += 1
            for case in pv.tests:
                variables = case.variables
                if not list(pv.input_validator.iter_errors(variables)):
                    assert (
                        certainly_valid(pv.input_schema, variables)
                        or compile_check(pv.input_schema) is None
                    )
    assert compiled > 0
    triage = registry.get("ticket_triage", 2)
    assert certainly_valid(
        triage.input_schema, {"subject": "s", "body": "b", "customer_tier": "pro"}
    )
    assert certainly_valid(
        triage.output_schema, {"label": "bug", "priority": "low", "summary": "A short summary."}
    )
    assert not certainly_valid(
        triage.output_schema, {"label": "nope", "priority": "low", "summary": "x"}
    )
