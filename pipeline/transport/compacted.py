"""Live state on compacted topics: follow one from the beginning, publish keyed records.

Several things every worker must agree on live on compacted topics: flags and pins
(``llm.control``), and what protects the model account across the fleet (``llm.fleet``:
quality-breaker outcomes, endpoint-breaker news, rate-limit leases, budget spend). The
Kafka part is the same for all of them and lives here once:

* :class:`CompactedFollower` reads a topic from the beginning without a consumer group
  (every worker needs every record) and signals ``ready`` once it has caught up with the
  end offsets seen at start, so a starting worker never serves a request on stale state.
  It keeps following while the worker runs. Records are handed to a callback on the event
  loop, where the stages read the state; the consumer's blocking calls run on a thread of
  their own.
* :class:`StatePublisher` writes keyed records (a ``None`` value is a tombstone) with an
  idempotent producer, without blocking the event loop: delivery reports are served by
  :meth:`StatePublisher.poll`. Records are published outside any stage transaction, on
  purpose: state about the account (a breaker opened, tokens spent) is true whether or
  not the transaction of the message that caused it commits. :meth:`StatePublisher.close`
  ends it with :func:`close_producer`, the bounded way to destroy a producer at shutdown.

What the records mean is not this module's business: the callers fold them
(:mod:`pipeline.control.listener`, :mod:`pipeline.runtime.fleet`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from pipeline.contract.codec import Codec
from pipeline.contract.envelopes import Envelope
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients

log = logging.getLogger("llmpipe.compacted")
METADATA_ATTEMPTS = 20
METADATA_TIMEOUT_S = 0.5
POLL_TIMEOUT_S = 0.1
BATCH = 500
CLOSE_FLUSH_S = 5.0
"""At shutdown, how long a producer's queued records may take to be delivered before they
are dropped (:func:`close_producer`): a healthy broker acknowledges within milliseconds, so
this only bounds the wait through an outage."""
_NOT_READY = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
    }
)
"""Errors that say "not yet": a topic created a moment ago whose partitions are not in this
client's metadata or have no leader yet (CI on 2026-12-03: ``_UNKNOWN_PARTITION`` right
after ``list_topics`` had named the partition, on a loaded machine), or no broker answering.
The follower asks again until they pass or the worker stops; any other error is a fault."""


@dataclass(frozen=True)
class Record:
    """One record as the follower hands it on: key, value (None: a tombstone), headers
    by name, and the record's timestamp (ms since the epoch; 0 when the broker gave none)."""

    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int


class CompactedFollower:
    """Follow ``topic`` from its beginning; ``apply(record)`` runs on the event loop.

    ``ready`` is set once every record that was on the topic at start has been applied.
    """

    def __init__(
        self,
        topic: str,
        apply: Callable[[Record], None],
        clients: KafkaClients,
        *,
        poll_timeout_s: float = POLL_TIMEOUT_S,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        self._topic = topic
        self._apply = apply
        self._clients = clients
        self._poll_timeout_s = poll_timeout_s
        self._on_loaded = on_loaded
        self.ready = asyncio.Event()
        self.applied = 0

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-follow")

        async def call(fn: Any, *args: Any) -> Any:
            return await loop.run_in_executor(thread, fn, *args)

        async def until_answered(fn: Any, *args: Any) -> Any:
            """``fn``'s answer once it has one (None: not yet, ask again), or None once
            ``stop`` is set: a broker that does not answer yet is waited for, not a crash."""
            answer = await call(fn, *args)
            while answer is None and not stop.is_set():
                answer = await call(fn, *args)
            return answer

        consumer = await call(self._consumer)
        try:
            partitions = await until_answered(self._partitions, consumer)
            if partitions is None:
                return
            tps = [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions]
            ends = await until_answered(self._ends, consumer, tps)
            if ends is None:
                return
            await call(consumer.assign, tps)
            pending = {p for p, end in ends.items() if end > 0}
            if not pending:
                self._loaded()
            while not stop.is_set():
                messages = await call(self._fetch, consumer)
                for message in messages:
                    self._hand_on(message)
                    if message.offset() + 1 >= ends.get(message.partition(), 0):
                        pending.discard(message.partition())
                if pending and not self.ready.is_set():
                    pending = await call(self._still_behind, consumer, pending, ends)
                if not pending and not self.ready.is_set():
                    self._loaded()
        finally:
            await call(consumer.close)
            thread.shutdown(wait=False)

    def _consumer(self) -> Any:
        # Short fetch waits: a record written by another worker arrives within ~50 ms.
        return self._clients.consumer(None, **{"fetch.wait.max.ms": 50})

    def _loaded(self) -> None:
        if self._on_loaded is not None:
            self._on_loaded()
        self.ready.set()

    def _hand_on(self, message: Any) -> None:
        kind, timestamp = message.timestamp()
        record = Record(
            key=message.key(),
            value=message.value(),
            headers=h.as_map(message.headers()),
            timestamp_ms=timestamp if kind and timestamp > 0 else 0,
        )
        self.applied += 1
        try:
            self._apply(record)
        except Exception:  # one bad record must not stop the state every stage reads
            log.exception("%s: a record could not be applied; skipped", self._topic)

    def _partitions(self, consumer: Any) -> list[int] | None:
        """A topic created a moment ago may not be in every broker's metadata yet.

        None when no broker answered: an outage, or a broker that refuses this process's
        credentials or certificate. Both are logged by the client factory (once, and once
        per interval), so the caller just asks again: a worker that exited instead would be
        restarted into the same refusal, again and again."""
        for _ in range(METADATA_ATTEMPTS):
            try:
                metadata = consumer.list_topics(self._topic, timeout=METADATA_TIMEOUT_S * 4)
            except KafkaException:
                consumer.poll(0)  # serves librdkafka's log, where a refusal shows
                return None
            topic = metadata.topics.get(self._topic)
            if topic is not None and topic.error is None and topic.partitions:
                return sorted(topic.partitions)
            consumer.poll(METADATA_TIMEOUT_S)
        raise RuntimeError(f"topic {self._topic} does not exist; run `llmpipe topics apply`")

    def _ends(self, consumer: Any, tps: list[TopicPartition]) -> dict[int, int] | None:
        """The end offsets at start: ready means "read at least up to here".

        None when a partition is still not ready after ``METADATA_ATTEMPTS`` (see
        ``_NOT_READY``): the caller asks again, between checks of its stop event."""
        ends: dict[int, int] = {}
        for tp in tps:
            high = self._end(consumer, tp)
            if high is None:
                return None
            ends[tp.partition] = high
        return ends

    @staticmethod
    def _end(consumer: Any, tp: TopicPartition) -> int | None:
        for _ in range(METADATA_ATTEMPTS):
            try:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(tp.topic, tp.partition), timeout=10.0
                )
                return int(high)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if not (isinstance(error, KafkaError) and error.code() in _NOT_READY):
                    raise
                consumer.poll(METADATA_TIMEOUT_S)
        return None

    def _fetch(self, consumer: Any) -> list[Any]:
        messages: list[Any] = consumer.consume(BATCH, 0)
        if not messages:
            first = consumer.poll(self._poll_timeout_s)
            messages = [first] if first is not None else []
        if messages:
            self._clients.health.ok()
        return [m for m in messages if m.error() is None]

    def _still_behind(self, consumer: Any, pending: set[int], ends: dict[int, int]) -> set[int]:
        """Compaction and transaction markers leave gaps: compare positions, not offsets."""
        positions = consumer.position([TopicPartition(self._topic, p) for p in sorted(pending)])
        return {tp.partition for tp in positions if tp.offset < ends[tp.partition]}


