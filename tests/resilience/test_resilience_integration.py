"""The composed stack against the real fake model server over HTTP, with the real client.

Assertions count calls at the server (its own counters) and, where spacing matters, the
moments our client handed each call to the socket. Timing assertions are one-sided
lower bounds (a loaded machine can only make gaps longer), except the rate-limit
window check, whose bound includes the bucket's burst as slack.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from bench.common import free_port
from pipeline.config import Settings
from pipeline.contract.decisions import Emit
from pipeline.contract.envelopes import ControlEvent
from pipeline.contract.topology import COMPLETIONS, FALLBACK
from pipeline.control.state import ENDPOINT_ENABLED, GLOBAL_MODEL_CALLS, ControlState, flag_key
from pipeline.harness.fakellm import FakeLLMServer, running_fake_llm
from pipeline.llm.openai import OpenAIChatClient
from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelClient, ModelError
from pipeline.resilience.breaker import BreakerConfig, BreakerState
from pipeline.resilience.configure import resilient_client
from pipeline.resilience.endpoints import (
    ClientFactory,
    Endpoints,
    ModelEndpoint,
    ResolvedEndpoint,
)
from pipeline.resilience.errors import AllModelsFailed, CircuitOpen
from pipeline.resilience.ratelimit import RateLimit
from pipeline.resilience.stack import ResilientClient, StackConfig, build_client
from pipeline.resilience.testing import ManualClock
from pipeline.stages.model_call import ModelCaller
from tests.stage_support import REGISTRY, validated
from tests.support import until

WAIT_S = 0.01  # retry backoff: tiny, so retries cost no time
NO_BREAKER = BreakerConfig(window_size=1000, min_calls=1000)


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    with running_fake_llm() as server:
        yield server


class Recording:
    """The real client, noting when each call leaves (what the server will count)."""

    def __init__(self, inner: ModelClient, log: list[tuple[float, str, str]]) -> None:
        self._inner = inner
        self._log = log

    async def complete(self, request: ChatRequest) -> ChatCompletion:
        self._log.append((time.monotonic(), request.model, request.messages[-1]["content"]))
        return await self._inner.complete(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def recording(log: list[tuple[float, str, str]]) -> ClientFactory:
    def build(endpoint: ResolvedEndpoint) -> ModelClient:
        return Recording(OpenAIChatClient(endpoint.base_url, endpoint.api_key), log)

    return build


def req(content: str, model: str = "fake-model") -> ChatRequest:
    return ChatRequest(model=model, messages=[{"role": "user", "content": content}], timeout_s=5.0)


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


async def test_429_storm_is_retried_after_the_servers_retry_after(fake: FakeLLMServer) -> None:
    log: list[tuple[float, str, str]] = []
    client = build_client(
        StackConfig(Endpoints(fake.url), breaker=NO_BREAKER, max_attempts=3, retry_budget_s=10),
        client_factory=recording(log),
    )
    try:
        recovering = [f"storm {i} [[fake:rate_limit:0.25:times=2]]" for i in range(5)]
        stuck = "storm forever [[fake:rate_limit:0.25]]"
        results = await asyncio.gather(
            *(client.complete(req(text)) for text in [*recovering, stuck]),
            return_exceptions=True,
        )
    finally:
        await client.aclose()
    answers, failure = results[:-1], results[-1]
    assert all(isinstance(a, ChatCompletion) and a.attempts == 3 for a in answers)
    assert isinstance(failure, ModelError) and failure.kind == "rate_limited"
    assert failure.attempts == 3 and failure.retry_after_s == 0.25
    counters = fake.counters()
    assert counters["total_calls"] == 18
    assert counters["by_behavior"] == {"rate_limit": 13, "valid": 5}
    for text in [*recovering, stuck]:
        sent = [at for at, _, content in log if content == text]
        assert len(sent) == 3
        gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
        assert min(gaps) >= 0.25 * 0.9, (text, gaps)


async def test_breaker_opens_on_500s_stops_calling_probes_and_recovers(
    fake: FakeLLMServer,
) -> None:
    clock = ManualClock(wall_start=time.time())  # the breaker's open interval, by hand
    transitions: list[BreakerState] = []
    client = build_client(
        StackConfig(
            Endpoints(fake.url),
            breaker=BreakerConfig(window_size=4, min_calls=4, failure_rate=0.5, open_s=30),
            max_attempts=3,
            initial_wait_s=WAIT_S,
            max_wait_s=WAIT_S,
        ),
        clock=clock,
        on_breaker_change=lambda model, old, new: transitions.append(new),
    )

    def calls() -> int:
        return int(fake.counters()["total_calls"])

    try:
        fake.configure(force_behavior="server_error")
        with pytest.raises(ModelError) as first:
            await client.complete(req("down 1"))
        assert (first.value.kind, first.value.attempts, calls()) == ("server_error", 3, 3)
        # One more failed call reaches min_calls and opens; the retry stops right there.
        with pytest.raises(CircuitOpen):
            await client.complete(req("down 2"))
        assert calls() == 4 and transitions == [BreakerState.OPEN]
        for i in range(5):
            with pytest.raises(CircuitOpen):
                await client.complete(req(f"while open {i}"))
        assert calls() == 4  # nothing reaches the server while open

        clock.advance(30)  # half-open: one probe, still failing -> open again
        with pytest.raises(CircuitOpen):
            await client.complete(req("probe 1"))
        assert calls() == 5

        fake.configure(force_behavior=None)
        with pytest.raises(CircuitOpen):
            await client.complete(req("recovered, but the circuit is still open"))
        assert calls() == 5
        clock.advance(30)
        answer = await client.complete(req("probe 2"))
        assert answer.attempts == 1 and calls() == 6
        await client.complete(req("closed again"))
        assert calls() == 7
    finally:
        await client.aclose()
    assert transitions == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


async def test_primary_unreachable_secondary_answers(fake: FakeLLMServer) -> None:
    endpoints = Endpoints(fake.url, models={"primary-model": ModelEndpoint(closed_port_url())})
    client = build_client(
        StackConfig(endpoints, max_attempts=2, initial_wait_s=WAIT_S, max_wait_s=WAIT_S)
    )
    try:
        answer = await client.complete(
            req("hello", model="primary-model"), models=["primary-model", "secondary-model"]
        )
    finally:
        await client.aclose()
    assert answer.model == "secondary-model"
    assert answer.attempts == 3  # two connection failures, one answer
    assert fake.counters()["by_model"] == {"secondary-model": 1}
    assert client.chain.failed == {"primary-model": 1}


async def test_primary_failing_on_its_own_server_then_disabled_by_flag(
    fake: FakeLLMServer,
) -> None:
    control = ControlState()
    with running_fake_llm() as down:
        down.configure(force_behavior="server_error")
        endpoints = Endpoints(fake.url, models={"primary": ModelEndpoint(down.url)})
        client = build_client(
            StackConfig(
                endpoints,
                max_attempts=3,
                breaker=NO_BREAKER,
                initial_wait_s=WAIT_S,
                max_wait_s=WAIT_S,
            ),
            is_enabled=lambda model: control.flag(ENDPOINT_ENABLED, model),
        )
        try:
            answer = await client.complete(req("hi", "primary"), models=["primary", "backup"])
            assert answer.model == "backup" and answer.attempts == 4
            assert down.counters()["total_calls"] == 3
            control.apply(
                ControlEvent(
                    key=flag_key(ENDPOINT_ENABLED, "primary"),
                    value=False,
                    actor="oncall",
                    at=datetime.now(UTC),
                )
            )
            answer = await client.complete(req("hi", "primary"), models=["primary", "backup"])
            assert answer.model == "backup" and answer.attempts == 1
            assert down.counters()["total_calls"] == 3
            fake.configure(force_behavior="server_error")
            with pytest.raises(AllModelsFailed) as caught:
                await client.complete(req("hi", "primary"), models=["primary", "backup"])
        finally:
            await client.aclose()
    assert caught.value.reasons["primary"] == "model endpoint primary is disabled"
    assert caught.value.reasons["backup"].startswith("server_error: 500")
    assert caught.value.attempts == 3
    assert fake.counters()["by_model"] == {"backup": 5}


async def test_requests_per_minute_limit_holds_at_the_server(fake: FakeLLMServer) -> None:
    log: list[tuple[float, str, str]] = []
    # 5 calls per (shortened) 1 s "minute", one at a time: one call every 200 ms.
    limit = RateLimit(requests_per_minute=5, request_burst=1, period_s=1.0)
    client = build_client(
        StackConfig(Endpoints(fake.url), rate_limits={"fake-model": limit}),
        client_factory=recording(log),
    )
    try:
        count = 8
        answers = await asyncio.gather(*(client.complete(req(f"r{i}")) for i in range(count)))
    finally:
        await client.aclose()
    assert len(answers) == count and fake.counters()["total_calls"] == count
    sent = sorted(at for at, _, _ in log)
    for start in sent:
        in_window = sum(1 for at in sent if start <= at <= start + limit.period_s)
        assert in_window <= 1 + 5, sent  # burst + rate x window
    # The first send can lag its slot (a fresh connection), so allow one interval of slack.
    assert sent[-1] - sent[0] >= (count - 2) / 5 * 0.9
    stats = client.rate_limits.stats()["fake-model"]
    # The first call takes the burst; on a loaded machine a later one may find its slot
    # already due when it asks, so "waited" is at most count - 1, not exactly.
    assert (stats.calls, stats.rejected) == (count, 0) and 1 <= stats.waits <= count - 1


def outage_client(
    fake: FakeLLMServer, control: ControlState, **overrides: float
) -> ResilientClient:
    """The worker's own client (``resilient_client``): breakers open after 2 failed calls."""
    settings = Settings(
        model_base_url=fake.url,
        model_max_attempts=1,
        breaker_min_calls=2,
        **{"breaker_open_s": 0.5, "breaker_wait_s": 20.0, **overrides},  # type: ignore[arg-type]
    )
    return resilient_client(settings, control)


