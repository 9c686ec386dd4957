"""The runner's view of one consumed message and of one message to produce."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.transport.headers import Headers


@dataclass(frozen=True)
class Inbound:
    """A consumed message, detached from the Kafka client that read it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


@dataclass(frozen=True)
class Outbound:
    """A message to produce, already encoded, with its full (prefixed) topic name."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
