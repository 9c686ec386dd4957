"""An account-wide rate limit shared by three worker processes, through a SIGKILL and a rejoin.

The account allows ``LIMIT`` calls per minute to gpt-4o-mini (ticket_triage@2's model; its
fallback model is switched off, so every call is to the limited model) and ``CAP`` calls
in flight. Requests arrive at three times the limit, each with a deadline, so the excess
leaves by deadline (``deadline_exceeded``, or refused by the limiter when its wait would
pass the deadline) instead of piling up. Scaled down so the test is short: the calls per
minute are measured over ``WINDOW_S`` windows (a window holds ``LIMIT / 60 * WINDOW_S``
calls at the limit).

1. three workers: calls per window within 0.9-1.05x of the limit, at most ``CAP`` in flight;
2. SIGKILL one: from the moment the group has rebalanced (the two survivors own every
   partition), the two use the freed share: >= 0.9x;
3. add a worker back: once it owns partitions, still <= 1.05x and at most ``CAP`` in flight.

Ends with the ledger: every request found exactly once, none in two places, and the calls
the kill made the pipeline pay again (requests called more than once) reported and bounded.
"""

from __future__ import annotations

import json
import time

import pytest

from pipeline.contract import topology
from pipeline.control.state import ENDPOINT_ENABLED, flag_key
from pipeline.control.topic import publish
from pipeline.harness.environment import create_topics
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import read_terminal
from pipeline.harness.scenarios import SCENARIO_OVERRIDES
from tests.e2e.fleet_support import (
    CallSampler,
    OfferedLoad,
    Processes,
    assignment,
    ledger_counts,
    processes,
    wait_for,
)
from tests.support import make_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LIMIT = 600
CAP = 6
WINDOW_S = 20.0
PER_WINDOW = LIMIT / 60 * WINDOW_S
OFFERED_PER_S = 3 * LIMIT / 60
DEADLINE_S = 10.0
LATENCY_S = 0.4  # at the limit ~4 calls are in flight: the cap of 6 is close to binding
FALLBACK_MODEL = "claude-3-5-haiku-latest"
MAX_REDONE = 20


def _members(settings) -> int:  # type: ignore[no-untyped-def]
    return len(set(assignment(settings, topology.MODEL).values()))


def _window(calls: CallSampler, start: float, workers: Processes, fake) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Calls in ``[start, start + WINDOW_S]`` as a multiple of the limit, and the most calls
    in flight at the server meanwhile."""
    fake.reset_counters()  # max_in_flight from now; the sampler's counts are unaffected
    wait_for(lambda: time.monotonic() >= start + WINDOW_S, "the window", WINDOW_S + 30, workers)
    return calls.between(start, start + WINDOW_S) / PER_WINDOW, fake.counters()["max_in_flight"]


def test_three_workers_share_an_account_limit_through_a_kill_and_a_rejoin(
    kafka_bootstrap: str,
) -> None:
    limits = {
        "gpt-4o-mini": {
            "requests_per_minute": LIMIT,
            "request_burst": 2,
            "max_in_flight": CAP,
        }
    }
    with running_fake_llm(latency=LATENCY_S) as fake:
        settings = make_settings(
            kafka_bootstrap, model_base_url=fake.url, model_timeout_s=15.0, max_in_flight=64
        )
        create_topics(settings)
        publish(settings, flag_key(ENDPOINT_ENABLED, FALLBACK_MODEL), False, "test", "one model")
        env = {
            "LLMPIPE_MODEL_RATE_LIMITS": json.dumps(limits),
            "LLMPIPE_BREAKER_MIN_CALLS": str(SCENARIO_OVERRIDES["breaker_min_calls"]),
        }
        load = OfferedLoad(settings, OFFERED_PER_S, "rl", DEADLINE_S)
        with processes(settings, env) as workers, CallSampler(fake) as calls:
            for name in ("w1", "w2", "w3"):
                workers.start(name)
            wait_for(lambda: _members(settings) == 3, "three model workers", 120, workers)
            load.start()
            try:
                warm = time.monotonic() + 5.0
                wait_for(lambda: time.monotonic() >= warm, "the warm-up", 30, workers)
                three, in_flight_three = _window(calls, time.monotonic(), workers, fake)

                killed_at = time.monotonic()
                workers.kill("w3")
                wait_for(lambda: _members(settings) == 2, "the rebalance", 60, workers)
                rebalanced_at = time.monotonic()
                two, _ = _window(calls, rebalanced_at, workers, fake)
                since_kill = calls.between(killed_at, killed_at + WINDOW_S) / PER_WINDOW

                workers.start("w4")
                wait_for(lambda: _members(settings) == 3, "the rejoin", 120, workers)
                rejoined, in_flight_rejoined = _window(calls, time.monotonic(), workers, fake)
            finally:
                load.stop()
            ledger = read_terminal(settings, load.ids, timeout_s=DEADLINE_S + 120)
            workers.check_alive()

    counts = ledger_counts(ledger)
    per_request = fake.request_calls()
    redone = {
        rid: n - 1
        for rid, kinds in per_request.items()
        if (n := sum(t.started for t in kinds.values())) > 1
    }
    outcomes = ledger.reasons()
    summary = (
        f"account limit {LIMIT}/min over {WINDOW_S:.0f} s windows, offered {OFFERED_PER_S * 60:.0f}"
        f"/min: 3 workers {three:.3f}x (max in flight {in_flight_three}/{CAP}); after SIGKILL "
        f"+ rebalance ({rebalanced_at - killed_at:.1f} s) 2 workers {two:.3f}x (the "
        f"{WINDOW_S:.0f} s from the kill itself: {since_kill:.3f}x); rejoined {rejoined:.3f}x "
        f"(max in flight {in_flight_rejoined}/{CAP}); {len(load.ids)} requests: {dict(outcomes)}; "
        f"ledger {counts}, calls redone {sum(redone.values())}"
    )
    print(summary)
    assert counts == {"missing": 0, "duplicates": 0, "two_places": 0}, summary
    assert 0.9 <= three <= 1.05, summary
    assert in_flight_three <= CAP and in_flight_rejoined <= CAP, summary
    assert two >= 0.9, summary
    assert rejoined <= 1.05, summary
    assert sum(redone.values()) <= MAX_REDONE, summary
    assert outcomes[("result:model", "-")] > 0
    assert set(outcomes) <= {
        ("result:model", "-"),
        ("result:fallback", "deadline_exceeded"),
        ("result:fallback", "model_rate_limited"),
        ("result:fallback", "model_unavailable"),
        ("result:fallback", "model_timeout"),  # a call whose deadline ran out while paced
    }, outcomes
