"""Account for every request: where did each request id end up, exactly once?

Used by the tests, the demo and the chaos benchmarks, so they all count the same way. A
request id is read from the ``x-request-id`` header (the pipeline sets it on everything it
produces and dead letters keep the original's), else from the message key.

The terminal topics are read ``read_committed``, as a downstream consumer must: what an
aborted transaction wrote was never delivered. Every sighting of every request is kept,
not just the first, because the faults a crash causes hide in the later ones: a second
copy (a duplicate), a copy in another terminal topic (two terminal places: a result *and*
a review item), or a copy on another route than the request's own fault implies.

Model calls are accounted per request too (:func:`redone_calls`): the fake model server
counts calls per request id (:meth:`FakeLLMServer.request_calls`), so the calls a fault
made the pipeline pay twice are the calls of the faulty run minus those of the same
requests in a run without faults.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline.config import Settings
from pipeline.contract import topology
from pipeline.contract.codec import Codec, DecodeError
from pipeline.contract.envelopes import Result
from pipeline.harness.fakellm.server import CallTally
from pipeline.stages.self_check import GRADER_SYSTEM
from pipeline.stages.settle import REASK_TEMPLATE
from pipeline.transport import headers as h
from pipeline.transport.clients import KafkaClients


@dataclass(frozen=True)
class Sighting:
    topic: str
    route: str
    reason: str | None
    value: bytes | None
    headers: dict[str, bytes]
    result: Result | None = None
    partition: int = -1
    offset: int = -1
    timestamp_ms: int = 0

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
        """Request id -> sightings beyond the first (in any terminal topic)."""
        return {rid: len(s) - 1 for rid, s in self.seen.items() if len(s) > 1}

    @property
    def two_places(self) -> dict[str, set[str]]:
        """Requests found in more than one terminal topic (e.g. a result *and* a review)."""
        out: dict[str, set[str]] = {}
        for rid, sightings in self.seen.items():
            topics = {s.topic for s in sightings}
            if len(topics) > 1:
                out[rid] = topics
        return out

    @property
    def unexpected(self) -> set[str]:
        return set(self.seen) - self.expected

    def first(self, request_id: str) -> Sighting:
        return self.seen[request_id][0]

    def wrong_routes(
        self, expected: Mapping[str, tuple[str, str | None]], reasons: bool = True
    ) -> dict[str, list[str]]:
        """Request id -> every sighting not on its expected ``(outcome, reason)``.

        Every sighting is checked, not just the first, so a duplicate that took another
        route (a redone call that got another answer) is caught. ``reasons=False``
        compares outcomes only (when breakers may legitimately change a reason).
        """
        out: dict[str, list[str]] = {}
        for rid, want in expected.items():
            for s in self.seen.get(rid, []):
                got = (s.outcome, s.reason) if reasons else (s.outcome, want[1])
                if got != want:
                    out.setdefault(rid, []).append(f"{s.outcome}/{s.reason}")
        return out

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
            "two_places": len(self.two_places),
            "routes": dict(self.routes()),
        }


def _header(headers: dict[str, bytes], name: str) -> str | None:
    value = headers.get(name)
    return value.decode("utf-8", "replace") if value is not None else None


def message_headers(message: Any) -> dict[str, bytes]:
    """A message's headers as ``lower-case name -> bytes`` (later repeats win)."""
    return {
        k.lower(): v if isinstance(v, bytes) else str(v).encode()
        for k, v in cast("list[tuple[str, Any]]", message.headers() or [])
        if v is not None
    }


def request_id_of(message: Any) -> str | None:
    """The ``x-request-id`` header, else the key: how every tool names a message's request."""
    rid = _header(message_headers(message), h.REQUEST_ID)
    if rid is not None:
        return rid
    key = message.key()
    return key.decode("utf-8", "replace") if key else None


