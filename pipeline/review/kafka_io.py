"""Kafka for the review service: a follower that indexes the review topics, a transactional
publisher for decisions, and a bounded "read a topic to its end" for the CLI.

Everything here reads with ``isolation.level=read_committed``. That is load-bearing: the
publisher writes a decision, its result and its correction in one Kafka transaction, and
"the decision is on the topic" must mean "the whole transaction committed", never "a
half-written attempt of a process that crashed is visible".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition

from pipeline.config import Settings
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import Envelope, Escalation, ReviewDecision
from pipeline.contract.topology import REVIEW, REVIEW_DECISIONS
from pipeline.review.model import Clock, IncomingItem, TopicPosition
from pipeline.review.store import ReviewStore, StoreUnavailable
from pipeline.transport import headers as h
from pipeline.transport import reader
from pipeline.transport.clients import KafkaClients

log = logging.getLogger("llmpipe.review.kafka")


E = TypeVar("E", bound=Envelope)
T = TypeVar("T")
Partition = tuple[str, int]


@dataclass(frozen=True)
class OutboundMessage:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


class PublishError(Exception):
    """The transaction did not commit (it was aborted, or its outcome is unknown)."""


def _consumer(settings: Settings, group: str) -> Consumer:
    # Offsets are kept in the review database, never committed to Kafka: the group id only
    # satisfies the client (read_committed, no auto commits: the factory's defaults).
    return KafkaClients(settings).consumer(group, **{"fetch.wait.max.ms": 100})


def _with_retries(what: str, timeout_s: float, call: Callable[[], T]) -> T:
    """Retry a metadata or offsets query through transient broker states.

    Right after a topic is created, or during a leader change, the broker answers
    "not leader" or "unknown partition" for a moment; that is no reason to fail a sync,
    an export or the follower's start.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            code = error.code() if isinstance(error, KafkaError) else None
            transient = code in _TRANSIENT or (isinstance(error, KafkaError) and error.retriable())
            if not transient or time.monotonic() + delay > deadline:
                raise
            log.debug("%s: %s; retrying", what, exc)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


_TRANSIENT = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError.REQUEST_TIMED_OUT,
}


def end_offsets(
    consumer: Consumer, partitions: Sequence[Partition], timeout_s: float
) -> dict[Partition, int]:
    """The last stable offset of each partition (read_committed: committed data only)."""
    ends: dict[Partition, int] = {}
    for topic, partition in partitions:
        query = functools.partial(
            consumer.get_watermark_offsets,
            KafkaTopicPartition(topic, partition),
            timeout=timeout_s,
            cached=False,
        )
        _, high = _with_retries(f"end offset of {topic}/{partition}", timeout_s, query)
        ends[(topic, partition)] = int(high)
    return ends


def start_offset(consumer: Consumer, topic: str, partition: int, timeout_s: float) -> int:
    tp = KafkaTopicPartition(topic, partition)
    low, _ = _with_retries(
        f"start offset of {topic}/{partition}",
        timeout_s,
        lambda: consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False),
    )
    return int(low)


