"""The redactor finds personal data and secrets, leaves look-alikes alone, and stays linear."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.observability.redact import Redactor

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
    "text", ["a" * 1_200_000, "a." * 600_000, "7" * 1_200_000, "a@b." * 300_000]
)
def test_megabyte_inputs_finish(text: str) -> None:
    """Pathological runs once made the e-mail pattern quadratic (minutes per megabyte)."""
    assert len(R.text(text)) >= len(text) // 2


@given(st.emails(), st.text(alphabet=st.characters(blacklist_characters="@"), max_size=40))
def test_generated_emails_never_survive(email: str, filler: str) -> None:
    assert email not in R.text(f"{filler} {email} {filler}")
