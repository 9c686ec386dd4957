"""The redactor finds personal data and secrets, leaves look-alikes alone, and stays linear."""

from __future__ import annotations

import ipaddress
import json
import re
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.observability import redact
from pipeline.observability.redact import Finding, Redactor
from tests.observability.personal_data import PERSONAL, SEPARATORS

R = Redactor(extra_patterns=[r"ACME-\d{6}"], extra_fields=["customer_secret"])


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.doe+x@mail.example.co.uk now", "email"),
        ("card 4111 1111 1111 1111 thanks", "card"),
        ("call +44 20 7946 0958", "phone"),
        ("IBAN GB82 WEST 1234 5698 7654 32", "iban"),
        ("from 192.168.10.4", "ip"),
        ("key sk-abcdefghijklmnopqrstuvwx", "secret"),
        ("Authorization: Bearer eyJhbGciOi.eyJzdWIi.c2lnbmF0dXJl", "secret"),
        ("aws AKIAIOSFODNN7EXAMPLE here", "secret"),
        ("token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "secret"),
        ("ticket ACME-123456", "custom"),
    ],
)
def test_each_kind_is_found_and_masked(text: str, kind: str) -> None:
    assert kind in R.kinds(text)
    assert f"[{kind.upper()}]" in R.text(text)


@pytest.mark.parametrize(
    "text",
    ["order 1234567812345678", "on 2024-01-02", "IBAN GB00 WEST 1234", "v1.2.3"],
)
def test_look_alikes_are_left_alone(text: str) -> None:
    assert R.text(text) == text


def test_nested_values_and_sensitive_field_names() -> None:
    value = {
        "note": "mail bob@example.com",
        "customer_secret": "hunter2",
        "list": ["+1 415 555 0100"],
    }
    assert R.value(value) == {
        "note": "mail [EMAIL]",
        "customer_secret": "[REDACTED]",
        "list": ["[PHONE]"],
    }


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        # A phone number, then another digit run: the card's own span must still be found.
        ("+30 100 100 1000 4111 1111 1111 1111", "[PHONE] [CARD]"),
        ("+30 100 100 1000 4111111111111111", "[PHONE] [CARD]"),
        ("+30 100 100 1000-4111111111111111", "[PHONE]-[CARD]"),
        ("call +44 20 7946 0958 or 0171 555 0100", "call [PHONE] or [PHONE]"),
        ("95.8.147.3-4510424576370651-x", "[IP]-[CARD]-x"),
        # A greedy IBAN match ran into the next word and failed its check.
        ("DE75813903081049443300 75.97.156.161", "[IBAN] [IP]"),
        # An address starting inside the phone number (or address) before it.
        ("+41 711 370 3406'gju.none@ijwg.com", "[PHONE]"),
        ("a.b@mfp.org'c.d@fvl.org end", "[EMAIL] end"),
        # Quoted by repr: the escape's letter must not glue itself to the key.
        (repr("prompt +30 100 100 1000\nAKIAIOSFODNN7EXAMPLE"), "'prompt [PHONE]\\n[SECRET]'"),
    ],
)
def test_neighbours_do_not_hide_each_other(text: str, masked: str) -> None:
    assert R.text(text) == masked


