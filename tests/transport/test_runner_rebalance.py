"""Rebalance callbacks never hold the consumer on work that is winding down.

librdkafka calls the runner's rebalance callbacks on its Kafka thread, inside ``poll``,
and does not rejoin the group until they return. A callback that waited for the revoked or
lost partitions' message tasks to end, with no bound, kept the consumer out of its group
for as long as one of those tasks took to wind down (a cleanup that awaits something, a
cancellation swallowed), forever if it never did: the worker stayed up, alive, and
consumed nothing. Here a task winds down only when the test lets it, and the runner must
take its next assignment (and commit it) meanwhile, without committing or emitting
anything of the partition it no longer owns.

And a consumer that librdkafka left without a broker after a broker restart never rejoins
at all: the runner notices and stops with a fatal error, so the worker process is
replaced, instead of staying up out of its groups.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import KafkaError

from pipeline.contract.decisions import Decision
from pipeline.transport import runner as runner_module
from pipeline.transport.delivery import KafkaFatalError
from pipeline.transport.message import Inbound
from pipeline.transport.runner import DeliveryMode
from tests.transport.fake_kafka import FakeBroker, FakeClients, FakeConsumer
from tests.transport.test_runner import (
    P0,
    P1,
    committed,
    counting_handler,
    emit,
    fill,
    make_runner,
    output_ids,
    running,
    wait_for,
)

MODES = ["exactly_once", "at_least_once"]


class WindingDown:
    """A handler whose P0 messages hang until cancelled, then wind down only once
    ``release`` is set: re-raising the cancellation, or (``swallow``) returning a decision
    as if it never came (asyncio.wait_for can lose a cancellation on Python 3.11)."""

    def __init__(self, swallow: bool = False) -> None:
        self.swallow = swallow
        self.release = asyncio.Event()
        self.in_flight = 0
        self.winding_down = 0
        self.handled: Counter[tuple[int, int]] = Counter()

    async def __call__(self, message: Inbound) -> Decision:
        if message.partition == 0:
            self.in_flight += 1
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.winding_down += 1
                await self.release.wait()
                if not self.swallow:
                    raise
        self.handled[(message.partition, message.offset)] += 1
        return emit(message)


@pytest.mark.parametrize("delivery", MODES)
def test_a_lost_partition_whose_work_winds_down_slowly_does_not_keep_the_consumer_out(
    delivery: DeliveryMode,
) -> None:
    """The broker outage of the worker-endpoints test: the session ends, the partitions
    are lost with work in flight, the broker comes back and assigns partitions again. The
    runner takes them while the lost work is still winding down."""
    broker = FakeBroker()
    fill(broker, P0, 3)
    clients = FakeClients(broker, [P0])
    handler = WindingDown(swallow=True)

    async def main() -> None:
        runner = make_runner(clients, handler, delivery=delivery)
        async with running(runner):
            try:
                consumer = clients.consumers[0]
                await wait_for(lambda: handler.in_flight == 3, "P0's messages in flight")
                consumer.events.append(("lost", [P0]))
                await wait_for(lambda: handler.winding_down == 3, "P0's work cancelled")
                ids = fill(broker, P1, 4)
                consumer.events.append(("assign", [P1]))
                await wait_for(
                    lambda: committed(broker, P1)[0] == 4,
                    "P1 assigned and committed while P0's lost work winds down (the "
                    "consumer was held in its on_lost callback)",
                    timeout_s=10,
                )
                assert runner.joined
                assert sorted(output_ids(broker)) == sorted(ids)
                handler.release.set()
                await wait_for(lambda: sum(handler.handled.values()) == 7, "P0's work ended")
                # Another commit of P1 as the barrier: P0's late results would be in it.
                ids += fill(broker, P1, 1)
                await wait_for(lambda: committed(broker, P1)[0] == 5, "a later commit of P1")
            finally:
                handler.release.set()  # the old runner's Kafka thread waits for this
        assert committed(broker, P0) == (0, set()), "nothing committed for the lost P0"
        assert sorted(output_ids(broker)) == sorted(ids), "no output of the lost P0"

    asyncio.run(main())


@pytest.mark.parametrize("delivery", MODES)
def test_a_revocation_waits_for_cancelled_work_only_within_a_bound(
    delivery: DeliveryMode,
) -> None:
    """A revocation lets in-flight work finish within its grace, then cancels the rest;
    a cancelled task that does not end at once is left behind (its result counts for
    nothing: the next owner redoes it) instead of holding the rebalance."""
    broker = FakeBroker()
    fill(broker, P0, 3)
    clients = FakeClients(broker, [P0, P1])
    handler = WindingDown(swallow=True)

    async def main() -> None:
        runner = make_runner(clients, handler, delivery=delivery, revoke_grace_s=0.1)
        async with running(runner):
            try:
                consumer = clients.consumers[0]
                await wait_for(lambda: handler.in_flight == 3, "P0's messages in flight")
                broker.revoke(consumer, [P0])
                await wait_for(
                    lambda: P0 not in consumer.assignment,
                    "the revocation to end while P0's cancelled work winds down",
                    timeout_s=10,
                )
                ids = fill(broker, P1, 2)
                await wait_for(lambda: committed(broker, P1)[0] == 2, "P1 goes on")
                handler.release.set()
                await wait_for(lambda: sum(handler.handled.values()) == 5, "P0's work ended")
                ids += fill(broker, P1, 1)
                await wait_for(lambda: committed(broker, P1)[0] == 3, "a later commit of P1")
            finally:
                handler.release.set()
        assert committed(broker, P0) == (0, set()), "P0's unfinished work is left to redo"
        assert sorted(output_ids(broker)) == sorted(ids), "nothing of P0 after it was revoked"

    asyncio.run(main())


# -- a consumer with no broker left ------------------------------------------------------------


def test_a_consumer_left_without_brokers_exits_the_worker_instead_of_idling_for_good(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """librdkafka 2.16 now and then re-bootstraps a client through a broker restart into
    having no broker handle that connects: its consumer, out of its group since the
    outage, polls on and never rejoins while the process's other clients work. Past
    ORPHAN_AFTER_S with its own metadata request failing, the runner stops with a fatal
    error: the worker exits and a fresh process rejoins."""
    monkeypatch.setattr(runner_module, "ORPHAN_AFTER_S", 0.2)
    monkeypatch.setattr(runner_module, "ORPHAN_PROBE_S", 0.05)
    broker = FakeBroker()
    ids = fill(broker, P0, 2)
    clients = FakeClients(broker, [P0])

    async def main() -> None:
        runner = make_runner(clients, counting_handler()[1])
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await wait_for(lambda: committed(broker, P0)[0] == 2, "P0 processed")
        broker.metadata_error = KafkaError(KafkaError._TRANSPORT, "no usable brokers")
        clients.consumers[0].events.append(("lost", [P0]))
        with pytest.raises(KafkaFatalError, match="reaches no broker"):
            await asyncio.wait_for(task, 10)
        assert not runner.joined

    asyncio.run(main())
    assert sorted(output_ids(broker)) == sorted(ids)


def test_a_consumer_out_of_its_group_in_an_outage_or_with_brokers_waits_to_rejoin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of its group past ORPHAN_AFTER_S is not enough: during an outage (the
    process's clients failing) or with its own metadata request answered, the consumer
    waits for its next assignment, however long the group takes."""
    monkeypatch.setattr(runner_module, "ORPHAN_AFTER_S", 0.1)
    monkeypatch.setattr(runner_module, "ORPHAN_PROBE_S", 0.02)
    broker = FakeBroker()
    clients = FakeClients(broker, [P0])
    probes = 0
    list_topics = FakeConsumer.list_topics

    def counted(self: FakeConsumer, topic: str | None = None, timeout: float = -1) -> Any:
        nonlocal probes
        probes += 1
        return list_topics(self, topic, timeout)

    monkeypatch.setattr(FakeConsumer, "list_topics", counted)

    async def main() -> None:
        runner = make_runner(clients, counting_handler()[1])
        async with running(runner) as task:
            consumer = clients.consumers[0]
            await wait_for(lambda: runner.joined, "the first assignment")
            clients.health.down = True  # an outage: no probe at all
            broker.metadata_error = KafkaError(KafkaError._TRANSPORT, "broker down")
            consumer.events.append(("lost", [P0]))
            await wait_for(lambda: not runner.joined, "the loss")
            await wait_for(
                lambda: time.monotonic() - runner._out_since > 0.5,
                "five times ORPHAN_AFTER_S out of the group",
            )
            assert probes == 0 and not task.done()
            clients.health.down = False  # the broker is back, this consumer reaches it
            broker.metadata_error = None
            await wait_for(lambda: probes >= 3, "the consumer's metadata probes")
            assert not task.done()
            ids = fill(broker, P0, 2)
            consumer.events.append(("assign", [P0]))
            await wait_for(lambda: committed(broker, P0)[0] == 2, "the rejoin")
        assert sorted(output_ids(broker)) == sorted(ids)

    asyncio.run(main())
