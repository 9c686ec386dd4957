"""Cost: the arithmetic, where prices come from, cost on every result, budgets in money,
and the cost metric per prompt name, version and model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from pipeline.contract.decisions import Emit
from pipeline.contract.envelopes import Escalation, Result, Usage
from pipeline.contract.topology import FALLBACK, RESULTS
from pipeline.control.state import ControlState
from pipeline.harness.fakellm import FakeLLMServer
from pipeline.llm.cost import Price, PriceConfigError, PriceTable, parse_prices
from pipeline.llm.protocol import ChatCompletion, ChatRequest
from pipeline.observability import semconv as sc
from pipeline.observability.context import MessageScope, message_scope
from pipeline.observability.testing import Captured, captured_telemetry
from pipeline.resilience.budget import BudgetConfig, BudgetedClient, parse_daily_costs
from pipeline.resilience.endpoints import parse_endpoints
from pipeline.resilience.errors import BudgetExceeded
from pipeline.resilience.fleet import FleetSpend
from pipeline.resilience.retry import RetryingClient
from pipeline.resilience.stack import StackConfig, build_client
from pipeline.resilience.testing import ManualClock, ScriptedClient, completion
from pipeline.stages.settle import Settler
from tests.stage_support import GOOD_ANSWER, REGISTRY, dumps
from tests.stage_support import completion as stage_completion
from tests.support import until

MINI = Price(input=0.15, output=0.60, cached_input=0.075)


def test_cost_is_tokens_times_price_per_million_with_cached_input_cheaper() -> None:
    assert MINI.cost(1_000_000, 0) == pytest.approx(0.15)
    assert MINI.cost(1000, 200) == pytest.approx((1000 * 0.15 + 200 * 0.60) / 1e6)
    assert MINI.cost(1000, 200, cached_tokens=400) == pytest.approx(
        (600 * 0.15 + 400 * 0.075 + 200 * 0.60) / 1e6
    )
    no_cache_rate = Price(input=1.0, output=2.0)
    assert no_cache_rate.cost(100, 10, cached_tokens=50) == no_cache_rate.cost(100, 10)
    assert MINI.cost(10, 0, cached_tokens=999) == pytest.approx(10 * 0.075 / 1e6)  # clamped


def test_configured_prices_win_and_the_bundled_catalogue_prices_the_rest() -> None:
    table = PriceTable(
        parse_prices(
            '{"gpt-4o-mini": {"input": 1, "output": 2}, "local": {"input": 0, "output": 0}}'
        )
    )
    assert table.cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert table.cost("local", 5000, 5000) == 0.0
    catalogue = PriceTable()
    # The bundled genai-prices snapshot: gpt-4o-mini is $0.15 / $0.60 per million tokens.
    assert catalogue.cost("gpt-4o-mini", 1000, 200) == pytest.approx(MINI.cost(1000, 200))
    assert catalogue.known("claude-3-5-haiku-latest")
    assert catalogue.cost("smollm2-135m-instruct", 1000, 200) is None
    assert PriceTable(catalogue=False).cost("gpt-4o-mini", 1000, 200) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[1]", "JSON object"),
        ('{"m": {"input": 1}}', "needs input and output"),
        ('{"m": {"input": 1, "output": -1}}', ">= 0"),
        ('{"m": {"input": 1, "output": "2"}}', "must be a number"),
        ('{"m": {"input": 1, "output": 2, "cache": 1}}', "unknown fields"),
    ],
)
def test_bad_price_tables_are_refused_with_a_reason(raw: str, message: str) -> None:
    with pytest.raises(PriceConfigError, match=message):
        parse_prices(raw)


def test_usage_adds_up_and_an_unknown_cost_stays_unknown() -> None:
    first = Usage(prompt_tokens=10, completion_tokens=5, cost_usd=0.001)
    second = Usage(prompt_tokens=20, completion_tokens=5, cached_prompt_tokens=8, cost_usd=0.002)
    total = first.plus(second)
    assert (total.prompt_tokens, total.completion_tokens, total.cached_prompt_tokens) == (30, 10, 8)
    assert total.cost_usd == pytest.approx(0.003)
    assert first.plus(Usage(prompt_tokens=1, completion_tokens=1)).cost_usd is None
    assert Usage().plus(first) == first and first.plus(Usage()) == first


async def test_every_answer_is_priced_where_the_model_is_known() -> None:
    async with FakeLLMServer() as fake:
        client = build_client(
            StackConfig(
                endpoints=parse_endpoints(None, fake.url),
                prices=PriceTable({"priced": MINI}, catalogue=False),
            )
        )
        try:
            messages = [{"role": "user", "content": "hello there"}]
            priced = await client.complete(ChatRequest(model="priced", messages=messages))
            unpriced = await client.complete(ChatRequest(model="other", messages=messages))
        finally:
            await client.aclose()
    assert priced.prompt_tokens > 0 and priced.completion_tokens > 0
    assert priced.cost_usd == pytest.approx(
        MINI.cost(priced.prompt_tokens, priced.completion_tokens)
    )
    assert unpriced.cost_usd is None


class Priced(ScriptedClient):
    """Scripted answers that carry a cost, like the endpoint layer's."""

    def __init__(self, *texts: str, cost: float) -> None:
        super().__init__()
        self.texts = list(texts)
        self.cost = cost

    async def complete(  # type: ignore[override]
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        prompt: str | None = None,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        return ChatCompletion(
            self.texts.pop(0), request.model, "stop", 100, 20, [-0.01] * 5, cost_usd=self.cost
        )


async def test_the_result_carries_the_cost_of_the_answer_and_its_re_ask() -> None:
    first = stage_completion('{"label": "nonsense"}').model_copy(
        update={"usage": Usage(prompt_tokens=100, completion_tokens=20, cost_usd=0.0004)}
    )
    settled = await Settler(REGISTRY, ControlState(), Priced(dumps(GOOD_ANSWER), cost=0.0003))(
        first
    )
    assert isinstance(settled, Emit) and settled.topic == RESULTS
    assert isinstance(settled.envelope, Result)
    assert settled.envelope.usage.cost_usd == pytest.approx(0.0007)
    assert settled.envelope.usage.total_tokens == 240

    unknown = stage_completion("not json")  # its usage has no cost: the total is unknown
    failed = await Settler(REGISTRY, ControlState(), Priced("still not json", cost=0.0003))(unknown)
    assert isinstance(failed, Emit) and failed.topic == FALLBACK
    assert isinstance(failed.envelope, Escalation) and failed.envelope.usage.cost_usd is None


def _req(max_tokens: int = 400) -> ChatRequest:
    # 400 characters -> 100 estimated prompt tokens.
    return ChatRequest(
        model="m", messages=[{"role": "user", "content": "x" * 396}], max_tokens=max_tokens
    )


class Routed:
    """Answers in order; each call waits for ``gate`` so calls can overlap."""

    def __init__(self, answers: list[ChatCompletion]) -> None:
        self.answers = answers
        self.gate = asyncio.Event()
        self.gate.set()

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        await self.gate.wait()
        return self.answers.pop(0)

    async def aclose(self) -> None:
        return None


async def test_money_budgets_refuse_before_the_call_and_charge_what_was_spent() -> None:
    prices = PriceTable({"m": Price(input=10.0, output=100.0)}, catalogue=False)
    # Estimate: 100 prompt tokens x $10/M + 400 output tokens x $100/M = $0.041.
    capped = BudgetedClient(
        Routed([]), BudgetConfig(max_request_cost_usd=0.04), clock=ManualClock(), prices=prices
    )
    with pytest.raises(BudgetExceeded) as refused:
        await capped.complete(_req(), prompt="p")
    assert refused.value.scope == "request_cost" and refused.value.reason == "budget_exceeded"
    assert refused.value.requested == pytest.approx(0.041)

    answers = [replace(completion(), cost_usd=0.006) for _ in range(3)]
    routed = Routed(answers)
    daily = BudgetedClient(
        routed, BudgetConfig(daily_cost_usd={"p": 0.06}), clock=ManualClock(), prices=prices
    )
    await daily.complete(_req(), prompt="p")  # reserves 0.041, charges 0.006
    assert daily.usage()["p"].spent_usd == pytest.approx(0.006)
    assert daily.usage()["p"].reserved_usd == 0
    routed.gate.clear()
    in_flight = asyncio.ensure_future(daily.complete(_req(), prompt="p"))
    await until(lambda: daily.usage()["p"].reserved_usd > 0, "the call in flight to reserve")
    assert daily.usage()["p"].reserved_usd == pytest.approx(0.041)
    with pytest.raises(BudgetExceeded) as over:  # 0.006 spent + 0.041 reserved + 0.041 > 0.06
        await daily.complete(_req(), prompt="p")
    routed.gate.set()
    await in_flight
    assert over.value.scope == "daily_cost" and over.value.retry_after_s is not None
    assert daily.usage()["p"].spent_usd == pytest.approx(0.012)
    assert parse_daily_costs('{"p": 2.5}') == {"p": 2.5}
    with pytest.raises(ValueError, match="positive amount"):
        parse_daily_costs('{"p": 0}')


async def test_money_budgets_are_account_wide_and_reported_to_the_fleet() -> None:
    """Dollars another worker charged or reserved count; this worker's go to the fleet."""
    prices = PriceTable({"m": Price(input=10.0, output=100.0)}, catalogue=False)
    clock = ManualClock()
    day = datetime.fromtimestamp(clock.time(), UTC).date()
    spend = FleetSpend("me")
    spend.fold(day, "p", "other", {"tokens": 0, "usd": 0.010, "reserved_usd": 0.005})
    daily = BudgetedClient(
        Routed([replace(completion(), cost_usd=0.006)]),
        BudgetConfig(daily_cost_usd={"p": 0.06}),
        clock=clock,
        prices=prices,
        shared=spend,
    )
    await daily.complete(_req(), prompt="p")  # 0.015 elsewhere + 0.041 reserved <= 0.06
    (published,) = spend.drain().values()
    assert published.spent_usd == pytest.approx(0.006) and published.reserved_usd == 0
    with pytest.raises(BudgetExceeded) as over:  # 0.015 + 0.006 + 0.041 > 0.06
        await daily.complete(_req(), prompt="p")
    assert over.value.scope == "daily_cost"
    assert over.value.spent == pytest.approx(0.021)


@pytest.fixture
def captured() -> Iterator[Captured]:
    with captured_telemetry() as cap:
        yield cap


class Answering:
    async def complete(self, request: ChatRequest) -> ChatCompletion:
        return ChatCompletion("{}", request.model, "stop", 10, 5, cost_usd=0.25)

    async def aclose(self) -> None:
        return None


def test_cost_is_a_metric_per_prompt_name_version_and_model(captured: Captured) -> None:
    client = RetryingClient(Answering())  # type: ignore[arg-type]

    async def call() -> None:
        with message_scope(MessageScope("model", "r-1", "ticket_triage", 2)):
            await client.complete(ChatRequest(model="gpt-4o-mini", messages=[]))
            await client.complete(ChatRequest(model="gpt-4o-mini", messages=[]))

    asyncio.run(call())
    [(attributes, point)] = captured.metric_points(sc.MODEL_COST)
    assert point.value == pytest.approx(0.5)
    assert attributes[sc.GEN_AI_PROMPT_NAME] == "ticket_triage"
    assert attributes[sc.GEN_AI_PROMPT_VERSION] == 2
    assert attributes[sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    [span] = [s for s in captured.spans.spans() if s.name.endswith("attempt")][:1]
    assert dict(span.attributes or {})[sc.COST_USD] == 0.25
    assert json.dumps(dict(span.attributes or {}))  # attributes stay JSON-friendly
