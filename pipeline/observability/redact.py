"""One redactor for everything that leaves the process: logs, span attributes, dead-letter
error messages and exported content.

Detection is offline and pattern based (no model downloads). Card numbers are Luhn checked
so that order numbers are not mangled; IBANs are checked with their mod-97 digit.

Neighbours must not hide each other. A greedy match that runs into the next token (a
phone number, then a card: ``+30 100 100 1000 4111 1111 1111 1111``) fails its check and
would swallow the real one, so cards, IBANs and phones are tried at every token boundary
inside a run; and findings that overlap (an e-mail whose local part starts inside the
phone number before it) are masked together, never one dropped for the other.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Matches may only start where a run of address characters starts, and runs are taken
# possessively: without both, a long run with no "@" is rescanned from every position.
_LOCAL = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]"
EMAIL = re.compile(rf"(?<!{_LOCAL}){_LOCAL}++@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{{2,}}\b")
# Every start, overlapping ones included: in "a@b.org'c@d.org" the second address's run
# of local characters starts inside the first address's domain.
EMAILS = re.compile(rf"(?=({EMAIL.pattern}))")
PHONE = re.compile(r"(?<![\w+])\+?\d[\d ().-]{7,}\d(?!\w)")
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
DIGIT_GROUPS = re.compile(r"(?<!\d)\d++(?:[ -]\d++)*+")
"""Digit groups separated by single spaces or dashes: where card numbers live."""
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6_START = re.compile(r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:")
"""How every textual IPv6 address starts: two colons at most four hex digits apart."""
IPV6 = re.compile(
    rf"(?={IPV6_START.pattern})(?<!\w)(?<![\w)\]]\[)(?P<run>[0-9A-Fa-f:.]++)"
    r"(?:%(?P<zone>[\w~-]++(?:\.[\w~-]++)*+))?+"
)
"""Where an IPv6 address may be, in any textual form (RFC 4291 2.2, RFC 5952): a run of
hex digits, colons and dots (the IPv4 tail) that starts as every address does
(:data:`IPV6_START`), then a zone (``%eth0``; ``%25eth0`` in a URL).
:func:`_ipv6s` confirms each with :class:`ipaddress.IPv6Address`: at most one ``::``,
eight groups or fewer, a valid IPv4 tail are rules a pattern spells badly.

That start is tried first: it fails at the first character almost everywhere, so a line
full of colons (a JSON log line) yields no candidate at all. A run starts only where a
word does not (``std::vector``, ``foo::bar``, ``ERROR::`` yield none that parses), and
not after a subscript's ``[`` (``x[1::2]``, ``a[::2]``: ``[`` right after a name or a
closing bracket), while ``[2001:db8::1]:8080`` and ``http://[::1]/`` have a space or a
slash before theirs. Runs are possessive: a long run of hex digits and colons is one
candidate, never rescanned from each of its positions."""
IPV6_LONGEST = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")
"""No address (zone aside) is longer: a candidate is tried only up to here."""
DIGIT = re.compile(r"\d")
r"""What IBANs, card and phone numbers and IPv4 addresses all contain (same ``\d``)."""
SECRET = re.compile(
    r"(?i)\b(?:sk|pk|rk|api|key|tok)[-_][A-Za-z0-9_-]{16,}\b"
    r"|\bBearer\s+[A-Za-z0-9._~+/-]{8,}=*"
    r"|\bAKIA[0-9A-Z]{16}\b"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"
)
SECRET_NEEDLES: dict[str, tuple[str, ...]] = {
    "": ("bearer", "akia"),
    "-": ("sk-", "pk-", "rk-", "api-", "key-", "tok-"),
    "_": ("sk_", "pk_", "rk_", "api_", "key_", "tok_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
}
"""What every match of :data:`SECRET` contains in :func:`folded` text, by the separator it
needs in the text itself. The case-insensitive scan cost more than the rest of
:meth:`Redactor.find` on text without digits (12 of 20 us for a 230-character ticket);
looking for a separator is a ``memchr``, for a needle a fast substring search."""

_FOLD = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})
"""The only characters outside ASCII that ``re.IGNORECASE`` matches to an ASCII letter
(capital I with a dot, dotless i, long s, Kelvin sign; tests/observability/test_redact.py
checks every code point)."""


def folded(text: str) -> str:
    """``text`` lowered so that wherever a case-insensitive pattern matches an ASCII word,
    the lower-case word is a plain substring: the cheap test that may skip the scan.

    Translated before lowering: ``"\\u0130".lower()`` is two characters, ``"i"`` and a dot.
    """
    return text.lower() if text.isascii() else text.translate(_FOLD).lower()


SENSITIVE_FIELDS = frozenset(
    {"password", "secret", "token", "api_key", "authorization", "ssn", "basic.auth.user.info"}
)
SECRET_WORDS = frozenset({"password", "passwd", "secret", "auth"})
"""A field whose name has one of these as a word (``sasl.password``, ``ssl_key_password``,
``sasl.oauthbearer.client.secret``, ``schema_registry_basic_auth``: client configurations
and settings) is masked whole too. Not
``token``: ``prompt_tokens`` is a count, and a bearer token's text is caught by its shape."""
_WORD = re.compile(r"[^a-z0-9]+")
_WORD_CHAR = re.compile(r"\w")


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
        """Every finding in ``text``. A pattern is only run when ``text`` holds what any of
        its matches must contain (a secret's prefix, an ``@``, a digit, three dots, a ``::``
        or six colons): most text has no e-mail, no key and no number, and each pattern is
        a scan of all of it."""
        text = _unescaped_view(text)
        found: list[Finding] = []
        if _may_hold_secret(text):
            found.extend(Finding("secret", m.start(), m.end()) for m in SECRET.finditer(text))
        if "@" in text:
            found.extend(Finding("email", m.start(1), m.end(1)) for m in EMAILS.finditer(text))
        digits = DIGIT.search(text) is not None
        if digits:
            found.extend(_ibans(text))
            found.extend(_cards(text))
            if text.count(".") >= 3:
                found.extend(Finding("ip", m.start(), m.end()) for m in IPV4.finditer(text))
        if "::" in text or text.count(":") >= 6:
            found.extend(_ipv6s(text))
        if digits:
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

    def _sensitive(self, key: str) -> bool:
        return key in self._fields or not SECRET_WORDS.isdisjoint(_WORD.split(key))

    def value(self, value: Any, key: str | None = None) -> Any:
        """Redact nested JSON-like values; fields named like secrets are masked whole."""
        if key is not None and self._sensitive(key.lower()):
            return "[REDACTED]"
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


