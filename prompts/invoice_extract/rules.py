"""Deterministic code for invoice_extract: the regex fallback and output checks.

Both v1 and v2 reference this file, so it is part of both content hashes:
once either version is released, any edit here fails `llmpipe prompts check`.
That is intended, since this code is how released versions behave. A later
version that needs different rules gets its own file (e.g. ``rules_v3.py``).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

_INVOICE_NUMBER = re.compile(
    r"(?i:\binvoice\s*(?:number|no\.?|#))\s*[:#]?\s*(?P<number>[A-Z0-9][A-Z0-9/_.-]{2,40})"
)
_AMOUNT = (
    r"(?P<before>[A-Z]{3}\b|[$€£])?[ \t]*"
    r"(?P<amount>\d[\d.,' ]*\d|\d)[ \t]*"
    r"(?P<after>[A-Z]{3}\b|[$€£])?"
)
# Most specific label first: "Total due" beats a plain "Total" line (often pre-tax).
_TOTAL_LINES = tuple(
    re.compile(rf"(?m)^[ \t]*(?i:{label})[ \t]*[:-]?[ \t]*{_AMOUNT}")
    for label in (r"grand\s+total", r"(?:total|amount|balance)\s+due", r"total(?:\s+amount)?")
)
_DUE = re.compile(r"(?im)^\s*(?:due\s+date|payment\s+due|due)\s*(?:on|by)?\s*[:-]?\s*(.+)$")
_NUMBERS = (re.compile(r"\d[\d.,' ]*\d|\d"), re.compile(r"\d[\d.,']*\d|\d"))
_SYMBOLS = {"$": "USD", "€": "EUR", "£": "GBP"}
_DATE_FORMATS = ("%Y-%m-%d", "%d %B %Y", "%d %b %Y", "%B %d, %Y", "%b %d, %Y", "%d.%m.%Y")


def regex_extract(variables: dict[str, Any]) -> dict[str, Any] | None:
    """Extract what is printed; None (human review) unless number, total and currency are found.

    Guessing any of the three would put a wrong payment into accounts
    payable, which costs more than a human looking at the invoice.
    """
    text = str(variables["text"])
    number = _INVOICE_NUMBER.search(text)
    total = next((m for m in (p.search(text) for p in _TOTAL_LINES) if m is not None), None)
    if number is None or total is None or not any(c.isdigit() for c in number["number"]):
        return None
    amount = _parse_amount(total["amount"])
    marker = total["before"] or total["after"] or _currency_anywhere(text)
    if amount is None or marker is None:
        return None
    return {
        "invoice_number": number["number"].rstrip(".,"),
        "total": amount,
        "currency": _SYMBOLS.get(marker, marker),
        "due_date": _due_date(text),
    }


def due_date_is_calendar_date(output: dict[str, Any], variables: dict[str, Any]) -> list[str]:
    """The schema regex accepts 2024-02-30; the payment scheduler does not."""
    due = output.get("due_date")
    if not isinstance(due, str):
        return []
    try:
        dt.date.fromisoformat(due)
    except ValueError:
        return [f"due_date {due} is not a real calendar date; use YYYY-MM-DD or null"]
    return []


def total_appears_in_text(output: dict[str, Any], variables: dict[str, Any]) -> list[str]:
    """A total the model computed itself (instead of reading it) is the costliest hallucination."""
    total = output.get("total")
    if not isinstance(total, int | float):
        return []
    text = str(variables["text"])
    # Both with and without spaces as thousands separators: "3 400.00" may be
    # one amount or a quantity followed by a price.
    printed = {_parse_amount(m) for pattern in _NUMBERS for m in pattern.findall(text)}
    if float(total) in printed:
        return []
    return [f"total {total} does not appear on the invoice; copy the amount due exactly as printed"]


def _parse_amount(raw: str) -> float | None:
    """Read 1,234.56 / 1.234,56 / 1 234,56 / 1'234.56 alike.

    A final separator followed by one or two digits is the decimal point;
    every other separator groups thousands.
    """
    compact = raw.replace(" ", "").replace("'", "")
    decimal = re.search(r"[.,](\d{1,2})$", compact)
    whole = compact[: decimal.start()] if decimal else compact
    digits = re.sub(r"[.,]", "", whole)
    if not digits.isdigit():
        return None
    return float(f"{digits}.{decimal[1]}") if decimal else float(digits)


def _currency_anywhere(text: str) -> str | None:
    code = re.search(r"\b(USD|EUR|GBP|CHF|JPY|CAD|AUD|SEK|NOK|DKK|PLN)\b", text)
    if code:
        return code[1]
    symbol = re.search(r"[$€£]", text)
    return symbol[0] if symbol else None


def _due_date(text: str) -> str | None:
    match = _DUE.search(text)
    if match is None:
        return None
    value = match[1].strip().rstrip(".")
    for date_format in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(value, date_format).date().isoformat()
        except ValueError:
            continue
    return None
