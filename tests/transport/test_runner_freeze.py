"""A frozen worker (SIGSTOP, a paused VM) resumed after its group moved on: at least once,
nothing it finished or fetched before the freeze may be sent before the loss is reported.

The fencing chaos run (``bench.chaos.fencing``) freezes a worker with its model calls in
flight while a replacement takes its static membership. The calls are answered during
the freeze, so on resuming the loop finished every one of them and sent its outputs
within the 10-60 ms librdkafka took to report the fencing: each a duplicate of the
replacement's redo. Here the freeze is the event loop blocked (and, for an idle runner,
a poll that returns that much late); the loss librdkafka reports after it is an
``on_lost`` the test delivers once the runner has had every chance to send.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from pipeline.contract.decisions import Decision
from pipeline.transport import runner as runner_module
from pipeline.transport.message import Inbound
from pipeline.transport.runner import DeliveryMode, StageRunner
from tests.transport.fake_kafka import FakeBroker, FakeClients
from tests.transport.test_runner import (
    P0,
    P1,
    committed,
    emit,
    fill,
    make_runner,
    output_ids,
    running,
    wait_for,
)

GAP_S = 0.3
FREEZE_S = 0.6  # twice the gap: a freeze whatever the machine's load adds to a tick


@pytest.fixture(autouse=True)
def short_freezes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "FREEZE_GAP_S", GAP_S)
    monkeypatch.setattr(runner_module, "FREEZE_TICK_S", 0.05)


def holding(runner: StageRunner) -> bool:
    return time.monotonic() < runner._held_until


def answered_during_a_freeze(answer: asyncio.Event) -> None:
    """The model answers while the process is stopped: the loop (this thread) does not run."""
    answer.set()
    time.sleep(FREEZE_S)


def test_work_finished_during_a_freeze_is_not_sent_before_the_loss_and_is_redone_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner_module, "FREEZE_HOLD_S", 30.0)  # the loss ends it here
    broker = FakeBroker()
    ids = fill(broker, P0, 4)
    clients = FakeClients(broker, [P0])
    answer = asyncio.Event()
    calls: Counter[int] = Counter()

    async def handler(message: Inbound) -> Decision:
        calls[message.offset] += 1
        await answer.wait()
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler, delivery="at_least_once")
        async with running(runner):
            await wait_for(lambda: sum(calls.values()) == 4, "four model calls in flight")
            producer = clients.producers[0]
            answered_during_a_freeze(answer)
            await wait_for(
                lambda: holding(runner) or bool(producer.pending or broker.outputs),
                "the runner to resume",
            )
            assert not producer.pending and not broker.outputs, "sent after the freeze"
            assert runner.stats.cancelled == 0
            consumer = clients.consumers[0]
            consumer.events.append(("lost", [P0]))  # librdkafka's first heartbeat's answer
            await wait_for(lambda: runner.stats.cancelled == 4, "the held work cancelled")
            assert not producer.pending and not broker.outputs, "nothing of it sent"
            assert committed(broker, P0) == (0, set()), "nothing committed for a lost partition"
            consumer.events.append(("assign", [P0]))  # the partition comes back: redone
            await wait_for(lambda: committed(broker, P0) == (4, set()), "P0 redone")

    asyncio.run(main())
    assert calls == Counter({0: 2, 1: 2, 2: 2, 3: 2}), "each redone once, after the loss"
    assert Counter(output_ids(broker)) == Counter(ids), "each sent once"


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_a_freeze_the_group_did_not_notice_only_delays_the_output(
    delivery: DeliveryMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A false alarm (a long loop turn while librdkafka kept heartbeating, or a freeze too
    short for anyone to take the partitions): the held work goes out after the hold, and
    nothing is lost or redone. Exactly once is not held (its transactions are fenced).
    Messages fetched during the hold start only after it."""
    monkeypatch.setattr(runner_module, "FREEZE_HOLD_S", 0.5)
    broker = FakeBroker()
    ids = fill(broker, P0, 4)
    clients = FakeClients(broker, [P0, P1])
    answer = asyncio.Event()
    calls: Counter[tuple[int, int]] = Counter()

    async def handler(message: Inbound) -> Decision:
        calls[(message.partition, message.offset)] += 1
        if message.partition == 0:
            await answer.wait()
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler, delivery=delivery)
        async with running(runner):
            await wait_for(lambda: len(calls) == 4, "four calls in flight")
            answered_during_a_freeze(answer)
            if delivery == "exactly_once":
                await wait_for(lambda: committed(broker, P0)[0] == 4, "P0 committed")
                assert runner._held_until == 0.0, "exactly once is never held"
                return
            await wait_for(lambda: holding(runner), "the hold")
            ids.extend(fill(broker, P1, 3))
            await wait_for(lambda: runner._tracker.in_flight(*P1) == 3, "P1 fetched")
            assert (1, 0) not in calls, "nothing spawned during the hold"
            assert not broker.outputs, "nothing sent during the hold"
            await wait_for(lambda: committed(broker, P0)[0] == 4, "P0 after the hold")
            await wait_for(lambda: committed(broker, P1)[0] == 3, "P1 after the hold")

    asyncio.run(main())
    assert set(calls.values()) == {1}, "nothing redone"
    assert Counter(output_ids(broker)) == Counter(ids), "nothing lost or sent twice"


def test_an_idle_runner_whose_poll_returns_a_freeze_late_holds_what_it_fetched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing in flight when the process stopped: the consumer's poll returns late, with
    messages a new owner is processing too. They wait for the loss instead of being handled."""
    monkeypatch.setattr(runner_module, "FREEZE_HOLD_S", 30.0)
    broker = FakeBroker()
    clients = FakeClients(broker, [P0])
    calls: Counter[int] = Counter()

    async def handler(message: Inbound) -> Decision:
        calls[message.offset] += 1
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler, delivery="at_least_once")
        async with running(runner):
            consumer = clients.consumers[0]
            await wait_for(lambda: P0 in consumer.assignment, "P0 assigned")
            poll = consumer.poll

            def frozen_poll(timeout: float = -1) -> Any:
                consumer.poll = poll  # type: ignore[method-assign]
                time.sleep(timeout + FREEZE_S)  # the process stopped inside the wait
                ids.extend(fill(broker, P0, 3))  # produced meanwhile, fetched on resuming
                return poll(timeout)

            ids: list[str] = []
            consumer.poll = frozen_poll  # type: ignore[method-assign]
            await wait_for(lambda: holding(runner), "the hold")
            await wait_for(lambda: runner._tracker.in_flight(*P0) == 3, "the messages fetched")
            assert not calls, "nothing handled during the hold"
            consumer.events.append(("lost", [P0]))
            await wait_for(lambda: P0 not in runner._owned, "the loss")
            assert not calls and not broker.outputs
            consumer.events.append(("assign", [P0]))
            await wait_for(lambda: committed(broker, P0) == (3, set()), "P0 back")
        assert Counter(output_ids(broker)) == Counter(ids)

    asyncio.run(main())
    assert set(calls.values()) == {1}
