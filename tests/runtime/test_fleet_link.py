"""Workers' links to llm.fleet on the real broker, several in one event loop: how fast shared
state travels, and what the endpoint-breaker news saves (calls and time) in an outage.

Each "worker" here is what a worker process builds: its :class:`FleetState`, its resilient
client (talking HTTP to the real fake model server) and its :class:`FleetLink` (Kafka).
Calls are driven by the test instead of by stage runners, so the numbers are those of the
shared state alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from pipeline.config import Settings
from pipeline.contract.codec import Codec
from pipeline.control.state import ControlState
from pipeline.harness.fakellm import running_fake_llm
from pipeline.llm.protocol import ChatRequest, ModelError
from pipeline.resilience.breaker import BreakerState
from pipeline.resilience.budget import PromptUsage
from pipeline.resilience.configure import fleet_state, resilient_client
from pipeline.resilience.fleet import FleetState
from pipeline.resilience.stack import ResilientClient
from pipeline.runtime.fleet import FleetLink
from pipeline.transport.clients import KafkaClients
from tests.support import until

pytestmark = [pytest.mark.kafka]

MODEL = "gpt-4o-mini"
MIN_CALLS = 5


@dataclass
class Member:
    state: FleetState
    client: ResilientClient
    link: FleetLink
    stop: asyncio.Event


@asynccontextmanager
async def member(settings: Settings, name: str) -> AsyncIterator[Member]:
    state = fleet_state(settings, name)
    client = resilient_client(settings, ControlState(), state)
    link = FleetLink(settings, KafkaClients(settings), Codec(), state, client)
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    try:
        await asyncio.wait_for(link.ready.wait(), 60)
        yield Member(state, client, link, stop)
    finally:
        stop.set()
        await task
        await client.aclose()


def _settings(kafka_settings: Settings, url: str, **overrides: object) -> Settings:
    return kafka_settings.model_copy(
        update={
            "model_base_url": url,
            "breaker_min_calls": MIN_CALLS,
            "breaker_open_s": 30.0,
            "model_max_attempts": 1,
            "quality_breaker_min_calls": 5,
            **overrides,
        }
    )


def test_quality_outcomes_leases_and_spend_travel_between_workers(
    kafka_settings: Settings,
) -> None:
    settings = _settings(kafka_settings, "http://127.0.0.1:9/v1")

    async def run() -> dict[str, float]:
        async with AsyncExitStack() as stack:
            judge = await stack.enter_async_context(member(settings, "judge"))
            gate = await stack.enter_async_context(member(settings, "gate"))
            joined = await until(
                lambda: gate.state.shares.members() == ["gate", "judge"], "the judge's lease"
            )
            for _ in range(5):
                judge.state.quality.record("p@1", ok=False)
            opened = await until(
                lambda: gate.state.quality.state("p@1") is BreakerState.OPEN, "the open breaker"
            )
            day = datetime.now(UTC).date()
            judge.state.spend.report("p", PromptUsage(day, spent=700, reserved=50))
            spend = await until(lambda: gate.state.spend.others(day, "p") == (750, 0.0), "spend")
            judge.stop.set()  # a clean stop deletes the lease at once
            left = await until(lambda: gate.state.shares.members() == ["gate"], "the tombstone")
        # A worker started later (a restart under a new id) reads the day back.
        async with member(settings, "restarted") as restarted:
            assert restarted.state.spend.others(day, "p") == (750, 0.0)
            assert restarted.state.shares.members() == ["restarted"]
        return {"lease": joined, "quality": opened, "spend": spend, "leave": left}

    seconds = asyncio.run(run())
    print(
        "fleet propagation (record written -> folded by another worker): "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in seconds.items())
    )
    assert seconds["quality"] < 10 and seconds["leave"] < 10


TRAFFIC_GAPS_S = (0.1, 0.3, 0.6)
"""Each worker's own pace of calls to the model: uneven, as load over partitions is."""


async def _outage(settings: Settings) -> float:
    """Three workers calling a model whose server answers 500 to everything: the seconds
    until every worker's breaker is open."""
    async with AsyncExitStack() as stack:
        members = [await stack.enter_async_context(member(settings, f"w{i}")) for i in range(3)]
        request = ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        started = time.monotonic()

        async def traffic(m: Member, gap_s: float) -> None:
            while m.client.breakers.breaker(MODEL).state is not BreakerState.OPEN:
                with contextlib.suppress(ModelError):
                    await m.client.breakers.complete(request)
                await asyncio.sleep(gap_s)

        calls = (traffic(m, gap) for m, gap in zip(members, TRAFFIC_GAPS_S, strict=True))
        await asyncio.wait_for(asyncio.gather(*calls), 60)
        return time.monotonic() - started


def test_endpoint_news_spares_the_other_workers_their_own_failing_calls(
    kafka_settings: Settings,
) -> None:
    with running_fake_llm() as fake:
        fake.configure(force_behavior="server_error")
        results = {}
        for shared in (True, False):
            settings = _settings(kafka_settings, fake.url, share_endpoint_breakers=shared)
            before = fake.counters()["total_calls"]
            seconds = asyncio.run(_outage(settings))
            results[shared] = (fake.counters()["total_calls"] - before, seconds)
    (with_calls, with_s), (without_calls, without_s) = results[True], results[False]
    print(
        f"endpoint outage, 3 workers, min_calls {MIN_CALLS}: with news {with_calls} calls, "
        f"every breaker open after {with_s:.2f} s; without {without_calls} calls, {without_s:.2f} s"
    )
    # Without news every worker pays min_calls failing calls of its own; with it, the
    # first to open spares the others most of theirs.
    assert without_calls >= 3 * MIN_CALLS
    assert with_calls < without_calls
