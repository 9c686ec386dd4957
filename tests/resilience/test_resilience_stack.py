"""The composed stack with scripted endpoints: the order of the layers is what is tested.

The retry layer sleeps for real (asyncio.sleep); backoff is configured in milliseconds so it
costs nothing, and no assertion depends on how long anything took.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime

import pytest

from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelClient, ModelError
from pipeline.resilience.breaker import BreakerConfig, BreakerState
from pipeline.resilience.budget import BudgetConfig
from pipeline.resilience.endpoints import (
    EndpointConfigError,
    Endpoints,
    ModelEndpoint,
    ResolvedEndpoint,
)
from pipeline.resilience.errors import AllModelsFailed, BudgetExceeded, CircuitOpen
from pipeline.resilience.fleet import FleetShares, FleetSpend
from pipeline.resilience.ratelimit import Demand, RateLimit
from pipeline.resilience.stack import ResilientClient, StackConfig, build_client
from pipeline.resilience.testing import ManualClock, completion

ENDPOINTS = Endpoints(
    "http://default/v1",
    models={"a": ModelEndpoint("http://a/v1"), "b": ModelEndpoint("http://b/v1")},
)
WAIT_S = 0.001  # retry backoff: tiny, so retries cost no time


class Endpoint:
    """A scripted endpoint: fails with ``error`` while it is set, else answers.

    While ``gate`` is set, a call waits for it to open before answering (a probe in flight).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.error: ModelError | None = None
        self.gate: asyncio.Event | None = None
        self.calls = 0
        self.closed = 0

    async def complete(self, request: ChatRequest) -> ChatCompletion:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise ModelError(self.error.kind, str(self.error), status=self.error.status)
        return completion(model=request.model)

    async def aclose(self) -> None:
        self.closed += 1


class Fleet:
    """The client factory: one scripted endpoint per base URL, failing from the start if told."""

    def __init__(self, failing: dict[str, ModelError] | None = None) -> None:
        self.by_url: dict[str, Endpoint] = {}
        self._failing = failing or {}

    def __call__(self, endpoint: ResolvedEndpoint) -> ModelClient:
        built = Endpoint(endpoint.base_url)
        built.error = self._failing.get(endpoint.base_url)
        self.by_url[endpoint.base_url] = built
        return built


def req(model: str = "a", content: str = "hi") -> ChatRequest:
    return ChatRequest(model=model, messages=[{"role": "user", "content": content}])


async def test_breaker_counts_attempts_cuts_retries_and_the_chain_skips_it() -> None:
    fleet = Fleet(failing={"http://a/v1": ModelError("server_error", "500", status=500)})
    transitions: list[tuple[str, BreakerState]] = []
    client = build_client(
        StackConfig(
            ENDPOINTS,
            breaker=BreakerConfig(window_size=4, min_calls=4, open_s=60.0),
            max_attempts=3,
            initial_wait_s=WAIT_S,
            max_wait_s=WAIT_S,
        ),
        client_factory=fleet,
        on_breaker_change=lambda model, old, new: transitions.append((model, new)),
    )
    first = await client.complete(req("a"), models=["a", "b"])
    a, b = fleet.by_url["http://a/v1"], fleet.by_url["http://b/v1"]
    assert (first.model, first.attempts, a.calls) == ("b", 4, 3)
    # Every try is on the answer, in order: what `llmpipe trace` shows.
    assert [(c.model, c.attempt, c.outcome) for c in first.calls] == [
        ("a", 1, "server_error"),
        ("a", 2, "server_error"),
        ("a", 3, "server_error"),
        ("b", 1, "ok"),
    ]
    assert transitions == []  # three failed calls: fewer than min_calls

    # The 4th failed call opens a's circuit; the retry's next attempt meets the open
    # circuit (not retryable) and the chain moves on without further calls to a.
    second = await client.complete(req("a"), models=["a", "b"])
    assert (second.model, a.calls) == ("b", 4)
    assert transitions == [("a", BreakerState.OPEN)]

    third = await client.complete(req("a"), models=["a", "b"])
    assert (third.model, third.attempts, a.calls) == ("b", 1, 4)  # skipped, not called
    assert [(c.model, c.attempt, c.outcome) for c in third.calls] == [
        ("a", 0, "skipped:circuit_open"),
        ("b", 1, "ok"),
    ]
    assert client.chain.skipped[("a", "circuit_open")] == 1
    assert client.breakers.states()["a"] is BreakerState.OPEN
    assert b.calls == 3


