"""Every parser of untrusted reviewer input, total: any bytes give a value or a named error.

Form bodies, query integers and corrected outputs (JSON) come from browsers, but also
from anyone who can reach the port. Each function here either returns a value the rest
of the service can use without further checks (UTF-8 encodable text, integers that fit
the database, JSON of bounded depth that every serializer accepts) or raises
:class:`InputError` with the message to show. None of them can raise anything else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FIELDS = 64
MAX_JSON_DEPTH = 32
MAX_JSON_INT = 2**63 - 1
"""Corrected outputs go to consumers in any language: keep integers within 64 bits."""
_DIGITS = re.compile(r"[0-9]{1,18}")


class InputError(ValueError):
    """Input this service refuses; ``status`` is the HTTP status, ``errors`` the details."""

    def __init__(self, message: str, errors: list[str] | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.errors = errors or []
        self.status = status


def parse_form(body: bytes, content_type: str | None) -> dict[str, str]:
    """A URL-encoded form; uploads and other body types are refused (415), not spooled.

    A field sent twice is refused too: which copy a handler would read is exactly the
    kind of ambiguity a crafted request exploits.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not body and not media:
        return {}
    if media != FORM_TYPE:
        raise InputError(f"only {FORM_TYPE} forms are accepted; uploads are refused", status=415)
    try:
        text = body.decode("ascii")
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError:
        raise InputError("the form is not URL-encoded UTF-8") from None
    except ValueError:
        raise InputError(f"the form has more than {MAX_FIELDS} fields", status=413) from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise InputError(f"the form field {name!r} is sent twice")
        form[name] = value
    return form


def bounded_int(text: str | None, low: int, high: int, name: str) -> int | None:
    """Digits only (no signs, spaces or non-ASCII digits), within ``[low, high]``."""
    if text is None or text == "":
        return None
    if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
        raise InputError(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def bounded_float(text: str | None, low: float, high: float, name: str) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text) if len(text) <= 32 else math.nan
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also false for NaN
        raise InputError(f"{name} must be a number from {low} to {high}")
    return value


def choice(text: str | None, allowed: Mapping[str, Any] | tuple[str, ...], name: str) -> str | None:
    if text is None or text == "":
        return None
    if text not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}")
    return text


def _reject_constant(name: str) -> Any:
    raise InputError(f"{name} is not JSON (NaN and Infinity have no JSON form)")


def json_object(text: str | None, max_chars: int) -> dict[str, Any]:
    """A corrected output: a JSON object every serializer downstream can encode.

    ``json.loads`` alone is not enough: it recurses (a deep enough nesting raises
    ``RecursionError``), accepts NaN, and turns ``"\\ud800"`` into a lone surrogate that
    UTF-8, and therefore the database, Kafka and the page, cannot encode.
    """
    if text is None or not text.strip():
        raise InputError("the corrected output is empty", ["output: required"])
    if len(text) > max_chars:
        raise InputError("the corrected output is too long", [f"output: over {max_chars} chars"])
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InputError(
            "the corrected output is not JSON", [f"line {exc.lineno} column {exc.colno}: {exc.msg}"]
        ) from None
    except RecursionError:
        raise InputError(
            "the corrected output is nested too deeply", [f"$: deeper than {MAX_JSON_DEPTH}"]
        ) from None
    except InputError:
        raise
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise InputError("the corrected output is not usable JSON", [str(exc)[:200]]) from None
    if not isinstance(value, dict):
        raise InputError("the corrected output must be a JSON object", ["$: not an object"])
    problems = _unencodable(value)
    if problems:
        raise InputError("the corrected output cannot be stored as it is", problems)
    return value


def _unencodable(value: Any) -> list[str]:
    """Depth, lone surrogates and integer range, iteratively (no recursion to exhaust)."""
    problems: list[str] = []
    stack: list[tuple[Any, str, int]] = [(value, "$", 1)]
    while stack and len(problems) < 20:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            problems.append(f"{path}: nested deeper than {MAX_JSON_DEPTH}")
            continue
        if isinstance(node, dict):
            for key, child in node.items():
                child_path = f"{path}.{_printable(key)}"
                if not _encodable(key):
                    problems.append(f"{child_path}: the key contains a lone surrogate")
                stack.append((child, child_path, depth + 1))
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(node))
        elif isinstance(node, str):
            if not _encodable(node):
                problems.append(f"{path}: contains a lone surrogate (invalid \\u escape)")
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > MAX_JSON_INT:
            problems.append(f"{path}: integer beyond 64 bits")
    return sorted(problems)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:60]
