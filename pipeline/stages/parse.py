"""Turn untrusted model text into a checked object, or say precisely why not.

Extraction is strict first (the whole text is JSON), then tolerant (a fenced block, or the
first balanced ``{...}`` in surrounding prose). Nothing is ever evaluated: the only
interpreter that touches model text is ``json.loads``. The errors are written so they can
be fed back to the model verbatim in a re-ask.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator

from pipeline.observability.redact import folded
from pipeline.prompts.fastcheck import certainly_valid
from pipeline.prompts.model import PromptVersion

MAX_OUTPUT_CHARS = 200_000
FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|i cannot|i can'?t|i'?m unable|i am unable|as an ai)",
    re.IGNORECASE,
)
HEDGES = re.compile(
    r"\b(i think|maybe|perhaps|not sure|i'?m not certain|possibly|it seems|might be|probably)\b",
    re.IGNORECASE,
)
HEDGE_NEEDLES = (
    *("i think", "maybe", "perhaps", "not sure", "not certain", "possibly", "it seems"),
    *("might be", "probably"),
)
"""What every match of :data:`HEDGES` contains in :func:`~pipeline.observability.redact.folded`
text: most answers hold none, and a few substring tests cost a tenth of the
case-insensitive scan (0.6 against 6 us on a short JSON answer)."""
_SERIALISE = json.JSONEncoder(ensure_ascii=False).encode
"""``json.dumps(value, ensure_ascii=False)``, same text: ``dumps`` with any argument builds
a new encoder on every call, which cost more than the encoding (11 against 4 us)."""

CheckFn = Callable[[dict[str, Any], dict[str, Any]], list[str]]


@dataclass
class ParseOutcome:
    output: dict[str, Any] | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    refusal: bool = False

    @property
    def ok(self) -> bool:
        return self.output is not None and not self.errors


def extract_json(text: str) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """Return ``(object, errors, warnings)``; warnings say how tolerant we had to be."""
    if len(text) > MAX_OUTPUT_CHARS:
        return None, [f"output is {len(text)} characters, over the {MAX_OUTPUT_CHARS} limit"], []
    stripped = text.strip()
    if not stripped:
        return None, ["output is empty"], []
    value = _loads(stripped)
    if value is not None:
        return _object(value, [])
    for match in FENCE.finditer(text):
        value = _loads(match.group(1).strip())
        if value is not None:
            return _object(value, ["json_in_code_fence"])
    candidate = _first_balanced_object(text)
    if candidate is not None:
        value = _loads(candidate)
        if value is not None:
            return _object(value, ["json_in_prose"])
    return None, ["output is not JSON and contains no JSON object"], []


def _object(value: Any, warnings: list[str]) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    if not isinstance(value, dict):
        return None, [f"output is JSON {type(value).__name__}, expected an object"], warnings
    return value, [], warnings


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _first_balanced_object(text: str) -> str | None:
    """Scan for a balanced ``{...}`` respecting strings; linear, no regex backtracking."""
    start = text.find("{")
    while start != -1:
        depth = 0
        in_string = False
        escaped = False
        for i in range(start, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find("{", start + 1)
    return None


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json))


def schema_errors(schema: dict[str, Any], value: Any, limit: int = 10) -> list[str]:
    if certainly_valid(schema, value):
        return []
    validator = _validator(json.dumps(schema, sort_keys=True))
    errors = []
    for err in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in err.absolute_path) or "<root>"
        errors.append(f"{path}: {_short(err.message)}")
        if len(errors) >= limit:
            break
    return errors


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_at(output: Any, path: str) -> tuple[bool, Any]:
    """``(found, value)`` at a dotted ``path``; found is False when any step is missing."""
    current: Any = output
    for part in path.split("."):
        if not isinstance(current, dict) or part not in current:
            return False, None
        current = current[part]
    return True, current


def rule_errors(
    pv: PromptVersion,
    output: dict[str, Any],
    variables: dict[str, Any],
    resolve_check: Callable[[str], CheckFn],
) -> tuple[list[str], list[str]]:
    """Run the prompt's rules; returns ``(errors, names of checks run)``."""
    rules = pv.rules
    errors: list[str] = []
    checks: list[str] = []
    for path, pattern in rules.regex.items():
        checks.append(f"regex:{path}")
        found, value = field_at(output, path)
        if (
            found
            and value is not None
            and not (isinstance(value, str) and re.fullmatch(pattern, value))
        ):
            errors.append(f"{path}: {_short(repr(value), 80)} does not match {pattern!r}")
    for path, limit in rules.max_length.items():
        checks.append(f"max_length:{path}")
        found, value = field_at(output, path)
        if found and value is not None and hasattr(value, "__len__") and len(value) > limit:
            errors.append(f"{path}: length {len(value)} exceeds {limit}")
    for path, limit in rules.min_length.items():
        checks.append(f"min_length:{path}")
        found, value = field_at(output, path)
        if found and value is not None and hasattr(value, "__len__") and len(value) < limit:
            errors.append(f"{path}: length {len(value)} is below {limit}")
    for path, allowed in rules.enum.items():
        checks.append(f"enum:{path}")
        found, value = field_at(output, path)
        if found and value not in allowed:
            errors.append(f"{path}: {_short(repr(value), 80)} is not one of {allowed}")
    if rules.banned_phrases:
        checks.append("banned_phrases")
        serialised = _SERIALISE(output).lower()
        for phrase in rules.banned_phrases:
            if phrase.lower() in serialised:
                errors.append(f"output contains the banned phrase {phrase!r}")
    for ref in rules.checks:
        checks.append(f"check:{ref}")
        try:
            problems = resolve_check(ref)(output, variables)
        except Exception as exc:  # a user check that crashes is a failed check, not a crash
            problems = [f"check {ref} raised {type(exc).__name__}: {_short(str(exc), 120)}"]
        errors.extend(problems)
    return errors, checks


def hedging(text: str) -> bool:
    """Whether ``text`` hedges (:data:`HEDGES`), scanned only when it holds a hedge word."""
    probe = folded(text)
    return any(needle in probe for needle in HEDGE_NEEDLES) and HEDGES.search(text) is not None


def parse_output(
    pv: PromptVersion,
    text: str,
    variables: dict[str, Any],
    resolve_check: Callable[[str], CheckFn],
) -> ParseOutcome:
    refusal = bool(REFUSAL.match(text))
    output, errors, warnings = extract_json(text)
    checks = ["json"]
    if output is None:
        return ParseOutcome(None, errors, warnings, checks, refusal)
    checks.append("output_schema")
    errors = schema_errors(pv.output_schema, output)
    if errors:
        return ParseOutcome(output, errors, warnings, checks, refusal)
    rule_errs, rule_checks = rule_errors(pv, output, variables, resolve_check)
    checks.extend(rule_checks)
    if hedging(text):
        warnings.append("hedging_language")
    return ParseOutcome(output, rule_errs, warnings, checks, refusal)
