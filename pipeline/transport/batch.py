"""Blocking produce of a batch, for tools: CLI, demo, tests, benchmarks.

Workers produce through their runner's commits (:mod:`pipeline.transport.runner`); tools
want the simplest thing that is still safe: the factory's idempotent producer, and a hard
error unless every message's *delivery report* says it was written. ``flush()`` returning 0
only means the local queue is empty: a message that timed out, or went to a topic that does
not exist, also leaves the queue (with an error in its report). So every report is read,
``message.timeout.ms`` bounds the wait (``LLMPIPE_CLI_TIMEOUT_S``), and the first failure
becomes a :class:`DeliveryError` whose one line names the cause.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError
from confluent_kafka import Message as KafkaMessage

from pipeline.config import Settings
from pipeline.errors import LlmpipeError
from pipeline.transport.clients import KafkaClients, KafkaRefused, security_failure_since

# Beyond message.timeout.ms, for the last delivery reports to be served.
REPORT_GRACE_S = 5.0
PRODUCE_QUEUE_WAIT_S = 0.1
# For harnesses (demo, tests, benchmarks) producing thousands of messages on a busy machine.
BULK_TIMEOUT_S = 60.0

Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]

_UNKNOWN_TOPIC = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})
_UNREACHABLE = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN})


class DeliveryError(LlmpipeError):
    """The broker did not acknowledge a write: nothing can be assumed to have happened."""

    exit_code = 1


@dataclass(frozen=True)
class Written:
    """Where one message landed, from its delivery report."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def cause(
    settings: Settings, topic: str, error: KafkaError, broker_down: bool, timeout_s: float
) -> str:
    """One line for an operator: what failed and which setting to check."""
    if error.code() in _UNKNOWN_TOPIC:
        return (
            f"topic {topic} does not exist (is LLMPIPE_TOPIC_PREFIX "
            f"{settings.topic_prefix!r} right? `llmpipe topics apply` creates the topics)"
        )
    if broker_down or error.code() in _UNREACHABLE:
        return (
            f"cannot reach the Kafka broker at {settings.bootstrap_servers} within "
            f"{timeout_s:g} s (LLMPIPE_BOOTSTRAP_SERVERS; LLMPIPE_CLI_TIMEOUT_S "
            f"sets the wait): nothing was written to {topic}"
        )
    if error.code() == KafkaError._MSG_TIMED_OUT:
        return (
            f"the broker at {settings.bootstrap_servers} did not acknowledge the write to "
            f"{topic} within {timeout_s:g} s (LLMPIPE_CLI_TIMEOUT_S): it may not have happened"
        )
    return f"the broker refused the write to {topic}: {error.str()}"


def produce_batch(
    settings: Settings,
    topic: str,
    messages: Iterable[Message],
    timeout_s: float | None = None,
    **config: Any,
) -> list[Written]:
    """Produce ``(key, value, headers)`` to the prefixed ``topic``; where each one landed.

    Raises :class:`DeliveryError` unless every message was acknowledged within
    ``timeout_s`` (default ``settings.cli_timeout_s``; harnesses producing thousands of
    messages on a busy machine pass more).
    """
    clients = KafkaClients(settings)
    started = time.monotonic()
    timeout = settings.cli_timeout_s if timeout_s is None else timeout_s
    timeout_ms = int(timeout * 1000)
    producer = clients.producer(
        **{
            "message.timeout.ms": timeout_ms,
            # A topic missing from the metadata fails after this instead of the default 30 s.
            "topic.metadata.propagation.max.ms": min(timeout_ms // 2, 5_000),
            **config,
        }
    )
    name = settings.topic(topic)
    written: list[Written] = []
    errors: list[KafkaError] = []

    def report(error: KafkaError | None, message: KafkaMessage) -> None:
        if error is not None:
            errors.append(error)
            return
        partition, offset = message.partition(), message.offset()
        written.append(Written(name, partition or 0, offset if offset is not None else -1))

    sent = 0
    for key, value, headers in messages:
        header_list: list[tuple[str, str | bytes | None]] = list(headers)
        while True:
            try:
                producer.produce(
                    name, value=value, key=key, headers=header_list, on_delivery=report
                )
                break
            except BufferError:  # librdkafka's local queue is full: let it drain
                producer.poll(PRODUCE_QUEUE_WAIT_S)
        producer.poll(0)
        sent += 1
    remaining = producer.flush(timeout + REPORT_GRACE_S)
    refused = security_failure_since(started)
    if refused is not None and (errors or remaining):
        raise KafkaRefused(f"{refused}: nothing was written to {name}")
    if errors:
        raise DeliveryError(cause(settings, name, errors[0], clients.health.down, timeout))
    if remaining or len(written) != sent:
        raise DeliveryError(
            f"{sent - len(written)} of {sent} messages to {name} were not acknowledged within "
            f"{timeout:g} s (LLMPIPE_BOOTSTRAP_SERVERS "
            f"{settings.bootstrap_servers})"
        )
    clients.health.ok()
    return written
