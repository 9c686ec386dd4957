"""The quality breaker across split processes: the issue's 0 ``quality_breaker_open`` case.

Two processes run ``--stages validate,model`` and two ``--stages settle,fallback``. The
model answers invalid JSON: the settle workers judge the answers, the model workers must
stop paying for them. Before llm.fleet this gave 0 ``quality_breaker_open`` results (the
model stage consulted a breaker only its own process's settle stage fed).

1. ``FIRST`` requests, invalid answers: the breaker opens (after ``MIN_CALLS`` judged
   answers; how many are called before the news is back depends on the machine's speed);
2. 60 more: every one of them is ``quality_breaker_open``, on partitions of *both* model
   workers, and the fake server sees not one call more;
3. the model answers well again: after the open interval the probes' good answers close
   the breaker on every model worker, and requests on both workers' partitions are
   answered by the model.

Printed: from the fleet record that opened the breaker (its broker timestamp) to each
model worker's first ``quality_breaker_open`` escalation, an upper bound on the propagation
(``runtime/test_fleet_link.py`` measures the record's own travel: ~100 ms).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from pipeline.contract import topology
from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Escalation
from pipeline.harness.environment import create_topics
from pipeline.harness.fakellm import running_fake_llm
from pipeline.harness.ledger import Ledger, read_terminal
from pipeline.harness.scenarios import SCENARIO_OVERRIDES, mixed_requests
from pipeline.resilience.breaker import BreakerConfig, BreakerState
from pipeline.resilience.fleet import FleetQualityBreaker
from pipeline.transport import headers as h
from pipeline.transport.reader import scan
from tests.e2e.fleet_support import (
    Processes,
    assignment,
    fleet_events,
    ledger_counts,
    processes,
    wait_for,
)
from tests.support import make_settings, produce

pytestmark = [pytest.mark.kafka]

MIN_CALLS = 10
FIRST = 2 * MIN_CALLS
OPEN_S = 6.0
REF = "ticket_triage@2"
OPEN = ("result:fallback", "quality_breaker_open")


def _send(settings, count: int, seed: int) -> list[str]:  # type: ignore[no-untyped-def]
    planned = mixed_requests(count, seed=seed, weights={"valid": 1}, prefix=f"q{seed}")
    produce(settings, "llm.requests", [(p.key, p.value, p.headers) for p in planned])
    return [p.request_id for p in planned]


def _done(settings, ids: list[str], workers: Processes) -> Ledger:  # type: ignore[no-untyped-def]
    workers.check_alive()
    ledger = read_terminal(settings, ids, timeout_s=90)
    assert not ledger.missing, f"missing {len(ledger.missing)}\n{workers.logs()}"
    assert not ledger.duplicates and not ledger.two_places, ledger_counts(ledger)
    return ledger


def _partitions(settings) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Request id -> its partition on llm.stage.validated (the model group's input)."""
    topic = settings.topic(topology.VALIDATED)
    out = {}
    for record in scan(settings, [topic], deadline_s=30):
        rid = h.text(record.headers_map, h.REQUEST_ID)
        if rid is not None:
            out[rid] = record.partition
    return out


def _opened_at(settings) -> float:  # type: ignore[no-untyped-def]
    """When the breaker opened for the fleet: fold llm.fleet's outcomes as a worker does,
    and take the broker timestamp of the record after which the breaker is open (0: none)."""
    config = BreakerConfig(
        window_size=50, min_calls=MIN_CALLS, failure_rate=0.5, open_s=OPEN_S, half_open_calls=5
    )
    fold = FleetQualityBreaker(config)
    for key, event, timestamp_ms in fleet_events(settings):
        if event is None or not key.startswith(f"quality:{REF}:"):
            continue
        fold.fold(REF, str(event.value["outcomes"]), bool(event.value.get("trip")))
        if fold.state(REF) is BreakerState.OPEN:
            return timestamp_ms / 1000
    return 0.0


def _first_open_per_member(settings, members: dict[int, str]) -> dict[str, float]:  # type: ignore[no-untyped-def]
    partitions = _partitions(settings)
    codec = Codec()
    first: dict[str, float] = {}
    for record in scan(settings, [settings.topic(topology.FALLBACK)], deadline_s=30):
        if record.value is None:
            continue
        content_type = h.text(record.headers_map, h.CONTENT_TYPE)
        escalation = codec.decode(record.value, Escalation, content_type)
        if escalation.reason != "quality_breaker_open":
            continue
        member = members.get(partitions.get(escalation.validated.request.request_id, -1))
        if member is not None:
            at = escalation.escalated_at.timestamp()
            first[member] = min(first.get(member, at), at)
    return first


