"""Account for every request: where did each request id end up, exactly once?

Used by the tests, the demo and the chaos benchmarks, so they all count the same way. A
request id is read from the ``x-request-id`` header (the pipeline sets it on everything it
produces and dead letters keep the original's), else from the message key.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline.config import Settings
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import Result

TERMINAL_TOPICS = ("llm.results", "llm.review", "llm.dlq")
ROUTE_OF_TOPIC = {"llm.results": "result", "llm.review": "review", "llm.dlq": "dead_letter"}


@dataclass(frozen=True)
class Sighting:
    topic: str
    route: str
    reason: str | None
    value: bytes | None
    headers: dict[str, bytes]
    result: Result | None = None

    @property
    def outcome(self) -> str:
        """``result:<source>`` (model, fallback, human), ``review`` or ``dead_letter``."""
        return f"result:{self.result.source}" if self.result is not None else self.route


@dataclass
class Ledger:
    expected: set[str]
    seen: dict[str, list[Sighting]] = field(default_factory=dict)

    @property
    def missing(self) -> set[str]:
        return self.expected - set(self.seen)

    @property
    def duplicates(self) -> dict[str, int]:
        return {rid: len(s) - 1 for rid, s in self.seen.items() if len(s) > 1}

    @property
    def unexpected(self) -> set[str]:
        return set(self.seen) - self.expected

    def first(self, request_id: str) -> Sighting:
        return self.seen[request_id][0]

    def routes(self) -> Counter[str]:
        return Counter(s[0].outcome for rid, s in self.seen.items() if rid in self.expected)

    def reasons(self) -> Counter[tuple[str, str]]:
        return Counter(
            (s[0].outcome, s[0].reason or "-")
            for rid, s in self.seen.items()
            if rid in self.expected
        )

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.expected),
            "found": len(self.expected & set(self.seen)),
            "missing": len(self.missing),
            "duplicates": sum(self.duplicates.values()),
            "routes": dict(self.routes()),
        }


def _header(headers: dict[str, bytes], name: str) -> str | None:
    value = headers.get(name)
    return value.decode("utf-8", "replace") if value is not None else None


def read_terminal(
    settings: Settings,
    expected: Iterable[str],
    timeout_s: float = 60.0,
    settle_s: float = 0.0,
    progress: Callable[[Ledger], None] | None = None,
    topics: Iterable[str] = TERMINAL_TOPICS,
) -> Ledger:
    """Read the terminal topics from the beginning until every expected id is seen.

    ``settle_s`` keeps reading that long after the last id arrived, so duplicates produced
    late (e.g. after a crash) are counted too.
    """
    ledger = Ledger(set(expected))
    codec = Codec()
    names = {settings.topic(t): t for t in topics}
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": f"llmpipe-ledger-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        metadata = consumer.list_topics(timeout=10)
        assignment = [
            TopicPartition(topic, p, OFFSET_BEGINNING)
            for topic in names
            for p in metadata.topics[topic].partitions
        ]
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout_s
        complete_at: float | None = None
        while time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=0.2):
                if message.error():
                    continue
                headers = {
                    k.lower(): v if isinstance(v, bytes) else str(v).encode()
                    for k, v in cast("list[tuple[str, Any]]", message.headers() or [])
                    if v is not None
                }
                key = message.key()
                rid = _header(headers, "x-request-id") or (
                    key.decode("utf-8", "replace") if key else None
                )
                if rid is None:
                    continue
                logical = names[str(message.topic())]
                route = ROUTE_OF_TOPIC[logical]
                reason = _header(headers, "x-dlq-reason" if route == "dead_letter" else "x-reason")
                result = None
                if route == "result":
                    try:
                        result = codec.decode(
                            message.value() or b"", Result, _header(headers, "content-type")
                        )
                    except DecodeError:
                        result = None
                ledger.seen.setdefault(rid, []).append(
                    Sighting(logical, route, reason, message.value(), headers, result)
                )
            if progress is not None:
                progress(ledger)
            if not ledger.missing:
                complete_at = complete_at or time.monotonic()
                if time.monotonic() - complete_at >= settle_s:
                    break
    finally:
        consumer.close()
    return ledger
