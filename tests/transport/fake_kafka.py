"""An in-memory Kafka for the runner's unit tests: partitions, a group, transactions.

Only what the runner's offset, slot and rebalance logic needs, with the semantics that
matter: a consumer fetches from the committed offset, pause stops fetching, a
transaction's outputs and offsets become visible together at commit or not at all, and a
"crashed" client's calls have no effect (like a SIGKILLed process). Rebalances are driven
by the test (:meth:`FakeBroker.revoke`, :meth:`FakeBroker.assign`) and delivered inside the
consumer's next ``poll``/``consume``, as librdkafka does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

Partition = tuple[str, int]


@dataclass
class FakeMessage:
    _topic: str
    _partition: int
    _offset: int
    _key: bytes | None
    _value: bytes | None
    _headers: list[tuple[str, bytes]]

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)

    def error(self) -> None:
        return None


@dataclass
class ErrorMessage:
    """What librdkafka's consume() returns for a consumer-level error."""

    _error: KafkaError

    def error(self) -> KafkaError:
        return self._error


@dataclass
class Produced:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, Any]]


@dataclass
class FakeBroker:
    """The shared state: logs, committed offsets (with metadata), committed outputs."""

    logs: dict[Partition, list[FakeMessage]] = field(default_factory=dict)
    committed: dict[Partition, tuple[int, str]] = field(default_factory=dict)
    outputs: list[Produced] = field(default_factory=list)
    commits: list[dict[Partition, tuple[int, str]]] = field(default_factory=list)
    generation: int = 1
    # Next transaction commits fail with this error (then the list is popped).
    commit_failures: list[KafkaError] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    consumers: list[FakeConsumer] = field(default_factory=list)
    epochs: dict[str, int] = field(default_factory=dict)  # transactional.id -> epoch
    # Calls to send_offsets_to_transaction that block until set (librdkafka#5456).
    hang_send_offsets: list[threading.Event] = field(default_factory=list)
    # Next consumer.committed() calls raise these (then the list is popped), every call
    # raises the second while it is set.
    committed_failures: list[KafkaError] = field(default_factory=list)
    committed_unreadable: KafkaError | None = None
    # This many transaction commits go through on the broker, but their answer is lost:
    # the producer's commit_transaction times out, then and on every retry.
    lost_commit_answers: int = 0
    # Next init_transactions calls raise these (then the list is popped).
    init_failures: list[KafkaError] = field(default_factory=list)
    # Consumer offset commits (at_least_once) fail with this while it is set.
    offset_commit_error: KafkaError | None = None
    # Each consumer offset commit takes the first of these (if any) and waits until it is
    # set before it reaches the broker: a commit in flight for as long as a test wants.
    offset_commit_gates: list[threading.Event] = field(default_factory=list)
    # Idempotent producers deliver nothing (and report nothing) while this is set.
    hold_deliveries: bool = False
    # Idempotent producers' pending messages fail with this (dropped, reported) while set.
    delivery_error: KafkaError | None = None
    # The next consume() returns a message carrying this error (a fatal consumer error).
    consumer_error: KafkaError | None = None
    # Consumers' metadata requests fail while this is set (a client with no broker left).
    metadata_error: KafkaError | None = None

    def append(
        self,
        topic: str,
        partition: int,
        value: bytes,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> int:
        with self.lock:
            log = self.logs.setdefault((topic, partition), [])
            log.append(FakeMessage(topic, partition, len(log), key, value, headers or []))
            return len(log) - 1

    def commit_offsets(self, offsets: list[TopicPartition]) -> None:
        record = {(tp.topic, tp.partition): (tp.offset, tp.metadata or "") for tp in offsets}
        self.committed.update(record)
        self.commits.append(record)

    def revoke(self, consumer: FakeConsumer, partitions: list[Partition]) -> None:
        consumer.events.append(("revoke", partitions))

    def assign(self, consumer: FakeConsumer, partitions: list[Partition]) -> None:
        consumer.events.append(("assign", partitions))


class GroupMetadata:
    def __init__(self, consumer: FakeConsumer) -> None:
        self.consumer = consumer
        self.generation = consumer.generation


class FakeConsumer:
    def __init__(self, broker: FakeBroker, group: str, partitions: list[Partition]) -> None:
        self.broker = broker
        self.group = group
        self.events: list[tuple[str, list[Partition]]] = [("assign", partitions)]
        self.assignment: set[Partition] = set()
        self.positions: dict[Partition, int] = {}
        self.paused: set[Partition] = set()
        self.callbacks: dict[str, Callable[..., None]] = {}
        self.generation = broker.generation
        self.crashed = False
        self.closed = False
        self.fetched = 0
        broker.consumers.append(self)

    # -- rebalance -------------------------------------------------------------------------

    def subscribe(
        self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None
    ) -> None:
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}

    def _serve_events(self) -> None:
        while self.events and self.callbacks and not self.crashed:
            kind, partitions = self.events.pop(0)
            tps = [TopicPartition(t, p) for t, p in partitions]
            if kind == "assign":
                self.callbacks["assign"](self, tps)
                for tp in partitions:
                    self.assignment.add(tp)
                    self.positions[tp] = self.broker.committed.get(tp, (0, ""))[0]
            else:
                self.callbacks[kind](self, tps)
                for tp in partitions:
                    # Not un-paused: librdkafka keeps a partition's pause flag across
                    # its revocation and a later re-assignment.
                    self.assignment.discard(tp)
                    self.positions.pop(tp, None)

    # -- fetching --------------------------------------------------------------------------

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        self._serve_events()
        out: list[Any] = []
        if self.crashed:
            return out
        if self.broker.consumer_error is not None:
            error, self.broker.consumer_error = self.broker.consumer_error, None
            return [ErrorMessage(error)]
        with self.broker.lock:
            for tp in sorted(self.assignment - self.paused):
                log = self.broker.logs.get(tp, [])
                while len(out) < num_messages and self.positions[tp] < len(log):
                    out.append(log[self.positions[tp]])
                    self.positions[tp] += 1
        self.fetched += len(out)
        if not out and timeout and timeout > 0:
            time.sleep(min(timeout, 0.005))
        return out

    def poll(self, timeout: float = -1) -> Any:
        messages = self.consume(1, timeout)
        return messages[0] if messages else None

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    # -- offsets ---------------------------------------------------------------------------

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> Any:
        if self.broker.committed_unreadable is not None:
            raise KafkaException(self.broker.committed_unreadable)
        if self.broker.committed_failures:
            raise KafkaException(self.broker.committed_failures.pop(0))
        result = []
        for tp in partitions:
            offset, metadata = self.broker.committed.get((tp.topic, tp.partition), (-1001, ""))
            result.append(TopicPartition(tp.topic, tp.partition, offset, metadata=metadata))
        return result

    def commit(self, *args: Any, offsets: list[TopicPartition], **kwargs: Any) -> Any:
        if self.crashed:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "crashed"))
        with self.broker.lock:
            gate = (
                self.broker.offset_commit_gates.pop(0) if self.broker.offset_commit_gates else None
            )
        if gate is not None:
            gate.wait()
        if self.broker.offset_commit_error is not None:
            raise KafkaException(self.broker.offset_commit_error)
        with self.broker.lock:
            self.broker.commit_offsets(offsets)
        return offsets

    def consumer_group_metadata(self) -> Any:
        return GroupMetadata(self)

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        return (0, len(self.broker.logs.get((partition.topic, partition.partition), [])))

    def position(self, partitions: list[TopicPartition]) -> Any:
        return [
            TopicPartition(tp.topic, tp.partition, self.positions.get((tp.topic, tp.partition), -1))
            for tp in partitions
        ]

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        if self.broker.metadata_error is not None:
            raise KafkaException(self.broker.metadata_error)
        return None

    def close(self) -> None:
        if not self.crashed and self.assignment:
            self.events.append(("revoke", sorted(self.assignment)))
            self._serve_events()
        self.closed = True


