"""Fuzzing through a live worker: hostile requests in, arbitrary model text back.

The strategies and the accounting live in :mod:`bench.fuzz` (``python -m bench.fuzz``
runs the long campaign). Here: one short seeded campaign must account for every input
with the worker alive and no stage raising; the classes of input the campaign once
found to lose requests (values Avro cannot encode: lone surrogates, token counts beyond
an int, a request id that cannot be encoded) must now end in a terminal place, and every
hostile request id takes its exact route.
"""

from __future__ import annotations

import pytest

from bench import fuzz

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PER_FAMILY = 150


def test_fuzzed_inputs_are_all_accounted_for_and_the_worker_survives(
    kafka_bootstrap: str,
) -> None:
    outcome = fuzz.campaign(kafka_bootstrap, per_family=PER_FAMILY, seed_value=0, timeout_s=90)
    print(outcome.reasons)
    assert outcome.worker_alive
    assert outcome.missing == 0, outcome.examples_missing
    assert outcome.internal_errors == 0, outcome.examples_internal
    # Nothing crashed and nothing was redelivered, so each input was handled once.
    assert outcome.duplicates == 0
    # Every family ran in full, the hostile request ids included.
    sizes = {family: sum(routes.values()) for family, routes in outcome.by_family.items()}
    ids = len(fuzz.NASTY) + len(fuzz.NON_STRING_IDS)
    assert sizes == {
        "bytes": PER_FAMILY,
        "request": PER_FAMILY,
        "output": PER_FAMILY,
        "request_id": 2 * ids,
    }
    # The campaign must reach past validation, or it would only test the front door: some
    # hostile requests are answered, some arbitrary answers are parsed and routed.
    for family in ("request", "output"):
        routes = outcome.by_family[family]
        assert routes.get("result", 0) + routes.get("review", 0) > 0, outcome.by_family


def test_every_hostile_request_id_takes_its_exact_route(kafka_bootstrap: str) -> None:
    cases = fuzz.request_id_cases(lambda i: fuzz.tracking_id(f"{i:03d}")[:13] + f"{i:03d}")
    outcome = fuzz.campaign(kafka_bootstrap, cases=cases, timeout_s=60)
    assert outcome.worker_alive

    def matches(seen: tuple[str, str] | None, expected: tuple[str, str | None] | None) -> bool:
        assert expected is not None
        return seen is not None and seen[0] == expected[0] and expected[1] in (None, seen[1])

    wrong = {
        c.detail[:60]: (outcome.first_sighting.get(c.rid), c.expected)
        for c in cases
        if not matches(outcome.first_sighting.get(c.rid), c.expected)
    }
    assert not wrong, wrong
    assert outcome.duplicates == 0


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
