"""The stage runner's slot, ordering, offset and rebalance logic, without a broker.

The runner gets its Kafka clients from a factory; here that factory is an in-memory Kafka
(:mod:`tests.transport.fake_kafka`) whose transactions make outputs and offsets visible
together or not at all, and whose "crash" makes a client's later calls count for nothing,
the way SIGKILL does. Everything is checked against the broker's state: what a
``read_committed`` reader would see and which offsets (with metadata) are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError

from pipeline.contract.codec import Codec
from pipeline.contract.decisions import DeadLetter, Decision, Emit
from pipeline.contract.topology import VALIDATED
from pipeline.observability.redact import Redactor
from pipeline.transport import delivery as delivery_module
from pipeline.transport import runner as runner_module
from pipeline.transport.delivery import IdempotentDelivery, KafkaFatalError, Outcome
from pipeline.transport.instrumentation import MessageTrace, NoInstrumentation
from pipeline.transport.message import Inbound, Outbound
from pipeline.transport.offsets import decode_done, encode_done
from pipeline.transport.runner import DeliveryMode, Handler, StageRunner
from tests.stage_support import validated
from tests.transport.fake_kafka import FakeBroker, FakeClients, Partition

TOPIC = "in"
P0: Partition = (TOPIC, 0)
P1: Partition = (TOPIC, 1)
ENVELOPE = validated()


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def emit(message: Inbound) -> Decision:
    rid = (message.value or b"").decode()
    return Emit(VALIDATED, ENVELOPE.model_copy(update={"request_id": rid}), rid, None)


def counting_handler() -> tuple[Counter[int], Handler]:
    """A handler that emits each message and counts how often each offset was handled."""
    calls: Counter[int] = Counter()

    async def handler(message: Inbound) -> Decision:
        calls[message.offset] += 1
        return emit(message)

    return calls, handler


def fill(broker: FakeBroker, partition: Partition, count: int, **kwargs: Any) -> list[str]:
    ids = []
    for _ in range(count):
        rid = f"{partition[1]}-{len(broker.logs.get(partition, []))}"
        broker.append(*partition, rid.encode(), **kwargs)
        ids.append(rid)
    return ids


def output_ids(broker: FakeBroker) -> list[str]:
    """The request behind each committed output (a dead letter carries the input value)."""
    return [
        (o.value if o.topic == "x.llm.dlq" else dict(o.headers)["x-request-id"]).decode()
        for o in broker.outputs
    ]


def make_runner(
    clients: FakeClients,
    handler: Handler,
    *,
    max_in_flight: int = 8,
    delivery: DeliveryMode = "exactly_once",
    revoke_grace_s: float = 5.0,
    commit_interval_ms: int = 10,
    instrumentation: Any = None,
) -> StageRunner:
    return StageRunner(
        stage="model",
        input_topic=TOPIC,
        group="g",
        handler=handler,
        clients=clients,
        codec=Codec(),
        redactor=Redactor(),
        topic_name=lambda t: f"x.{t}",
        max_in_flight=max_in_flight,
        delivery=delivery,
        commit_interval_ms=commit_interval_ms,
        revoke_grace_s=revoke_grace_s,
        instrumentation=instrumentation or NoInstrumentation(),
    )


@contextlib.asynccontextmanager
async def running(runner: StageRunner) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await wait_for(runner.started.is_set, "the runner to start")
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)


def committed(broker: FakeBroker, partition: Partition) -> tuple[int, set[int]]:
    position, metadata = broker.committed.get(partition, (0, ""))
    return position, decode_done(position, metadata)


# -- the in-flight bound ----------------------------------------------------------------------


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_in_flight_never_exceeds_the_bound_and_every_message_commits_once(
    delivery: DeliveryMode,
) -> None:
    broker = FakeBroker()
    ids = fill(broker, P0, 60) + fill(broker, P1, 60)
    clients = FakeClients(broker, [P0, P1])
    now = 0
    peak = 0
    release = asyncio.Event()

    async def handler(message: Inbound) -> Decision:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await release.wait()
        await asyncio.sleep(random.random() / 1000)  # work of random length: out of order
        now -= 1
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler, max_in_flight=8, delivery=delivery)
        async with running(runner):
            await wait_for(lambda: now == 8, "8 messages in flight")
            # Full: the runner keeps polling (paused) but takes nothing more.
            await wait_for(lambda: set(clients.consumers[0].paused) == {P0, P1}, "a pause")
            assert now == 8
            release.set()
            await wait_for(lambda: len(broker.outputs) == len(ids), "every output")
            await wait_for(
                lambda: committed(broker, P0)[0] == 60 and committed(broker, P1)[0] == 60,
                "both partitions committed to their end",
            )
        assert runner.stats.max_in_flight_seen == 8

    asyncio.run(main())
    assert peak == 8
    assert sorted(output_ids(broker)) == sorted(ids)


def test_messages_trickling_in_are_handed_on_within_one_fetch_and_the_bound_holds() -> None:
    """One fetch on the Kafka thread hands each message on as it arrives and goes on
    polling (instead of a thread round trip per message), never taking more than the room
    it was given: a full runner still pauses with exactly its bound in flight."""
    broker = FakeBroker()
    clients = FakeClients(broker, [P0])
    started: list[int] = []
    now = 0
    peak = 0
    release = asyncio.Event()

    async def handler(message: Inbound) -> Decision:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        started.append(message.offset)
        if message.offset < 6:
            await release.wait()
        now -= 1
        return emit(message)

    async def main() -> int:
        runner = make_runner(
            clients, handler, max_in_flight=4, delivery="at_least_once", commit_interval_ms=1000
        )
        fetches = 0
        fetch = runner._fetch

        def counted(*args: Any) -> list[Any]:
            nonlocal fetches
            fetches += 1
            return fetch(*args)

        runner._fetch = counted  # type: ignore[method-assign]
        async with running(runner):
            for i in range(6):  # one at a time, each once the previous one is handled
                fill(broker, P0, 1)
                if i < 4:
                    await wait_for(lambda i=i: len(started) == i + 1, f"message {i} handled")
            await wait_for(lambda: clients.consumers[0].paused == {P0}, "a pause while full")
            assert (now, started) == (4, [0, 1, 2, 3])
            release.set()
            await wait_for(lambda: len(started) == 6, "the two that waited for room")
            before = fetches
            for i in range(6, 30):
                fill(broker, P0, 1)
                await wait_for(lambda i=i: len(started) == i + 1, f"message {i} handled")
            trickle_fetches = fetches - before
            await wait_for(lambda: len(broker.outputs) == 30, "every output")
        return trickle_fetches

    trickle_fetches = asyncio.run(main())
    assert peak == 4
    assert sorted(output_ids(broker)) == sorted(f"0-{i}" for i in range(30))
    # 24 messages, each arriving while a fetch was already waiting: a few fetches (each
    # ends at its 100 ms timeout), not one per message.
    assert trickle_fetches <= 12, trickle_fetches


def test_exactly_once_a_full_outbox_is_committed_when_due_not_after_the_full_poll_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exactly once, finished messages wait in the outbox for the next transaction, and a
    full outbox stops fetching. Only the commit makes room again, so a full runner must
    commit when the commit is due rather than wait for room up to its full-poll interval
    (30 s here: the test's deadline is far shorter)."""
    monkeypatch.setattr(runner_module, "FULL_POLL_INTERVAL_S", 30.0)
    broker = FakeBroker()
    ids = fill(broker, P0, 200)
    clients = FakeClients(broker, [P0])
    _, handler = counting_handler()

    async def main() -> None:
        # 2 in flight: the outbox is full at 16 finished messages, long before 200.
        runner = make_runner(clients, handler, max_in_flight=2, commit_interval_ms=20)
        async with running(runner):
            await wait_for(lambda: committed(broker, P0)[0] == 200, "every offset committed")

    asyncio.run(main())
    assert sorted(output_ids(broker)) == sorted(ids)


