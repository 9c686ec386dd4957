"""One redactor for everything that leaves the process: logs, span attributes, dead-letter
error messages and exported content.

Detection is offline and pattern based (no model downloads). Card numbers are Luhn checked
so that order numbers are not mangled; IBANs are checked with their mod-97 digit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Matches may only start where a run of address characters starts, and runs are taken
# possessively: without both, a long run with no "@" is rescanned from every position.
_LOCAL = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]"
EMAIL = re.compile(rf"(?<!{_LOCAL}){_LOCAL}++@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{{2,}}\b")
PHONE = re.compile(r"(?<![\w+])\+?\d[\d ().-]{7,}\d(?!\w)")
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6 = re.compile(r"\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b")
SECRET = re.compile(
    r"(?i)\b(?:sk|pk|rk|api|key|tok)[-_][A-Za-z0-9_-]{16,}\b"
    r"|\bBearer\s+[A-Za-z0-9._~+/-]{8,}=*"
    r"|\bAKIA[0-9A-Z]{16}\b"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"
)

SENSITIVE_FIELDS = frozenset({"password", "secret", "token", "api_key", "authorization", "ssn"})


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    rearranged = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


@dataclass
class Redactor:
    """Finds and masks personal data and secrets; extra patterns and field names are config."""

    extra_patterns: Iterable[str] = ()
    extra_fields: Iterable[str] = ()
    _extra: list[re.Pattern[str]] = field(init=False, repr=False)
    _fields: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._extra = [re.compile(p) for p in self.extra_patterns]
        self._fields = SENSITIVE_FIELDS | {f.lower() for f in self.extra_fields}

    def find(self, text: str) -> list[Finding]:
        found: list[Finding] = []
        for kind, pattern in (("secret", SECRET), ("email", EMAIL), ("iban", IBAN)):
            for m in pattern.finditer(text):
                if kind != "iban" or iban_ok(m.group()):
                    found.append(Finding(kind, m.start(), m.end()))
        for m in CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if 13 <= len(digits) <= 19 and luhn_ok(digits):
                found.append(Finding("card", m.start(), m.end()))
        for kind, pattern in (("ip", IPV4), ("ip", IPV6)):
            found.extend(Finding(kind, m.start(), m.end()) for m in pattern.finditer(text))
        found.extend(_phones(text))
        for pattern in self._extra:
            found.extend(Finding("custom", m.start(), m.end()) for m in pattern.finditer(text))
        return _non_overlapping(found)

    def kinds(self, text: str) -> set[str]:
        return {f.kind for f in self.find(text)}

    def text(self, text: str) -> str:
        out: list[str] = []
        last = 0
        for f in self.find(text):
            out.append(text[last : f.start])
            out.append(f"[{f.kind.upper()}]")
            last = f.end
        out.append(text[last:])
        return "".join(out)

    def value(self, value: Any, key: str | None = None) -> Any:
        """Redact nested JSON-like values; fields named like secrets are masked whole."""
        if key is not None and key.lower() in self._fields:
            return "[REDACTED]"
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


def _phones(text: str) -> list[Finding]:
    """A run of digit groups longer than a phone number may still start with one
    ("+30 100 100 1000 4000..."): then the longest leading groups that fit are the phone."""
    found: list[Finding] = []
    for m in PHONE.finditer(text):
        run = m.group()
        ends = [g.end() for g in re.finditer(r"\S+", run)]
        for end in reversed(ends):
            candidate = run[:end].rstrip(" ().-")
            digits = sum(c.isdigit() for c in candidate)
            if 8 <= digits <= 15 and not ISO_DATE.match(candidate):
                found.append(Finding("phone", m.start(), m.start() + len(candidate)))
                break
    return found


def _non_overlapping(findings: list[Finding]) -> list[Finding]:
    """Earlier and longer matches win, so an email's digits are not also a phone number."""
    kept: list[Finding] = []
    for f in sorted(findings, key=lambda f: (f.start, -(f.end - f.start))):
        if kept and f.start < kept[-1].end:
            continue
        kept.append(f)
    return kept


DEFAULT_REDACTOR = Redactor()
