"""Fallback chains over models, and routing models to their endpoints."""

from __future__ import annotations

import pytest

from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelClient, ModelError
from pipeline.resilience.endpoints import (
    EndpointConfigError,
    EndpointRouter,
    Endpoints,
    ModelEndpoint,
    ResolvedEndpoint,
    parse_endpoints,
)
from pipeline.resilience.errors import AllModelsFailed, CircuitOpen, ModelDisabled
from pipeline.resilience.fallback_models import FallbackChainClient
from pipeline.resilience.testing import ManualClock, ScriptedClient, completion, echo


def req(model: str = "a", timeout_s: float = 30.0) -> ChatRequest:
    return ChatRequest(
        model=model, messages=[{"role": "user", "content": "hi"}], timeout_s=timeout_s
    )


def failing(kind: str = "server_error", attempts: int = 3) -> ModelError:
    return ModelError(kind, f"{kind} after retries", attempts=attempts)  # type: ignore[arg-type]


async def test_next_model_answers_when_the_primary_fails_after_its_retries() -> None:
    inner = ScriptedClient(failing(attempts=3), default=echo)
    chain = FallbackChainClient(lambda model: inner)
    answer = await chain.complete(req("a"), models=["a", "b", "c"])
    assert answer.model == "b"
    assert answer.attempts == 4  # three on a, one on b
    assert inner.models == ["a", "b"]
    assert chain.answered_by == {"b": 1} and chain.failed == {"a": 1}


async def test_each_model_has_its_own_client() -> None:
    clients = {"a": ScriptedClient(failing()), "b": ScriptedClient(default=echo)}
    chain = FallbackChainClient(clients.__getitem__)
    assert (await chain.complete(req("a"), models=["a", "b"])).model == "b"
    assert clients["a"].models == ["a"] and clients["b"].models == ["b"]


async def test_disabled_and_open_models_are_skipped_without_a_call() -> None:
    inner = ScriptedClient(default=echo)
    chain = FallbackChainClient(
        lambda model: inner,
        is_enabled=lambda model: model != "a",
        circuit_refusal=lambda model: CircuitOpen(model) if model == "b" else None,
    )
    answer = await chain.complete(req("a"), models=["a", "b", "c"])
    assert answer.model == "c" and answer.attempts == 1
    assert inner.models == ["c"]
    assert chain.skipped == {("a", "disabled"): 1, ("b", "circuit_open"): 1}


async def test_all_failed_names_every_model_and_sums_attempts() -> None:
    inner = ScriptedClient(failing("server_error", attempts=3), failing("rate_limited", attempts=2))
    chain = FallbackChainClient(lambda model: inner, is_enabled=lambda model: model != "c")
    with pytest.raises(AllModelsFailed) as caught:
        await chain.complete(req("a"), models=["a", "b", "c"])
    error = caught.value
    assert error.kind == "unavailable" and error.attempts == 5
    assert str(error).startswith("all models failed: a: server_error: ")
    assert set(error.reasons) == {"a", "b", "c"}
    assert error.reasons["c"] == "model endpoint c is disabled"


async def test_single_model_chain_is_transparent() -> None:
    original = failing("timeout", attempts=3)
    chain = FallbackChainClient(lambda model: ScriptedClient(original))
    with pytest.raises(ModelError) as caught:
        await chain.complete(req("a"))
    assert caught.value is original and caught.value.attempts == 3

    chain = FallbackChainClient(lambda model: ScriptedClient(), circuit_refusal=CircuitOpen)
    with pytest.raises(CircuitOpen):
        await chain.complete(req("a"))
    chain = FallbackChainClient(lambda model: ScriptedClient(), is_enabled=lambda m: False)
    with pytest.raises(ModelDisabled):
        await chain.complete(req("a"))


async def test_stops_when_the_deadline_has_passed() -> None:
    clock = ManualClock()

    async def slow_failure(request: ChatRequest) -> ChatCompletion:
        clock.advance(10)  # the primary used up the whole deadline
        raise failing()

    inner = ScriptedClient(slow_failure, default=echo)
    chain = FallbackChainClient(lambda model: inner, clock=clock)
    deadline = clock.datetime_in(5)
    with pytest.raises(AllModelsFailed) as caught:
        await chain.complete(req("a"), deadline, models=["a", "b", "c"])
    assert inner.models == ["a"]
    assert caught.value.reasons["b"] == "deadline passed"
    assert caught.value.reasons["c"] == "deadline passed"
    assert inner.calls[0].deadline == deadline


async def test_alternates_supply_the_chain_when_models_are_not_given() -> None:
    inner = ScriptedClient(failing(), default=echo)
    chain = FallbackChainClient(lambda model: inner, alternates=lambda model: ["b", "a", "b"])
    assert chain.chain_for(req("a"), None) == ["a", "b"]
    assert (await chain.complete(req("a"))).model == "b"


