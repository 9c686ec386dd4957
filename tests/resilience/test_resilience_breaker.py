"""Circuit breakers: the state machine, what counts as a failure, and the client around it."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelError
from pipeline.resilience.breaker import (
    BreakerClient,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    QualityBreaker,
    endpoint_failure,
)
from pipeline.resilience.errors import CircuitOpen, RateLimitExceeded
from pipeline.resilience.testing import ManualClock, ScriptedClient, completion, echo

CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
SMALL = BreakerConfig(window_size=4, min_calls=4, failure_rate=0.5, open_s=30.0)


def req(model: str = "m") -> ChatRequest:
    return ChatRequest(model=model, messages=[{"role": "user", "content": "hi"}])


class Transitions:
    def __init__(self) -> None:
        self.seen: list[tuple[str, BreakerState, BreakerState]] = []

    def __call__(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self.seen.append((name, old, new))


def run(breaker: CircuitBreaker, *outcomes: bool) -> None:
    """Record outcomes (True = failed) through permits, as a client would."""
    for failed in outcomes:
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, failed)


def test_opens_on_failure_rate_only_after_min_calls() -> None:
    clock = ManualClock()
    seen = Transitions()
    breaker = CircuitBreaker("m", SMALL, clock=clock, on_state_change=seen)
    run(breaker, True, True, True)
    assert breaker.state is CLOSED  # 3 of 3 failed, but fewer than min_calls
    run(breaker, False)
    assert breaker.state is OPEN  # 3 of 4 >= 50%
    assert seen.seen == [("m", CLOSED, OPEN)]
    assert breaker.acquire() is None
    assert breaker.retry_after_s() == 30.0


def test_sliding_window_forgets_old_calls() -> None:
    breaker = CircuitBreaker("m", SMALL, clock=ManualClock())
    run(breaker, True, False, False, False, False, True)
    assert breaker.state is CLOSED  # the last four: ok, ok, ok, failed -> 25%
    run(breaker, True)  # ok, ok, failed, failed -> 50%
    assert breaker.state is OPEN


def test_time_window_drops_outcomes_older_than_window_s() -> None:
    clock = ManualClock()
    config = BreakerConfig(window_size=10, window_s=60.0, min_calls=3, failure_rate=0.5)
    breaker = CircuitBreaker("m", config, clock=clock)
    run(breaker, True, True)
    clock.advance(61)
    run(breaker, True, False, False)
    assert breaker.state is CLOSED  # the two old failures are gone: 1 of 3
    assert breaker.snapshot().calls == 3


def test_half_open_admits_limited_probes_and_closes_when_all_succeed() -> None:
    clock = ManualClock()
    seen = Transitions()
    config = BreakerConfig(window_size=4, min_calls=4, open_s=30.0, half_open_calls=2)
    breaker = CircuitBreaker("m", config, clock=clock, on_state_change=seen)
    run(breaker, True, True, True, True)
    clock.advance(29.9)
    assert breaker.state is OPEN and not breaker.allows()
    clock.advance(0.1)
    assert breaker.state is HALF
    first, second = breaker.acquire(), breaker.acquire()
    assert first is not None and second is not None and first.probe
    assert breaker.acquire() is None  # both probe slots taken
    breaker.record(first, failed=False)
    assert breaker.state is HALF and breaker.acquire() is None
    breaker.record(second, failed=False)
    assert breaker.state is CLOSED
    assert [new for _, _, new in seen.seen] == [OPEN, HALF, CLOSED]


def test_a_failed_probe_reopens_for_a_full_interval() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("m", SMALL, clock=clock)
    run(breaker, True, True, True, True)
    clock.advance(30)
    run(breaker, True)
    assert breaker.state is OPEN
    assert breaker.retry_after_s() == 30.0
    clock.advance(30)
    run(breaker, False)
    assert breaker.state is CLOSED


def test_stale_outcomes_from_an_earlier_state_are_ignored() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("m", SMALL, clock=clock)
    slow = breaker.acquire()  # a long call started while closed
    run(breaker, True, True, True, True)
    clock.advance(30)
    probe = breaker.acquire()
    assert breaker.state is HALF and probe is not None
    breaker.record(slow, failed=False)  # must not count as the probe's success
    assert breaker.state is HALF
    breaker.record(probe, failed=False)
    assert breaker.state is CLOSED


def test_released_and_expired_probes_free_their_slot() -> None:
    clock = ManualClock()
    config = BreakerConfig(window_size=4, min_calls=4, open_s=30.0, probe_timeout_s=5.0)
    breaker = CircuitBreaker("m", config, clock=clock)
    run(breaker, True, True, True, True)
    clock.advance(30)
    probe = breaker.acquire()
    assert breaker.acquire() is None
    breaker.release(probe)
    lost = breaker.acquire()  # never reported back
    assert lost is not None and breaker.acquire() is None
    clock.advance(5)
    assert breaker.acquire() is not None


def test_listener_failure_does_not_change_routing() -> None:
    def broken(name: str, old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("metrics backend down")

    breaker = CircuitBreaker("m", SMALL, clock=ManualClock(), on_state_change=broken)
    run(breaker, True, True, True, True)
    assert breaker.state is OPEN


def test_config_is_validated() -> None:
    for bad in (
        {"window_size": 0},
        {"min_calls": 30},
        {"failure_rate": 0.0},
        {"open_s": -1.0},
        {"half_open_calls": 0},
    ):
        with pytest.raises(ValueError):
            BreakerConfig(**bad)


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (ModelError("timeout", "t"), True),
        (ModelError("connection", "c"), True),
        (ModelError("server_error", "500", status=500), True),
        (ModelError("rate_limited", "429", status=429), True),
        (ModelError("client_error", "400", status=400), False),
        (ModelError("bad_response", "junk"), False),
        (RateLimitExceeded("m", "local", retry_after_s=1.0), False),
        (CircuitOpen("m"), False),
    ],
)
def test_only_endpoint_failures_count(error: ModelError, counts: bool) -> None:
    assert endpoint_failure(error) is counts


async def test_client_opens_and_then_refuses_without_calling() -> None:
    clock = ManualClock()
    seen = Transitions()
    inner = ScriptedClient(default=ModelError("server_error", "500"))
    client = BreakerClient(inner, SMALL, clock=clock, on_state_change=seen)
    for _ in range(4):
        with pytest.raises(ModelError, match="500"):
            await client.complete(req())
    with pytest.raises(CircuitOpen, match="circuit open for m") as caught:
        await client.complete(req())
    assert caught.value.kind == "unavailable" and not caught.value.retryable
    assert caught.value.retry_after_s == 30.0
    assert len(inner.calls) == 4
    assert client.states() == {"m": OPEN} and not client.allows("m")
    assert client.allows("other")  # breakers are per model
    assert seen.seen == [("m", CLOSED, OPEN)]


async def test_client_errors_and_local_rejections_do_not_open() -> None:
    inner = ScriptedClient(
        *[ModelError("client_error", "400")] * 4,
        *[RateLimitExceeded("m", "local", retry_after_s=9.0)] * 4,
        default=echo,
    )
    client = BreakerClient(inner, SMALL, clock=ManualClock())
    for _ in range(8):
        with pytest.raises(ModelError):
            await client.complete(req())
    assert client.states() == {"m": CLOSED}
    assert client.breaker("m").snapshot().calls == 4  # the 400s count as answers


async def test_half_open_probe_through_the_client() -> None:
    clock = ManualClock()
    inner = ScriptedClient(*[ModelError("timeout", "t")] * 4, default=echo)
    client = BreakerClient(inner, SMALL, clock=clock)
    for _ in range(4):
        with pytest.raises(ModelError):
            await client.complete(req())
    clock.advance(30)
    assert (await client.complete(req())).model == "m"
    assert client.states() == {"m": CLOSED}


async def test_cancelled_probe_frees_its_slot() -> None:
    clock = ManualClock()
    entered, gate = asyncio.Event(), asyncio.Event()

    async def hang(request: ChatRequest) -> ChatCompletion:
        entered.set()
        await gate.wait()
        return completion()

    inner = ScriptedClient(*[ModelError("timeout", "t")] * 4, hang, default=echo)
    client = BreakerClient(inner, SMALL, clock=clock)
    for _ in range(4):
        with pytest.raises(ModelError):
            await client.complete(req())
    clock.advance(30)
    probe = asyncio.create_task(client.complete(req()))
    await entered.wait()
    assert not client.allows("m")
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert client.allows("m")
    await client.complete(req())
    assert client.states() == {"m": CLOSED}


def test_quality_breaker_per_prompt_version() -> None:
    clock = ManualClock()
    seen = Transitions()
    config = BreakerConfig(window_size=4, min_calls=4, open_s=60.0, half_open_calls=2)
    quality = QualityBreaker(config, clock=clock, on_state_change=seen)
    for ok in (False, True, False, True):
        assert quality.allow("summarise@3")
        quality.record("summarise@3", ok)
    assert quality.state("summarise@3") is OPEN
    assert not quality.allow("summarise@3")
    assert quality.allow("summarise@4")  # a new version starts clean
    quality.record("summarise@3", ok=True)  # observed while open: ignored
    clock.advance(60)
    assert quality.allow("summarise@3") and quality.allow("summarise@3")
    assert not quality.allow("summarise@3")  # two probes at most
    quality.record("summarise@3", ok=True)
    quality.record("summarise@3", ok=True)
    assert quality.state("summarise@3") is CLOSED
    assert [(name, new) for name, _, new in seen.seen] == [
        ("summarise@3", OPEN),
        ("summarise@3", HALF),
        ("summarise@3", CLOSED),
    ]


def test_quality_breaker_reopens_on_a_bad_output_while_half_open() -> None:
    clock = ManualClock()
    config = BreakerConfig(window_size=2, min_calls=2, open_s=10.0, half_open_calls=3)
    quality = QualityBreaker(config, clock=clock)
    quality.record("p@1", ok=False)
    quality.record("p@1", ok=False)
    clock.advance(10)
    assert quality.allow("p@1")
    quality.record("p@1", ok=True)
    quality.record("p@1", ok=False)  # any outcome counts, allowed or not
    assert quality.states() == {"p@1": OPEN}