# -- per-key order ----------------------------------------------------------------------------


def test_ordered_keys_finish_in_offset_order_while_other_keys_overtake() -> None:
    broker = FakeBroker()
    ordered = [(b"k%d" % (i % 3), [("x-ordered", b"1")]) for i in range(30)]
    for key, headers in ordered:
        fill(broker, P0, 1, key=key, headers=headers)
    fill(broker, P0, 10)  # unordered, no key

    async def handler(message: Inbound) -> Decision:
        await asyncio.sleep(random.random() / 200)  # later messages often finish first
        return emit(message)

    async def main() -> None:
        async with running(make_runner(FakeClients(broker, [P0]), handler, max_in_flight=16)):
            await wait_for(lambda: len(broker.outputs) == 40, "40 outputs")

    asyncio.run(main())
    seen: dict[bytes, list[str]] = {}
    for out in broker.outputs:
        if out.key and out.key.startswith(b"k"):
            seen.setdefault(out.key, []).append(dict(out.headers)["x-request-id"].decode())
    for key, rids in seen.items():
        offsets = [int(r.split("-")[1]) for r in rids]
        assert offsets == sorted(offsets), f"key {key!r} out of order: {offsets}"
        assert len(offsets) == 10


# -- nothing a task raises can stall its partition --------------------------------------------


class ExplodingTrace:
    """Instrumentation that fails after the stage decided: outside the stage's own guard."""

    def __init__(self, explode: bool) -> None:
        self.explode = explode

    def decided(self, decision: Decision) -> None:
        if self.explode:
            raise RuntimeError("instrumentation bug")

    def failed(self, exc: BaseException) -> None:
        return None

    def output_trace(self, *args: Any) -> dict[str, str]:
        return {}

    def committed(self, decision: Decision) -> None:
        return None


class Exploding(NoInstrumentation):
    def __init__(self, offsets: set[int]) -> None:
        self.offsets = offsets

    @contextlib.contextmanager
    def message(self, inbound: Inbound) -> Iterator[MessageTrace]:
        yield ExplodingTrace(inbound.offset in self.offsets)


def test_an_exception_escaping_a_message_task_is_a_dead_letter_not_a_stuck_offset() -> None:
    broker = FakeBroker()
    ids = fill(broker, P0, 12)

    async def handler(message: Inbound) -> Decision:
        if message.offset == 2:
            raise ValueError("stage bug")
        return emit(message)

    async def main() -> None:
        runner = make_runner(FakeClients(broker, [P0]), handler, instrumentation=Exploding({5}))
        async with running(runner):
            await wait_for(lambda: committed(broker, P0)[0] == 12, "the commit past 2 and 5")

    asyncio.run(main())
    dead = {o.value: dict(o.headers) for o in broker.outputs if o.topic == "x.llm.dlq"}
    assert set(dead) == {b"0-2", b"0-5"}
    assert dead[b"0-2"]["x-dlq-error-class"] == b"ValueError"
    assert dead[b"0-5"]["x-dlq-error-class"] == b"RuntimeError"
    results = [o.value for o in broker.outputs if o.topic == "x.llm.stage.validated"]
    assert len(results) == 10
    assert Counter(output_ids(broker)) == Counter(ids)


# -- commit metadata: finished work above the position ----------------------------------------