async def test_all_rate_limited_suggests_the_shortest_wait() -> None:
    inner = ScriptedClient(
        ModelError("rate_limited", "429", retry_after_s=5.0),
        ModelError("rate_limited", "429", retry_after_s=2.0),
    )
    chain = FallbackChainClient(lambda model: inner)
    with pytest.raises(AllModelsFailed) as caught:
        await chain.complete(req("a"), models=["a", "b"])
    assert caught.value.retry_after_s == 2.0


# -- endpoints ------------------------------------------------------------------------------


def test_parse_endpoints() -> None:
    endpoints = parse_endpoints(
        '{"claude-3-5-haiku-latest": {"base_url": "https://gw.example/v1",'
        ' "api_key_env": "ANTHROPIC_KEY"}, "llama": "http://vllm:8000/v1"}',
        "http://127.0.0.1:8089/v1",
        "default-key",
    )
    assert endpoints.models == {
        "claude-3-5-haiku-latest": ModelEndpoint("https://gw.example/v1", "ANTHROPIC_KEY"),
        "llama": ModelEndpoint("http://vllm:8000/v1"),
    }
    env = {"ANTHROPIC_KEY": "sk-ant"}
    assert endpoints.resolve("claude-3-5-haiku-latest", env) == ResolvedEndpoint(
        "https://gw.example/v1", "sk-ant"
    )
    assert endpoints.resolve("llama", env) == ResolvedEndpoint("http://vllm:8000/v1", None)
    assert endpoints.resolve("gpt-4o", env) == ResolvedEndpoint(
        "http://127.0.0.1:8089/v1", "default-key"
    )
    assert "sk-ant" not in repr(endpoints.resolve("claude-3-5-haiku-latest", env))
    assert parse_endpoints("", "http://x/v1") == Endpoints("http://x/v1")
    with pytest.raises(EndpointConfigError, match="ANTHROPIC_KEY"):
        endpoints.check({})


@pytest.mark.parametrize(
    "raw",
    [
        "{oops",
        "[]",
        '{"m": 3}',
        '{"m": {"base_url": "ftp://x"}}',
        '{"m": {"base_url": "http://x", "api_key": "sk-leaked"}}',
        '{"m": {"base_url": "http://x", "api_key_env": "not a name"}}',
        '{"m": {}}',
    ],
)
def test_parse_endpoints_rejects(raw: str) -> None:
    with pytest.raises(EndpointConfigError):
        parse_endpoints(raw, "http://127.0.0.1:8089/v1")


class PlainClient:
    """A client with the bare ``ModelClient`` shape (no deadline), like OpenAIChatClient."""

    def __init__(self, endpoint: ResolvedEndpoint) -> None:
        self.endpoint = endpoint
        self.requests: list[ChatRequest] = []
        self.closed = 0

    async def complete(self, request: ChatRequest) -> ChatCompletion:
        self.requests.append(request)
        return completion(model=request.model, text=self.endpoint.base_url)

    async def aclose(self) -> None:
        self.closed += 1


async def test_router_sends_each_model_to_its_endpoint_and_shares_clients() -> None:
    clock = ManualClock()
    built: list[PlainClient] = []

    def factory(endpoint: ResolvedEndpoint) -> ModelClient:
        built.append(PlainClient(endpoint))
        return built[-1]

    endpoints = parse_endpoints(
        '{"b": "http://other/v1", "c": "http://other/v1"}', "http://default/v1"
    )
    router = EndpointRouter(endpoints, factory, clock=clock, environ={})
    answers = [(await router.complete(req(m))).text for m in ("a", "b", "c", "a")]
    assert answers == [
        "http://default/v1",
        "http://other/v1",
        "http://other/v1",
        "http://default/v1",
    ]
    assert len(built) == 2  # one connection pool per endpoint, not per model

    await router.complete(req("a", timeout_s=30), clock.datetime_in(2.5))
    assert built[0].requests[-1].timeout_s == pytest.approx(2.5)
    with pytest.raises(ModelError) as caught:
        await router.complete(req("a"), clock.datetime_in(-1))
    assert caught.value.kind == "timeout"
    assert len(built[0].requests) == 3

    await router.aclose()
    assert [c.closed for c in built] == [1, 1]


async def test_router_turns_a_missing_key_into_a_client_error() -> None:
    endpoints = Endpoints("http://d/v1", models={"k": ModelEndpoint("http://k/v1", "NOPE")})
    router = EndpointRouter(endpoints, PlainClient, environ={})
    with pytest.raises(ModelError) as caught:
        await router.complete(req("k"), None)
    assert caught.value.kind == "client_error" and "NOPE" in str(caught.value)