def list_partitions(consumer: Consumer, topic: str, timeout_s: float) -> list[Partition]:
    def query() -> list[Partition]:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None:
            error = described.error if described is not None else None
            raise KafkaException(error or KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        return [(topic, p) for p in sorted(described.partitions)]

    return _with_retries(f"partitions of {topic}", timeout_s, query)


def _headers(message: Any) -> dict[str, bytes]:
    """Header map of a consumed message (librdkafka hands them back as a list of pairs)."""
    pairs = message.headers() or []
    return h.as_map((k, v.encode() if isinstance(v, str) else v) for k, v in pairs)


class TopicFollower:
    """Keeps the store in step with ``llm.review`` and ``llm.review.decisions``.

    Runs a confluent-kafka consumer on a thread of its own, with manual assignment of
    every partition starting at the positions stored in the database (or the beginning,
    when the database is new: that is the rebuild). Each polled batch is applied with its
    new positions in one database transaction.

    :meth:`sync` is the primitive the exactly-once design rests on: it returns once
    everything committed to the two topics *before the call* has been applied.
    """

    def __init__(
        self,
        settings: Settings,
        store: ReviewStore,
        codec: Codec,
        clock: Clock,
        *,
        poll_timeout_s: float = 0.1,
        refresh_partitions_s: float = 30.0,
    ) -> None:
        self._settings = settings
        self._store = store
        self._codec = codec
        self._clock = clock
        self._poll_timeout_s = poll_timeout_s
        self._refresh_partitions_s = refresh_partitions_s
        self._topics = (settings.topic(REVIEW), settings.topic(REVIEW_DECISIONS))
        self._group = settings.group("review")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()
        self._positions: dict[Partition, int] = {}
        self._probe: Consumer | None = None
        self._probe_lock = threading.Lock()
        self.error: BaseException | None = None
        self._stalled = False
        """A batch waits for the database: syncing cannot succeed until it is back."""
        self.skipped = 0
        """Messages that did not decode; logged and passed over so one cannot wedge the queue."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="review-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None

    def sync(self, timeout_s: float) -> bool:
        """Wait until the store reflects everything committed to the topics before this call.

        The target is each partition's last stable offset taken now; the follower's
        consumer position moves past transaction markers, so "position >= target" is the
        exact condition. False on timeout (e.g. a transaction of another process is still
        open and holds the stable offset back), and at once while the database is down
        (nothing can be applied, so waiting would only hold a reviewer's request).
        """
        deadline = time.monotonic() + timeout_s
        try:
            targets = self._targets(timeout_s)
        except KafkaException as exc:
            log.warning("cannot read the end offsets of the review topics: %s", exc)
            return False
        with self._changed:
            while True:
                if self.error is not None or self._stalled:
                    return False
                if all(self._positions.get(tp, 0) >= end for tp, end in targets.items()):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.5))

    def _targets(self, timeout_s: float) -> dict[Partition, int]:
        with self._probe_lock:
            if self._probe is None:
                self._probe = _consumer(self._settings, self._group)
            partitions = [
                tp
                for topic in self._topics
                for tp in list_partitions(self._probe, topic, timeout_s)
            ]
            return end_offsets(self._probe, partitions, timeout_s)

    def _run(self) -> None:
        """Poll, apply, publish positions; survive broker hiccups and database outages.

        A Kafka error is retried (nothing was applied, positions did not move). A batch
        the database cannot take right now (:class:`StoreUnavailable`: it restarted) is
        kept and applied again until it goes in, because the consumer already moved past
        it; applying is idempotent, so a batch whose commit outcome was unknown does no
        harm the second time. Meanwhile :meth:`sync` waits (positions do not move). Any
        other database error is fatal for the follower: the service then reports not
        ready, and a restart resumes from the stored positions.
        """
        consumer = _consumer(self._settings, self._group)
        assigned: set[Partition] = set()
        refreshed = 0.0
        try:
            while not self._stop.is_set():
                try:
                    if not assigned or time.monotonic() - refreshed >= self._refresh_partitions_s:
                        assigned = self._assign(consumer, assigned)
                        refreshed = time.monotonic()
                    messages = consumer.consume(num_messages=500, timeout=self._poll_timeout_s)
                except (KafkaException, StoreUnavailable) as exc:
                    log.warning("review follower: %s; retrying", exc)
                    self._stop.wait(0.5)
                    continue
                if messages and not self._apply_until_stored(messages):
                    return
                positions = consumer.position(
                    [KafkaTopicPartition(t, p) for t, p in sorted(assigned)]
                )
                with self._changed:
                    for tp in positions:
                        if tp.offset >= 0:
                            self._positions[(tp.topic, tp.partition)] = tp.offset
                    self._changed.notify_all()
        except BaseException as exc:
            log.exception("review follower stopped")
            with self._changed:
                self.error = exc
                self._changed.notify_all()
        finally:
            consumer.close()

    def _assign(self, consumer: Consumer, assigned: set[Partition]) -> set[Partition]:
        """Assign partitions not yet assigned, each from its stored position.

        The known starting point is also recorded as the position, because librdkafka
        reports none until a message arrives: a partition with nothing new would
        otherwise never count as caught up.
        """
        stored = self._store.positions()
        fresh: list[KafkaTopicPartition] = []
        seeds: dict[Partition, int] = {}
        everything = set(assigned)
        for topic in self._topics:
            for tp in list_partitions(consumer, topic, 10.0):
                if tp in assigned:
                    continue
                everything.add(tp)
                if tp in stored:
                    seeds[tp] = stored[tp]
                    fresh.append(KafkaTopicPartition(tp[0], tp[1], stored[tp]))
                else:
                    seeds[tp] = start_offset(consumer, tp[0], tp[1], 10.0)
                    fresh.append(KafkaTopicPartition(tp[0], tp[1], OFFSET_BEGINNING))
        if fresh:
            with self._changed:
                self._positions.update(seeds)
            consumer.incremental_assign(fresh)
        return everything

    def _apply_until_stored(self, messages: Sequence[Any]) -> bool:
        """Apply a batch, retrying through a database outage; False if stopped first."""
        batch = self._decode(messages)
        delay = 0.2
        while True:
            try:
                self._store.apply(*batch, self._clock())
            except StoreUnavailable as exc:
                log.warning("review follower: %s; keeping the batch and retrying", exc)
                self._set_stalled(True)
                if self._stop.wait(delay):
                    return False
                delay = min(delay * 2, 2.0)
            else:
                self._set_stalled(False)
                return True

    def _set_stalled(self, stalled: bool) -> None:
        with self._changed:
            self._stalled = stalled
            self._changed.notify_all()

    def _decode(
        self, messages: Sequence[Any]
    ) -> tuple[list[IncomingItem], list[ReviewDecision], list[TopicPosition]]:
        items: list[IncomingItem] = []
        decisions: list[ReviewDecision] = []
        positions: dict[Partition, int] = {}
        for message in messages:
            if message.error() is not None:
                if message.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", message.error())
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            positions[(topic, partition)] = offset + 1
            headers = _headers(message)
            content_type = h.text(headers, h.CONTENT_TYPE)
            try:
                if topic == self._topics[0]:
                    escalation = self._codec.decode(
                        message.value() or b"", Escalation, content_type
                    )
                    items.append(
                        IncomingItem(
                            escalation=escalation,
                            key=message.key(),
                            traceparent=h.text(headers, h.TRACEPARENT),
                            topic=topic,
                            partition=partition,
                            offset=offset,
                        )
                    )
                else:
                    decisions.append(
                        self._codec.decode(message.value() or b"", ReviewDecision, content_type)
                    )
            except DecodeError as exc:
                self.skipped += 1
                log.warning("skipping %s/%s@%s: %s", topic, partition, offset, exc)
        return (
            items,
            decisions,
            [TopicPosition(t, p, o) for (t, p), o in sorted(positions.items())],
        )


def transactional_id(settings: Settings, instance: str) -> str:
    """The Kafka transactional id of a review service instance: one home for the format."""
    return f"{settings.topic_prefix}llmpipe.review.{instance}"


class TransactionalPublisher:
    """Writes the messages of one decision atomically: all of them become visible, or none.

    The ``transactional.id`` belongs to one review-service instance (see
    :func:`transactional_id`), so a restart under the same instance id fences its previous
    incarnation: ``init_transactions`` aborts whatever that one left open. After any
    failure the producer is thrown away; it is initialised again only by :meth:`begin`,
    never inside :meth:`publish`, because the service must check the decisions topic
    *after* holding a live producer epoch (fence first, then read, then write): a check
    made before a re-initialisation could be outdated by another instance's delivery.
    """

    def __init__(self, settings: Settings, instance: str, timeout_s: float = 15.0) -> None:
        self._settings = settings
        self._clients = KafkaClients(settings)
        self._transactional_id = transactional_id(settings, instance)
        self._timeout_s = timeout_s
        self._producer: Producer | None = None
        self._lock = threading.Lock()

    @property
    def transactional_id(self) -> str:
        return self._transactional_id

    def start(self) -> None:
        self.begin()

    def begin(self) -> None:
        """Hold a live producer epoch of this instance's id (initialising one if needed)."""
        with self._lock:
            if self._producer is not None:
                return
            producer = self._transactional_producer(self._transactional_id)
            try:
                producer.init_transactions(self._timeout_s)
            except KafkaException as exc:
                producer.flush(0)
                raise PublishError(f"cannot initialise transactions: {exc}") from exc
            self._producer = producer

    def fence(self, instance: str) -> None:
        """Fence another instance's transactional id: abort its open transaction, and make
        its producer unable to commit, before this instance delivers what it owned."""
        producer = self._transactional_producer(transactional_id(self._settings, instance))
        try:
            producer.init_transactions(self._timeout_s)
        except KafkaException as exc:
            raise PublishError(f"cannot fence instance {instance}: {exc}") from exc
        finally:
            producer.flush(0)

    def _transactional_producer(self, tid: str) -> Producer:
        # One decision per transaction, sent at once; a minute before the broker aborts
        # a transaction left open by a crashed instance that never comes back.
        return self._clients.transactional_producer(
            tid, **{"linger.ms": 0, "transaction.timeout.ms": 60_000}
        )

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        with self._lock:
            producer = self._producer
            if producer is None:
                raise PublishError("no live producer: begin() first")
            try:
                producer.begin_transaction()
                for message in messages:
                    headers: list[tuple[str, str | bytes | None]] = list(message.headers)
                    producer.produce(
                        message.topic, value=message.value, key=message.key, headers=headers
                    )
                producer.commit_transaction(self._timeout_s)
            except KafkaException as exc:
                self._discard()
                raise PublishError(str(exc)) from exc

    def _discard(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        # If this fails, the next init_transactions with the same id aborts it for us. A
        # fenced producer is in a fatal state: its flush raises too (seen under load in
        # the takeover test), and the PublishError being raised must not turn into that.
        with contextlib.suppress(KafkaException):
            producer.abort_transaction(self._timeout_s)
        with contextlib.suppress(KafkaException):
            producer.flush(0)

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.flush(self._timeout_s)
                self._producer = None


def read_to_end(
    settings: Settings,
    topic: str,
    cls: type[E],
    codec: Codec | None = None,
    timeout_s: float = 30.0,
    on_skip: Callable[[str], None] | None = None,
) -> Iterator[tuple[E, dict[str, bytes]]]:
    """Every committed message of ``topic`` that exists now, decoded, then stop.

    For the CLI (export, calibration): bounded by the end offsets taken at the start, so
    it terminates even while producers keep writing.
    """
    codec = codec or Codec()
    for record in reader.scan(settings, [settings.topic(topic)], deadline_s=timeout_s):
        try:
            envelope = codec.decode(record.value or b"", cls, record.header(h.CONTENT_TYPE))
        except DecodeError as exc:
            if on_skip is not None:
                on_skip(f"{record.topic}/{record.partition}@{record.offset}: {exc}")
            continue
        yield envelope, record.headers_map