def test_finished_offsets_above_a_slow_one_are_committed_in_the_metadata() -> None:
    broker = FakeBroker()
    fill(broker, P0, 10)
    slow = asyncio.Event()

    async def handler(message: Inbound) -> Decision:
        if message.offset == 3:
            await slow.wait()
        return emit(message)

    async def main() -> None:
        async with running(make_runner(FakeClients(broker, [P0]), handler, max_in_flight=16)):
            await wait_for(lambda: committed(broker, P0) == (3, {4, 5, 6, 7, 8, 9}), "metadata")
            assert len(broker.outputs) == 9, "outputs of finished messages are committed"
            slow.set()
            await wait_for(lambda: committed(broker, P0) == (10, set()), "the position moves")

    asyncio.run(main())


def test_a_new_owner_skips_what_the_commit_metadata_records_as_done() -> None:
    broker = FakeBroker()
    fill(broker, P0, 13)
    broker.committed[P0] = (5, encode_done(5, {7, 9}))
    handled: list[int] = []

    async def handler(message: Inbound) -> Decision:
        handled.append(message.offset)
        return emit(message)

    async def main() -> None:
        runner = make_runner(FakeClients(broker, [P0]), handler)
        async with running(runner):
            await wait_for(lambda: committed(broker, P0)[0] == 13, "the commit to the end")
        assert runner.stats.skipped == 2

    asyncio.run(main())
    assert sorted(handled) == [5, 6, 8, 10, 11, 12]


# -- transactions: aborted means invisible, then redone once ----------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        KafkaError(KafkaError._FENCED, "fenced", txn_requires_abort=True),
        # A fatal producer error (fenced by the broker's transaction timeout after an
        # outage): the producer is rebuilt, the worker goes on.
        KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True),
    ],
    ids=["abortable", "fatal"],
)
def test_an_aborted_transaction_is_invisible_and_its_batch_is_retried_once(
    failure: KafkaError,
) -> None:
    broker = FakeBroker()
    ids = fill(broker, P0, 20)
    broker.commit_failures.append(failure)
    calls, handler = counting_handler()

    async def main() -> None:
        clients = FakeClients(broker, [P0])
        runner = make_runner(clients, handler)
        async with running(runner):
            await wait_for(lambda: committed(broker, P0)[0] == 20, "the commit")
        assert runner.stats.failed_commits == 1
        assert len(clients.producers) == 2, "the retry runs on a fresh producer"

    asyncio.run(main())
    assert Counter(output_ids(broker)) == Counter(ids), "each output exactly once"
    assert set(calls.values()) == {1}, "the retry re-sends outputs, it does not redo work"


# -- revocation: drain, commit, forget ---------------------------------------------------------


def test_revocation_drains_commits_and_forgets_only_the_revoked_partition() -> None:
    broker = FakeBroker()
    fill(broker, P0, 10)
    fill(broker, P1, 10)
    clients = FakeClients(broker, [P0, P1])
    gate = asyncio.Event()
    handled: list[tuple[int, int]] = []

    async def handler(message: Inbound) -> Decision:
        if message.partition == 0 and message.offset >= 5:
            await gate.wait()  # in flight when the revocation comes
        handled.append((message.partition, message.offset))
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler, max_in_flight=32, revoke_grace_s=20)
        async with running(runner):
            await wait_for(lambda: committed(broker, P0)[0] == 5, "p0 committed below the gate")
            consumer = clients.consumers[0]
            broker.revoke(consumer, [P0])
            await wait_for(lambda: not consumer.events, "the runner to take the revocation")
            assert P0 in consumer.assignment, "the revocation waits for in-flight work"
            gate.set()
            await wait_for(lambda: P0 not in consumer.assignment, "the revocation to end")
            assert committed(broker, P0) == (10, set()), "drained work committed before release"
            assert runner._tracker.partitions() == [P1]
            fill(broker, P1, 5)
            fill(broker, P0, 5)  # no longer ours
            await wait_for(lambda: committed(broker, P1)[0] == 15, "p1 goes on")

    asyncio.run(main())
    assert sorted(o for p, o in handled if p == 0) == list(range(10))


def test_a_revocation_past_its_bound_cancels_and_the_next_owner_redoes_only_that() -> None:
    broker = FakeBroker()
    fill(broker, P0, 10)
    first = FakeClients(broker, [P0])
    hang = {2, 6}
    first_handled: list[int] = []

    async def hanging(message: Inbound) -> Decision:
        if message.offset in hang:
            await asyncio.Event().wait()  # never finishes: a model call past its deadline
        first_handled.append(message.offset)
        return emit(message)

    second_handled: list[int] = []

    async def quick(message: Inbound) -> Decision:
        second_handled.append(message.offset)
        return emit(message)

    async def main() -> None:
        runner = make_runner(first, hanging, max_in_flight=16, revoke_grace_s=0.2)
        async with running(runner):
            await wait_for(lambda: len(first_handled) == 8, "8 of 10 finished")
            consumer = first.consumers[0]
            broker.revoke(consumer, [P0])
            await wait_for(lambda: P0 not in consumer.assignment, "the bounded revocation")
            assert runner.stats.cancelled == 2
        assert committed(broker, P0) == (2, {3, 4, 5, 7, 8, 9})
        async with running(make_runner(FakeClients(broker, [P0]), quick)):
            await wait_for(lambda: committed(broker, P0) == (10, set()), "the new owner")

    asyncio.run(main())
    assert sorted(second_handled) == [2, 6], "only the cancelled messages are redone"
    assert Counter(output_ids(broker)) == Counter(f"0-{i}" for i in range(10))