@settings(max_examples=300)
@given(
    st.lists(PERSONAL, min_size=1, max_size=4), st.lists(st.sampled_from(SEPARATORS), min_size=4)
)
def test_personal_data_and_secrets_never_survive_whatever_their_neighbours(
    values: list[str], separators: list[str]
) -> None:
    text = "note: " + "".join(v + sep for v, sep in zip(values, separators, strict=False)) + "end"
    # As written, and quoted the way error messages (repr) and log lines (JSON) quote it.
    for form in (text, repr(text), json.dumps(text)):
        masked = R.text(form)
        assert [v for v in values if v in masked] == [], masked


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("from 2001:db8::1 now", "from [IP] now"),
        ("from 2001:0db8:0000:0000:0000:ff00:0042:8329 now", "from [IP] now"),
        ("from 2001:DB8::FF00:42:8329 now", "from [IP] now"),
        ("local ::1 only", "local [IP] only"),
        ("net 2001:db8:0:0:1:: end", "net [IP] end"),
        ("link fe80::1%eth0 up", "link [IP] up"),
        ("mapped ::ffff:192.0.2.1 in", "mapped [IP] in"),
        ("nat64 64:ff9b::192.0.2.33 out", "nat64 [IP] out"),
        ("full 0:0:0:0:0:ffff:192.0.2.1 in", "full [IP] in"),
        ("connect [2001:db8::1]:8080 failed", "connect [[IP]]:8080 failed"),
        ("GET http://[fe80::1%25eth0]:80/x", "GET http://[[IP]]:80/x"),
        ("GET https://[::1]/health", "GET https://[[IP]]/health"),
        ("peer=2001:db8::1/64", "peer=[IP]/64"),
        ("ip:2001:db8::1", "ip:[IP]"),
        ("host ::1: connection refused", "host [IP]: connection refused"),
        ("seen at 2001:db8::1.", "seen at [IP]."),
        ("2001:db8::1.2001:db8::2", "[IP].[IP]"),
        ("2001:db8::1.95.8.147.3", "[IP]"),
        # Decided: only hex letters, so an address (it parses); masking it is the safe side.
        ("dead::beef", "[IP]"),
        ("eui64 aa:bb:cc:dd:ee:ff:00:11", "eui64 [IP]"),
    ],
)
def test_ipv6_addresses_in_every_textual_form_are_masked(text: str, masked: str) -> None:
    assert R.text(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "at 12:30:45 and 12:30:45.123",
        "std::vector<int> foo::bar crate::cafe::Face",
        "dead::beefy abc::def::ghi 2001:db8::1:zz",
        "mac aa:bb:cc:dd:ee:ff AA-BB-CC-DD-EE-FF",
        "x[1::2] a[::2] a[::-1] b[c][::3]",
        ":-) ::) :D ;-)",
        "ERROR:: boom ERROR::cafe",
        "f :: Int -> Int",
        "1:2:3:4:5:6 and 1:2:3:4:5:6:7",
        "::",
    ],
)
def test_ipv6_look_alikes_are_left_alone(text: str) -> None:
    assert R.text(text) == text


IPV6_ADDRESSES = st.one_of(
    st.integers(1, 2**128 - 1),
    st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF]) | st.integers(0, 0xFFFF), min_size=8, max_size=8)
    .map(lambda groups: int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big"))
    .filter(bool),
).map(ipaddress.IPv6Address)
"""Any address but ``::`` (not flagged, see :func:`redact._ipv6s`); the groups' zeros make
``::`` land anywhere."""
BOUNDARIES = [" ", "\t", "\n", ", ", "; ", "(", ")", "'", '"', "/", "=", "<", ">", "|", " [", "]"]
"""Non-word characters that end a token, around an address."""


@settings(max_examples=300)
@given(
    IPV6_ADDRESSES,
    st.sampled_from(["compressed", "exploded", "ipv4_tail"]),
    st.text(st.characters(blacklist_characters=":"), max_size=20),
    st.sampled_from(BOUNDARIES),
    st.sampled_from([*BOUNDARIES, ".", ": ", ":8080 ", "]:443"]),
    st.text(st.characters(blacklist_characters=":"), max_size=20),
)
def test_every_ipv6_address_is_masked_whatever_its_form_and_surroundings(
    address: ipaddress.IPv6Address, form: str, before: str, left: str, right: str, after: str
) -> None:
    """The filler has no colon, so it cannot hold the address: what survives leaked."""
    if form == "ipv4_tail":
        rendered = address.exploded[:30] + str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    else:
        rendered = getattr(address, form)
    assert ipaddress.IPv6Address(rendered) == address
    text = f"{before}{left}{rendered}{right}{after}"
    masked = R.text(text)
    assert rendered not in masked, masked
    assert "[IP]" in masked


PATHOLOGICAL = ["a", "a.", "7", "a@b.", "1 ", "1-", "1.", "+1 ", "12345678 ", "a@b.co'"]
PATHOLOGICAL += [":", "1:", "::1 ", "1::.", "1::1::", "a:b:c:d:e:f:1:2:", "[::1]x"]