async def test_single_model_open_circuit_surfaces_as_circuit_open() -> None:
    fleet = Fleet()
    client = build_client(
        StackConfig(
            ENDPOINTS,
            breaker=BreakerConfig(window_size=2, min_calls=2, failure_rate=1.0),
            max_attempts=2,
            initial_wait_s=WAIT_S,
            max_wait_s=WAIT_S,
        ),
        client_factory=fleet,
    )
    await client.complete(req("a"))
    fleet.by_url["http://a/v1"].error = ModelError("timeout", "slow")
    with pytest.raises(ModelError) as caught:
        await client.complete(req("a"))
    assert caught.value.kind == "timeout" and caught.value.attempts == 2
    with pytest.raises(CircuitOpen):
        await client.complete(req("a"))


async def test_local_rate_limit_moves_on_without_opening_the_breaker() -> None:
    fleet = Fleet()
    client = build_client(
        StackConfig(
            ENDPOINTS,
            rate_limits={"a": RateLimit(requests_per_minute=6, request_burst=1)},
            breaker=BreakerConfig(window_size=1, min_calls=1),
            initial_wait_s=WAIT_S,
            max_wait_s=WAIT_S,
        ),
        client_factory=fleet,
    )
    await client.complete(req("a"), models=["a", "b"])
    # a's next turn is 10 s away; the deadline is 5 s away: refused at once, b answers.
    deadline = datetime.fromtimestamp(time.time() + 5, UTC)
    answer = await client.complete(req("a"), deadline, models=["a", "b"])
    assert answer.model == "b"
    assert fleet.by_url["http://a/v1"].calls == 1
    assert client.breakers.states()["a"] is BreakerState.CLOSED
    assert client.rate_limits.stats()["a"].rejected == 1


async def test_disabled_endpoint_is_skipped_and_all_failed_is_reported() -> None:
    fleet = Fleet()
    disabled = {"a"}
    client = build_client(
        StackConfig(ENDPOINTS, max_attempts=1, initial_wait_s=WAIT_S, max_wait_s=WAIT_S),
        client_factory=fleet,
        is_enabled=lambda model: model not in disabled,
    )
    assert (await client.complete(req("a"), models=["a", "b"])).model == "b"
    assert "http://a/v1" not in fleet.by_url
    fleet.by_url["http://b/v1"].error = ModelError("client_error", "401", status=401)
    with pytest.raises(AllModelsFailed) as caught:
        await client.complete(req("a"), models=["a", "b"])
    assert caught.value.reasons == {
        "a": "model endpoint a is disabled",
        "b": "client_error: 401",
    }
    assert caught.value.attempts == 1
    assert [(c.model, c.attempt, c.outcome) for c in caught.value.calls] == [
        ("a", 0, "skipped:disabled"),
        ("b", 1, "client_error"),
    ]


async def test_budget_refuses_before_any_call_and_charges_the_answering_model() -> None:
    fleet = Fleet()
    spend = FleetSpend("me")
    spend.fold(date(2026, 1, 1), "p", "other", {"tokens": 0, "reserved": 0})
    today = datetime.now(UTC).date()
    spend.fold(today, "p", "other", {"tokens": 500, "reserved": 30})
    client = build_client(
        StackConfig(
            ENDPOINTS,
            budget=BudgetConfig(max_request_tokens=1000, daily_tokens={"p": 1060}),
        ),
        client_factory=fleet,
        spend=spend,
    )
    with pytest.raises(BudgetExceeded):
        await client.complete(req("a", content="x" * 4000), prompt="p")
    assert fleet.by_url == {}
    # Another worker has spent 530 of the 1060 tokens; a call reserves 2 + 512 and is
    # charged 15.
    for _ in range(2):
        await client.complete(req("a"), prompt="p", models=["a", "b"])
    assert client.budget.usage()["p"].spent == 30
    with pytest.raises(BudgetExceeded):
        await client.complete(req("a"), prompt="p")  # 30 + 514 > 530
    assert fleet.by_url["http://a/v1"].calls == 2


