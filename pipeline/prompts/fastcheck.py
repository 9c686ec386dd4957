"""A fast "certainly valid" check for the simple JSON schemas prompts use.

jsonschema validates in pure Python, keyword by keyword, with a generator per level: for
the small object schemas of prompt inputs and outputs that was 5-10 % of a worker's CPU
per request, spent mostly on answering "valid" for valid data. :func:`compile_check`
turns a schema built only from the keywords below into one plain function that returns
True only when the value is valid. It is a shortcut, not a second validator: a schema
with any other keyword gets no check (None), and a value the check does not accept goes
to jsonschema, which decides and produces the error messages. So the check needs to be
sound (True => jsonschema finds no error), never complete.

Supported: ``type`` (one name or a list), ``properties``, ``required``,
``additionalProperties: false``, ``enum``, ``minLength``/``maxLength``,
``minimum``/``maximum``, ``minItems``/``maxItems``, ``items`` (one schema), and the
annotations ``description``, ``title``, ``default``, ``examples``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], bool]

ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$comment"})
SUPPORTED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "enum",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "minItems",
        "maxItems",
        "items",
    }
)


def _is_type(name: str) -> Check | None:
    if name == "string":
        return lambda v: isinstance(v, str)
    if name == "object":
        return lambda v: isinstance(v, dict)
    if name == "array":
        return lambda v: isinstance(v, list)
    if name == "boolean":
        return lambda v: isinstance(v, bool)
    if name == "null":
        return lambda v: v is None
    if name == "integer":  # a float with no fraction is an integer to JSON Schema; refuse it
        return lambda v: type(v) is int
    if name == "number":
        return lambda v: type(v) in (int, float)
    return None


def compile_check(schema: Any) -> Check | None:
    """A function returning True only for values ``schema`` accepts, or None when the
    schema uses anything this module does not handle."""
    if not isinstance(schema, Mapping):
        return None
    if set(schema) - SUPPORTED - ANNOTATIONS:
        return None
    checks: list[Check] = []
    kind = schema.get("type")
    if kind is not None:
        names = kind if isinstance(kind, list) else [kind]
        tests = [_is_type(n) if isinstance(n, str) else None for n in names]
        if not tests or any(t is None for t in tests):
            return None
        chosen = [t for t in tests if t is not None]
        checks.append(chosen[0] if len(chosen) == 1 else lambda v: any(t(v) for t in chosen))
    if "enum" in schema:
        options = schema["enum"]
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            return None  # only string enums: no 1 == True == 1.0 questions
        allowed = frozenset(options)
        checks.append(lambda v: isinstance(v, str) and v in allowed)
    bounds = _bounds(schema)
    if bounds is None:
        return None
    checks += bounds
    if {"properties", "required", "additionalProperties"} & set(schema):
        objects = _object_check(schema)
        if objects is None:
            return None
        checks.append(objects)
    if "items" in schema:
        item = compile_check(schema["items"])
        if item is None:
            return None
        checks.append(lambda v: not isinstance(v, list) or all(item(x) for x in v))
    if len(checks) == 1:
        return checks[0]
    return lambda v: all(c(v) for c in checks)


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def _at_least(kind: type[str] | type[list[Any]], n: int) -> Check:
    return lambda v: not isinstance(v, kind) or len(v) >= n


def _at_most(kind: type[str] | type[list[Any]], n: int) -> Check:
    return lambda v: not isinstance(v, kind) or len(v) <= n


def _not_below(n: float) -> Check:
    return lambda v: not _number(v) or v >= n


def _not_above(n: float) -> Check:
    return lambda v: not _number(v) or v <= n


def _bounds(schema: Mapping[str, Any]) -> list[Check] | None:
    """Length, size and range limits; each applies only to values of its own type."""
    checks: list[Check] = []
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key not in schema:
            continue
        limit = schema[key]
        if type(limit) is not int:
            return None
        kind: type[str] | type[list[Any]] = str if key.endswith("Length") else list
        checks.append(_at_least(kind, limit) if key.startswith("min") else _at_most(kind, limit))
    for key in ("minimum", "maximum"):
        if key not in schema:
            continue
        limit = schema[key]
        if not _number(limit):
            return None
        checks.append(_not_below(limit) if key == "minimum" else _not_above(limit))
    return checks


def _object_check(schema: Mapping[str, Any]) -> Check | None:
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    extra = schema.get("additionalProperties", True)
    if not isinstance(properties, Mapping) or not isinstance(required, list):
        return None
    if extra is not False and extra is not True:
        return None  # a schema for the extra properties: leave it to jsonschema
    fields: dict[str, Check] = {}
    for name, sub in properties.items():
        sub_check = compile_check(sub)
        if sub_check is None:
            return None
        fields[name] = sub_check
    needed = tuple(required)
    known = frozenset(fields)
    closed = extra is False

    def check(value: Any) -> bool:
        if not isinstance(value, dict):
            return True  # "type" decides whether a non-object is allowed
        for name in needed:
            if name not in value:
                return False
        for name, item in value.items():
            field = fields.get(name)
            if field is None:
                if closed:
                    return False
            elif not field(item):
                return False
        return True

    if not all(isinstance(n, str) for n in needed) or (closed and not known >= set(needed)):
        return None
    return check


CACHE_SIZE = 1024
_compiled: dict[int, tuple[Any, Check | None]] = {}


def certainly_valid(schema: Any, value: Any) -> bool:
    """True when the compiled check of ``schema`` accepts ``value`` (then jsonschema would
    too); False means "ask jsonschema". Checks are compiled once per schema object (the
    cache holds the schema, so its id cannot be reused while cached)."""
    entry = _compiled.get(id(schema))
    if entry is None or entry[0] is not schema:
        if len(_compiled) >= CACHE_SIZE:
            _compiled.clear()
        entry = (schema, compile_check(schema))
        _compiled[id(schema)] = entry
    check = entry[1]
    return check is not None and check(value)
