"""A stage runner on the real broker gets back partitions it had paused, and fetches them.

librdkafka keeps a partition's pause flag across its revocation and a later re-assignment.
A runner with every slot busy pauses all its partitions (back-pressure); if some of them
go (a rebalance, or a broker outage that ends the group session) and come back, they must
come back fetchable. Before the fix they stayed paused for good: after the broker outage
of the crash test the at-least-once worker took no more work (0 calls in flight).

Here the revocation is a second group member joining (cooperative-sticky moves half the
partitions to it) and leaving again; the runner is held full by a handler that waits for a
gate: it is full (every partition paused) when the rebalance takes half of them, and idle
(nothing left to pause for) when they come back, as after an outage.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from pipeline.config import Settings
from pipeline.contract.codec import Codec
from pipeline.contract.decisions import Decision, Emit
from pipeline.contract.topology import REQUESTS, VALIDATED
from pipeline.observability.redact import Redactor
from pipeline.transport.clients import KafkaClients
from pipeline.transport.instrumentation import NoInstrumentation
from pipeline.transport.message import Inbound
from pipeline.transport.runner import StageRunner
from tests.stage_support import validated

pytestmark = [pytest.mark.kafka]

PER_PARTITION = 5
ENVELOPE = validated()


async def wait_for(
    condition: Callable[[], bool], what: Callable[[], str], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what()}"
        await asyncio.sleep(0.02)


def test_partitions_paused_while_full_are_fetched_again_after_a_rebalance(
    kafka_settings: Settings,
) -> None:
    settings = kafka_settings
    topic = settings.topic(REQUESTS)
    group = f"{settings.topic_prefix}rebalance"
    clients = KafkaClients(settings)
    partitions = len(clients.admin().list_topics(topic, timeout=10).topics[topic].partitions)
    ids = {p: [f"r{p}-{i}" for i in range(PER_PARTITION)] for p in range(partitions)}
    producer = clients.producer()
    for p, values in ids.items():
        for rid in values:
            producer.produce(topic, rid.encode(), partition=p)
    assert producer.flush(30) == 0
    every = {rid for values in ids.values() for rid in values}
    gate = asyncio.Event()
    done: set[str] = set()

    async def handler(message: Inbound) -> Decision:
        await gate.wait()
        rid = (message.value or b"").decode()
        done.add(rid)
        return Emit(VALIDATED, ENVELOPE.model_copy(update={"request_id": rid}), rid, None)

    runner = StageRunner(
        stage="validate",
        input_topic=topic,
        group=group,
        handler=handler,
        clients=clients,
        codec=Codec(),
        redactor=Redactor(),
        topic_name=settings.topic,
        max_in_flight=2,
        delivery="at_least_once",
        commit_interval_ms=50,
        revoke_grace_s=0.2,
        instrumentation=NoInstrumentation(),
    )
    other_owns: set[int] = set()
    other_stop = threading.Event()

    def other_member() -> None:
        """A second member of the group: takes its share, commits nothing, then leaves."""
        consumer = clients.stage_consumer(group)

        def on_assign(_: object, tps: list[object]) -> None:
            other_owns.update(tp.partition for tp in tps)  # type: ignore[attr-defined]

        consumer.subscribe([topic], on_assign=on_assign)
        try:
            while not other_stop.is_set():
                consumer.poll(0.1)
        finally:
            consumer.close()  # revokes its share: it goes back to the runner

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        member = threading.Thread(target=other_member)
        try:
            await wait_for(
                lambda: len(runner._owned) == partitions and runner._paused == runner._owned,
                lambda: (
                    f"the runner to own and pause all {partitions} partitions "
                    f"(owned {sorted(runner._owned)}, paused {sorted(runner._paused)})"
                ),
                60,
            )
            member.start()
            await wait_for(
                lambda: bool(other_owns) and len(runner._owned) < partitions,
                lambda: f"a rebalance moving partitions away (other member: {other_owns})",
                60,
            )
            moved = set(other_owns)
            kept = every - {rid for p in moved for rid in ids[p]}
            gate.set()  # the runner finishes what it kept and goes idle
            await wait_for(
                lambda: kept <= done,
                lambda: f"the partitions the runner kept done ({len(kept - done)} left)",
                30,
            )
            other_stop.set()
            await asyncio.to_thread(member.join, 30)
            await wait_for(
                lambda: len(runner._owned) == partitions,
                lambda: f"partitions {sorted(moved)} back with the runner",
                60,
            )
            await wait_for(
                lambda: done == every,
                lambda: (
                    f"{len(every - done)} requests never fetched after partitions "
                    f"{sorted(moved)} came back: {sorted(every - done)[:10]}"
                ),
                30,
            )
        finally:
            other_stop.set()
            gate.set()
            stop.set()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 60)
            if member.is_alive():
                await asyncio.to_thread(member.join, 30)

    asyncio.run(main())
    assert done == every
