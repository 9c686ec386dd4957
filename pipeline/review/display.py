"""How untrusted text reaches a reviewer's eyes: escaped, and unable to hide or spoof.

Escaping (Jinja autoescape) stops markup. It does not stop text that *looks* different
from what it is: a right-to-left override (U+202E) shows ``exe.txt`` for ``txt.exe`` and
reverses a request id in the queue; a NUL, a zero-width space or a soft hyphen make two
different ids look the same. Every ``{{ ... }}`` in every template therefore passes
through :func:`finalize`, which shows each such character as a visible marker
(``<mark class="ctl">RLO</mark>``). Templates opt out in two places only, by filter:

* ``|as_value`` for form field values, which must round-trip unchanged (escaped only);
* ``|plain`` where markup cannot go (``<title>``, ``<option>``): markers as text.

The JSON in the correction editor uses :func:`json_for_editing`, which writes these
characters as ``\\uXXXX`` escapes: the same JSON value, visibly.
"""

from __future__ import annotations

import json
import re
import unicodedata
from datetime import UTC, datetime
from typing import Any

from markupsafe import Markup, escape

NAMES = {
    "\u0000": "NUL",
    "\u00ad": "SHY",
    "\u061c": "ALM",
    "\u200b": "ZWSP",
    "\u200c": "ZWNJ",
    "\u200d": "ZWJ",
    "\u200e": "LRM",
    "\u200f": "RLM",
    "\u2028": "LSEP",
    "\u2029": "PSEP",
    "\u202a": "LRE",
    "\u202b": "RLE",
    "\u202c": "PDF",
    "\u202d": "LRO",
    "\u202e": "RLO",
    "\u2060": "WJ",
    "\u2066": "LRI",
    "\u2067": "RLI",
    "\u2068": "FSI",
    "\u2069": "PDI",
    "\ufeff": "BOM",
}
HIDDEN = re.compile(
    "["
    "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"  # C0/C1 controls except tab, newline, return
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\uffa0"
    "\u0600-\u0605\u06dd\u070f\u0890\u0891\u08e2"
    "\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufe00-\ufe0f\ufeff\ufff9-\ufffb"
    "\ud800-\udfff"  # lone surrogates (they cannot even be encoded)
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff"  # tags and variation selectors supplement
    "]"
)
"""Invisible or direction-changing characters: every Cc (but tab, LF, CR), Cf, Cs, Zl and
Zp, plus the fillers and selectors that render as nothing (a test checks the categories)."""


def _name(char: str) -> str:
    return NAMES.get(char) or f"U+{ord(char):04X}"


def _title(char: str) -> str:
    try:
        return f"U+{ord(char):04X} {unicodedata.name(char)}"
    except ValueError:
        return f"U+{ord(char):04X}"


def has_hidden(text: str) -> bool:
    return HIDDEN.search(text) is not None


def marked(text: str) -> Markup:
    """``text`` escaped, with each hidden character as a visible ``<mark>``."""
    parts: list[str] = []
    position = 0
    for match in HIDDEN.finditer(text):
        parts.append(str(escape(text[position : match.start()])))
        char = match.group()
        parts.append(f'<mark class="ctl" title="{_title(char)}">{_name(char)}</mark>')
        position = match.end()
    parts.append(str(escape(text[position:])))
    return Markup("".join(parts))


def plain(text: Any) -> str:
    """Hidden characters as bracketed names, for places where markup cannot go."""
    return HIDDEN.sub(lambda m: f"\u27e8{_name(m.group())}\u27e9", str(text))


def as_value(text: Any) -> Markup:
    """Escaped only: a form value must come back exactly as it was sent."""
    return escape(str(text).encode("utf-8", "surrogatepass").decode("utf-8", "replace"))


def finalize(value: Any) -> Any:
    """Jinja's finalize hook: runs on every expression's value before autoescaping."""
    if isinstance(value, Markup) or not isinstance(value, str):
        return value
    return marked(value)


def _escape_hidden(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code > 0xFFFF:
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def json_for_editing(value: Any) -> str:
    """Readable JSON (non-ASCII kept) in which hidden characters are ``\\u`` escapes.

    Hidden characters can only occur inside JSON strings (the syntax is ASCII), where a
    ``\\uXXXX`` escape means the same character: parsing the text gives the same value.
    """
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return HIDDEN.sub(_escape_hidden, text)


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def format_age(ms: int) -> str:
    minutes = ms // 60_000
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def format_ts(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def one_line(text: str, limit: int = 140) -> str:
    """Whitespace collapsed and cut at ``limit`` characters, for a queue row."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "\u2026"