def test_revoke_then_crash_loses_nothing_and_redoes_only_what_was_unfinished() -> None:
    broker = FakeBroker()
    fill(broker, P0, 8)
    fill(broker, P1, 8)
    first = FakeClients(broker, [P0, P1])
    gate = asyncio.Event()
    first_handled: list[tuple[int, int]] = []

    async def gated(message: Inbound) -> Decision:
        if message.offset >= 4:
            await gate.wait()
        first_handled.append((message.partition, message.offset))
        return emit(message)

    redone: list[tuple[int, int]] = []

    async def quick(message: Inbound) -> Decision:
        redone.append((message.partition, message.offset))
        return emit(message)

    async def main() -> None:
        runner = make_runner(first, gated, max_in_flight=32, revoke_grace_s=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await wait_for(
            lambda: committed(broker, P0)[0] == 4 and committed(broker, P1)[0] == 4,
            "offsets 0-3 of both partitions committed",
        )
        consumer = first.consumers[0]
        broker.revoke(consumer, [P0])  # p0's offsets 4-7 are cancelled at the bound
        await wait_for(lambda: P0 not in consumer.assignment, "the revocation")
        assert committed(broker, P0)[0] == 4
        first.crash()  # SIGKILL while p1's offsets 4-7 are still in flight
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
        assert committed(broker, P1)[0] == 4, "the dead worker committed nothing more"
        assert len(first_handled) == 8
        async with running(make_runner(FakeClients(broker, [P0, P1]), quick)):
            await wait_for(
                lambda: committed(broker, P0)[0] == 8 and committed(broker, P1)[0] == 8,
                "the survivor to finish both partitions",
            )

    asyncio.run(main())
    assert sorted(redone) == [(p, o) for p in (0, 1) for o in range(4, 8)]
    assert Counter(output_ids(broker)) == Counter(f"{p}-{o}" for p in (0, 1) for o in range(8))


def test_a_lost_partition_is_abandoned_without_a_commit() -> None:
    broker = FakeBroker()
    fill(broker, P0, 6)
    clients = FakeClients(broker, [P0])
    gate = asyncio.Event()

    async def handler(message: Inbound) -> Decision:
        if message.partition == 0 and message.offset >= 3:
            await gate.wait()
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler)
        async with running(runner):
            await wait_for(lambda: committed(broker, P0)[0] == 3, "offsets 0-2")
            commits = len(broker.commits)
            consumer = clients.consumers[0]
            consumer.events.append(("lost", [P0]))
            await wait_for(lambda: P0 not in consumer.assignment, "the loss")
            gate.set()
            # A later commit (of another partition) as the barrier: the lost partition's
            # finished work would be in it or before it, if it were ever committed.
            fill(broker, P1, 2)
            broker.assign(consumer, [P1])
            await wait_for(lambda: committed(broker, P1)[0] == 2, "a later commit, of p1")
            later = broker.commits[commits:]
            assert all(P0 not in c for c in later), "nothing committed for a lost partition"
            assert runner._tracker.partitions() == [P1]

    asyncio.run(main())
    assert committed(broker, P0)[0] == 3


@pytest.mark.parametrize("kind", ["revoke", "lost"])
def test_a_partition_paused_while_full_is_fetched_again_when_it_comes_back(kind: str) -> None:
    """The post-outage stall: a full runner pauses its partitions, a broker outage ends
    its session (lost) or a rebalance moves them (revoke), they come back, and librdkafka
    still has them paused. The runner must let them go unpaused."""
    broker = FakeBroker()
    ids = fill(broker, P0, 6)
    clients = FakeClients(broker, [P0])
    gate = asyncio.Event()

    async def handler(message: Inbound) -> Decision:
        await gate.wait()
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler, max_in_flight=2, revoke_grace_s=0.05)
        async with running(runner):
            consumer = clients.consumers[0]
            await wait_for(lambda: P0 in consumer.paused, "the full runner to pause P0")
            consumer.events.append((kind, [P0]))
            await wait_for(lambda: P0 not in consumer.assignment, f"the {kind}")
            consumer.events.append(("assign", [P0]))
            await wait_for(lambda: P0 in consumer.assignment, "P0 assigned again")
            gate.set()
            await wait_for(
                lambda: committed(broker, P0)[0] == 6,
                f"P0 fetched again after it came back (paused: {consumer.paused})",
                timeout_s=5,
            )

    asyncio.run(main())
    assert Counter(output_ids(broker)) == Counter(ids)


# -- back-pressure by the metadata window ------------------------------------------------------


def test_a_partition_whose_window_is_full_is_paused_not_committed_past(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner_module, "MAX_WINDOW", 20)
    broker = FakeBroker()
    fill(broker, P0, 200)
    clients = FakeClients(broker, [P0])
    gate = asyncio.Event()

    async def handler(message: Inbound) -> Decision:
        if message.offset == 0:
            await gate.wait()
        return emit(message)

    async def main() -> None:
        async with running(make_runner(clients, handler, max_in_flight=4)):
            await wait_for(lambda: P0 in clients.consumers[0].paused, "a pause at the window")
            await wait_for(lambda: len(committed(broker, P0)[1]) >= 19, "the window committed")
            assert committed(broker, P0)[0] == 0, "never past the unfinished offset"
            assert clients.consumers[0].fetched <= 20 + 4
            gate.set()
            await wait_for(lambda: committed(broker, P0)[0] == 200, "all of it after the gate")

    asyncio.run(main())
    assert len(broker.outputs) == 200


