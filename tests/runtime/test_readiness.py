"""``/readyz`` of a worker sees a stage whose commit never returns.

An exactly-once commit whose librdkafka call hangs (librdkafka#5456) is abandoned by the
delivery's watchdog; if a commit hangs past even that, the stage holds its partitions and
commits nothing while the consumer stays in its group and the broker answers: every other
readiness condition holds. Here the watchdog is held off and the commit hangs on the
in-memory Kafka's ``send_offsets_to_transaction`` until the test lets it return.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.runtime import health as health_module
from pipeline.runtime.health import WorkerReadiness
from pipeline.transport import delivery as delivery_module
from tests.transport.fake_kafka import FakeBroker, FakeClients
from tests.transport.test_runner import (
    P0,
    committed,
    counting_handler,
    fill,
    make_runner,
    running,
    wait_for,
)

CONTROL = "x.llm.control"


class Admin:
    """The metadata answer of a reachable broker."""

    def list_topics(self, topic: str, timeout: float = -1) -> Any:
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None)})


class ReadinessClients:
    def __init__(self, clients: FakeClients) -> None:
        self.health = clients.health

    def admin(self) -> Admin:
        return Admin()


def test_readyz_is_not_ready_while_a_commit_runs_past_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(delivery_module, "WATCHDOG_S", 600.0)  # the hang is not healed
    monkeypatch.setattr(delivery_module, "CALL_TIMEOUT_S", 600.0)
    monkeypatch.setattr(health_module, "STUCK_COMMIT_S", 0.2)
    monkeypatch.setattr(health_module, "PROBE_CACHE_S", 0.0)
    broker = FakeBroker()
    fill(broker, P0, 3)
    hang = threading.Event()
    broker.hang_send_offsets.append(hang)
    clients = FakeClients(broker, [P0])

    async def main() -> None:
        runner = make_runner(clients, counting_handler()[1])
        readiness = WorkerReadiness(ReadinessClients(clients), CONTROL)
        readiness.control_read = lambda: True
        readiness.members = [runner]
        async with running(runner):
            try:
                await wait_for(lambda: runner.commit_since is not None, "the commit to start")
                await wait_for(lambda: not readiness().ok, "/readyz to see the stuck commit")
                detail = readiness().detail
                assert detail["reason"] == "a commit running for over 0 s: model", detail
                assert detail["broker"] == "reachable" and detail["stages_joined"] == ["model"]
                hang.set()
                await wait_for(lambda: committed(broker, P0)[0] == 3, "the commit to end")
                await wait_for(lambda: readiness().ok, "/readyz ready again")
            finally:
                hang.set()

    asyncio.run(main())
