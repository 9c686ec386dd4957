"""Smallest plausible JSON value that satisfies a JSON Schema.

The fake model cannot know what a prompt is supposed to produce, so when a test does not
spell out the answer it wants, the fake derives one from the schema the prompt already
carries. "Minimal" is deliberate: only required properties, the lower bound of every range,
the first enum value. Tests then exercise the happy path without anyone writing fixtures,
and a schema that cannot be satisfied minimally (e.g. a ``pattern`` we cannot invert) is a
signal to pass an explicit ``[[answer:...]]`` block instead.

Supported: ``type`` (single or list), ``const``, ``enum``, ``default``-free generation,
``properties``/``required``, ``minProperties`` (fills optional properties), ``items``,
``prefixItems``, ``minItems``, ``uniqueItems``, ``minLength``/``maxLength``, common
``format`` values, ``minimum``/``maximum``/``exclusive*``/``multipleOf``, local ``$ref``
(``#/...``), ``allOf`` (merged), ``anyOf``/``oneOf`` (first branch). ``pattern`` is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline.digits import ascii_int

__all__ = ["SchemaInstanceError", "minimal_instance"]

_FORMAT_EXAMPLES: dict[str, str] = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "uri": "https://example.com/",
    "iri": "https://example.com/",
    "uri-reference": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "duration": "P1D",
}

_MAX_DEPTH = 64


class SchemaInstanceError(ValueError):
    """The schema is malformed or self-referential beyond what a fake answer should chase."""


def minimal_instance(schema: Any) -> Any:
    """Return a minimal JSON value valid against ``schema`` (best effort, see module doc)."""
    return _instance(schema, schema, 0, 0)


def _instance(schema: Any, root: Any, variant: int, depth: int) -> Any:
    # ``variant`` makes sibling array items differ so ``uniqueItems`` holds.
    if depth > _MAX_DEPTH:
        raise SchemaInstanceError("schema nests too deeply (recursive $ref?)")
    if schema is True or schema is None:
        return None
    if schema is False:
        raise SchemaInstanceError("schema 'false' has no valid instance")
    if not isinstance(schema, Mapping):
        raise SchemaInstanceError(f"schema must be an object or boolean, got {type(schema)}")
    schema = _flatten(schema, root, depth)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[min(variant, len(enum) - 1)]
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            usable = [b for b in branches if b is True or isinstance(b, Mapping)]
            if not usable:
                raise SchemaInstanceError(f"no usable branch in {key}")
            merged = {k: v for k, v in schema.items() if k != key}
            first = {} if usable[0] is True else _flatten(usable[0], root, depth + 1)
            return _instance(_merge(merged, first), root, variant, depth + 1)
    kind = _pick_type(schema)
    if kind == "object":
        return _object(schema, root, variant, depth)
    if kind == "array":
        return _array(schema, root, variant, depth)
    if kind == "string":
        return _string(schema, variant)
    if kind == "integer":
        return _number(schema, variant, integer=True)
    if kind == "number":
        return _number(schema, variant, integer=False)
    if kind == "boolean":
        return variant % 2 == 1
    return None


def _flatten(schema: Mapping[str, Any], root: Any, depth: int) -> dict[str, Any]:
    """Resolve ``$ref`` and merge ``allOf`` so the generator sees one flat schema."""
    if depth > _MAX_DEPTH:
        raise SchemaInstanceError("schema nests too deeply (recursive $ref?)")
    out: dict[str, Any] = dict(schema)
    ref = out.pop("$ref", None)
    if isinstance(ref, str):
        target = _resolve_ref(ref, root)
        if target is False:
            raise SchemaInstanceError(f"$ref {ref} resolves to 'false'")
        if isinstance(target, Mapping):
            out = _merge(_flatten(target, root, depth + 1), out)
    all_of = out.pop("allOf", None)
    if isinstance(all_of, list):
        for part in all_of:
            if isinstance(part, Mapping):
                out = _merge(out, _flatten(part, root, depth + 1))
    return out


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(a)
    for key, value in b.items():
        if key == "properties" and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        elif key == "required" and isinstance(merged.get(key), list):
            merged[key] = list(dict.fromkeys([*merged[key], *value]))
        else:
            merged[key] = value
    return merged


def _resolve_ref(ref: str, root: Any) -> Any:
    if not ref.startswith("#"):
        raise SchemaInstanceError(f"only local $ref is supported, got {ref!r}")
    node = root
    for raw in ref[1:].split("/"):
        if raw == "":
            continue
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif (
            isinstance(node, list) and (index := ascii_int(part)) is not None and index < len(node)
        ):
            node = node[index]
        else:
            raise SchemaInstanceError(f"unresolvable $ref {ref!r}")
    return node


def _pick_type(schema: Mapping[str, Any]) -> str | None:
    declared = schema.get("type")
    if isinstance(declared, str):
        return declared
    if isinstance(declared, list) and declared:
        non_null = [t for t in declared if t != "null"]
        return str(non_null[0]) if non_null else "null"
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    if any(k in schema for k in ("minLength", "maxLength", "format", "pattern")):
        return "string"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return "number"
    return None


def _object(schema: Mapping[str, Any], root: Any, variant: int, depth: int) -> dict[str, Any]:
    properties = schema.get("properties")
    props: Mapping[str, Any] = properties if isinstance(properties, Mapping) else {}
    required = schema.get("required")
    names: list[str] = [str(n) for n in required] if isinstance(required, list) else []
    min_props = schema.get("minProperties")
    if isinstance(min_props, int):
        for name in props:
            if len(names) >= min_props:
                break
            if name not in names:
                names.append(name)
    out: dict[str, Any] = {}
    for name in names:
        sub = props.get(name, True)
        if sub is True:
            sub = _extra_property_schema(schema)
        out[name] = _instance(sub, root, variant, depth + 1)
    return out


def _extra_property_schema(schema: Mapping[str, Any]) -> Any:
    # A required name that is not in ``properties`` is governed by additionalProperties.
    extra = schema.get("additionalProperties", True)
    return {"type": "string"} if extra is True else extra


def _array(schema: Mapping[str, Any], root: Any, variant: int, depth: int) -> list[Any]:
    prefix = schema.get("prefixItems")
    prefix_items: list[Any] = list(prefix) if isinstance(prefix, list) else []
    items = schema.get("items", True)
    if isinstance(items, list):  # draft 4-7 tuple form
        prefix_items, items = items, schema.get("additionalItems", True)
    min_items = schema.get("minItems", 0)
    count = max(int(min_items) if isinstance(min_items, int | float) else 0, len(prefix_items))
    out: list[Any] = []
    for index in range(count):
        sub = prefix_items[index] if index < len(prefix_items) else items
        if sub is True:
            sub = {"type": "string"}
        out.append(_instance(sub, root, variant + index, depth + 1))
    return out


def _string(schema: Mapping[str, Any], variant: int) -> str:
    fmt = schema.get("format")
    base = _FORMAT_EXAMPLES.get(fmt, "example") if isinstance(fmt, str) else "example"
    if variant and fmt not in _FORMAT_EXAMPLES:
        base = f"{base}{variant}"
    min_len = schema.get("minLength")
    max_len = schema.get("maxLength")
    if isinstance(min_len, int) and len(base) < min_len:
        base = base + "x" * (min_len - len(base))
    if isinstance(max_len, int) and len(base) > max_len:
        base = base[-max_len:] if variant else base[:max_len]
    return base


def _number(schema: Mapping[str, Any], variant: int, *, integer: bool) -> int | float:
    low = _bound(schema, "minimum", "exclusiveMinimum", lower=True, integer=integer)
    high = _bound(schema, "maximum", "exclusiveMaximum", lower=False, integer=integer)
    step = schema.get("multipleOf")
    if low is not None:
        value = low + variant
    elif high is not None and high < 0:
        value = high - variant
    else:
        value = variant
    if high is not None and value > high:
        value = high if low is None else max(low, high)
    if isinstance(step, int | float) and step > 0:
        multiple = math.ceil(value / step) * step
        value = multiple if high is None or multiple <= high else math.floor(value / step) * step
    if integer:
        return math.ceil(value) if not float(value).is_integer() else int(value)
    return value if isinstance(value, int) else float(value)


def _bound(
    schema: Mapping[str, Any], inclusive: str, exclusive: str, *, lower: bool, integer: bool
) -> float | int | None:
    inc = schema.get(inclusive)
    exc = schema.get(exclusive)
    candidates: list[float | int] = []
    if isinstance(inc, int | float) and not isinstance(inc, bool):
        if exc is True:  # draft 4 boolean exclusive flag
            candidates.append(_nudge(inc, lower=lower, integer=integer))
        else:
            candidates.append(inc)
    if isinstance(exc, int | float) and not isinstance(exc, bool):
        candidates.append(_nudge(exc, lower=lower, integer=integer))
    if not candidates:
        return None
    value = max(candidates) if lower else min(candidates)
    if integer:
        return math.ceil(value) if lower else math.floor(value)
    return value


def _nudge(value: float, *, lower: bool, integer: bool) -> float | int:
    if integer:
        return math.floor(value) + 1 if lower else math.ceil(value) - 1
    delta = max(abs(value) * 1e-9, 1e-9)
    return value + delta if lower else value - delta