def test_split_processes_open_and_close_the_quality_breaker_on_every_model_worker(
    kafka_bootstrap: str,
) -> None:
    with running_fake_llm(latency=0.05) as fake:
        settings = make_settings(
            kafka_bootstrap, model_base_url=fake.url, model_timeout_s=5.0, max_in_flight=8
        )
        create_topics(settings)
        env = {
            "LLMPIPE_QUALITY_BREAKER_MIN_CALLS": str(MIN_CALLS),
            "LLMPIPE_QUALITY_BREAKER_FAILURE_RATE": "0.5",
            "LLMPIPE_QUALITY_BREAKER_OPEN_S": str(OPEN_S),
            "LLMPIPE_BREAKER_MIN_CALLS": str(SCENARIO_OVERRIDES["breaker_min_calls"]),
        }
        with processes(settings, env) as workers:
            for name in ("model-1", "model-2"):
                workers.start(name, [topology.VALIDATE, topology.MODEL])
            for name in ("settle-1", "settle-2"):
                workers.start(name, [topology.SETTLE, topology.FALLBACK_STAGE])
            wait_for(
                lambda: len(set(assignment(settings, topology.MODEL).values())) == 2,
                "both model workers own partitions of llm.stage.validated",
                90,
                workers,
            )
            members = assignment(settings, topology.MODEL)

            # 1. Invalid answers: the settle workers' judgement opens the breaker.
            fake.configure(force_behavior="invalid_json")
            first = _send(settings, FIRST, 1)
            ledger1 = _done(settings, first, workers)
            routes1 = ledger1.reasons()
            assert routes1[("result:fallback", "invalid_output")] >= MIN_CALLS, routes1
            opened: list[float] = []
            wait_for(
                lambda: bool(opened.append(_opened_at(settings)) or opened[-1]),
                "a record on llm.fleet that opens the breaker",
                30,
                workers,
            )
            opened_at = opened[-1]

            # 2. Open on every model worker: no call at all, on every partition.
            calls_before = fake.counters()["total_calls"]
            second = _send(settings, 60, 2)
            ledger2 = _done(settings, second, workers)
            assert fake.counters()["total_calls"] == calls_before, "a model worker still calls"
            assert {(ledger2.first(i).outcome, ledger2.first(i).reason) for i in second} == {OPEN}
            partitions = _partitions(settings)
            seen_members = {members[partitions[i]] for i in second}
            assert seen_members == set(members.values()), "phase 2 missed a model worker"
            first_open = _first_open_per_member(settings, members)
            assert set(first_open) == set(members.values()), first_open
            propagation = {m: at - opened_at for m, at in first_open.items()}

            # 3. The model answers well again: probes after OPEN_S close it everywhere.
            fake.configure(force_behavior=None)
            wait_for(
                lambda: time.time() >= opened_at + OPEN_S + 1.0,
                "the open interval",
                OPEN_S + 30,
                workers,
            )
            closed_batch: list[str] = []
            batches = 0
            for batch in range(15):
                ids = _send(settings, 20, 10 + batch)
                ledger3 = _done(settings, ids, workers)
                batches += 1
                if all(ledger3.first(i).outcome == "result:model" for i in ids):
                    closed_batch = ids
                    break
            assert closed_batch, f"the breaker did not close in {batches} batches of 20"
            partitions = _partitions(settings)
            assert {members[partitions[i]] for i in closed_batch} == set(members.values())
            assert members == assignment(settings, topology.MODEL), "a rebalance meanwhile"
            closed_at = datetime.now(UTC)

    calls = fake.request_calls()
    # Calls redone: an invalid answer costs its call and one re-ask, nothing else.
    redone = {
        rid: sum(t.started for t in kinds.values())
        for rid, kinds in calls.items()
        if sum(t.started for t in kinds.values()) > 2
    }
    assert redone == {}, redone
    assert all(rid not in calls for rid in second), "a phase-2 request reached the model"
    print(
        f"split quality breaker: phase 1 {dict(routes1)}; phase 2: {len(second)} x "
        f"quality_breaker_open, 0 calls; from the opening record to each model worker's first "
        f"quality_breaker_open (an upper bound: phase 2 is sent once phase 1 is read back): "
        f"{', '.join(f'{v:.2f} s' for v in sorted(propagation.values()))}; closed after "
        f"{batches} batch(es) of 20 ({closed_at:%H:%M:%S}); ledger missing 0, duplicates 0, "
        f"two places 0, calls redone 0"
    )
