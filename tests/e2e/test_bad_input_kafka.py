"""Hostile bytes on llm.requests: each becomes a dead letter, the worker keeps going."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import Settings
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.harness.scenarios import mixed_requests
from tests.support import produce, running_worker

pytestmark = pytest.mark.kafka

NESTED = (
    b'{"request_id": "deep", "prompt": "ticket_triage", "variables": '
    + b'{"a":' * 5000
    + b"1"
    + b"}" * 5000
    + b"}"
)
HOSTILE: list[tuple[str, bytes, str]] = [
    ("not-json", b"hello, this is not a request", "decode_error"),
    ("bad-utf8", b'{"request_id": "\xff\xfe", "prompt": "x"}', "decode_error"),
    ("wrong-avro", b"\x02\x04\x06\x08\x0a\x0c", "decode_error"),
    (
        "five-mb",
        b'{"request_id": "big", "prompt": "ticket_triage", "variables": {"body": "'
        + b"A" * 5_000_000
        + b'"}}',
        "too_large",
    ),
    ("deep-json", NESTED, "decode_error"),
    (
        "unknown-prompt",
        json.dumps({"request_id": "u", "prompt": "nope", "variables": {}}).encode(),
        "unknown_prompt",
    ),
    ("missing-fields", json.dumps({"request_id": "m"}).encode(), "invalid_envelope"),
    ("array", b"[1, 2, 3]", "decode_error"),
    ("empty", b"", "decode_error"),
]


def _arbitrary_payloads() -> list[bytes]:
    drawn: list[bytes] = []

    @settings(max_examples=100, database=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(min_size=1, max_size=4096))
    def collect(value: bytes) -> None:
        drawn.append(value)

    collect()
    return drawn


def test_hostile_inputs_become_dead_letters_and_good_ones_still_pass(
    kafka_settings: Settings,
) -> None:
    good = mixed_requests(len(HOSTILE), seed=2, weights={"valid": 1})
    messages = []
    for (name, value, _), follower in zip(HOSTILE, good, strict=True):
        messages.append((name.encode(), value, [("x-request-id", name.encode())]))
        messages.append((follower.key, follower.value, follower.headers))
    fuzz = [f"fuzz-{i}" for i in range(len(_arbitrary_payloads()))]
    for rid, value in zip(fuzz, _arbitrary_payloads(), strict=True):
        messages.append((rid.encode(), value, [("x-request-id", rid.encode())]))
    with running_fake_llm() as fake:
        settings = kafka_settings.model_copy(update={"model_base_url": fake.url})
        with running_worker(settings):
            produce(settings, "llm.requests", messages)
            expected = [n for n, _, _ in HOSTILE] + [g.request_id for g in good] + fuzz
            ledger = read_terminal(settings, expected, timeout_s=60, settle_s=1)
    assert not ledger.missing and not ledger.duplicates
    for name, _, reason in HOSTILE:
        sighting = ledger.first(name)
        assert (sighting.route, sighting.reason) == ("dead_letter", reason), name
    for g in good:
        assert ledger.first(g.request_id).outcome == "result:model"
    for rid in fuzz:
        assert ledger.first(rid).route == "dead_letter"
    five_mb = ledger.first("five-mb")
    assert five_mb.value is not None and len(five_mb.value) > 5_000_000, (
        "dead letter keeps the original bytes"
    )