CARD_GROUPS = 5
"""Most groups a printed card number has (4-4-4-4-3 for 19 digits)."""


ESCAPE = re.compile(r"\\(?:[nrtfvab0'\"\\]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")


def _unescaped_view(text: str) -> str:
    """``text`` with each backslash escape blanked out, same length (offsets still match).

    Error messages quote untrusted text with ``repr`` and logs carry JSON: there, a newline
    between two values is the two characters ``\\n``, and the ``n`` glues itself to what
    follows (``\\nAKIA...`` has no word boundary before ``AKIA``).
    """
    if "\\" not in text:
        return text
    return ESCAPE.sub(lambda m: " " * len(m.group()), text)


def _may_hold_secret(text: str) -> bool:
    """False only when :data:`SECRET` cannot match ``text``: none of its needles is in it."""
    probe = folded(text)
    return any(
        sep in text and any(needle in probe for needle in needles)
        for sep, needles in SECRET_NEEDLES.items()
    )


def _cards(text: str) -> list[Finding]:
    """From each group of a digit run, the longest Luhn-valid span of 13-19 digits in at
    most :data:`CARD_GROUPS` groups.

    Every start is tried: a span that begins inside a phone number before the card fails
    Luhn, and must not hide the card that begins one group later. At most five groups
    per start keeps a megabyte of "1 1 1 ..." linear.
    """
    found: list[Finding] = []
    for run in DIGIT_GROUPS.finditer(text):
        chars = run.group()
        if len(chars) < 13:
            continue  # fewer than 13 digits: no card (most runs; keeps the scan cheap)
        groups = [(g.start(), g.end()) for g in re.finditer(r"\d+", chars)]
        for i, (start, _) in enumerate(groups):
            best: int | None = None
            digits = ""
            for g_start, g_end in groups[i : i + CARD_GROUPS]:
                digits += chars[g_start:g_end]
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and luhn_ok(digits):
                    best = g_end
            if best is not None:
                found.append(Finding("card", run.start() + start, run.start() + best))
    return found


def _ibans(text: str) -> list[Finding]:
    """The longest IBAN-shaped prefix that passes mod-97: the greedy match may have run
    on into the next word ("DE75 8139 ... 3300 75.97.156.161")."""
    found: list[Finding] = []
    for m in IBAN.finditer(text):
        candidate = m.group()
        ends = [e.start() for e in re.finditer(r"(?<=[A-Z0-9])(?= |$)", candidate)]
        for end in reversed(ends):
            if end >= 15 and iban_ok(candidate[:end]):
                found.append(Finding("iban", m.start(), m.start() + end))
                break
    return found


