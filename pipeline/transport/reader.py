"""Bounded reads: "read these partitions up to their end offsets", the one way every tool
reads a topic to its end (DLQ tools, control history, ``llmpipe trace``, prompt stats).

A tool that read "until nothing arrives for a while" would be slow, flaky and, during a
DLQ replay, could chase its own output forever (a replayed message that fails again lands
back on the DLQ). Snapshotting the high watermarks first makes every scan finite and makes
"what this run covers" a precise statement: ``[start, end)`` per partition. A scan that
makes no progress for ``STALL_TIMEOUT_S`` (broker gone) fails instead of hanging, and a
caller with a wall-clock budget passes ``deadline_s``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.config import Settings
from pipeline.errors import LlmpipeError
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients, KafkaRefused, security_failure_since

METADATA_TIMEOUT_S = 10.0
# A scan that makes no progress for this long is broken (broker gone), not slow.
STALL_TIMEOUT_S = 30.0

Ranges = dict[tuple[str, int], tuple[int, int]]
RawHeaders = tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True)
class SourceRecord:
    """One Kafka record exactly as read: headers keep their order and duplicates.

    Replays must be byte-faithful, so nothing is normalised here; :attr:`headers_map` is the
    contract view (lower-cased, last value wins) used for reading provenance.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: RawHeaders = ()

    @property
    def ref(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)

    @cached_property
    def headers_map(self) -> dict[str, bytes]:
        return h.as_map(self.headers)

    def header(self, name: str) -> str | None:
        return h.text(self.headers_map, name)

    @property
    def request_id(self) -> str | None:
        """The ``x-request-id`` header, else the key: the rule of :mod:`pipeline.harness.ledger`.

        Dead letters of undecodable messages cannot carry the id from the body, but every
        producer in the pipeline (and the documented upstream contract) keys by request id.
        """
        rid = self.header(h.REQUEST_ID)
        if rid:
            return rid
        if self.key:
            return self.key.decode("utf-8", "replace")
        return None

    @property
    def time(self) -> datetime | None:
        ms = self.timestamp_ms
        return datetime.fromtimestamp(ms / 1000, UTC) if ms is not None and ms >= 0 else None


class ScanError(LlmpipeError):
    """The broker did not let us read what we planned to read; the message says what."""

    exit_code = 1


# How often require_broker looks for a refusal while it waits for the broker.
REFUSAL_CHECK_S = 1.0


def require_broker(client: Consumer | AdminClient, settings: Settings) -> None:
    """Fail within ``LLMPIPE_CLI_TIMEOUT_S`` with one line when no broker answers, or
    when it refused our credentials or TLS (exit 2: a setting to fix, said in the line).

    Without this a tool's first metadata call waits its own, longer timeout, and the error
    it raises names librdkafka's internals instead of the setting to check."""
    started = time.monotonic()
    deadline = started + settings.cli_timeout_s
    while True:
        try:
            client.list_topics(timeout=min(REFUSAL_CHECK_S, max(deadline - time.monotonic(), 0)))
            return
        except KafkaException:
            # librdkafka hands its log (where refusals show) to the client's poll; this
            # client has no partitions yet, so polling serves the log and reads nothing.
            client.poll(0)
            refused = security_failure_since(started)
            if refused is not None:  # no need to wait out the timeout: retrying won't help
                raise KafkaRefused(refused) from None
            if time.monotonic() >= deadline:
                break
    raise BrokerUnreachable(
        f"cannot reach the Kafka broker at {settings.bootstrap_servers} within "
        f"{settings.cli_timeout_s:g} s (LLMPIPE_BOOTSTRAP_SERVERS; LLMPIPE_CLI_TIMEOUT_S "
        "sets the wait)"
    )


class BrokerUnreachable(ScanError):
    """No broker answered a metadata request."""


def reader_consumer(settings: Settings, group: str | None = None, **overrides: Any) -> Consumer:
    """Manual commits only: the tools decide exactly when a position becomes durable.

    From the client factory (:meth:`~pipeline.transport.clients.KafkaClients.reader`), so
    connection, security and ``read_committed`` are the workers', and librdkafka's log goes
    through the project's logger, never raw to a terminal."""
    return KafkaClients(settings).reader(group, **overrides)


def partitions(consumer: Consumer, topic: str) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
    described = metadata.topics.get(topic)
    if described is None or described.error is not None:
        raise ScanError(f"topic {topic} does not exist (is LLMPIPE_TOPIC_PREFIX right?)")
    return sorted(cast("Mapping[int, Any]", described.partitions))