@pytest.mark.parametrize("unit", PATHOLOGICAL)
def test_pathological_runs_stay_linear(unit: str) -> None:
    """Pathological runs once made the e-mail pattern quadratic (minutes per megabyte) and
    the phone and card searches after it. Ten times the input must cost about ten times
    the time: a quadratic scan costs a hundred times. The bound (40x) leaves 4x for noise.
    Time is this process's CPU time, not the wall clock (on a loaded machine the wall clock
    counts the waits for a core: 7x once in CI), the sizes are measured in turn and each
    takes its fastest of three, and the small size counts as at least 20 ms (a scan that
    fast is all noise; a quadratic one takes minutes)."""
    texts = [unit * (size // len(unit)) for size in (50_000, 500_000)]
    runs: list[list[float]] = [[], []]
    for _ in range(3):
        for text, costs in zip(texts, runs, strict=True):
            started = time.process_time()
            R.text(text)
            costs.append(time.process_time() - started)
    small, large = min(runs[0]), min(runs[1])
    assert large < 40 * max(small, 0.02), (unit, small, large)


@pytest.mark.parametrize(
    "text", ["a" * 1_200_000, "a." * 600_000, "7" * 1_200_000, "a@b." * 300_000]
)
def test_megabyte_look_alikes_come_back_unchanged(text: str) -> None:
    assert R.text(text) == text


@given(st.emails(), st.text(alphabet=st.characters(blacklist_characters="@"), max_size=40))
def test_generated_emails_never_survive(email: str, filler: str) -> None:
    assert email not in R.text(f"{filler} {email} {filler}")


def _every_pattern(text: str) -> list[Finding]:
    """What :meth:`Redactor.find` returns with no pre-check at all: every pattern scanned."""
    text = redact._unescaped_view(text)
    found = [Finding("secret", m.start(), m.end()) for m in redact.SECRET.finditer(text)]
    found += [Finding("email", m.start(1), m.end(1)) for m in redact.EMAILS.finditer(text)]
    found += redact._ibans(text) + redact._cards(text)
    found += [Finding("ip", m.start(), m.end()) for m in redact.IPV4.finditer(text)]
    found += redact._ipv6s(text)
    found += redact._phones(text)
    return redact._non_overlapping(found)


FRAGMENTS = [
    *(
        "sk-",
        "SK_",
        "\u017fk-",
        "p\u212a_",
        "rk-",
        "Api_",
        "AP\u0130-",
        "ap\u0131_",
        "KEY-",
        "tok_",
    ),
    *("Bearer ", "bEaReR\t", "AKIA", "ak\u0131a", "ghp_", "GHS_", "gh", "_", "-", "=", "\\n"),
    *("abcdefghijklmnop", "0123456789abcdefABCDEF0123456789", "IOSFODNN7EXAMPLE", " ", "."),
    *("1.2.3.4", "192.168.10.4", ":", "fe80:0:0:0:0:0:0:1", "@", "a.b@mail.example.org"),
    *("::", "::1", "2001:db8::1", "::ffff:192.0.2.1", "%eth0", "[", "]", "dead::beef"),
    *("4111 1111 1111 1111", "+44 20 7946 0958", "DE75813903081049443300", "2024-01-02"),
]


@settings(max_examples=500)
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=12).map("".join))
def test_pre_checks_never_skip_a_scan_that_would_find_something(text: str) -> None:
    """The pre-checks only save work: the findings are those of scanning every pattern."""
    assert Redactor().find(text) == _every_pattern(text)


@given(st.from_regex(redact.SECRET), st.text(max_size=8), st.text(max_size=8))
def test_every_secret_shape_passes_its_pre_check(secret: str, before: str, after: str) -> None:
    assert redact._may_hold_secret(before + secret + after)


def test_fold_covers_every_character_ignorecase_matches_to_an_ascii_letter() -> None:
    letter = re.compile("[a-z]", re.IGNORECASE)
    matched = {c for c in range(128, sys.maxunicode + 1) if letter.fullmatch(chr(c))}
    assert matched == set(redact._FOLD)
    assert all(redact.folded(chr(c)) == chr(c).lower() for c in range(ord("A"), ord("Z") + 1))