class FakeProducer:
    """Transactional when ``transactional``; otherwise idempotent with delivery reports."""

    def __init__(
        self, broker: FakeBroker, owner: FakeClients, transactional: bool, tid: str = ""
    ) -> None:
        self.broker = broker
        self.owner = owner
        self.transactional = transactional
        self.tid = tid
        self.epoch = 0
        self.pending: list[Produced] = []
        self.pending_offsets: list[TopicPartition] = []
        self.reports: list[tuple[Callable[..., None], Produced]] = []
        self.in_txn = False
        self.aborts = 0
        self.answer_lost = False

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        *,
        on_delivery: Any = None,
        headers: list[tuple[str, Any]] | None = None,
    ) -> None:
        if self.transactional:
            assert self.in_txn, "produce outside a transaction"
        message = Produced(topic, key, value, list(headers or []))
        with self.broker.lock:
            self.pending.append(message)
            if on_delivery is not None:
                self.reports.append((on_delivery, message))

    def poll(self, timeout: float = 0) -> int:
        """Idempotent: delivers what is pending and serves its reports (how many)."""
        served = self._deliver()
        if not served and timeout and timeout > 0:
            time.sleep(min(timeout, 0.005))
        return served

    def flush(self, timeout: float = -1) -> int:
        self._deliver()
        return 0

    def _deliver(self) -> int:
        if self.transactional or self.owner.crashed or self.broker.hold_deliveries:
            return 0
        error = self.broker.delivery_error
        with self.broker.lock:
            if error is None:
                self.broker.outputs.extend(self.pending)
            self.pending = []
            reports, self.reports = self.reports, []
        for callback, message in reports:
            callback(error, message)
        return len(reports)

    def init_transactions(self, timeout: float = -1) -> None:
        if self.broker.init_failures:
            raise KafkaException(self.broker.init_failures.pop(0))
        with self.broker.lock:
            self.epoch = self.broker.epochs.get(self.tid, 0) + 1
            self.broker.epochs[self.tid] = self.epoch

    def begin_transaction(self) -> None:
        assert not self.in_txn
        self.in_txn = True

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: Any, timeout: float = -1
    ) -> None:
        assert self.in_txn
        if self.broker.hang_send_offsets:
            self.broker.hang_send_offsets.pop(0).wait()
            if self.broker.epochs.get(self.tid) != self.epoch:  # replaced while it hung
                raise KafkaException(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
        if group_metadata.generation != self.broker.generation:
            raise KafkaException(
                KafkaError(KafkaError.ILLEGAL_GENERATION, "fenced", txn_requires_abort=True)
            )
        self.pending_offsets = list(positions)

    def commit_transaction(self, timeout: float = -1) -> None:
        if self.answer_lost:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True))
        assert self.in_txn
        if self.owner.crashed:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "crashed", retriable=False))
        with self.broker.lock:
            if self.broker.epochs.get(self.tid) != self.epoch:
                raise KafkaException(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
            if self.broker.commit_failures:
                raise KafkaException(self.broker.commit_failures.pop(0))
            self.broker.outputs.extend(self.pending)
            if self.pending_offsets:
                self.broker.commit_offsets(self.pending_offsets)
            lost = self.broker.lost_commit_answers > 0
            self.broker.lost_commit_answers -= int(lost)
        self.pending, self.pending_offsets, self.in_txn = [], [], False
        if lost:
            self.answer_lost = True
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True))

    def abort_transaction(self, timeout: float = -1) -> None:
        self.pending, self.pending_offsets, self.in_txn = [], [], False
        self.aborts += 1