def test_dead_letter_decisions_go_to_the_dead_letter_topic_with_provenance() -> None:
    broker = FakeBroker()
    fill(broker, P0, 3)

    async def handler(message: Inbound) -> Decision:
        return DeadLetter("model", "bad_json", "DecodeError", "nope", f"r{message.offset}")

    async def main() -> None:
        async with running(make_runner(FakeClients(broker, [P0]), handler)):
            await wait_for(lambda: committed(broker, P0)[0] == 3, "the commit")

    asyncio.run(main())
    assert [o.topic for o in broker.outputs] == ["x.llm.dlq"] * 3
    headers = dict(broker.outputs[0].headers)
    assert headers["x-dlq-reason"] == b"bad_json"
    assert headers["x-dlq-original-offset"] == b"0"


@pytest.mark.parametrize(
    "timeouts",
    [
        pytest.param({"WATCHDOG_S": 0.3}, id="abandoned by the commit watchdog"),
        pytest.param(
            {"WATCHDOG_S": 600.0, "CALL_TIMEOUT_S": 0.1, "CALL_GRACE_S": 0.2},
            id="abandoned by its own timeout, before the commit watchdog",
        ),
    ],
)
def test_a_commit_stuck_in_librdkafka_is_abandoned_fenced_and_retried_once(
    timeouts: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """librdkafka#5456: send_offsets_to_transaction may never return after an outage. The
    hung call is abandoned (by its own timeout plus a grace when that comes first, else by
    the whole commit's bound) and retried on a new producer; when it returns at last,
    fenced by the replacement, it neither commits nor drops the new producer."""
    for name, value in timeouts.items():
        monkeypatch.setattr(delivery_module, name, value)
    broker = FakeBroker()
    ids = fill(broker, P0, 10)
    stuck = threading.Event()
    broker.hang_send_offsets.append(stuck)
    clients = FakeClients(broker, [P0])

    async def handler(message: Inbound) -> Decision:
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler)
        async with running(runner):
            await wait_for(lambda: committed(broker, P0)[0] == 10, "the commit after the hang")
            assert len(clients.producers) == 2, "the stuck producer was replaced"
            stuck.set()  # the stuck call returns at last: its transaction must not commit
            ids.extend(fill(broker, P0, 10))
            await wait_for(lambda: committed(broker, P0)[0] == 20, "later commits")
            assert len(clients.producers) == 2, "the late failure left the new producer alone"

    asyncio.run(main())
    assert Counter(output_ids(broker)) == Counter(ids), "each output exactly once"


# -- after a broker outage; fatal errors ------------------------------------------------------


def test_after_a_broker_outage_the_next_commit_uses_a_new_producer_that_fences_the_old() -> None:
    """librdkafka#5456/#5511: a producer that lived through an outage may hang in its next
    send_offsets_to_transaction; a fresh one (same transactional.id) cannot."""
    broker = FakeBroker()
    ids = fill(broker, P0, 10)
    clients = FakeClients(broker, [P0])

    async def handler(message: Inbound) -> Decision:
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler)
        async with running(runner):
            await wait_for(lambda: committed(broker, P0)[0] == 10, "commits before the outage")
            assert len(clients.producers) == 1
            clients.health.outages += 1
            ids.extend(fill(broker, P0, 10))
            await wait_for(lambda: committed(broker, P0)[0] == 20, "commits after it")
            assert len(clients.producers) == 2
            old, new = clients.producers
            assert broker.epochs[new.tid] == new.epoch == old.epoch + 1, "the old one is fenced"
            ids.extend(fill(broker, P0, 10))
            await wait_for(lambda: committed(broker, P0)[0] == 30, "and later ones")
            assert len(clients.producers) == 2, "one replacement per outage"

    asyncio.run(main())
    assert Counter(output_ids(broker)) == Counter(ids), "each output exactly once"


