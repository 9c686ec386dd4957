"""Chaos, short enough for CI: workers join, leave, die and come back as zombies; the model
server dies and comes back. Every run ends with the ledger, every sighting checked.

The scenarios live in :mod:`bench.chaos` (``python -m bench.chaos`` runs the long
versions in both delivery modes and writes a report); these tests run them small, in the
default mode (exactly-once hops), and scaling at least once too (its commits run beside the
fetch, which a revocation must not wait for). The kill and broker-outage runs, in both
modes, are in ``tests/e2e/test_pipeline_crash.py``.
"""

from __future__ import annotations

import pytest

from bench import chaos

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
# Inside pytest's 300 s per test: a stuck scenario fails with its event log instead.
DEADLINE_S = 270.0


@pytest.mark.parametrize("mode", ["exactly_once", "at_least_once"])
def test_scaling_up_and_down_under_load_loses_and_repeats_nothing(
    kafka_bootstrap: str, mode: str
) -> None:
    """One worker; a second and a third join mid-stream; one leaves with SIGTERM, one is
    SIGKILLed. Cooperative rebalancing: the others keep producing meanwhile.

    At least once, each stage commits on a thread of its own: a revocation that waited for
    the commit in flight deadlocked the consumer (librdkafka answers that commit only after
    the revocation returns) and held its group in PREPARING_REBALANCE for a minute, so
    ``wait_groups_stable`` timed out. Copies after the SIGKILL are allowed in that mode
    (judged request by request in ``test_pipeline_crash``); lost requests, two terminal
    places and wrong routes are not, in either mode.
    """
    outcome = chaos.scaling(kafka_bootstrap, mode, requests=1_200, deadline_s=DEADLINE_S)
    why = outcome.explain()
    print(why)
    assert outcome.missing == 0, why
    if mode == "exactly_once":
        assert outcome.duplicates == 0, why
    assert outcome.two_places == 0, why
    assert outcome.wrong_route == 0, why
    assert len(outcome.details["membership_changes"]) == 4, why
    assert outcome.details["survivor_alive"], why
    gaps = outcome.details["longest_output_gap_s"]
    assert set(gaps) == {"validate", "model", "settle+fallback"}, why


def test_a_zombie_worker_cannot_commit_after_its_partitions_moved(kafka_bootstrap: str) -> None:
    """SIGSTOP a busy worker until a replacement owns its partitions, then SIGCONT it: its
    finished work must be fenced off, and the replacement's redo is the only copy."""
    outcome = chaos.fencing(kafka_bootstrap, "exactly_once", requests=500, deadline_s=DEADLINE_S)
    why = outcome.explain()
    print(why)
    assert outcome.details["zombie_calls_in_flight_when_frozen"] >= 30, why
    # The replacement redid every call the zombie was frozen in: had the zombie committed
    # its own answers too, each would be a duplicate below.
    assert outcome.details["frozen_requests_called_again"] == outcome.details["frozen_requests"]
    assert outcome.missing == 0, why
    assert outcome.duplicates == 0, why
    assert outcome.two_places == 0, why
    assert outcome.wrong_route == 0, why
    assert outcome.details["replacement_alive"], why
    # Fenced as a static member (a fatal consumer error), the zombie exits 1 by itself with
    # one line saying why, for its supervisor to see, instead of staying up idle.
    assert outcome.details["zombie_exit_code"] == 1, why
    (line,) = outcome.details["zombie_error_lines"]
    assert "fenced" in line.lower(), why


def test_model_server_dies_and_comes_back(kafka_bootstrap: str) -> None:
    outcome = chaos.model_server_restart(
        kafka_bootstrap, "exactly_once", requests=400, deadline_s=DEADLINE_S
    )
    why = outcome.explain()
    print(why)
    assert outcome.missing == 0, why
    # No worker died and no commit failed: nothing may be delivered twice, anywhere.
    assert outcome.duplicates == 0, why
    assert outcome.two_places == 0, why
    assert outcome.details["worker_alive"], why
    # Every sighting (not only the first) is a model answer or a fallback for a model
    # reason: the outage may only move requests to the fallback path, and it did move some
    # (an empty set of sightings would satisfy a subset check).
    assert set(outcome.details["sighting_outcomes"]) == {"result:model", "result:fallback"}, why
    assert outcome.details["off_model_reasons"] == [], why
    assert outcome.details["model_answers_after_restart"] > 0, why