def _ipv6s(text: str) -> list[Finding]:
    """Each :data:`IPV6` candidate that :class:`ipaddress.IPv6Address` accepts, or else its
    longest accepted prefix that ends before a dot or colon: the run may have taken in what
    follows the address ("2001:db8::1." ending a sentence, "::1:" before a port,
    "2001:db8::1.95.8.147.3" glued to an IPv4 address). After a prefix, the rest of the run
    is tried the same way, so "2001:db8::1.2001:db8::2" is two addresses.

    A run glued to a word ("dead::beefy", "abc::def::ghi", "2001:db8::1:zz") is part of
    that word; only a prefix that ends at a dot (where a sentence or a field ends) may
    still be an address. Every other valid form is an address, ``dead::beef`` and
    ``abc::def`` included: they cannot be told from one, and masking a word that looks
    like an address is the safe mistake. Not ``::`` alone (the unspecified address, no
    one's): it is Haskell's type annotation, an emoticon, a slice. Not a MAC address
    (``aa:bb:cc:dd:ee:ff``: six groups, no ``::``): it does not parse. A hex fingerprint
    with colons is masked eight groups at a time, as before (each is a valid address).

    Only :data:`IPV6_LONGEST` characters of a run are looked at per address: linear on
    any run.
    """
    found: list[Finding] = []
    for m in IPV6.finditer(text):
        run, zone = m.group("run"), m.group("zone")
        glued = _WORD_CHAR.match(text, m.end()) is not None
        start = 0
        while True:
            window = run[start : start + IPV6_LONGEST + 1]
            whole = start + len(window) == len(run)
            end = _ipv6_end(window, whole, glued, zone)
            if end is None:
                break
            if whole and end == len(window):
                found.append(Finding("ip", m.start() + start, m.end()))
                break
            found.append(Finding("ip", m.start() + start, m.start() + start + end))
            start += end + 1
            if IPV6_START.match(run, start) is None:
                break
    return found


def _ipv6_end(window: str, whole: bool, glued: bool, zone: str | None) -> int | None:
    """Where the longest address at the start of ``window`` ends: at its end when it is the
    rest of a run that no word follows (then with the run's ``zone``), else before one of
    its dots, or colons when no word follows."""
    ends = [len(window)] if whole and not glued else []
    cuts = "." if glued else ".:"
    ends.extend(i for i in range(len(window) - 1, 0, -1) if window[i] in cuts)
    for end in ends:
        address = window[:end]
        if end > IPV6_LONGEST or not _may_be_ipv6(address):
            continue
        if end == len(window) and zone is not None:
            address = f"{address}%{zone}"
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            continue
        return end
    return None


def _may_be_ipv6(candidate: str) -> bool:
    """False when ``candidate`` cannot parse, counted rather than parsed (most prefixes of
    a run fail here, without the parser's exception): an address has at most eight
    colons; without ``::`` it has seven, or six and an IPv4 tail; with it, one ``::`` and
    a digit (``::`` alone is not flagged)."""
    colons = candidate.count(":")
    if colons > 8:
        return False
    doubles = candidate.count("::")
    if doubles == 0:
        return colons in (6, 7)
    return doubles == 1 and candidate.strip(":") != ""


def _phones(text: str) -> list[Finding]:
    """A run of digit groups longer than a phone number may still start with one
    ("+30 100 100 1000 4000..."): then the longest leading groups that fit are the phone.
    Groups end at spaces and at the separators phone numbers use (``(``, ``)``, ``.``,
    ``-``), so a phone glued to the next number by a dash still ends where it should.
    Only the first 15 digits of a run are looked at: linear on any run."""
    found: list[Finding] = []
    for m in PHONE.finditer(text):
        if ISO_DATE.match(m.group()):
            continue
        best: int | None = None
        digits = 0
        for group in re.finditer(r"\d+", m.group()):
            digits += group.end() - group.start()
            if digits > 15:
                break
            if digits >= 8:
                best = group.end()
        if best is not None:
            found.append(Finding("phone", m.start(), m.start() + best))
    return found


def _non_overlapping(findings: list[Finding]) -> list[Finding]:
    """Overlapping findings become one, named after the earliest (then longest): an
    email's digits are not also a phone number, and an email that starts inside the
    phone number before it is masked with it instead of being dropped."""
    kept: list[Finding] = []
    for f in sorted(findings, key=lambda f: (f.start, -(f.end - f.start))):
        if kept and f.start < kept[-1].end:
            last = kept[-1]
            kept[-1] = Finding(last.kind, last.start, max(last.end, f.end))
            continue
        kept.append(f)
    return kept


DEFAULT_REDACTOR = Redactor()