async def test_rate_limits_are_this_workers_share_of_the_account() -> None:
    clock = ManualClock()
    shares = FleetShares("me", clock=clock)
    shares.fold("other", {"models": {"a": {"rate": 0, "saturated": True}}}, age_s=0.0)
    shares.set_own({"a": Demand(0.0, saturated=True)})
    client = build_client(
        StackConfig(
            ENDPOINTS,
            rate_limits={"a": RateLimit(requests_per_minute=400, max_in_flight=8)},
        ),
        client_factory=Fleet(),
        shares=shares,
    )
    assert client.rate_limits.limit_for("a") == RateLimit(requests_per_minute=400, max_in_flight=8)
    assert client.rate_limits.share("a") == (0.5, 0)  # a joiner's slots wait for the others
    clock.advance(1.0)
    client.rate_limits.rescale()
    assert client.rate_limits.share("a") == (0.5, 4)  # two busy members: half each
    await client.complete(req("a"))


def test_missing_api_key_fails_at_build_time() -> None:
    endpoints = Endpoints("http://d/v1", models={"a": ModelEndpoint("http://a/v1", "A_KEY")})
    with pytest.raises(EndpointConfigError, match="A_KEY"):
        build_client(StackConfig(endpoints), client_factory=Fleet(), environ={})
    build_client(StackConfig(endpoints), client_factory=Fleet(), environ={"A_KEY": "k"})


async def test_aclose_closes_every_endpoint_client_once() -> None:
    fleet = Fleet()
    client = build_client(StackConfig(ENDPOINTS), client_factory=fleet)
    for model in ("a", "b", "c", "d"):
        await client.complete(req(model))
    await client.aclose()
    assert {url: e.closed for url, e in fleet.by_url.items()} == {
        "http://a/v1": 1,
        "http://b/v1": 1,
        "http://default/v1": 1,
    }


SERVER_ERROR = ModelError("server_error", "500", status=500)


def held_stack(clock: ManualClock, fleet: Fleet, **overrides: object) -> ResilientClient:
    """Both endpoints' breakers open after 2 failed calls for 10 s; requests wait up to 30 s."""
    options: dict[str, object] = {
        "breaker": BreakerConfig(window_size=2, min_calls=2, open_s=10.0),
        "max_attempts": 1,
        "breaker_wait_s": 30.0,
        **overrides,
    }
    may_wait = options.pop("may_wait", None)
    return build_client(
        StackConfig(ENDPOINTS, **options),  # type: ignore[arg-type]
        client_factory=fleet,
        clock=clock,
        may_wait=may_wait,  # type: ignore[arg-type]
    )


async def open_circuit(client: ResilientClient, model: str) -> None:
    for _ in range(2):
        with pytest.raises(ModelError) as failed:
            await client.complete(req(model), models=[model])
        assert failed.value.kind == "server_error"  # a model failure is never held
    assert client.breakers.states()[model] is BreakerState.OPEN


async def test_with_every_circuit_open_requests_are_held_until_a_probe_closes_one() -> None:
    clock = ManualClock(auto_advance=False)
    fleet = Fleet(failing={"http://a/v1": SERVER_ERROR, "http://b/v1": SERVER_ERROR})
    client = held_stack(clock, fleet)
    await open_circuit(client, "a")  # a half-opens at t=10
    clock.advance(5)
    await open_circuit(client, "b")  # b half-opens at t=15
    a, b = fleet.by_url["http://a/v1"], fleet.by_url["http://b/v1"]

    held = [asyncio.create_task(client.complete(req("a"), models=["a", "b"])) for _ in range(5)]
    await clock.until_sleeping(5)
    assert client.breaker_wait.held == 5 and not any(task.done() for task in held)
    assert (a.calls, b.calls) == (2, 2)  # held, not calling and not falling back

    a.error, a.gate = None, asyncio.Event()  # a is back; its probe will hang until told
    clock.advance(5)  # t=10: a half-opens, one held request takes the probe
    await clock.until_sleeping(4)
    assert (a.calls, b.calls) == (3, 2)
    assert client.breakers.states() == {"a": BreakerState.HALF_OPEN, "b": BreakerState.OPEN}
    assert not any(task.done() for task in held)

    a.gate.set()  # the probe answers: the circuit closes and every held request goes now,
    answers = await asyncio.gather(*held)  # without the clock moving
    assert [answer.model for answer in answers] == ["a"] * 5
    assert (a.calls, b.calls) == (7, 2)
    # A held request's answer lists the call that answered it, not a skip per re-check.
    assert {tuple((c.model, c.outcome) for c in answer.calls) for answer in answers} == {
        (("a", "ok"),)
    }
    assert client.breaker_wait.outcomes == {"answered": 5} and client.breaker_wait.held == 0
    assert clock.monotonic() == 1_010.0


