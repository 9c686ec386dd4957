"""Rate limits per model: spacing, deadlines, token reservations, calls in flight.

Time is a :class:`ManualClock`: waits are asserted as computed values, never measured.
"""

from __future__ import annotations

import asyncio

import pytest

from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelError
from pipeline.resilience.errors import RateLimitExceeded
from pipeline.resilience.ratelimit import (
    RateLimit,
    RateLimitedClient,
    TokenBucket,
    parse_rate_limits,
)
from pipeline.resilience.testing import ManualClock, ScriptedClient, completion, echo


def req(
    model: str = "m", content: str = "x" * 400, max_tokens: int = 400, timeout_s: float = 30.0
) -> ChatRequest:
    # 400 characters of content plus "user" -> 101 estimated prompt tokens.
    return ChatRequest(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        timeout_s=timeout_s,
    )


def test_token_bucket_refills_up_to_capacity_and_goes_into_debt() -> None:
    bucket = TokenBucket(rate_per_s=2.0, capacity=4.0, now=0.0)
    assert bucket.wait_s(4, 0.0) == 0.0
    bucket.take(6, 0.0)
    assert bucket.level(0.0) == -2.0
    assert bucket.wait_s(1, 0.0) == pytest.approx(1.5)
    assert bucket.level(100.0) == 4.0


async def test_requests_are_spaced_by_the_refill_rate() -> None:
    clock = ManualClock()
    inner = ScriptedClient(default=echo, clock=clock)
    limited = RateLimitedClient(
        inner, {"m": RateLimit(requests_per_minute=60, request_burst=1)}, clock=clock
    )
    for _ in range(3):
        await limited.complete(req())
    assert [c.at for c in inner.calls] == [1000.0, 1001.0, 1002.0]
    stats = limited.stats()["m"]
    assert (stats.calls, stats.waits, stats.waited_s, stats.rejected) == (3, 2, 2.0, 0)


async def test_concurrent_callers_are_served_in_arrival_order() -> None:
    clock = ManualClock(auto_advance=False)
    inner = ScriptedClient(default=echo, clock=clock)
    limited = RateLimitedClient(
        inner, {"m": RateLimit(requests_per_minute=60, request_burst=1)}, clock=clock
    )
    tasks = [asyncio.create_task(limited.complete(req(content=f"{i}" * 40))) for i in range(3)]
    await clock.until_sleeping(2)
    # Each reservation knows its turn at once: 0 s, 1 s, 2 s. Nobody polls.
    assert clock.sleeps == [1.0, 2.0]
    assert len(inner.calls) == 1
    clock.advance(2.0)
    await asyncio.gather(*tasks)
    assert [c.request.messages[0]["content"][0] for c in inner.calls] == ["0", "1", "2"]


async def test_wait_past_the_deadline_is_refused_at_once_without_spending() -> None:
    clock = ManualClock()
    inner = ScriptedClient(default=echo, clock=clock)
    limited = RateLimitedClient(
        inner, {"m": RateLimit(requests_per_minute=60, request_burst=1)}, clock=clock
    )
    await limited.complete(req())
    with pytest.raises(RateLimitExceeded) as caught:
        await limited.complete(req(), deadline=clock.datetime_in(0.5))
    assert caught.value.kind == "rate_limited"
    assert caught.value.retry_after_s == pytest.approx(1.0)
    assert caught.value.attempts == 0
    assert clock.sleeps == [] and len(inner.calls) == 1
    # The refused call reserved nothing: the next caller waits one interval, not two.
    await limited.complete(req(), deadline=clock.datetime_in(5))
    assert clock.sleeps == [1.0]
    assert limited.stats()["m"].rejected == 1


async def test_without_a_deadline_the_request_timeout_bounds_the_wait() -> None:
    clock = ManualClock()
    limited = RateLimitedClient(
        ScriptedClient(default=echo),
        {"m": RateLimit(requests_per_minute=60, request_burst=1)},
        clock=clock,
    )
    await limited.complete(req())
    with pytest.raises(RateLimitExceeded):
        await limited.complete(req(timeout_s=0.5))
    await limited.complete(req(timeout_s=2.0))
    assert clock.sleeps == [1.0]


async def test_deadline_shrinks_the_timeout_by_the_time_waited() -> None:
    clock = ManualClock()
    inner = ScriptedClient(default=echo, clock=clock)
    limited = RateLimitedClient(
        inner, {"m": RateLimit(requests_per_minute=60, request_burst=1)}, clock=clock
    )
    await limited.complete(req())
    deadline = clock.datetime_in(10)
    await limited.complete(req(timeout_s=30), deadline=deadline)
    assert inner.calls[1].request.timeout_s == pytest.approx(9.0)
    assert inner.calls[1].deadline == deadline


