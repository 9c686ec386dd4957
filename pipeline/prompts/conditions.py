"""Field comparisons written in prompt files: ``priority in [urgent]``, ``total > 1000``.

A condition is one comparison ``<field> <operator> <value>``. The field is a dotted path
into the parsed model output, or into the request's variables when it starts with
``input.`` (``input.customer_tier == enterprise``). The value is a YAML flow scalar or
list, so ``[urgent, high]``, ``1000`` and ``"EUR"`` read as they do everywhere else in the
file. The language is deliberately this small: anything that needs more is a ``rules.py``
function, which is code that is hashed, reviewed and tested like any other check.

Comparisons follow JSON, not Python: ``1 == 1.0`` but ``true != 1``; ordering operators
only compare numbers with numbers and strings with strings. A missing field, a null or a
value of another type never matches (as in SQL, "unknown" is not "true"); a rule that must
fire on missing data says so with ``== null``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, cast

import yaml

Operator = Literal["==", "!=", "<", "<=", ">", ">=", "in", "not in"]
INPUT_PREFIX = "input."

_CONDITION = re.compile(
    r"^\s*(?P<field>[^\s<>=!]+)\s*(?P<op>==|!=|<=|>=|<|>|\s+not\s+in\s+|\s+in\s+)(?P<value>.+?)\s*$"
)
MISSING = object()
"""What :func:`field_value` returns for an absent field (distinct from a JSON null)."""


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed comparison; ``source`` is the text as written, for messages."""

    source: str
    field: str
    operator: Operator
    value: Any

    @property
    def on_input(self) -> bool:
        return self.field.startswith(INPUT_PREFIX)

    @property
    def path(self) -> str:
        """The dotted path inside the output or the variables."""
        return self.field.removeprefix(INPUT_PREFIX) if self.on_input else self.field

    def matches(self, output: dict[str, Any], variables: dict[str, Any]) -> str | None:
        """A sentence naming the value that matched, or None when the condition is false."""
        actual = field_value(variables if self.on_input else output, self.path)
        if actual is MISSING:
            return None
        if not _compare(self.operator, actual, self.value):
            return None
        return f"{self.field} is {_show(actual)} ({self.source})"


def parse_condition(text: str) -> Condition:
    """Parse ``text``; raises ValueError with a message fit for a prompt load error."""
    match = _CONDITION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a comparison; expected '<field> <op> <value>' with op one of "
            "==, !=, <, <=, >, >=, in, not in (e.g. 'priority in [urgent]', 'total > 1000')"
        )
    operator = " ".join(match["op"].split())
    field = match["field"]
    if not re.fullmatch(r"[^.\s]+(\.[^.\s]+)*", field) or field == INPUT_PREFIX.rstrip("."):
        raise ValueError(f"{text!r}: {field!r} is not a field path")
    try:
        value = yaml.safe_load(match["value"])
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "cannot be read"
        raise ValueError(f"{text!r}: the value is not valid YAML ({problem})") from None
    if operator in ("in", "not in"):
        if not isinstance(value, list) or not value:
            raise ValueError(f"{text!r}: {operator} needs a non-empty list, e.g. [urgent, high]")
    elif operator not in ("==", "!=") and (
        isinstance(value, bool) or not isinstance(value, int | float | str)
    ):
        raise ValueError(f"{text!r}: {operator} compares with a number or a string")
    return Condition(text.strip(), field, cast("Operator", operator), value)


def field_value(node: Any, path: str) -> Any:
    """The value at a dotted ``path``, or :data:`MISSING`."""
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def same_json(expected: Any, actual: Any) -> bool:
    """JSON equality: 1 == 1.0 (JSON has one number type) but True != 1, unlike Python's ==."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(
            same_json(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(
            same_json(e, a) for e, a in zip(expected, actual, strict=True)
        )
    return bool(expected == actual)


def _ordered(a: Any, b: Any) -> bool:
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    return numbers or (isinstance(a, str) and isinstance(b, str))


def _compare(operator: Operator, actual: Any, expected: Any) -> bool:
    if operator == "==":
        return same_json(actual, expected)
    if operator == "!=":
        return actual is not None and not same_json(actual, expected)
    if operator == "in":
        return any(same_json(actual, item) for item in expected)
    if operator == "not in":
        return actual is not None and not any(same_json(actual, item) for item in expected)
    if not _ordered(actual, expected):
        return False
    if operator == "<":
        return bool(actual < expected)
    if operator == "<=":
        return bool(actual <= expected)
    if operator == ">":
        return bool(actual > expected)
    return bool(actual >= expected)


def _show(value: Any) -> str:
    shown = repr(value) if isinstance(value, str) else str(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