async def test_a_failed_probe_fails_its_own_request_and_keeps_the_others_held() -> None:
    clock = ManualClock(auto_advance=False)
    fleet = Fleet(failing={"http://a/v1": SERVER_ERROR})
    client = held_stack(clock, fleet)
    await open_circuit(client, "a")
    a = fleet.by_url["http://a/v1"]
    held = [asyncio.create_task(client.complete(req("a"))) for _ in range(3)]
    await clock.until_sleeping(3)
    a.gate = asyncio.Event()
    clock.advance(10)  # probe 1 goes out and will fail
    await clock.until_sleeping(2)
    a.gate.set()
    # The probe's request made a real call and the model failed it: that failure is its
    # answer (the fallback path). The circuit reopens; the other two stay held.
    done, pending = await asyncio.wait(held, return_when=asyncio.FIRST_COMPLETED)
    (probe,) = done
    with pytest.raises(ModelError) as failed:
        probe.result()
    assert failed.value.kind == "server_error"
    await clock.until_sleeping(2)
    assert a.calls == 3 and client.breakers.states() == {"a": BreakerState.OPEN}
    a.error, a.gate = None, None
    clock.advance(10)  # t=20: probe 2 succeeds and releases the others
    answers = await asyncio.gather(*pending)
    assert [answer.model for answer in answers] == ["a", "a"]
    assert a.calls == 5
    assert client.breaker_wait.outcomes == {"failed": 1, "answered": 2}


async def test_held_requests_give_up_at_the_wait_bound_the_deadline_or_the_kill_switch() -> None:
    clock = ManualClock(auto_advance=False)
    calls_on = True
    fleet = Fleet(failing={"http://a/v1": SERVER_ERROR})
    client = held_stack(
        clock,
        fleet,
        breaker=BreakerConfig(window_size=2, min_calls=2, open_s=600.0),
        breaker_wait_s=3.0,
        may_wait=lambda: calls_on,
    )
    await open_circuit(client, "a")
    bounded = asyncio.create_task(client.complete(req("a")))
    late = asyncio.create_task(client.complete(req("a"), clock.datetime_in(2)))
    await clock.until_sleeping(2)
    clock.advance(1)
    await clock.until_sleeping(2)
    clock.advance(1)
    with pytest.raises(ModelError) as deadline_passed:
        await late  # the deadline (2 s) came first: the chain says so
    assert deadline_passed.value.kind == "timeout"
    await clock.until_sleeping(1)
    assert not bounded.done()
    clock.advance(1)
    with pytest.raises(CircuitOpen):
        await bounded  # 3 s: the wait bound
    assert client.breaker_wait.outcomes == {"failed": 1, "gave_up": 1}

    switched_off = asyncio.create_task(client.complete(req("a")))
    await clock.until_sleeping(1)
    calls_on = False
    clock.advance(1)  # the kill switch is read at least every poll (1 s)
    with pytest.raises(CircuitOpen):
        await switched_off
    assert client.breaker_wait.outcomes == {"failed": 1, "gave_up": 2}
    assert fleet.by_url["http://a/v1"].calls == 2


async def test_no_wait_configured_means_an_open_circuit_fails_at_once() -> None:
    clock = ManualClock(auto_advance=False)
    fleet = Fleet(failing={"http://a/v1": SERVER_ERROR})
    client = held_stack(clock, fleet, breaker_wait_s=0.0)
    await open_circuit(client, "a")
    with pytest.raises(CircuitOpen) as refused:
        await client.complete(req("a"))
    assert refused.value.retry_after_s == 10.0  # the chain's skip says when it half-opens
    assert client.breaker_wait.outcomes == {} and clock.sleeps == []