async def test_token_reservation_is_corrected_with_actual_usage() -> None:
    clock = ManualClock()
    inner = ScriptedClient(clock=clock)
    # 10 tokens/s, bucket of 600. Each request reserves 101 + 400 = 501.
    limited = RateLimitedClient(inner, {"m": RateLimit(tokens_per_minute=600)}, clock=clock)
    inner.push(completion(prompt_tokens=80, completion_tokens=20))
    await limited.complete(req())  # level 600 - 501 + (501 - 100) = 500
    inner.push(completion(prompt_tokens=101, completion_tokens=1))
    await limited.complete(req(max_tokens=399))  # reserves 500: fits exactly, no wait
    assert clock.sleeps == []
    # Level is now 500 - 500 + (500 - 102) = 398; a call that used more than it reserved
    # pushes the bucket into debt and the next caller pays for it.
    inner.push(completion(prompt_tokens=300, completion_tokens=600))
    await limited.complete(req(max_tokens=297))  # reserves 398: no wait; then -502
    inner.push(completion())
    await limited.complete(req(timeout_s=200))
    assert clock.sleeps == [pytest.approx((501 + 502) / 10)]


async def test_failed_call_returns_its_completion_reservation() -> None:
    clock = ManualClock()
    inner = ScriptedClient(ModelError("server_error", "500"), default=echo)
    limited = RateLimitedClient(inner, {"m": RateLimit(tokens_per_minute=600)}, clock=clock)
    with pytest.raises(ModelError):
        await limited.complete(req())  # keeps the 101 prompt tokens: level 499
    await limited.complete(req(max_tokens=398))  # reserves 499: no wait
    assert clock.sleeps == []


async def test_request_larger_than_the_bucket_waits_for_its_cost_instead_of_starving() -> None:
    clock = ManualClock()
    limited = RateLimitedClient(
        ScriptedClient(default=echo),
        {"m": RateLimit(tokens_per_minute=600, token_burst=100)},
        clock=clock,
    )
    await limited.complete(req(max_tokens=400, timeout_s=100))
    assert clock.sleeps == [pytest.approx((501 - 100) / 10)]


async def test_calls_in_flight_are_capped() -> None:
    clock = ManualClock()
    release = asyncio.Event()
    entered: asyncio.Queue[str] = asyncio.Queue()

    async def blocking(request: ChatRequest) -> ChatCompletion:
        await entered.put(request.messages[0]["content"])
        await release.wait()
        return completion(model=request.model)

    inner = ScriptedClient(default=blocking)
    limited = RateLimitedClient(inner, {"m": RateLimit(max_in_flight=2)}, clock=clock)
    tasks = [asyncio.create_task(limited.complete(req(content=str(i)))) for i in range(3)]
    assert {await entered.get(), await entered.get()} == {"0", "1"}
    assert entered.empty() and limited.stats()["m"].in_flight == 2
    # A caller with no time left is refused at once instead of queueing.
    with pytest.raises(RateLimitExceeded, match="no free call slot"):
        await limited.complete(req(), deadline=clock.datetime_in(0))
    release.set()
    assert await entered.get() == "2"
    await asyncio.gather(*tasks)
    stats = limited.stats()["m"]
    assert (stats.calls, stats.in_flight, stats.rejected, stats.waits) == (3, 0, 1, 1)


async def test_cancelled_waiter_gives_its_reservation_back() -> None:
    clock = ManualClock(auto_advance=False)
    limited = RateLimitedClient(
        ScriptedClient(default=echo),
        {"m": RateLimit(requests_per_minute=60, request_burst=1)},
        clock=clock,
    )
    await limited.complete(req())
    waiting = asyncio.create_task(limited.complete(req()))
    await clock.until_sleeping(1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    follower = asyncio.create_task(limited.complete(req()))
    await clock.until_sleeping(1)
    assert clock.sleeps == [1.0, 1.0]  # not 2.0: the cancelled turn was handed back
    clock.advance(1.0)
    await follower


async def test_models_have_their_own_buckets_and_unlisted_models_are_free() -> None:
    clock = ManualClock()
    limited = RateLimitedClient(
        ScriptedClient(default=echo),
        {"a": RateLimit(requests_per_minute=60, request_burst=1)},
        clock=clock,
    )
    for model in ("a", "b", "b", "b"):
        await limited.complete(req(model))
    assert clock.sleeps == []
    assert set(limited.stats()) == {"a"}

    shared = RateLimitedClient(
        ScriptedClient(default=echo),
        {},
        default=RateLimit(requests_per_minute=60, request_burst=1),
        clock=clock,
    )
    for model in ("a", "b"):
        await shared.complete(req(model))
    assert clock.sleeps == []  # the default applies to each model separately


def test_parse_rate_limits() -> None:
    limits, default = parse_rate_limits(
        '{"gpt-4o-mini": {"requests_per_minute": 500, "max_in_flight": 8},'
        ' "*": {"tokens_per_minute": 1000}}'
    )
    assert limits == {"gpt-4o-mini": RateLimit(requests_per_minute=500, max_in_flight=8)}
    assert default == RateLimit(tokens_per_minute=1000)
    assert parse_rate_limits(None) == ({}, None)
    assert parse_rate_limits("  ") == ({}, None)
    for bad in (
        "[1]",
        "{not json",
        '{"m": {"rpm": 5}}',
        '{"m": {"requests_per_minute": "5"}}',
        '{"m": {"requests_per_minute": -1}}',
        '{"m": {"max_in_flight": 1.5}}',
        '{"m": 5}',
    ):
        with pytest.raises(ValueError):
            parse_rate_limits(bad)
