"""An outcome is recorded once per durable output, and only once it is durable.

The stage runner records a message's metrics (``MessageTrace.committed``: routes, terminal
outcomes, durations) when the transaction holding its outputs committed. These tests run
the runner on the in-memory Kafka of its unit tests through every way a commit can go
wrong (an aborted or fatal transaction, an answer lost, a call stuck in librdkafka, a
revocation past its grace or with a failing commit, a lost partition), with the message
redone by the next owner where the first one gave it up, and compare what was recorded
with what a ``read_committed`` reader sees: one recording per committed output, never two.
At least once, outputs delivered after their partition was lost count too, once.

The first test pins the window that made the metrics-equal-the-ledger test flaky (a CI
rehearsal: one outcome too many): a message's span has ended (``decided``) well before its
metrics are recorded, so a test that waited for spans can leave outcomes still to come,
which the next snapshot then counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError

from pipeline.contract.decisions import Decision
from pipeline.transport import delivery as delivery_module
from pipeline.transport.instrumentation import MessageTrace, NoInstrumentation
from pipeline.transport.message import Inbound
from tests.transport.fake_kafka import FakeBroker, FakeClients
from tests.transport.test_runner import (
    P0,
    committed,
    emit,
    fill,
    make_runner,
    output_ids,
    running,
    wait_for,
)


class _Trace:
    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def decided(self, decision: Decision) -> None:
        self._recorder.decided.append(decision.request_id or "")

    def failed(self, exc: BaseException) -> None:
        return None

    def output_trace(self, *args: Any) -> dict[str, str]:
        return {}

    def committed(self, decision: Decision) -> None:
        self._recorder.recorded.append(decision.request_id or "")


class Recorder(NoInstrumentation):
    """What the metrics would count: the request of every ``committed`` call."""

    def __init__(self) -> None:
        self.decided: list[str] = []
        self.recorded: list[str] = []

    @contextlib.contextmanager
    def message(self, inbound: Inbound) -> Iterator[MessageTrace]:
        yield _Trace(self)


async def quick(message: Inbound) -> Decision:
    return emit(message)


def test_outcomes_are_recorded_after_the_commit_not_when_the_span_ends() -> None:
    broker = FakeBroker()
    ids = fill(broker, P0, 5)
    held = threading.Event()
    broker.hang_send_offsets.append(held)  # the transaction waits inside librdkafka
    recorder = Recorder()

    async def main() -> None:
        runner = make_runner(FakeClients(broker, [P0]), quick, instrumentation=recorder)
        async with running(runner):
            await wait_for(lambda: len(recorder.decided) == 5, "every message decided")
            assert recorder.recorded == [] and broker.outputs == [], "nothing committed yet"
            held.set()
            await wait_for(lambda: len(recorder.recorded) == 5, "the outcomes, after the commit")

    asyncio.run(main())
    assert Counter(recorder.recorded) == Counter(output_ids(broker)) == Counter(ids)


Scenario = Callable[[FakeBroker, Recorder, list[str], pytest.MonkeyPatch], None]


def _failing_commit(failure: KafkaError) -> Scenario:
    def run(broker: FakeBroker, recorder: Recorder, ids: list[str], mp: pytest.MonkeyPatch) -> None:
        clients = _run_to_the_end(
            broker, recorder, ids, lambda: broker.commit_failures.append(failure)
        )
        assert clients.producers[0].pending, "the failed transaction held outputs"

    return run


def _lost_answer(
    broker: FakeBroker, recorder: Recorder, ids: list[str], mp: pytest.MonkeyPatch
) -> None:
    mp.setattr(delivery_module, "COMMIT_DEADLINE_S", 0.05)

    def lose() -> None:
        broker.lost_commit_answers = 1

    clients = _run_to_the_end(broker, recorder, ids, lose)
    assert clients.producers[0].answer_lost and broker.lost_commit_answers == 0


def _stuck_call(
    broker: FakeBroker, recorder: Recorder, ids: list[str], mp: pytest.MonkeyPatch
) -> None:
    mp.setattr(delivery_module, "WATCHDOG_S", 0.3)
    stuck = threading.Event()
    try:
        clients = _run_to_the_end(
            broker, recorder, ids, lambda: broker.hang_send_offsets.append(stuck)
        )
    finally:
        stuck.set()
    assert clients.producers[0].pending, "the abandoned transaction held outputs"


def _run_to_the_end(
    broker: FakeBroker, recorder: Recorder, ids: list[str], fault: Callable[[], None]
) -> FakeClients:
    """``fault`` is injected by the first message's handler, before any message has
    finished: the first commit, the first carrying outputs, meets it. (A runner commits
    nothing before a message finishes: an assigned position alone is not a commit.)"""
    injected = False

    async def handler(message: Inbound) -> Decision:
        nonlocal injected
        if not injected:
            injected = True
            assert not broker.commits, "nothing committed before the first message finished"
            fault()
        return emit(message)

    clients = FakeClients(broker, [P0])

    async def main() -> None:
        async with running(make_runner(clients, handler, instrumentation=recorder)):
            await wait_for(lambda: committed(broker, P0)[0] == len(ids), "every offset")

    asyncio.run(main())
    return clients


def _given_up(kind: str, failing_commit: bool = False) -> Scenario:
    """Offsets 0-3 finished but not yet committed (a long commit interval) and 4-9 held
    (in flight or fetched) when the partition goes: revoked past its grace (its commit
    takes 0-3, the rest is cancelled), the revocation's commit failing too, or lost
    (nothing is committed). The
    first runner then stops (its last commit), and a second one redoes what is left."""

    def run(broker: FakeBroker, recorder: Recorder, ids: list[str], mp: pytest.MonkeyPatch) -> None:
        gate = asyncio.Event()

        async def gated(message: Inbound) -> Decision:
            if message.offset >= 4:
                await gate.wait()
            return emit(message)

        async def main() -> None:
            first = FakeClients(broker, [P0])
            runner = make_runner(
                first,
                gated,
                revoke_grace_s=0.2,
                commit_interval_ms=600_000,
                instrumentation=recorder,
            )
            async with running(runner):
                await wait_for(lambda: len(recorder.decided) == 4, "offsets 0-3 decided")
                assert recorder.recorded == [], "finished, waiting for their commit"
                if failing_commit:
                    broker.commit_failures.append(
                        KafkaError(KafkaError._FENCED, "fenced", txn_requires_abort=True)
                    )
                consumer = first.consumers[0]
                consumer.events.append((kind, [P0]))
                await wait_for(lambda: P0 not in consumer.assignment, "the partition goes")
                gate.set()  # what was still in flight finishes now, too late
            assert runner.stats.failed_commits == int(failing_commit)
            assert runner.stats.cancelled > 0, "work was in flight when the partition went"
            async with running(
                make_runner(FakeClients(broker, [P0]), quick, instrumentation=recorder)
            ):
                await wait_for(lambda: committed(broker, P0)[0] == 10, "the next owner")

        asyncio.run(main())

    return run


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(
            _failing_commit(KafkaError(KafkaError._FENCED, "fenced", txn_requires_abort=True)),
            id="aborted transaction, retried",
        ),
        pytest.param(
            _failing_commit(KafkaError(KafkaError._FENCED, "fenced by a newer one", fatal=True)),
            id="fatal transaction error, new producer",
        ),
        pytest.param(_lost_answer, id="commit answer lost, resolved from the offsets"),
        pytest.param(_stuck_call, id="call stuck in librdkafka, abandoned"),
        pytest.param(_given_up("revoke"), id="revoked past its grace, redone"),
        pytest.param(_given_up("revoke", failing_commit=True), id="revocation commit fails"),
        pytest.param(_given_up("lost"), id="partition lost, redone"),
    ],
)
def test_each_committed_output_is_recorded_once_whatever_its_commit_went_through(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = FakeBroker()
    ids = fill(broker, P0, 10)
    recorder = Recorder()
    scenario(broker, recorder, ids, monkeypatch)
    assert Counter(output_ids(broker)) == Counter(ids), "each output committed once"
    assert Counter(recorder.recorded) == Counter(ids), "each committed output recorded once"


def test_at_least_once_outputs_delivered_after_their_partition_was_lost_are_recorded_once() -> None:
    """At least once, outcomes are recorded when the outputs are acknowledged. A broker
    outage ends the session while outputs are queued: their tasks are cancelled with the
    lost partition, the outputs go out when the broker is back, and the partition's next
    assignment skips those messages. Their outcomes count then, once (they were never
    recorded: undercounted by every output delivered late)."""
    broker = FakeBroker()
    ids = fill(broker, P0, 5)
    clients = FakeClients(broker, [P0])
    recorder = Recorder()

    async def main() -> None:
        broker.hold_deliveries = True
        runner = make_runner(clients, quick, delivery="at_least_once", instrumentation=recorder)
        async with running(runner):
            await wait_for(lambda: len(clients.producers[0].pending) == 5, "outputs queued")
            consumer = clients.consumers[0]
            consumer.events.append(("lost", [P0]))
            await wait_for(lambda: P0 not in consumer.assignment, "the loss")
            assert recorder.recorded == [], "not delivered yet"
            broker.hold_deliveries = False
            await wait_for(lambda: len(broker.outputs) == 5, "the queued outputs delivered")
            consumer.events.append(("assign", [P0]))
            await wait_for(lambda: committed(broker, P0) == (5, set()), "the partition back")
            assert runner.stats.skipped == 5

    asyncio.run(main())
    assert Counter(output_ids(broker)) == Counter(ids), "nothing delivered twice"
    assert Counter(recorder.recorded) == Counter(ids), "each delivered output recorded once"
