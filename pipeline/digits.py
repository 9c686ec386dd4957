"""Whole numbers read from untrusted text: Kafka headers, HTTP fields, replay markers.

``str.isdigit`` is not a check that ``int`` will accept a string: it is true of
superscripts and other digit characters (``"¹"``, ``"²"``, ``"①"``) that ``int`` refuses
with a ValueError, and ``int`` also refuses strings of more than 4,300 digits. A
``Content-Length: \\xb9`` (latin-1 for ``¹``) made the review app answer 500 that way
(found by its property test, 2026-12-03); every place that turns untrusted text into a
number reads it here.
"""

from __future__ import annotations

MAX_DIGITS = 18
"""Enough for any count, length, offset or epoch in milliseconds (below 2**63)."""


def ascii_int(text: str | None, max_digits: int = MAX_DIGITS) -> int | None:
    """The non-negative integer ``text`` spells in 1 to ``max_digits`` ASCII digits, else
    None (no sign, no spaces, no other digit characters)."""
    if text is None or not 0 < len(text) <= max_digits:
        return None
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text)
