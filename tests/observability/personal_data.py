"""Hypothesis strategies for personal data and secrets: what must never leave the process.

Shared by the redactor's unit properties and the end-to-end check through a live worker,
so both prove the same thing about the same inputs.
"""

from __future__ import annotations

import string

from hypothesis import strategies as st

from pipeline.observability.redact import iban_ok, luhn_ok

LOWER = string.ascii_lowercase
ALNUM = string.ascii_letters + string.digits
SEPARATORS = [" ", "  ", ", ", " / ", "/", "-", ".", "'", '"', ": ", "; ", "\n", "\t", " | "]
"""What stands between two values in text. Not the empty string: digits glued to digits
("+30 100 100 10004111...") cannot be told apart by anyone."""


def luhn_card(body: str) -> str:
    """``body`` plus the check digit that makes it a valid card number."""
    return next(body + d for d in string.digits if luhn_ok(body + d))


def german_iban(bban: str) -> str:
    return next(f"DE{check:02d}{bban}" for check in range(2, 99) if iban_ok(f"DE{check:02d}{bban}"))


def _grouped(text: str, size: int = 4) -> str:
    return " ".join(text[i : i + size] for i in range(0, len(text), size))


EMAILS = st.builds(
    "{}.{}@{}.{}".format,
    st.text(LOWER, min_size=3, max_size=8),
    st.text(LOWER + string.digits, min_size=2, max_size=6),
    st.text(LOWER, min_size=3, max_size=8),
    st.sampled_from(["com", "org", "net", "io", "de"]),
)
PHONES = st.builds(
    "+{} {} {} {}".format,
    st.integers(30, 49),
    st.integers(100, 999),
    st.integers(100, 999),
    st.integers(1000, 9999),
)
CARDS = st.text(string.digits, min_size=15, max_size=15).flatmap(
    lambda body: st.sampled_from([luhn_card("4" + body[1:]), _grouped(luhn_card("4" + body[1:]))])
)
IBANS = st.text(string.digits, min_size=18, max_size=18).flatmap(
    lambda bban: st.sampled_from([german_iban(bban), _grouped(german_iban(bban))])
)
IPS = st.tuples(
    st.integers(11, 99), st.integers(0, 255), st.integers(0, 255), st.integers(1, 254)
).map(lambda t: ".".join(map(str, t)))
SECRETS = st.one_of(
    st.builds(
        "{}-{}".format,
        st.sampled_from(["sk", "sk-proj", "pk", "rk"]),
        st.text(ALNUM, min_size=20, max_size=48),
    ),
    st.builds("api_{}".format, st.text(ALNUM, min_size=16, max_size=40)),
    st.builds(
        "Bearer {}".format,
        st.text(ALNUM + "._~+/-", min_size=12, max_size=60).filter(
            lambda t: t[0] in ALNUM and t[-1] in ALNUM
        ),
    ),
    st.builds(
        "AKIA{}".format, st.text(string.ascii_uppercase + string.digits, min_size=16, max_size=16)
    ),
    st.builds("ghp_{}".format, st.text(ALNUM, min_size=36, max_size=36)),
)
PERSONAL = st.one_of(EMAILS, PHONES, CARDS, IBANS, IPS, SECRETS)
"""One piece of personal data or one credential, as people write them."""