def test_committed_offsets_unreadable_for_a_while_are_retried_so_done_work_is_not_redone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Right after a broker restart the coordinator refuses offset fetches for a while;
    reading them later (not giving up and redoing from the offset) keeps the skip."""
    monkeypatch.setattr(runner_module, "COMMITTED_RETRY_S", 0.01)
    broker = FakeBroker()
    fill(broker, P0, 10)
    broker.committed[P0] = (2, encode_done(2, [3, 5, 7]))
    broker.committed_failures += [
        KafkaError(KafkaError.NOT_COORDINATOR, "not coordinator"),
        KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS, "loading"),
    ]
    handled: list[int] = []

    async def handler(message: Inbound) -> Decision:
        handled.append(message.offset)
        return emit(message)

    async def main() -> None:
        async with running(make_runner(FakeClients(broker, [P0]), handler)):
            await wait_for(lambda: committed(broker, P0) == (10, set()), "the partition done")

    asyncio.run(main())
    assert not broker.committed_failures
    assert sorted(handled) == [2, 4, 6, 8, 9], "offsets recorded as done are skipped"


def test_committed_offsets_that_stay_unreadable_stop_the_runner_with_a_fatal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner_module, "COMMITTED_RETRY_S", 0.01)
    monkeypatch.setattr(runner_module, "COMMITTED_DEADLINE_S", 0.2)
    broker = FakeBroker()
    fill(broker, P0, 10)
    broker.committed[P0] = (2, encode_done(2, [3, 5, 7]))
    broker.committed_unreadable = KafkaError(KafkaError._TIMED_OUT, "timed out")
    handled: list[int] = []

    async def handler(message: Inbound) -> Decision:
        handled.append(message.offset)
        return emit(message)

    async def main() -> None:
        runner = make_runner(FakeClients(broker, [P0]), handler)
        with pytest.raises(KafkaFatalError, match="unreadable for 0 s"):
            await asyncio.wait_for(runner.run(asyncio.Event()), 30)

    asyncio.run(main())
    assert handled == [], "nothing is processed without its committed offsets"
    assert broker.committed[P0] == (2, encode_done(2, [3, 5, 7])), "nor committed"


def test_a_fatal_consumer_error_stops_the_runner_instead_of_leaving_it_idle() -> None:
    """A static member fenced after a long outage (librdkafka#3437) never fetches again: the
    runner raises, so the worker exits non-zero and its supervisor starts a fresh one."""
    broker = FakeBroker()
    fill(broker, P0, 5)
    clients = FakeClients(broker, [P0])

    async def handler(message: Inbound) -> Decision:
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await wait_for(lambda: committed(broker, P0)[0] == 5, "work before the error")
        broker.consumer_error = KafkaError(
            KafkaError._FATAL, "Fatal consumer error: Broker: Static consumer fenced", fatal=True
        )
        with pytest.raises(KafkaFatalError, match="Static consumer fenced"):
            await asyncio.wait_for(task, 30)

    asyncio.run(main())


@pytest.mark.parametrize("losses", [1, 2])
def test_at_least_once_work_delivered_while_commits_failed_is_not_redone_on_reassignment(
    losses: int,
) -> None:
    """A broker outage longer than the session: outputs delivered, their offset commit
    refused (unknown member), the partitions lost, then assigned back to the same worker.
    What it delivered is skipped, not delivered again (the outage's duplicates). Lost
    twice before a commit goes through (a frozen worker's session ends, then the broker
    goes), what the first re-assignment skipped is still uncommitted: skipped again."""
    broker = FakeBroker()
    ids = fill(broker, P0, 10)
    clients = FakeClients(broker, [P0])
    calls, handler = counting_handler()

    async def main() -> None:
        broker.offset_commit_error = KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "unknown member")
        runner = make_runner(clients, handler, delivery="at_least_once")
        async with running(runner):
            await wait_for(lambda: len(broker.outputs) == 10, "outputs delivered")
            assert P0 not in broker.committed, "their offsets were not committed"
            consumer = clients.consumers[0]
            for loss in range(1, losses + 1):
                consumer.events.append(("lost", [P0]))
                await wait_for(lambda: P0 not in consumer.assignment, f"loss {loss}")
                # The runner's own view, and no commit planned before the loss still on
                # its way: one that ran after the refusals end would commit the delivered
                # offsets (correct too, but nothing left to skip).
                await wait_for(
                    lambda: P0 not in runner._owned and runner._commit_in_flight is None,
                    f"loss {loss} seen by the runner, no earlier commit in flight",
                )
                if loss == losses:
                    broker.offset_commit_error = None
                consumer.events.append(("assign", [P0]))
                await wait_for(
                    lambda n=10 * loss: runner.stats.skipped == n, f"loss {loss} skipped"
                )
            ids.extend(fill(broker, P0, 5))
            await wait_for(lambda: committed(broker, P0) == (15, set()), "the partition back")

    asyncio.run(main())
    assert set(calls.values()) == {1}, "nothing redone"
    assert Counter(output_ids(broker)) == Counter(ids), "nothing delivered twice"


def test_stages_sharing_a_producer_get_their_reports_when_one_of_them_closes() -> None:
    """At least once, every stage of a process sends through one producer, whose reports
    one loop timer serves for all of them. A stage closing flushes that producer on its
    own Kafka thread, which serves the other stages' reports there: they still reach the
    loop, and the timer keeps serving the stages left."""
    broker = FakeBroker()
    clients = FakeClients(broker, [P0])
    first, second = (
        IdempotentDelivery(clients.stage_producer, clients.stage_consumer("g"), name=n)
        for n in ("first", "second")
    )
    out = Outbound("x.out", b"k", b"v", [])

    async def main() -> None:
        first.start()
        second.start()
        broker.hold_deliveries = True
        waiting = asyncio.create_task(second.send([out]))
        await wait_for(lambda: bool(clients.producers[0].reports), "the output produced")
        assert not waiting.done()
        broker.hold_deliveries = False
        await asyncio.to_thread(first.close)  # its flush serves the second stage's report
        await asyncio.wait_for(waiting, 10)
        await asyncio.wait_for(second.send([out]), 10)  # the timer still serves the rest
        await asyncio.to_thread(second.close)

    asyncio.run(main())
    assert len(broker.outputs) == 2


def test_at_least_once_outputs_go_out_at_once_not_with_the_next_commit() -> None:
    """Latency: a message's outputs are produced the moment it is decided, however long
    the commit interval; its offset follows with the next commit."""
    broker = FakeBroker()
    ids = fill(broker, P0, 5)
    clients = FakeClients(broker, [P0])

    async def handler(message: Inbound) -> Decision:
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler, delivery="at_least_once", commit_interval_ms=60_000)
        async with running(runner):
            await wait_for(lambda: len(broker.outputs) == 5, "the outputs, before any commit")
            assert committed(broker, P0) == (0, set()), "no offset committed yet"
        assert committed(broker, P0) == (5, set()), "committed when the runner stopped"

    asyncio.run(main())
    assert Counter(output_ids(broker)) == Counter(ids)


def test_at_least_once_never_commits_past_an_output_not_yet_acknowledged() -> None:
    """Decided is not done: until the broker acknowledges a message's outputs, its offset
    stays uncommitted (and out of the commit metadata), however many commits pass."""
    broker = FakeBroker()
    ids = fill(broker, P0, 5)
    clients = FakeClients(broker, [P0])
    decided: list[int] = []

    async def handler(message: Inbound) -> Decision:
        decided.append(message.offset)
        return emit(message)

    async def main() -> None:
        broker.hold_deliveries = True
        runner = make_runner(clients, handler, delivery="at_least_once")
        async with running(runner):
            await wait_for(lambda: len(decided) == 5, "every message decided")
            producer = clients.producers[0]
            await wait_for(lambda: len(producer.pending) == 5, "their outputs produced")
            assert runner._tracker.committable(*P0) in (0, None), "nothing done before its ack"
            assert committed(broker, P0) == (0, set())
            broker.hold_deliveries = False
            await wait_for(lambda: committed(broker, P0) == (5, set()), "the commit after acks")

    asyncio.run(main())
    assert Counter(output_ids(broker)) == Counter(ids)


async def lose_with_outputs_queued(clients: FakeClients, count: int) -> Any:
    """Once ``count`` outputs wait unacknowledged (deliveries held), P0's session ends: the
    partition is lost with them in transit. Returns the consumer, to give P0 back."""
    await wait_for(lambda: len(clients.producers[0].pending) == count, "outputs queued")
    consumer = clients.consumers[0]
    consumer.events.append(("lost", [P0]))
    await wait_for(lambda: P0 not in consumer.assignment, "the loss")
    return consumer


def test_at_least_once_outputs_delivered_after_their_partition_was_lost_are_not_redone() -> None:
    """A broker outage ends the session while outputs are queued, unacknowledged: their
    tasks are cancelled with the lost partition, but the outputs go out when the broker
    is back. Those messages are skipped when the partition returns, not sent twice."""
    broker = FakeBroker()
    ids = fill(broker, P0, 5)
    clients = FakeClients(broker, [P0])
    calls, handler = counting_handler()

    async def main() -> None:
        broker.hold_deliveries = True
        runner = make_runner(clients, handler, delivery="at_least_once")
        async with running(runner):
            consumer = await lose_with_outputs_queued(clients, 5)
            broker.hold_deliveries = False
            await wait_for(lambda: len(broker.outputs) == 5, "the queued outputs delivered")
            consumer.events.append(("assign", [P0]))
            await wait_for(lambda: committed(broker, P0) == (5, set()), "the partition back")
            assert runner.stats.skipped == 5

    asyncio.run(main())
    assert set(calls.values()) == {1}, "nothing redone"
    assert Counter(output_ids(broker)) == Counter(ids), "nothing delivered twice"


@pytest.mark.parametrize("delivered", [True, False])
def test_at_least_once_a_redo_waits_for_the_outputs_still_in_transit_from_before(
    delivered: bool,
) -> None:
    """The race behind duplicates after a broker outage: the partition is lost with
    outputs queued, and comes back (the messages fetched again) before the broker has
    acknowledged them. The redo waits for their delivery reports: delivered, the messages
    are skipped, never handled or sent again; failed, they are redone, once."""
    broker = FakeBroker()
    ids = fill(broker, P0, 5)
    clients = FakeClients(broker, [P0])
    calls, handler = counting_handler()

    async def main() -> None:
        broker.hold_deliveries = True
        runner = make_runner(clients, handler, delivery="at_least_once")
        async with running(runner):
            consumer = await lose_with_outputs_queued(clients, 5)
            consumer.events.append(("assign", [P0]))
            await wait_for(
                lambda: runner._tracker.in_flight(*P0) == 5, "the messages fetched again"
            )
            assert sum(calls.values()) == 5, "a redo waits for the earlier outputs' reports"
            if not delivered:  # the queued outputs time out: the redo goes ahead
                broker.delivery_error = KafkaError(KafkaError._MSG_TIMED_OUT)
            broker.hold_deliveries = False
            if not delivered:
                await wait_for(lambda: sum(calls.values()) == 10, "the messages redone")
                broker.delivery_error = None
            await wait_for(lambda: committed(broker, P0) == (5, set()), "the messages done")
            assert runner.stats.skipped == (5 if delivered else 0)

    asyncio.run(main())
    assert set(calls.values()) == ({1} if delivered else {2}), "handled again only if lost"
    assert Counter(output_ids(broker)) == Counter(ids), "every output delivered once"


def test_a_transactional_producer_that_cannot_start_stops_the_runner_with_a_fatal_error() -> None:
    """A non-retriable init_transactions failure (say, a transactional.id the ACLs
    refuse) cannot be fixed by retrying: the worker exits instead of idling."""
    broker = FakeBroker()
    fill(broker, P0, 5)
    broker.init_failures.append(
        KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "not authorised", fatal=True)
    )

    async def handler(message: Inbound) -> Decision:
        return emit(message)

    async def main() -> None:
        runner = make_runner(FakeClients(broker, [P0]), handler)
        with pytest.raises(KafkaFatalError, match="cannot start"):
            await asyncio.wait_for(runner.run(asyncio.Event()), 30)

    asyncio.run(main())
    assert broker.outputs == [] and P0 not in broker.committed


def test_a_commit_whose_answer_is_lost_is_resolved_from_the_offsets_not_redone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker committed the transaction but the answer never came (it went away
    mid-commit): redoing the batch would deliver it twice. The committed offsets say it
    went through, so the batch counts as committed."""
    monkeypatch.setattr(delivery_module, "COMMIT_DEADLINE_S", 0.05)
    broker = FakeBroker()
    ids = fill(broker, P0, 10)
    broker.lost_commit_answers = 1
    clients = FakeClients(broker, [P0])

    async def handler(message: Inbound) -> Decision:
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler)
        async with running(runner):
            await wait_for(lambda: committed(broker, P0)[0] == 10, "the commit")
            await wait_for(lambda: len(clients.producers) == 2, "the resolving producer")
            ids.extend(fill(broker, P0, 5))
            await wait_for(lambda: committed(broker, P0)[0] == 15, "later commits")
        assert runner.stats.failed_commits == 0

    asyncio.run(main())
    assert broker.lost_commit_answers == 0
    assert Counter(output_ids(broker)) == Counter(ids), "each output exactly once"


# -- at-least-once commits off the fetch path -------------------------------------------------


def commit_history(broker: FakeBroker, partition: Partition) -> list[int]:
    """Every position committed for ``partition``, in the order the broker took them."""
    return [record[partition][0] for record in broker.commits if partition in record]


def test_at_least_once_a_commit_in_flight_holds_neither_the_fetch_nor_the_offset_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The offset commit runs off the fetch path: while one is held on its way to the
    broker, new messages are still fetched and delivered. A revocation meanwhile commits
    only after the held commit is answered (here within the revocation's bound), so the
    partition's committed offset only ever moves forward (a late commit landing after the
    revocation's would move it back, and the next owner would redo what was done)."""
    monkeypatch.setattr(runner_module, "REVOKE_COMMIT_WAIT_S", 30.0)
    broker = FakeBroker()
    fill(broker, P0, 5)
    fill(broker, P1, 5)
    clients = FakeClients(broker, [P0, P1])
    gate = threading.Event()
    broker.offset_commit_gates.append(gate)

    async def handler(message: Inbound) -> Decision:
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler, delivery="at_least_once", commit_interval_ms=10)
        entered: list[str] = []
        execute = runner._execute

        def counted(plan: Any, wait_s: float | None = None) -> Any:
            entered.append(threading.current_thread().name)
            return execute(plan, wait_s)

        runner._execute = counted  # type: ignore[method-assign]
        async with running(runner):
            try:
                await wait_for(lambda: len(entered) == 1, "a commit on its way (held)")
                assert not broker.commits
                fill(broker, P0, 5)
                fill(broker, P1, 5)
                await wait_for(
                    lambda: len(broker.outputs) == 20, "outputs fetched past the held commit"
                )
                consumer = clients.consumers[0]
                broker.revoke(consumer, [P0])
                await wait_for(lambda: len(entered) == 2, "the revocation's commit")
                assert entered[1].startswith("kafka-"), entered
                assert P0 in consumer.assignment, "the revocation waits for the commit in flight"
                gate.set()
                await wait_for(lambda: P0 not in consumer.assignment, "the revocation to end")
                assert committed(broker, P0) == (10, set())
                await wait_for(lambda: committed(broker, P1) == (10, set()), "p1 committed")
            finally:
                gate.set()  # never leave the runner stuck in a held commit
        history = commit_history(broker, P0)
        assert history == sorted(history), f"p0's committed offset moved back: {history}"
        assert history[-1] == 10

    asyncio.run(main())


def test_at_least_once_a_revocation_does_not_wait_for_a_commit_that_cannot_answer() -> None:
    """librdkafka answers a commit made on another thread only after the running rebalance
    callback returns: a revocation that waited for it without bound deadlocked until the
    request timed out (60 s), and its group stayed in PREPARING_REBALANCE. Past
    REVOKE_COMMIT_WAIT_S it commits beside the one in flight and lets the partition go."""
    broker = FakeBroker()
    fill(broker, P0, 5)
    clients = FakeClients(broker, [P0])
    gate = threading.Event()
    broker.offset_commit_gates.append(gate)

    async def handler(message: Inbound) -> Decision:
        return emit(message)

    async def main() -> None:
        runner = make_runner(clients, handler, delivery="at_least_once", commit_interval_ms=10)
        async with running(runner):
            try:
                await wait_for(lambda: runner._commit_in_flight is not None, "a held commit")
                fill(broker, P0, 5)
                await wait_for(lambda: len(broker.outputs) == 10, "outputs past the held commit")
                consumer = clients.consumers[0]
                started = time.monotonic()
                broker.revoke(consumer, [P0])
                await wait_for(lambda: P0 not in consumer.assignment, "the revocation to end")
                waited = time.monotonic() - started
                assert not gate.is_set()
                assert committed(broker, P0) == (10, set()), "the revocation committed all ten"
                assert waited >= runner_module.REVOKE_COMMIT_WAIT_S, waited
            finally:
                gate.set()

    asyncio.run(main())


def test_at_least_once_an_older_snapshot_never_commits_over_a_newer_one() -> None:
    """Commits may be answered out of the order they were planned in (the committer's and a
    revocation's): a plan taken before one already committed leaves out the partitions
    that one covered."""
    broker = FakeBroker()
    fill(broker, P0, 3)
    clients = FakeClients(broker, [P0])
    gate = asyncio.Event()

    async def handler(message: Inbound) -> Decision:
        if message.offset >= 3:
            await gate.wait()
        return emit(message)

    async def main() -> None:
        runner = make_runner(
            clients, handler, delivery="at_least_once", commit_interval_ms=3_600_000
        )
        async with running(runner):
            await wait_for(lambda: runner._tracker.committable(*P0) == 3, "3 done")
            older = runner._plan()
            fill(broker, P0, 2)
            await wait_for(lambda: runner._tracker.in_flight(*P0) == 2, "2 more in flight")
            gate.set()
            await wait_for(lambda: runner._tracker.committable(*P0) == 5, "5 done")
            newer = runner._plan()
            assert older is not None and newer is not None and older.seq < newer.seq
            before = len(commit_history(broker, P0))
            assert runner._execute(newer) is Outcome.COMMITTED
            assert runner._execute(older) is Outcome.COMMITTED
            assert older.offsets == []
            assert commit_history(broker, P0)[before:] == [5]

    asyncio.run(main())