def committed_reader(settings: Settings, eof: bool = False) -> Consumer:
    """A group-less reader that sees what a downstream consumer sees: committed data only.

    ``eof`` reports the end of each partition (for read_committed: the last stable offset).
    """
    return KafkaClients(settings).consumer(None, **{"enable.partition.eof": eof})


def read_terminal(
    settings: Settings,
    expected: Iterable[str],
    timeout_s: float = 60.0,
    settle_s: float = 0.0,
    progress: Callable[[Ledger], None] | None = None,
    topics: Iterable[str] | None = None,
) -> Ledger:
    """Read the terminal topics (or ``topics``) from the beginning until every expected id
    is seen.

    ``settle_s`` keeps reading that long after the last id arrived, so duplicates produced
    late (e.g. after a crash) are counted too.
    """
    ledger = Ledger(set(expected))
    codec = Codec()
    names = {settings.topic(t): t for t in topics or topology.terminal_topics()}
    consumer = committed_reader(settings)
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
                rid = request_id_of(message)
                if rid is None:
                    continue
                headers = message_headers(message)
                logical = names[str(message.topic())]
                if _header(headers, h.ROUTE) == topology.ROUTE_AUDIT:
                    continue  # a copy of a delivered result for a verdict: not terminal
                route = topology.route_of(logical)
                dead = route == topology.ROUTE_DEAD_LETTER
                reason = _header(headers, h.DLQ_REASON if dead else h.REASON)
                result = None
                if route == topology.ROUTE_RESULT:
                    try:
                        result = codec.decode(
                            message.value() or b"", Result, _header(headers, h.CONTENT_TYPE)
                        )
                    except DecodeError:
                        result = None
                ledger.seen.setdefault(rid, []).append(
                    Sighting(
                        logical,
                        route,
                        reason,
                        message.value(),
                        headers,
                        result,
                        int(message.partition() or 0),
                        int(message.offset() or 0),
                        int(message.timestamp()[1]),
                    )
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


# -- model calls ------------------------------------------------------------------------

MODEL_CALL = "model"
SETTLE_CALL = "settle"
_REASK_PREFIX = REASK_TEMPLATE.split("{", 1)[0]


def pipeline_call_kind(messages: Sequence[Any]) -> str:
    """Which stage made a call, from its messages: the settle stage's re-asks and
    self-check gradings, or the model stage's first call.

    Given to the fake server (``call_kind=``) so a crash's redone calls can be matched to
    the stage whose commit they were waiting for.
    """

    def content(message: Any) -> str:
        text = message.get("content") if isinstance(message, dict) else None
        return text if isinstance(text, str) else ""

    if messages and content(messages[0]).startswith(GRADER_SYSTEM[:40]):
        return SETTLE_CALL
    if messages and content(messages[-1]).startswith(_REASK_PREFIX):
        return SETTLE_CALL
    return MODEL_CALL


RequestCalls = Mapping[str, Mapping[str, CallTally]]


def calls_of(calls: RequestCalls, request_id: str, kind: str | None = None) -> int:
    """Calls started for one request (of one kind, or all kinds)."""
    kinds = calls.get(request_id, {})
    return sum(t.started for k, t in kinds.items() if kind is None or k == kind)


def redone_calls(
    faulty: RequestCalls, baseline: RequestCalls, requests: Iterable[str]
) -> dict[str, int]:
    """Request id -> calls paid beyond the fault-free run of the same request (> 0 only).

    The fake model's answers depend only on the request (seeded), so without faults each
    request costs the same calls every run; whatever a fault run paid on top was redone.
    """
    out: dict[str, int] = {}
    for rid in requests:
        extra = calls_of(faulty, rid) - calls_of(baseline, rid)
        if extra > 0:
            out[rid] = extra
    return out


def fewer_calls(faulty: RequestCalls, baseline: RequestCalls, requests: Iterable[str]) -> set[str]:
    """Requests that cost *fewer* calls than without faults: the baseline is not
    deterministic (or calls were skipped), so a redone-call count would be unsound."""
    return {rid for rid in requests if calls_of(faulty, rid) < calls_of(baseline, rid)}
