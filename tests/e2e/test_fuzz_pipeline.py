"""Fuzzing through a live worker: hostile requests in, arbitrary model text back.

The strategies and the accounting live in :mod:`bench.fuzz` (``python -m bench.fuzz``
runs the long campaign). Here: one short seeded campaign must account for every input
with the worker alive and no stage raising; the classes of input the campaign once
found to lose requests (values Avro cannot encode: lone surrogates, token counts beyond
an int) must now end in a terminal place, including a request id that cannot be encoded.
"""

from __future__ import annotations

import pytest

from bench import fuzz

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_fuzzed_inputs_are_all_accounted_for_and_the_worker_survives(
    kafka_bootstrap: str,
) -> None:
    outcome = fuzz.campaign(
        kafka_bootstrap, per_family=150, seed_value=0, known_bugs=False, timeout_s=60
    )
    print(outcome.reasons)
    assert outcome.worker_alive
    assert outcome.missing == 0, outcome.examples_missing
    assert outcome.internal_errors == 0, outcome.examples_internal
    # Nothing crashed and nothing was redelivered, so each input was handled once.
    assert outcome.duplicates == 0
    # The campaign must reach past validation, or it would only test the front door.
    assert outcome.reasons.get("request:result/-", 0) > 0, outcome.reasons


def test_unencodable_values_still_end_in_a_terminal_place(kafka_bootstrap: str) -> None:
    answer = '{"label": "bug", "priority": "low", "summary": "Dashboard shows an error."}'
    cases = [
        fuzz.request_case(
            rid := fuzz.tracking_id("s"),
            {
                "request_id": rid,
                "prompt": "ticket_triage",
                "variables": {"subject": "lone \ud800 surrogate", "body": "in the request"},
            },
        ),
        fuzz.output_case(fuzz.tracking_id("o"), {"content": "model says \ud800"}),
        fuzz.output_case(
            fuzz.tracking_id("u"), {"content": answer, "usage": {"prompt_tokens": 2**64}}
        ),
        fuzz.output_case(
            fuzz.tracking_id("f"), {"content": answer, "usage": {"completion_tokens": 1e300}}
        ),
    ]
    outcome = fuzz.campaign(kafka_bootstrap, cases=cases, timeout_s=15)
    assert outcome.worker_alive
    assert outcome.missing == 0, outcome.examples_missing


def test_unencodable_request_id_without_a_header_is_dead_lettered(kafka_bootstrap: str) -> None:
    rid = fuzz.tracking_id("h")
    body = fuzz.request_case(
        rid, {"request_id": rid + "\ud800", "prompt": "ticket_triage", "variables": {}}
    )
    # The same request, minus the header that would otherwise give the dead letter its id.
    headless = fuzz.Case("request", rid, body.value, [("content-type", b"application/json")], "")
    outcome = fuzz.campaign(kafka_bootstrap, cases=[headless], timeout_s=15)
    assert outcome.worker_alive
    assert outcome.missing == 0, outcome.examples_missing