async def open_both_circuits(caller: ModelCaller, client: ResilientClient) -> None:
    """Two requests whose calls fail (primary and fallback model) open both circuits."""
    for _ in range(2):
        decision = await caller(validated())
        assert isinstance(decision, Emit) and decision.topic == FALLBACK
        assert decision.reason == "model_server_error"  # real failures are never held
    assert set(client.breakers.states().values()) == {BreakerState.OPEN}


async def test_model_stage_holds_requests_while_every_circuit_is_open_then_the_model_answers(
    fake: FakeLLMServer,
) -> None:
    control = ControlState()
    # Circuits half-open 2 s after opening: the server is healthy again well before that.
    client = outage_client(fake, control, breaker_open_s=2.0)
    caller = ModelCaller(REGISTRY, client, control)
    try:
        fake.configure(force_behavior="server_error")
        await open_both_circuits(caller, client)
        held = [asyncio.create_task(caller(validated())) for _ in range(10)]
        await until(lambda: client.breaker_wait.held == 10, "10 requests held")
        assert fake.counters()["total_calls"] == 4  # held requests call nothing
        fake.configure(force_behavior=None)
        decisions = await asyncio.gather(*held)
    finally:
        await client.aclose()
    emitted = [d for d in decisions if isinstance(d, Emit)]
    assert [d.topic for d in emitted] == [COMPLETIONS] * 10, decisions
    models = {d.envelope.model for d in emitted}  # type: ignore[attr-defined]
    assert "gpt-4o-mini" in models and models <= {"gpt-4o-mini", "claude-3-5-haiku-latest"}
    # One call per held request (the first was the probe), none on the fallback path.
    assert fake.counters()["by_behavior"] == {"server_error": 4, "valid": 10}
    assert client.breaker_wait.outcomes == {"answered": 10}


async def test_held_requests_take_the_fallback_path_when_model_calls_are_switched_off(
    fake: FakeLLMServer,
) -> None:
    control = ControlState()
    client = outage_client(fake, control, breaker_open_s=600.0)
    caller = ModelCaller(REGISTRY, client, control)
    try:
        fake.configure(force_behavior="server_error")
        await open_both_circuits(caller, client)
        held = [asyncio.create_task(caller(validated())) for _ in range(3)]
        await until(lambda: client.breaker_wait.held == 3, "3 requests held")
        assert not any(task.done() for task in held)
        control.apply(
            ControlEvent(
                key=flag_key(GLOBAL_MODEL_CALLS), value=False, actor="oncall", at=datetime.now(UTC)
            )
        )
        decisions = await asyncio.gather(*held)
    finally:
        await client.aclose()
    assert [(d.topic, d.reason) for d in decisions if isinstance(d, Emit)] == [
        (FALLBACK, "model_unavailable")
    ] * 3
    assert fake.counters()["total_calls"] == 4
    assert client.breaker_wait.outcomes == {"gave_up": 3}