class FakeHealth:
    def __init__(self) -> None:
        self.oks = 0
        self.outages = 0
        self.down = False

    def ok(self) -> None:
        self.oks += 1

    def probe_due(self, every_s: float = 1.0) -> bool:
        return False


class FakeClients:
    """The runner's client factory, on a :class:`FakeBroker`."""

    def __init__(self, broker: FakeBroker, partitions: list[Partition]) -> None:
        self.broker = broker
        self.partitions = partitions
        self._health = FakeHealth()
        self.consumers: list[FakeConsumer] = []
        self.producers: list[FakeProducer] = []
        self.crashed = False

    @property
    def health(self) -> FakeHealth:
        return self._health

    def stage_consumer(self, group: str, **overrides: Any) -> FakeConsumer:
        consumer = FakeConsumer(self.broker, group, self.partitions)
        self.consumers.append(consumer)
        return consumer

    def producer(self, **overrides: Any) -> FakeProducer:
        producer = FakeProducer(self.broker, self, transactional=False)
        self.producers.append(producer)
        return producer

    def stage_producer(self) -> FakeProducer:
        """One per clients, like the real factory's."""
        shared = [p for p in self.producers if not p.transactional]
        return shared[0] if shared else self.producer()

    def transactional_producer(self, transactional_id: str, **overrides: Any) -> FakeProducer:
        producer = FakeProducer(self.broker, self, transactional=True, tid=transactional_id)
        self.producers.append(producer)
        return producer

    def crash(self) -> None:
        """Like SIGKILL: nothing this client does from now on reaches the broker."""
        self.crashed = True
        for consumer in self.consumers:
            consumer.crashed = True
