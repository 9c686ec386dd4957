"""The fleet's shared state, folded without Kafka: every worker folds the same records in the
same order, so these tests fold records by hand and check what each worker decides."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime

import pytest

from pipeline.contract.envelopes import FleetEvent
from pipeline.llm.protocol import ChatRequest, ModelError
from pipeline.resilience.breaker import (
    BreakerClient,
    BreakerConfig,
    BreakerState,
)
from pipeline.resilience.budget import PromptUsage
from pipeline.resilience.errors import CircuitOpen
from pipeline.resilience.fleet import (
    GROW_AFTER_S,
    EndpointNews,
    FleetQualityBreaker,
    FleetShares,
    FleetSpend,
    FleetState,
    allocate,
    split_slots,
)
from pipeline.resilience.ratelimit import Demand, RateLimit, RateLimitedClient
from pipeline.resilience.testing import ManualClock, ScriptedClient, echo
from tests.support import until

QUALITY = BreakerConfig(window_size=10, min_calls=4, failure_rate=0.5, open_s=30, half_open_calls=2)
ENDPOINT = BreakerConfig(window_size=4, min_calls=2, failure_rate=0.5, open_s=10)


def req(model: str) -> ChatRequest:
    return ChatRequest(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8)


def state(me: str, clock: ManualClock) -> FleetState:
    return FleetState(
        me=me,
        quality=FleetQualityBreaker(QUALITY, clock=clock),
        news=EndpointNews(ENDPOINT),
        shares=FleetShares(me, clock=clock),
        spend=FleetSpend(me),
        clock=clock,
    )


def carry(records: list[tuple[str, FleetEvent | None]], *workers: FleetState) -> None:
    """What the topic does: every worker folds every record, its own included."""
    for key, event in records:
        for worker in workers:
            worker.apply(event, key)


def test_the_quality_breaker_opens_on_every_worker_from_another_workers_outcomes() -> None:
    clock = ManualClock()
    settle, model_a, model_b = (state(n, clock) for n in ("settle", "model-a", "model-b"))
    for _ in range(4):
        settle.quality.record("p@1", ok=False)  # queued, not applied locally
    assert settle.quality.state("p@1") is BreakerState.CLOSED
    carry(settle.flush(), settle, model_a, model_b)
    for worker in (settle, model_a, model_b):
        assert worker.quality.state("p@1") is BreakerState.OPEN
        assert not worker.quality.allow("p@1")
    # After open_s each model worker lets probes through; the settle worker's judgement
    # of them (two good answers) closes the breaker everywhere.
    clock.advance(QUALITY.open_s)
    assert model_a.quality.allow("p@1") and model_b.quality.allow("p@1")
    settle.quality.record("p@1", ok=True)
    settle.quality.record("p@1", ok=True)
    carry(settle.flush(), settle, model_a, model_b)
    assert {w.quality.state("p@1") for w in (settle, model_a, model_b)} == {BreakerState.CLOSED}


def test_a_trip_and_old_outcomes() -> None:
    clock = ManualClock()
    judge, gate = state("judge", clock), state("gate", clock)
    judge.quality.trip("p@2")
    records = judge.flush()
    carry(records, judge, gate)
    assert gate.quality.state("p@2") is BreakerState.OPEN
    # A worker starting later ignores batches older than the open interval.
    clock.advance(QUALITY.open_s + 1)
    late = state("late", clock)
    carry(records, late)
    assert late.quality.state("p@2") is BreakerState.CLOSED
    assert late.ignored == 1


async def test_endpoint_news_opens_the_others_breakers_without_their_own_failing_calls() -> None:
    clock = ManualClock()
    first, second = state("first", clock), state("second", clock)
    failing = ModelError("server_error", "500", status=500)
    scripted = {
        "first": ScriptedClient(failing, failing, default=echo),
        "second": ScriptedClient(default=echo),
    }
    breakers = {}
    for worker in (first, second):
        breakers[worker.me] = BreakerClient(
            scripted[worker.me], ENDPOINT, clock=clock, on_state_change=worker.news.on_state_change
        )
        worker.news.attach(breakers[worker.me])
    for _ in range(2):
        with pytest.raises(ModelError, match="500"):
            await breakers["first"].complete(req("m"))
    assert breakers["first"].states()["m"] is BreakerState.OPEN
    carry(first.flush(), first, second)
    assert breakers["second"].breaker("m").state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await breakers["second"].complete(req("m"))
    assert scripted["second"].calls == []  # no probe storm of its own
    assert second.flush() == []  # news applied is not news again
    # The first worker's probe succeeds after the open interval: both close.
    clock.advance(ENDPOINT.open_s)
    await breakers["first"].complete(req("m"))
    carry(first.flush(), first, second)
    assert breakers["second"].breaker("m").state is BreakerState.CLOSED


def test_allocation_is_max_min_fair_and_adds_up() -> None:
    busy = Demand(0.0, saturated=True)
    assert allocate({"a": busy, "b": busy, "c": busy}, 600) == pytest.approx(
        {"a": 200, "b": 200, "c": 200}
    )
    # An idle member keeps a floor (10 % of an equal share), the busy ones split the rest.
    idle = Demand(0.0, saturated=False)
    shares = allocate({"a": busy, "b": busy, "idle": idle}, 600)
    assert shares["idle"] == pytest.approx(20)
    assert shares["a"] == pytest.approx(290) and sum(shares.values()) == pytest.approx(600)
    # Light users get what they use plus headroom; nobody busy: the rest is spread.
    light = allocate({"a": Demand(60, False), "b": Demand(120, False)}, 600)
    assert light["a"] == pytest.approx(75 + (600 - 75 - 150) / 2)
    assert sum(light.values()) == pytest.approx(600)
    assert allocate({}, 600) == {}


def test_slots_add_up_to_the_cap_without_a_floor() -> None:
    third = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    for epoch in range(20):
        slots = split_slots(third, 2, epoch)
        assert sum(slots.values()) == 2 and max(slots.values()) == 1
    # Over epochs every member gets a slot some of the time.
    assert {m for e in range(20) for m, n in split_slots(third, 2, e).items() if n} == set(third)
    assert split_slots({"a": 0.5, "b": 0.5}, 9, 0) in ({"a": 5, "b": 4}, {"a": 4, "b": 5})


def test_a_larger_slot_share_waits_until_the_others_have_shrunk() -> None:
    clock = ManualClock()
    me = FleetShares("me", clock=clock)
    assert me.slots("m", 6) == 6  # alone from the start: the whole cap at once
    busy = {"models": {"m": {"rate": 0, "saturated": True}}}
    me.set_own({"m": Demand(0, True)})
    me.fold("b", busy, age_s=0.0)
    me.fold("c", busy, age_s=0.0)
    assert me.slots("m", 6) == 2  # smaller: at once
    me.fold("c", None, age_s=0.0)
    assert me.slots("m", 6) == 2  # larger (3): only after GROW_AFTER_S
    clock.advance(GROW_AFTER_S)
    assert me.slots("m", 6) == 3
    joiner = FleetShares("new", clock=clock)
    joiner.set_own({"m": Demand(0, True)})
    joiner.fold("me", busy, age_s=0.0)
    assert joiner.slots("m", 6) == 0  # the others have not seen it yet
    clock.advance(GROW_AFTER_S)
    assert joiner.slots("m", 6) == 3


def test_leases_expire_and_tombstones_leave_at_once() -> None:
    clock = ManualClock()
    me = FleetShares("me", ttl_s=5, clock=clock)
    busy = {"models": {"m": {"rate": 100, "saturated": True}}}
    me.set_own({"m": Demand(100, True)})
    me.fold("b", busy, age_s=0.0)
    me.fold("c", busy, age_s=0.0)
    assert me.fraction("m") == pytest.approx(1 / 3)
    me.fold("stale", busy, age_s=6.0)  # an old lease read at start: its worker is gone
    assert me.members() == ["b", "c", "me"]
    clock.advance(4)
    me.fold("c", busy, age_s=0.0)  # c renews, b does not
    me.heard()
    clock.advance(2)
    assert me.expire() and me.members() == ["c", "me"]
    assert me.fraction("m") == pytest.approx(1 / 2)
    me.fold("c", None, age_s=0.0)  # c stops cleanly: its tombstone
    assert me.members() == ["me"] and me.fraction("m") == 1.0
    me.fold("b", busy, age_s=0.0)
    clock.advance(10)  # nothing heard for longer than a TTL: cut off, not alone
    assert not me.expire() and me.members() == ["b", "me"]
    me.heard()
    assert me.expire() and me.members() == ["me"]


def test_spend_is_the_sum_of_every_other_worker_key() -> None:
    day = date(2026, 12, 1)
    spend = FleetSpend("me")
    spend.fold(day, "p", "gone", {"tokens": 300, "reserved": 50, "usd": 0.5})
    spend.fold(day, "p", "other", {"tokens": 100, "reserved": 0, "usd": 0.25})
    spend.fold(date(2026, 11, 30), "p", "other", {"tokens": 9999})
    spend.fold(day, "p", "me", {"tokens": 40, "reserved": 2})  # an earlier life of this id
    assert spend.others(day, "p") == (450, 0.75)
    assert spend.carried(day, "p") == (42, 0.0)
    spend.report("p", PromptUsage(day, spent=50, reserved=10))
    fleet = FleetState(
        "me", FleetQualityBreaker(), EndpointNews(ENDPOINT), FleetShares("me"), spend
    )
    key, event = fleet.flush()[0]
    assert key == "spend:2026-12-01:p:me"
    assert event is not None and event.value["tokens"] == 50 and event.value["reserved"] == 10


@pytest.mark.timeout(20)
async def test_a_rescale_re_times_calls_already_waiting() -> None:
    """A worker whose share doubles (another one died) must not keep pacing its waiting
    calls at the old rate: their wait is recomputed at the new one."""
    clock = ManualClock(auto_advance=False)
    shares = FleetShares("me", clock=clock)
    shares.set_own({"m": Demand(0, True)})
    shares.fold("other", {"models": {"m": {"rate": 0, "saturated": True}}}, age_s=0.0)
    limiter = RateLimitedClient(
        ScriptedClient(default=echo),
        {"m": RateLimit(requests_per_minute=60, request_burst=2)},
        clock=clock,
        shares=shares,
    )
    await limiter.complete(req("m"))  # the half burst
    waiting = asyncio.ensure_future(limiter.complete(req("m")))
    await clock.until_sleeping(1)
    assert clock.sleeps[-1] == pytest.approx(2.0)  # half of 1/s: one call per 2 s
    shares.fold("other", None, age_s=0.0)  # the other worker left
    limiter.rescale()
    await until(lambda: len(clock.sleeps) == 2, "the waiter to sleep again, re-timed")
    assert clock.sleeps[-1] == pytest.approx(1.0)  # the call it waits for, at 1/s now
    clock.advance(1.0)
    await asyncio.wait_for(waiting, 5)
    assert limiter.share("m") == (1.0, None)
    assert limiter.demand()["m"].saturated


def test_a_fleet_event_round_trips_through_the_codec() -> None:
    from pipeline.contract.codec import Codec

    event = FleetEvent(key="lease:w", worker="w", value={"models": {}}, at=datetime.now(UTC))
    for fmt in ("avro", "json"):
        codec = Codec(output_format=fmt)  # type: ignore[arg-type]
        data, content_type = codec.encode(event)
        assert codec.decode(data, FleetEvent, content_type).value == {"models": {}}
