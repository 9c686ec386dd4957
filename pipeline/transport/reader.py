"""Bounded reads: every scan stops at the end offsets seen when it started.

A dead-letter tool that read "until nothing arrives for a while" would be slow, flaky and,
during a replay, could chase its own output forever (a replayed message that fails again
lands back on the DLQ). Snapshotting the high watermarks first makes every scan finite
and makes "what this run covers" a precise statement: ``[start, end)`` per partition.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from pipeline.config import Settings
from pipeline.dlq.model import RawHeaders, SourceRecord

METADATA_TIMEOUT_S = 10.0
# A scan that makes no progress for this long is broken (broker gone), not slow.
STALL_TIMEOUT_S = 30.0

Ranges = dict[tuple[str, int], tuple[int, int]]


class ScanError(Exception):
    """The broker did not let us read what we planned to read; the message says what."""


def consumer_config(settings: Settings, group: str | None = None) -> dict[str, Any]:
    """Manual commits only: the tools decide exactly when a position becomes durable."""
    return {
        **settings.kafka_client_config(),
        "group.id": group or f"llmpipe-dlq-reader-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
        "fetch.message.max.bytes": 10_485_760,
    }


def partitions(consumer: Consumer, topic: str) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
    described = metadata.topics.get(topic)
    if described is None or described.error is not None:
        raise ScanError(f"topic {topic} does not exist (is LLMPIPE_TOPIC_PREFIX right?)")
    return sorted(cast("Mapping[int, Any]", described.partitions))


def watermarks(consumer: Consumer, topic: str, partition: int) -> tuple[int, int]:
    low, high = consumer.get_watermark_offsets(
        TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_S
    )
    return int(low), int(high)


def offsets_for_time(
    consumer: Consumer, topic: str, parts: Iterable[int], timestamp_ms: int
) -> dict[int, int]:
    """First offset at or after ``timestamp_ms`` per partition; -1 means "none yet"."""
    found = consumer.offsets_for_times(
        [TopicPartition(topic, p, timestamp_ms) for p in parts], timeout=METADATA_TIMEOUT_S
    )
    return {tp.partition: int(tp.offset) for tp in found}


def snapshot_ranges(
    consumer: Consumer, topics: Iterable[str], since_ms: int | None = None
) -> Ranges:
    """``[start, end)`` for a read-only scan: from the start (or ``since``) to today's end."""
    ranges: Ranges = {}
    for topic in topics:
        parts = partitions(consumer, topic)
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


def read_ranges(consumer: Consumer, ranges: Ranges) -> Iterator[SourceRecord]:
    """Yield every record in the ranges, in offset order per partition, then stop."""
    pending = {tp: bounds for tp, bounds in ranges.items() if bounds[0] < bounds[1]}
    if not pending:
        return
    consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in pending.items()])
    last_progress = time.monotonic()
    try:
        while pending:
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
    settings: Settings, topics: Iterable[str], since_ms: int | None = None
) -> Iterator[SourceRecord]:
    """Read-only: a throwaway group that never commits, so looking never moves anything."""
    consumer = Consumer(consumer_config(settings))
    try:
        yield from read_ranges(consumer, snapshot_ranges(consumer, topics, since_ms))
    finally:
        consumer.close()