def watermarks(consumer: Consumer, topic: str, partition: int) -> tuple[int, int]:
    """Low and high watermark; retried while a just-created topic's leader is elected."""
    deadline = time.monotonic() + METADATA_TIMEOUT_S
    while True:
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_S
            )
            return int(low), int(high)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def offsets_for_time(
    consumer: Consumer, topic: str, parts: Iterable[int], timestamp_ms: int
) -> dict[int, int]:
    """First offset at or after ``timestamp_ms`` per partition; -1 means "none yet"."""
    found = consumer.offsets_for_times(
        [TopicPartition(topic, p, timestamp_ms) for p in parts], timeout=METADATA_TIMEOUT_S
    )
    return {tp.partition: int(tp.offset) for tp in found}


def snapshot_ranges(
    consumer: Consumer,
    topics: Iterable[str],
    since_ms: int | None = None,
    missing_ok: bool = False,
) -> Ranges:
    """``[start, end)`` for a read-only scan: from the start (or ``since``) to today's end.

    A topic that does not exist is an error, or, with ``missing_ok``, nothing to read."""
    ranges: Ranges = {}
    for topic in topics:
        try:
            parts = partitions(consumer, topic)
        except ScanError:
            if missing_ok:
                continue
            raise
        seek = offsets_for_time(consumer, topic, parts, since_ms) if since_ms else {}
        for p in parts:
            low, high = watermarks(consumer, topic, p)
            start = low
            if since_ms:
                found = seek.get(p, -1)
                start = high if found < 0 else max(low, found)
            ranges[(topic, p)] = (start, high)
    return ranges


def where(message: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a message (an error event may lack an offset: -1)."""
    partition, offset = message.partition(), message.offset()
    return (
        str(message.topic()),
        partition if partition is not None else -1,
        offset if offset is not None else -1,
    )


def to_record(message: Message) -> SourceRecord:
    _, timestamp = message.timestamp()
    raw = cast("list[tuple[str, Any]] | None", message.headers()) or []
    headers: RawHeaders = tuple(
        (str(k), v if isinstance(v, bytes) or v is None else str(v).encode()) for k, v in raw
    )
    topic, partition, offset = where(message)
    key, value = message.key(), message.value()
    return SourceRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=int(timestamp) if timestamp and timestamp > 0 else None,
        key=key if isinstance(key, bytes) or key is None else str(key).encode(),
        value=value if isinstance(value, bytes) or value is None else str(value).encode(),
        headers=headers,
    )


def read_ranges(
    consumer: Consumer, ranges: Ranges, deadline_s: float | None = None
) -> Iterator[SourceRecord]:
    """Yield every record in the ranges, in offset order per partition, then stop; fail
    with :class:`ScanError` naming what is left when ``deadline_s`` runs out."""
    pending = {tp: bounds for tp, bounds in ranges.items() if bounds[0] < bounds[1]}
    if not pending:
        return
    deadline = time.monotonic() + deadline_s if deadline_s is not None else None
    consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in pending.items()])
    last_progress = time.monotonic()
    try:
        while pending:
            if deadline is not None and time.monotonic() > deadline:
                left = ", ".join(f"{t}[{p}]" for t, p in sorted(pending))
                raise ScanError(f"{left} not read to the end within {deadline_s:.0f}s")
            messages = consumer.consume(num_messages=500, timeout=0.1)
            if not messages:
                if time.monotonic() - last_progress > STALL_TIMEOUT_S:
                    left = ", ".join(f"{t}[{p}]" for t, p in sorted(pending))
                    raise ScanError(f"no progress reading {left} for {STALL_TIMEOUT_S:.0f}s")
                continue
            last_progress = time.monotonic()
            for message in messages:
                topic, partition, offset = where(message)
                tp = (topic, partition)
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.pop(tp, None)
                        continue
                    raise ScanError(f"reading {tp[0]}[{tp[1]}]: {error.str()}")
                bounds = pending.get(tp)
                if bounds is None:
                    continue
                if offset >= bounds[1]:
                    pending.pop(tp, None)
                    continue
                yield to_record(message)
                if offset + 1 >= bounds[1]:
                    pending.pop(tp, None)
    except KafkaException as exc:
        raise ScanError(str(exc)) from None
    finally:
        consumer.unassign()


def scan(
    settings: Settings,
    topics: Iterable[str],
    since_ms: int | None = None,
    deadline_s: float | None = None,
    missing_ok: bool = False,
) -> Iterator[SourceRecord]:
    """Read-only: a throwaway group that never commits, so looking never moves anything.

    ``topics`` are full names (with the prefix); see :func:`snapshot_ranges`."""
    consumer = reader_consumer(settings)
    try:
        require_broker(consumer, settings)
        ranges = snapshot_ranges(consumer, topics, since_ms, missing_ok)
        yield from read_ranges(consumer, ranges, deadline_s)
    finally:
        consumer.close()
