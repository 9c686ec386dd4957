"""Blocking produce of a batch, for tools: CLI, demo, tests, benchmarks.

Workers produce through their runner's commits (:mod:`pipeline.transport.runner`); tools
want the simplest thing that is still safe: the factory's idempotent producer, and a hard
error when the broker did not acknowledge everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.config import Settings
from pipeline.transport.clients import KafkaClients

FLUSH_TIMEOUT_S = 60.0

Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


def produce_batch(
    settings: Settings, topic: str, messages: Iterable[Message], **config: Any
) -> int:
    """Produce ``(key, value, headers)`` to the prefixed ``topic``; returns the count."""
    producer = KafkaClients(settings).producer(**config)
    count = 0
    for key, value, headers in messages:
        header_list: list[tuple[str, str | bytes | None]] = list(headers)
        producer.produce(settings.topic(topic), value=value, key=key, headers=header_list)
        producer.poll(0)
        count += 1
    remaining = producer.flush(FLUSH_TIMEOUT_S)
    if remaining:
        raise RuntimeError(f"{remaining} messages to {topic} were not acknowledged by the broker")
    return count
