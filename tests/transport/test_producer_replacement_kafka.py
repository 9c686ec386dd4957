"""Replaced transactional producers are freed, never accumulated (real broker).

Exactly once, :class:`~pipeline.transport.delivery.TransactionalDelivery` drops its
producer and starts a new one (same ``transactional.id``) after a failed transaction,
after a broker outage, and when a call hangs in librdkafka (the watchdog abandons it with
its thread). Each librdkafka handle holds threads, sockets and buffers, so one that
outlived its replacement would grow a worker by one handle per fault. Live handles are
counted the way the operating system sees them: one ``rdk:main`` thread per handle.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.transport import delivery as delivery_module
from pipeline.transport.clients import KafkaClients
from pipeline.transport.delivery import Outcome, TransactionalDelivery
from pipeline.transport.message import Outbound

pytestmark = pytest.mark.kafka


def live_handles() -> int:
    """librdkafka handles alive in this process (each runs one ``rdk:main`` thread)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                count += comm.read().strip() == "rdk:main"
        except OSError:  # the thread ended while being listed
            continue
    return count


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, (
            f"not within {timeout_s:.0f} s: {what} ({live_handles()} librdkafka handles alive)"
        )
        time.sleep(0.05)  # polling a process-level count for a condition, with a deadline


class Hangable:
    """A real transactional producer whose next ``begin_transaction`` can be made to wait
    for an event first: a call that never returns (librdkafka#5456), as the watchdog sees
    it."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self.hang: threading.Event | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def begin_transaction(self) -> None:
        hang, self.hang = self.hang, None
        if hang is not None:
            hang.wait()
        self._producer.begin_transaction()


def test_replaced_transactional_producers_are_freed(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients = KafkaClients(kafka_settings)
    tid = f"replace-{uuid.uuid4().hex[:8]}"
    topic = kafka_settings.topic("llm.stage.validated")
    consumer = clients.consumer(None)  # the committer: group metadata, committed offsets
    made: list[weakref.ref[Hangable]] = []
    outages = 0

    def make() -> Hangable:
        producer = Hangable(clients.transactional_producer(tid))
        made.append(weakref.ref(producer))
        return producer

    def alive() -> int:
        return sum(ref() is not None for ref in made)

    def commit() -> Outcome:
        return delivery.commit([Outbound(topic, b"k", b"v", [])], [], lambda: False)

    gc.collect()  # an earlier test's client in a reference cycle goes now, not mid-test
    baseline = live_handles()
    delivery = TransactionalDelivery(make, consumer, outages=lambda: outages, name="replace")
    try:
        delivery.start()
        assert commit() is Outcome.COMMITTED
        for _ in range(3):  # fenced by a newer producer with the same id: a fatal error
            zombie = clients.transactional_producer(tid)
            zombie.init_transactions(10)
            del zombie
            assert commit() is Outcome.FAILED
            assert commit() is Outcome.COMMITTED, "retried on a new producer"
        for _ in range(3):  # a broker outage: the next commit starts a new producer
            outages += 1
            assert commit() is Outcome.COMMITTED
        assert len(made) == 7
        wait_until(lambda: live_handles() == baseline + 1, "one producer left after six faults")
        assert alive() == 1

        monkeypatch.setattr(delivery_module, "WATCHDOG_S", 1.0)
        stuck = threading.Event()
        current = made[-1]()
        assert current is not None
        current.hang = stuck
        del current
        try:
            assert commit() is Outcome.FAILED, "abandoned by the watchdog"
            assert commit() is Outcome.COMMITTED, "on a new producer"
            # The abandoned call still runs on its thread: its producer cannot go yet.
            assert live_handles() == baseline + 2 and alive() == 2
        finally:
            stuck.set()
        wait_until(
            lambda: live_handles() == baseline + 1,
            "the abandoned producer freed once its call returned",
        )
        assert alive() == 1 and len(made) == 8
    finally:
        delivery.close()
    wait_until(lambda: live_handles() == baseline, "no producer left after close")
    assert alive() == 0
    consumer.close()
