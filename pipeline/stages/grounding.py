"""Is an answer's content in its input? Cheap, offline measures for two kinds of field.

* **Extractive** values (an invoice number, a total, a due date) must be printed in the
  input. Strings match after Unicode and case normalisation, or with punctuation and
  spaces dropped ("INV 3391" is "INV-3391"); numbers match any amount printed in either
  decimal convention ("1.234,56" is 1234.56); ISO dates match a date printed in any of the
  usual formats ("14 May 2024", "14.05.2024", "May 14, 2024").
* **Free text** (a summary) must be supported: most of its content words appear in the
  input (after light stemming), and every number or name it states that the input does
  not contain counts against it. A small model's confident summaries invent exactly those:
  "free shipping for orders with 12 Rue de Rivoli" for a ticket about a double charge.

No model, no embeddings: these must run on every answer for free, and a false "grounded"
is only ever one factor of the confidence, never the decision alone.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_WORD = re.compile(r"[^\W_]+")
_NUMBER = re.compile(r"\d+(?:[.,' ]\d+)*")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CAPITALISED = re.compile(r"\b[A-Z][\w'-]*")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n)\s*[\"'(\[]*([A-Z][\w'-]*)")
_MONTHS = {
    name: index
    for index, names in enumerate(
        (
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ),
        start=1,
    )
    for name in names
}
_I = re.IGNORECASE
_MONTH = "|".join(sorted(_MONTHS, key=len, reverse=True))
_DATE_PATTERNS = (
    (re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b"), "ymd"),
    (re.compile(r"\b(\d{1,2})[./](\d{1,2})[./](\d{4})\b"), "dmy_or_mdy"),
    (re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+({_MONTH})\.?,?\s+(\d{{4}})\b", _I), "d_mon_y"),
    (re.compile(rf"\b({_MONTH})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})\b", _I), "mon_d_y"),
)
# Three letters or more that carry no topic, plus the words summaries use to describe a
# ticket rather than its content ("customer reports ..."): neither is evidence of anything.
_STOPWORDS = frozenset(
    {
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "also",
        "and",
        "any",
        "are",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "can",
        "cannot",
        "could",
        "did",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "her",
        "here",
        "hers",
        "him",
        "his",
        "how",
        "into",
        "its",
        "itself",
        "just",
        "more",
        "most",
        "not",
        "now",
        "off",
        "once",
        "only",
        "other",
        "our",
        "ours",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "too",
        "under",
        "until",
        "very",
        "was",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "via",
        "per",
        "customer",
        "customers",
        "user",
        "users",
        "client",
        "asks",
        "asked",
        "asking",
        "ask",
        "reports",
        "reported",
        "reporting",
        "report",
        "wants",
        "want",
        "wanted",
        "requests",
        "requested",
        "request",
        "says",
        "said",
        "states",
        "stated",
        "needs",
        "need",
        "issue",
        "issues",
        "problem",
        "problems",
        "ticket",
        "help",
        "support",
        "please",
        "thanks",
        "thank",
        "regarding",
    }
)
_SUFFIXES = ("ing", "ed", "es", "s", "ly")


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: how two printings of one value compare."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _compact(text: str) -> str:
    return "".join(_WORD.findall(normalise(text)))


def input_text(variables: Any) -> str:
    """Every string in the request's variables (keys excluded), in order, one per line."""
    return "\n".join(_strings(variables))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def parse_amount(raw: str) -> float | None:
    """Read 1,234.56 / 1.234,56 / 1 234,56 / 1'234.56 alike: a final separator followed by
    one or two digits is the decimal point, every other separator groups thousands."""
    compact = raw.replace(" ", "").replace("'", "")
    decimal = re.search(r"[.,](\d{1,2})$", compact)
    whole = compact[: decimal.start()] if decimal else compact
    digits = re.sub(r"[.,]", "", whole)
    if not digits.isdigit():
        return None
    return float(f"{digits}.{decimal[1]}") if decimal else float(digits)


