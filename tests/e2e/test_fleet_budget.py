"""A daily token budget that survives SIGKILLing every worker and is shared by the fleet.

Two worker processes spend about half of ticket_triage's daily budget, then both are
SIGKILLed with calls in flight and two new ones start (new ids: a deploy). Far more requests
than the rest of the budget pays for follow. Before llm.fleet the restarted workers started
the day at zero and spent the whole budget again.

The spend the provider saw is counted at the fake server: every call it started, at the
usage it reports for that request's text (the same text always reports the same usage), so
calls cut off by the kill and redone count twice, as a provider would bill them. It must
not exceed the budget by more than what was in flight at the kill; and the fleet must
have stopped calling: all the requests after the restart but what the rest of the budget
pays for end ``budget_exceeded``.

Reservations are published within milliseconds of being made (not at the next 100 ms
flush), so the calls in flight at the kill are known to the restarted fleet, as spent: the
overshoot is bounded by the calls in flight at the kill (they are paid again when redone).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline.contract import topology
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Completion
from pipeline.harness.environment import create_topics
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import Ledger, read_terminal
from pipeline.harness.scenarios import PROMPT, SCENARIO_OVERRIDES, TICKETS
from pipeline.transport import headers as h
from pipeline.transport.batch import BULK_TIMEOUT_S, produce_batch
from pipeline.transport.reader import scan
from tests.e2e.fleet_support import (
    Processes,
    fleet_events,
    ledger_counts,
    processes,
    valid_request,
)
from tests.support import make_settings

pytestmark = [pytest.mark.kafka]

BUDGET = 12_000
MAX_IN_FLIGHT = 4
WORKERS = ("a", "b")
AFTER_RESTART = 120


def _send(settings, prefix: str, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    ids = [f"{prefix}-{i:04d}" for i in range(count)]
    messages = [
        (rid.encode(), valid_request(rid, None, i), [("content-type", b"application/json")])
        for i, rid in enumerate(ids)
    ]
    produce_batch(settings, topology.REQUESTS, messages, timeout_s=BULK_TIMEOUT_S)
    return ids


def _ticket(request_id: str) -> int:
    return int(request_id.rsplit("-", 1)[1]) % len(TICKETS)


def _usage_per_ticket(ledger: Ledger) -> dict[int, int]:
    usage: dict[int, int] = {}
    for rid, sightings in ledger.seen.items():
        result = sightings[0].result
        if result is not None and result.source == "model" and result.usage is not None:
            used = result.usage.prompt_tokens + result.usage.completion_tokens
            usage[_ticket(rid)] = used
    return usage


def _done(settings, ids: list[str], workers: Processes) -> Ledger:  # type: ignore[no-untyped-def]
    workers.check_alive()
    ledger = read_terminal(settings, ids, timeout_s=120, settle_s=1.0)
    assert not ledger.missing, f"missing {len(ledger.missing)}\n{workers.logs()}"
    return ledger


def _completions(settings, ids: list[str]) -> dict[str, Completion]:  # type: ignore[no-untyped-def]
    """The completions on llm.stage.completions by request id."""
    codec = Codec()
    found: dict[str, Completion] = {}
    topic = settings.topic(topology.COMPLETIONS)
    for record in scan(settings, [topic], deadline_s=30):
        content_type = h.text(record.headers_map, h.CONTENT_TYPE)
        completion = codec.decode(record.value or b"", Completion, content_type)
        found[completion.validated.request.request_id] = completion
    return {rid: found[rid] for rid in ids if rid in found}


def test_a_budget_half_spent_survives_sigkilling_every_worker(kafka_bootstrap: str) -> None:
    with running_fake_llm(latency=0.3) as fake:
        settings = make_settings(
            kafka_bootstrap,
            model_base_url=fake.url,
            model_timeout_s=10.0,
            max_in_flight=MAX_IN_FLIGHT,
        )
        create_topics(settings)
        env = {
            "LLMPIPE_PROMPT_DAILY_TOKENS": json.dumps({PROMPT: BUDGET}),
            "LLMPIPE_BREAKER_MIN_CALLS": str(SCENARIO_OVERRIDES["breaker_min_calls"]),
        }
        with processes(settings, env) as workers:
            for name in WORKERS:
                workers.start(name)
            # Spend about half, batch by batch.
            sent: list[str] = []
            spent = 0
            batch = 0
            while spent < BUDGET / 2:
                ids = _send(settings, f"half{batch}", 3)
                sent += ids
                ledger = _done(settings, sent, workers)
                usage = _usage_per_ticket(ledger)
                spent = sum(
                    usage.get(_ticket(rid), 0)
                    for rid in sent
                    if ledger.first(rid).outcome == "result:model"
                )
                batch += 1
                assert batch < 20, f"half the budget not spent in {batch} batches: {spent}"
            half = spent
            # A batch in flight, then SIGKILL every worker.
            cut = _send(settings, "cut", 8)
            fake.wait_live_in_flight(2, timeout=60)
            in_flight_at_kill = fake.live_in_flight()
            for name in WORKERS:
                workers.kill(name)
            for name in ("a2", "b2"):
                workers.start(name)
            rest = _send(settings, "rest", AFTER_RESTART)
            everything = sent + cut + rest
            ledger = _done(settings, everything, workers)

    counts = ledger_counts(ledger)
    usage = _usage_per_ticket(ledger)
    calls = fake.request_calls()
    started = {rid: sum(t.started for t in kinds.values()) for rid, kinds in calls.items()}
    largest = max(usage.values())
    # A text no model result reports the usage of (its calls were cut off, then refused)
    # is counted at the largest usage seen: never less than the provider would bill.
    provider_spend = sum(
        n * usage.get(_ticket(rid), largest) for rid, n in started.items() if rid != "-"
    )
    redone = sum(n - 1 for n in started.values() if n > 1)
    outcomes = Counter((ledger.first(r).outcome, ledger.first(r).reason) for r in everything)
    allowed_overshoot = in_flight_at_kill * largest
    overshoot = provider_spend - BUDGET
    summary = (
        f"budget {BUDGET} tokens: {half} spent before the kill ({len(sent)} requests), "
        f"{in_flight_at_kill} calls in flight at the SIGKILL of both workers; after the "
        f"restart the provider's total is {provider_spend} ({overshoot:+d} vs the budget; "
        f"allowed +{allowed_overshoot} = in flight x {largest} tokens); outcomes "
        f"{dict(outcomes)}; ledger {counts}, calls redone {redone}"
    )
    print(summary)
    assert counts == {"missing": 0, "duplicates": 0, "two_places": 0}, summary
    assert overshoot <= allowed_overshoot, summary
    # The fleet stopped calling: most of the requests after the restart were refused, and
    # the model answered at most what the remaining half of the budget pays for. Which of
    # them were answered is not asserted: the partitions are served side by side, and a
    # call that ends under its reservation (the estimate) frees room a later one may use.
    refused = outcomes[("result:fallback", "budget_exceeded")]
    assert refused >= AFTER_RESTART - (BUDGET - half) // min(usage.values()), summary
    assert redone <= in_flight_at_kill, summary


def test_a_worker_stopped_with_calls_in_flight_leaves_with_its_spend_settled(
    kafka_bootstrap: str,
) -> None:
    """SIGTERM with calls in flight: the stages drain (the calls finish, are charged and
    their completions written; settling them is left to the next worker),
    and only then does the worker publish its spend and delete its lease. Its last spend
    record must therefore hold the calls' tokens and no reservation: one that still
    reserved them would hold budget for calls long over, for the rest of the day."""
    in_flight = MAX_IN_FLIGHT
    with running_fake_llm(latency=1.5) as fake:
        settings = make_settings(
            kafka_bootstrap,
            model_base_url=fake.url,
            model_timeout_s=10.0,
            max_in_flight=in_flight,
        )
        create_topics(settings)
        env = {"LLMPIPE_PROMPT_DAILY_TOKENS": json.dumps({PROMPT: BUDGET})}
        with processes(settings, env) as workers:
            process = workers.start("a")
            ids = _send(settings, "term", in_flight)
            fake.wait_live_in_flight(in_flight, timeout=60)
            process.terminate()
            exit_code = process.wait(60)
            logs = workers.logs()
        completions = _completions(settings, ids)
    assert exit_code == 0, logs
    assert sorted(completions) == ids, f"the calls in flight finished: {completions}\n{logs}"
    charged = sum(c.usage.prompt_tokens + c.usage.completion_tokens for c in completions.values())
    assert charged > 0, f"no completion reports its usage: {completions}"
    events = fleet_events(settings)
    left = [key for key, event, _ in events if key.startswith("lease:") and event is None]
    assert len(left) == 1, f"one lease tombstone expected, got {left}"
    worker = left[0].removeprefix("lease:")
    spend = [
        (event, at)
        for key, event, at in events
        if key.startswith("spend:") and key.endswith(f":{worker}") and event is not None
    ]
    assert spend, f"worker {worker} published no spend"
    last, last_at = spend[-1]
    tombstone_at = next(at for key, event, at in events if key == left[0] and event is None)
    assert last.value["reserved"] == 0, f"still reserved when it left: {last.value}"
    assert last.value["tokens"] == charged, f"spend {last.value} vs {charged} charged"
    assert last_at <= tombstone_at, "the spend went out before the lease tombstone"