def close_producer(producer: Producer, timeout_s: float = CLOSE_FLUSH_S) -> int:
    """Deliver what ``producer`` still holds for up to ``timeout_s``, drop the rest, and
    destroy it: its librdkafka threads have ended when this returns. Blocking (call it on a
    thread); the number of records dropped (their delivery reports say "purged").

    Destroyed here, at shutdown, rather than whenever Python frees the object: that may be
    never before the interpreter finalises (an object frozen by ``gc.freeze()`` in a cycle
    with it keeps it alive), and librdkafka threads still running while Python finalises
    are where a worker once died of heap corruption instead of exiting. ``close()`` alone
    waits for every queued record to be delivered or to time out: one record for a topic
    that did not exist took 28 s, with no broker 58 s; after ``purge()``, 1 ms.
    """
    left = int(producer.flush(timeout_s))
    if left:
        producer.purge()
        producer.poll(0)  # serves the purged records' reports
    producer.close()
    return left


class StatePublisher:
    """Keyed records to one compacted topic, fire and forget, never blocking the loop.

    ``publish`` hands a record to librdkafka (which batches and retries it); ``poll``
    serves delivery reports and must be called now and then (the fleet loop does).
    A record the broker refused is logged and counted in ``failed``: the next state
    record for the same key supersedes it anyway. ``close`` ends it at shutdown.
    """

    def __init__(self, topic: str, clients: KafkaClients, codec: Codec) -> None:
        self._topic = topic
        self._codec = codec
        self._producer = clients.producer(**{"linger.ms": 0})
        self._closed = False
        self.failed = 0
        self.delivered = 0

    def publish(self, key: str, envelope: Envelope | None) -> None:
        if self._closed:  # a report after shutdown began: nothing carries it any more
            self.failed += 1
            return
        value: bytes | None = None
        headers: list[tuple[str, str | bytes | None]] = []
        if envelope is not None:
            value, content_type = self._codec.encode(envelope)
            headers.append((h.CONTENT_TYPE, content_type.encode()))
        try:
            self._producer.produce(
                self._topic, value=value, key=key.encode(), headers=headers, on_delivery=self._done
            )
        except BufferError:
            self._producer.poll(0)
            self.failed += 1
            log.warning("%s: local queue full, state record for %s dropped", self._topic, key)

    def poll(self) -> None:
        if not self._closed:
            self._producer.poll(0)

    async def close(self, timeout_s: float = CLOSE_FLUSH_S) -> int:
        """Deliver what is queued (for up to ``timeout_s``) and destroy the producer, on a
        thread; the number of records dropped. Marked closed first, on the loop, so no
        ``publish`` or ``poll`` touches the producer while the thread closes it."""
        if self._closed:
            return 0
        self._closed = True
        dropped = await asyncio.to_thread(close_producer, self._producer, timeout_s)
        if dropped:
            log.warning(
                "%s: %d state records not delivered within %.0fs at shutdown; dropped",
                self._topic,
                dropped,
                timeout_s,
            )
        return dropped

    def _done(self, error: KafkaError | None, _message: Any) -> None:
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        log.warning("%s: state record not written: %s", self._topic, error)