def printed_numbers(text: str) -> set[float]:
    """Every amount the text prints, read with and without spaces as group separators
    ("3 400.00" may be one amount, or a quantity and a price), and every bare digit run."""
    found: set[float] = set()
    for match in _NUMBER.finditer(text):
        raw = match.group(0)
        for candidate in (raw, *re.split(r"[ ']", raw)):
            value = parse_amount(candidate)
            if value is not None:
                found.add(value)
        found.update(float(d) for d in re.findall(r"\d+", raw))
    return found


def printed_dates(text: str) -> set[str]:
    """ISO forms of every date the text prints; a d/m vs m/d ambiguity yields both."""
    found: set[str] = set()
    for pattern, kind in _DATE_PATTERNS:
        for match in pattern.finditer(text):
            a, b, c = match.groups()
            if kind == "ymd":
                candidates = [(int(a), int(b), int(c))]
            elif kind == "dmy_or_mdy":
                candidates = [(int(c), int(b), int(a)), (int(c), int(a), int(b))]
            elif kind == "d_mon_y":
                candidates = [(int(c), _MONTHS[b.lower()], int(a))]
            else:
                candidates = [(int(c), _MONTHS[a.lower()], int(b))]
            for year, month, day in candidates:
                try:
                    found.add(dt.date(year, month, day).isoformat())
                except ValueError:
                    continue
    return found


@dataclass(frozen=True)
class Source:
    """The input, pre-digested once per answer for every field that is checked against it."""

    text: str
    normalised: str
    compact: str
    numbers: frozenset[float]
    dates: frozenset[str]
    stems: frozenset[str]

    @classmethod
    def of(cls, variables: Any) -> Source:
        text = input_text(variables)
        return cls(
            text=text,
            normalised=normalise(text),
            compact=_compact(text),
            numbers=frozenset(printed_numbers(text)),
            dates=frozenset(printed_dates(text)),
            stems=frozenset(stem(w) for w in _WORD.findall(normalise(text))),
        )


def value_is_printed(value: Any, source: Source) -> bool | None:
    """Whether an extractive value appears in the input; None when there is nothing to check
    (null, booleans, empty strings): an absent value is the schema's business, not ours."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return any(abs(float(value) - n) < 0.005 for n in source.numbers)
    if isinstance(value, list):
        verdicts = [v for v in (value_is_printed(item, source) for item in value) if v is not None]
        return all(verdicts) if verdicts else None
    if not isinstance(value, str) or not value.strip():
        return None
    if _ISO_DATE.match(value.strip()):
        return value.strip() in source.dates
    if normalise(value) in source.normalised:
        return True
    compact = _compact(value)
    return bool(compact) and compact in source.compact


def stem(word: str) -> str:
    """A crude suffix strip ("charged", "charges" -> "charg"): enough to match inflections."""
    for suffix in _SUFFIXES:
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> list[str]:
    return [
        w
        for w in _WORD.findall(normalise(text))
        if len(w) > 2 and not w.isdigit() and w not in _STOPWORDS
    ]


@dataclass(frozen=True)
class Support:
    """How much of a free text the input supports, and what it states that the input does not."""

    words: int
    supported: int
    invented: tuple[str, ...]

    @property
    def ratio(self) -> float | None:
        return self.supported / self.words if self.words else None


def support(text: str, source: Source) -> Support:
    """Content-word support plus invented numbers and names.

    A number is invented when no amount printed in the input equals it; a name is a
    capitalised word that does not start a sentence and whose stem the input lacks.
    """
    words = content_words(text)
    supported = sum(1 for w in words if stem(w) in source.stems)
    invented: list[str] = []
    for match in _NUMBER.finditer(text):
        value = parse_amount(match.group(0))
        if value is not None and value not in source.numbers:
            invented.append(match.group(0))
    sentence_starts = {m.start(1) for m in _SENTENCE_START.finditer(text)}
    for match in _CAPITALISED.finditer(text):
        word = match.group(0)
        if match.start() in sentence_starts or normalise(word) in _STOPWORDS:
            continue
        if stem(normalise(word).strip("'-")) not in source.stems:
            invented.append(word)
    return Support(len(words), supported, tuple(dict.fromkeys(invented)))
