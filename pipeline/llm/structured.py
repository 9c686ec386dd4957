"""Structured output: asking the endpoint to constrain decoding to the prompt's output schema.

Four modes, chosen per endpoint in configuration and overridable per prompt, because
servers disagree on the wire form and some refuse forms they do not know:

``json_schema``
    OpenAI's form, ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
    (also served by vLLM, Ollama and most gateways). ``strict`` is true only when the
    schema fits OpenAI's strict subset (:func:`strict_decision`); otherwise the schema is
    sent non-strict, as guidance, because OpenAI rejects a strict request whose schema
    uses keywords outside the subset (``minLength``, ``allOf``, optional properties...).
``json_object_schema``
    llama.cpp's form, ``{"type": "json_object", "schema": {...}}``: a grammar built from
    the schema. llama.cpp answers OpenAI's form with an HTTP 500.
``json_object``
    "Some JSON object": no schema, but no prose or code fences either.
``none``
    No ``response_format``; the schema is only in the prompt (the behaviour before modes).

A constrained answer is still untrusted: the pipeline validates it, applies the rules,
scores it and re-asks exactly as before. Constraining removes most invalid outputs (and
their paid re-asks); it does not make the model right.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

StructuredOutput = Literal["json_schema", "json_object_schema", "json_object", "none"]
STRUCTURED_OUTPUT_MODES: tuple[str, ...] = get_args(StructuredOutput)

# OpenAI's "Supported schemas" for strict Structured Outputs: what a schema may use and
# still be compiled into a decoding constraint.
_ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "examples"})
_STRUCTURE = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "enum", "const"}
)
_REFERENCES = frozenset({"$ref", "$defs", "definitions", "anyOf"})
_STRING = frozenset({"pattern", "format"})
_NUMBER = frozenset({"multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum"})
_ARRAY = frozenset({"minItems", "maxItems"})
STRICT_KEYWORDS: frozenset[str] = (
    _ANNOTATIONS | _STRUCTURE | _REFERENCES | _STRING | _NUMBER | _ARRAY
)
STRICT_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
)
MAX_NESTING = 10
MAX_PROPERTIES = 5000
MAX_ENUM_VALUES = 1000


@dataclass(frozen=True)
class StrictDecision:
    """Whether a schema can be sent with ``strict: true``, and every reason it cannot."""

    strict: bool
    reasons: tuple[str, ...] = ()

    def explain(self) -> str:
        if self.strict:
            return "strict (the schema fits OpenAI's strict subset)"
        shown = "; ".join(self.reasons[:5])
        more = f" (+{len(self.reasons) - 5} more)" if len(self.reasons) > 5 else ""
        return f"non-strict: {shown}{more}"


def strict_decision(schema: Mapping[str, Any]) -> StrictDecision:
    """Walk ``schema`` and list what OpenAI's strict mode would reject, with JSON paths.

    Strict mode needs: an object at the root (not ``anyOf``); on every object
    ``additionalProperties: false`` and every property listed in ``required``; only the
    keywords in :data:`STRICT_KEYWORDS` (no ``minLength``/``maxLength``, ``allOf``,
    ``not``, ``if``/``then``, ``patternProperties``...); known ``format`` values; at most
    :data:`MAX_NESTING` levels, :data:`MAX_PROPERTIES` properties and
    :data:`MAX_ENUM_VALUES` enum values in all.
    """
    reasons: list[str] = []
    totals = {"properties": 0, "enum": 0}

    def walk(node: Any, path: str, depth: int) -> None:
        if not isinstance(node, Mapping):
            return
        if depth > MAX_NESTING:
            reasons.append(f"{path} nests deeper than {MAX_NESTING} levels")
            return
        for keyword in sorted(set(node) - STRICT_KEYWORDS):
            reasons.append(f"{path} uses {keyword}")
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt not in STRICT_FORMATS:
            reasons.append(f"{path} uses format {fmt!r}")
        types = node.get("type")
        is_object = types == "object" or (isinstance(types, list) and "object" in types)
        properties = node.get("properties")
        if is_object or isinstance(properties, Mapping):
            props = properties if isinstance(properties, Mapping) else {}
            totals["properties"] += len(props)
            if node.get("additionalProperties") is not False:
                reasons.append(f"{path} does not set additionalProperties: false")
            optional = sorted(set(props) - set(node.get("required") or []))
            if optional:
                reasons.append(f"{path} has optional properties {', '.join(optional)}")
            for name, child in props.items():
                walk(child, f"{path}.{name}", depth + 1)
        enum = node.get("enum")
        if isinstance(enum, list):
            totals["enum"] += len(enum)
        items = node.get("items")
        if isinstance(items, Mapping):
            walk(items, f"{path}[]", depth + 1)
        for index, branch in enumerate(node.get("anyOf") or []):
            walk(branch, f"{path}.anyOf[{index}]", depth + 1)
        for key in ("$defs", "definitions"):
            for name, child in (node.get(key) or {}).items():
                walk(child, f"{path}.{key}.{name}", depth + 1)

    if schema.get("type") != "object" or "anyOf" in schema:
        reasons.append("$ the root must be an object, not anyOf")
    walk(schema, "$", 1)
    if totals["properties"] > MAX_PROPERTIES:
        reasons.append(f"$ has {totals['properties']} properties (at most {MAX_PROPERTIES})")
    if totals["enum"] > MAX_ENUM_VALUES:
        reasons.append(f"$ has {totals['enum']} enum values (at most {MAX_ENUM_VALUES})")
    return StrictDecision(not reasons, tuple(reasons))


def response_format(
    mode: StructuredOutput, schema: Mapping[str, Any] | None, name: str, strict: bool
) -> dict[str, Any] | None:
    """The ``response_format`` body field for ``mode``; None when nothing is to be sent.

    Without a schema the schema-carrying modes fall back to ``json_object``.
    """
    if mode == "none":
        return None
    if mode == "json_object" or schema is None:
        return {"type": "json_object"}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": dict(schema)}
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": dict(schema), "strict": strict},
    }
