"""Token budgets: per-request cap, per-prompt daily allowance with reservations."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from pipeline.llm.protocol import ChatCompletion, ChatRequest, ModelError
from pipeline.resilience.budget import BudgetConfig, BudgetedClient, parse_daily_budgets
from pipeline.resilience.errors import BudgetExceeded
from pipeline.resilience.testing import ManualClock, ScriptedClient, completion


class Routed:
    """A routed inner client: records the ``models`` it was given."""

    def __init__(self, inner: ScriptedClient) -> None:
        self.inner = inner
        self.models: list[Sequence[str] | None] = []

    async def complete(
        self,
        request: ChatRequest,
        deadline: datetime | None = None,
        *,
        models: Sequence[str] | None = None,
    ) -> ChatCompletion:
        self.models.append(models)
        return await self.inner.complete(request, deadline)

    async def aclose(self) -> None:
        await self.inner.aclose()


def req(max_tokens: int = 400) -> ChatRequest:
    # "user" + 396 characters = 400 characters -> 100 estimated prompt tokens.
    return ChatRequest(
        model="m", messages=[{"role": "user", "content": "x" * 396}], max_tokens=max_tokens
    )


def budgeted(
    config: BudgetConfig, *steps: ChatCompletion | ModelError, clock: ManualClock | None = None
) -> tuple[BudgetedClient, Routed]:
    inner = ScriptedClient(*steps, default=completion(prompt_tokens=100, completion_tokens=50))
    routed = Routed(inner)
    return BudgetedClient(routed, config, clock=clock or ManualClock()), routed


async def test_request_over_the_per_request_cap_is_refused_before_any_call() -> None:
    client, routed = budgeted(BudgetConfig(max_request_tokens=499))
    with pytest.raises(BudgetExceeded) as caught:
        await client.complete(req(max_tokens=400), prompt="p")
    error = caught.value
    assert (error.scope, error.limit, error.requested, error.reason) == (
        "request",
        499,
        500,
        "budget_exceeded",
    )
    assert isinstance(error, ModelError) and error.kind == "client_error"
    assert not error.retryable and routed.inner.calls == []
    await client.complete(req(max_tokens=399), prompt="p")


async def test_daily_budget_is_charged_actual_usage() -> None:
    client, routed = budgeted(BudgetConfig(daily_tokens={"p": 1000}))
    for _ in range(4):  # each reserves 500 but uses 150: charged by estimate, 3 would fit
        await client.complete(req(), prompt="p")
    assert client.usage()["p"].spent == 600 and client.usage()["p"].reserved == 0
    with pytest.raises(BudgetExceeded) as caught:
        await client.complete(req(), prompt="p")  # 600 + 500 > 1000
    assert caught.value.scope == "daily" and caught.value.spent == 600
    assert len(routed.inner.calls) == 4
    await client.complete(req(max_tokens=300), prompt="p")  # 600 + 400 fits exactly


async def test_reservations_stop_concurrent_requests_overshooting() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: ChatRequest) -> ChatCompletion:
        entered.set()
        await release.wait()
        return completion(prompt_tokens=100, completion_tokens=10)

    client, routed = budgeted(BudgetConfig(daily_tokens={"p": 900}))
    routed.inner.push(slow)
    first = asyncio.create_task(client.complete(req(), prompt="p"))
    await entered.wait()
    assert client.usage()["p"].reserved == 500
    with pytest.raises(BudgetExceeded):
        await client.complete(req(), prompt="p")  # 500 reserved + 500 > 900
    release.set()
    await first
    assert client.usage()["p"].spent == 110
    await client.complete(req(), prompt="p")


async def test_failed_calls_are_not_charged() -> None:
    client, _ = budgeted(
        BudgetConfig(daily_tokens={"p": 500}), ModelError("unavailable", "all models failed")
    )
    with pytest.raises(ModelError):
        await client.complete(req(), prompt="p")
    assert client.usage()["p"].spent == 0 and client.usage()["p"].reserved == 0
    await client.complete(req(), prompt="p")


async def test_budget_resets_at_utc_midnight() -> None:
    start = datetime(2025, 3, 1, 23, 0, tzinfo=UTC).timestamp()
    clock = ManualClock(wall_start=start)
    client, _ = budgeted(BudgetConfig(default_daily_tokens=600), clock=clock)
    await client.complete(req(), prompt="p")
    with pytest.raises(BudgetExceeded) as caught:
        await client.complete(req(), prompt="p")
    assert caught.value.retry_after_s == pytest.approx(3600)
    clock.advance(3600)
    await client.complete(req(), prompt="p")
    assert client.usage()["p"].day.isoformat() == "2025-03-02"


async def test_unbudgeted_prompts_and_anonymous_calls_pass_with_their_models() -> None:
    client, routed = budgeted(BudgetConfig(daily_tokens={"p": 1}))
    await client.complete(req(), prompt="other", models=["m", "n"])
    await client.complete(req())
    assert len(routed.inner.calls) == 2
    assert routed.models == [["m", "n"], None]


def test_daily_allowances_are_checked_but_not_the_request_cap_must_be_positive() -> None:
    with pytest.raises(ValueError):
        BudgetConfig(daily_tokens={"p": 0})


def test_parse_daily_budgets() -> None:
    assert parse_daily_budgets('{"summarise": 2000000, "classify": 500000}') == {
        "summarise": 2_000_000,
        "classify": 500_000,
    }
    assert parse_daily_budgets(None) == {}
    for bad in ("[1]", "{x", '{"p": "1"}', '{"p": 0}', '{"p": true}', '{"p": 1.5}'):
        with pytest.raises(ValueError):
            parse_daily_budgets(bad)
